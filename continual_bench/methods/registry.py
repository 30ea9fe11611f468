"""The method registry: ``@register(track, name)`` for built-ins, entry points for plugins.

A plugin package adds methods without touching this repository::

    # pyproject.toml of the plugin
    [project.entry-points."continual_bench.methods"]
    my_method = "my_package.my_module"      # importing the module runs its @register decorators

Names are unique within a track (``t2i`` or ``cls``); the same name may exist in both (``c_lora``).
"""
from __future__ import annotations

import importlib
import logging
import pkgutil
from importlib.metadata import entry_points

from ..utils import UserError

log = logging.getLogger(__name__)
TRACKS = ("t2i", "cls")
_REGISTRY: dict[tuple[str, str], type] = {}
_LOADED = False
FAILED_PLUGINS: dict[str, str] = {}  # entry-point name -> why it failed to load


def register(track: str, name: str):
    """Class decorator: make ``cls`` available as method ``name`` of ``track``."""
    if track not in TRACKS:
        raise ValueError(f"unknown track {track!r}; expected one of {TRACKS}")

    def deco(cls):
        key = (track, name)
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"method {name!r} is already registered for track {track!r} by {_REGISTRY[key]}")
        if not (cls.__doc__ or "").strip():
            raise ValueError(f"method {name!r}: a method's docstring must cite its paper and equation")
        cls.name, cls.track = name, track
        _REGISTRY[key] = cls
        return cls

    return deco


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import cls as cls_pkg, t2i as t2i_pkg

    for pkg in (t2i_pkg, cls_pkg):
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
    for ep in entry_points(group="continual_bench.methods"):
        try:
            ep.load()
        except (Exception, SystemExit) as e:  # a broken plugin (even one calling sys.exit) must not hide the others
            log.error("plugin %s (%s) failed to load: %s: %s", ep.name, ep.value, type(e).__name__, e)
            FAILED_PLUGINS[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"


def get_method(track: str, name: str) -> type:
    _load_all()
    try:
        return _REGISTRY[(track, name)]
    except KeyError:
        known = sorted(n for t, n in _REGISTRY if t == track)
        raise UserError(f"unknown method {name!r} for track {track!r}; known: {', '.join(known)}") from None


def list_methods() -> list[dict]:
    _load_all()
    return [{"track": t, "name": n, "paper": getattr(c, "paper", ""), "module": c.__module__,
             "uses_past_data": bool(getattr(c, "uses_past_data", False)),
             "stores_user_data": bool(getattr(c, "stores_user_data", False))}
            for (t, n), c in sorted(_REGISTRY.items())]
