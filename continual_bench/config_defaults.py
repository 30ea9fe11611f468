"""The default run's configuration: the one source of the command line's defaults.

A run's configuration is ``config/config.yaml`` (the Snakefile's ``configfile``), overlaid by ``--configfile`` and
``--config``, with the defaults of ``workflow/schemas/config.schema.yaml`` filled in where it says nothing
(Snakemake's ``validate``). :func:`default_config` resolves it the same way with nothing overlaid, so an option of
``continual-bench`` that a rule fills from a config key (``pretrain-vae --steps`` from ``toy.vae_steps``) defaults to
what a default run passes (:func:`config_default`).
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

from .utils import UserError

REPO = Path(__file__).resolve().parent.parent
CONFIG_FILE = REPO / "config" / "config.yaml"
SCHEMA_FILE = REPO / "workflow" / "schemas" / "config.schema.yaml"


def fill_defaults(value: dict, schema: dict) -> dict:
    """Fill in ``schema``'s ``default`` of every property ``value`` lacks, recursively into objects (in place, as
    Snakemake's ``validate(config, schema)`` does); return ``value``."""
    for key, sub in schema.get("properties", {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if isinstance(value.get(key), dict):
            fill_defaults(value[key], sub)
    return value


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise UserError(f"{path}: unreadable ({e.strerror}); the command line takes its defaults from the "
                        "repository's config (run it from a checkout)") from None


@functools.lru_cache(maxsize=1)
def _default_config() -> dict:
    return fill_defaults(_read_yaml(CONFIG_FILE), _read_yaml(SCHEMA_FILE))


def default_config() -> dict:
    """config/config.yaml with the schema's defaults filled in (a copy)."""
    return copy.deepcopy(_default_config())


def config_default(key: str):
    """The default run's value of the dotted config ``key`` (``"toy.vae_steps"``); a KeyError names an unknown key."""
    value = _default_config()
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"config key {key!r}: not in {CONFIG_FILE.name} nor a schema default")
        value = value[part]
    return copy.deepcopy(value)
