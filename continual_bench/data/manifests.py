"""Dataset manifests (``data_manifests/<name>.yaml``): where the files of a real dataset come from.

A manifest names the dataset, its terms of use, the files to fetch and the rule that selects the
benchmark's concepts. It is meant to be audited by a reader, so it is validated strictly: an unknown or
repeated key, a malformed checksum or a path leaving the output directory stops with a UserError naming
the file and the key. Layout::

    name: imagenet_r                 # = the file's stem
    title: ...                       # one line
    homepage: https://...
    license: ...                     # terms of use, prose
    citation: ...                    # optional
    notes: ...                       # optional prose
    files:                           # fetched in this order
      - path: imagenet-r.tar         # relative to the output directory
        url: https://...             # required unless manual (then: where the user gets it)
        md5: <32 hex> | null         # published checksums; with neither, the first download is locked
        sha256: <64 hex> | null
        sha256_prefix: <hex>         # optional: leading digits only (torch hub names files after them)
        size: <bytes> | null
        manual: false                # true: the user downloads it by hand into a manual directory
        instructions: ...            # required when manual: how to get the file
        extract: <dir>               # optional: extract the archive to this directory (relative)
        provides: [<path>, ...]      # optional: paths inside <dir> that must exist after extraction
        note: ...                    # optional prose
    selection:
      rule: ...                      # prose: which images/classes/concepts a benchmark uses
      params: {...}                  # values for the preparation step, which validates them itself

:mod:`continual_bench.data.fetch` (``fetch_manifest``) fetches a loaded manifest. The toy world's
``toy.yaml`` describes generated data and has another layout; it is not loaded here.

``data_manifests/models.yaml`` lists the paper profile's pretrained models (:func:`load_models`): per
model the same keys minus ``selection``, plus ``revision`` (the Hugging Face commit, or a release tag for
other hosts), ``format`` (how the fetched files become a local resource, see
:mod:`continual_bench.data.model_resources`) and, for a model on the Hugging Face Hub, ``repo_id``: its files
are then fetched with ``huggingface_hub`` at ``revision``, and every file's ``url`` must be
``https://huggingface.co/<repo_id>/resolve/<revision>/<path>`` (it documents the file; the hub client builds
its own request from repo_id, revision and path).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from ..utils import UserError

MANIFEST_DIR = Path(__file__).resolve().parents[2] / "data_manifests"

_TOP_KEYS = {"name": True, "title": True, "homepage": True, "license": True, "citation": False,
             "notes": False, "files": True, "selection": True}  # key -> required
_FILE_KEYS = {"path", "url", "md5", "sha256", "sha256_prefix", "size", "manual", "instructions", "extract", "provides",
              "note"}
_SELECTION_KEYS = {"rule", "params"}
_HEX = {"md5": 32, "sha256": 64}


@dataclass(frozen=True)
class FileEntry:
    """One file of a manifest (see the module docstring for the meaning of each field)."""

    path: str
    url: str = ""
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None
    manual: bool = False
    sha256_prefix: str | None = None
    instructions: str = ""
    extract: str | None = None
    provides: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Manifest:
    name: str
    title: str
    homepage: str
    license: str
    files: tuple[FileEntry, ...]
    selection_rule: str
    selection_params: dict[str, Any] = field(default_factory=dict)
    citation: str = ""
    notes: str = ""
    source: Path | None = None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key '{key}' given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _text(where: str, key: str, value: Any, *, required: bool) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value.strip()


def _url(where: str, key: str, value: Any) -> str:
    url = _text(where, key, value, required=True)
    if not re.fullmatch(r"https?://\S+", url):
        raise UserError(f"{where}: '{key}' must be an http(s) URL, got {url!r}")
    return url


def _relpath(where: str, key: str, value: Any) -> str:
    """A relative POSIX path that stays inside the output directory."""
    text = _text(where, key, value, required=True)
    path = PurePosixPath(text)
    if path.is_absolute() or ".." in path.parts or "\\" in text or not path.parts:
        raise UserError(f"{where}: '{key}' must be a relative path inside the output directory, got {text!r}")
    return str(path)


def _file_entry(where: str, raw: Any) -> FileEntry:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping with path, url, checksums, got {raw!r}")
    if "path" in raw and isinstance(raw["path"], str):
        where = f"{where} ({raw['path']})"
    unknown = sorted(set(raw) - _FILE_KEYS, key=str)
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(_FILE_KEYS))})")
    if "path" not in raw:
        raise UserError(f"{where}: missing key 'path'")
    sums: dict[str, str | None] = {}
    for algo, length in _HEX.items():
        value = raw.get(algo)
        if value is not None and not (isinstance(value, str) and re.fullmatch(f"[0-9a-fA-F]{{{length}}}", value)):
            raise UserError(f"{where}: '{algo}' must be {length} hex digits or null, got {value!r}")
        sums[algo] = value.lower() if value else None
    prefix = raw.get("sha256_prefix")
    if prefix is not None and not (isinstance(prefix, str) and re.fullmatch("[0-9a-fA-F]{4,64}", prefix)):
        raise UserError(f"{where}: 'sha256_prefix' must be 4 to 64 hex digits or null, got {prefix!r}")
    size = raw.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise UserError(f"{where}: 'size' must be a positive number of bytes or null, got {size!r}")
    manual = raw.get("manual", False)
    if not isinstance(manual, bool):
        raise UserError(f"{where}: 'manual' must be true or false, got {manual!r}")
    if manual:
        instructions = _text(where, "instructions", raw.get("instructions"), required=True)
        url = _url(where, "url", raw["url"]) if raw.get("url") is not None else ""
    else:
        if "instructions" in raw:
            raise UserError(f"{where}: 'instructions' is only for manual files (manual: true)")
        instructions = ""
        if "url" not in raw:
            raise UserError(f"{where}: missing key 'url' (or set manual: true with instructions)")
        url = _url(where, "url", raw["url"])
    extract = _relpath(where, "extract", raw["extract"]) if raw.get("extract") is not None else None
    provides = raw.get("provides") or []
    if not isinstance(provides, list):
        raise UserError(f"{where}: 'provides' must be a list of paths, got {provides!r}")
    if provides and extract is None:
        raise UserError(f"{where}: 'provides' lists paths inside an extracted archive: set 'extract' too")
    return FileEntry(path=_relpath(where, "path", raw["path"]), url=url, md5=sums["md5"], sha256=sums["sha256"],
                     size=size, manual=manual, instructions=instructions, extract=extract,
                     sha256_prefix=prefix.lower() if prefix else None,
                     provides=tuple(_relpath(where, "provides", p) for p in provides),
                     note=_text(where, "note", raw.get("note"), required=False))


def parse_manifest(raw: Any, source: str | Path) -> Manifest:
    """Validate an already-parsed manifest (``source`` names it in messages; its stem must equal ``name``)."""
    where = str(source)
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    _check_keys(where, raw, _TOP_KEYS)
    name = _text(where, "name", raw["name"], required=True)
    if name != Path(where).stem:
        raise UserError(f"{where}: 'name' is {name!r} but the file is named {Path(where).name}")
    files_raw = raw["files"]
    if not isinstance(files_raw, list) or not files_raw:
        raise UserError(f"{where}: 'files' must be a non-empty list")
    files = tuple(_file_entry(f"{where}: files[{i}]", f) for i, f in enumerate(files_raw))
    seen: set[str] = set()
    for p in [p for f in files for p in (f.path, f.extract) if p is not None]:
        if p in seen:
            raise UserError(f"{where}: path '{p}' appears twice in 'files' (as a path or an extract directory)")
        seen.add(p)
    selection = raw["selection"]
    if not isinstance(selection, dict):
        raise UserError(f"{where}: 'selection' must be a mapping with 'rule' and optional 'params'")
    unknown = sorted(set(selection) - _SELECTION_KEYS, key=str)
    if unknown:
        raise UserError(f"{where}: selection: unknown key '{unknown[0]}' (allowed: params, rule)")
    params = selection.get("params") or {}
    if not isinstance(params, dict):
        raise UserError(f"{where}: selection: 'params' must be a mapping, got {params!r}")
    return Manifest(name=name, title=_text(where, "title", raw["title"], required=True),
                    homepage=_url(where, "homepage", raw["homepage"]),
                    license=_text(where, "license", raw["license"], required=True), files=files,
                    selection_rule=_text(where, "selection: rule", selection.get("rule"), required=True),
                    selection_params=params, citation=_text(where, "citation", raw.get("citation"), required=False),
                    notes=_text(where, "notes", raw.get("notes"), required=False), source=Path(source))


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file; a bare name (``imagenet_r``) is looked up in ``data_manifests/``."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml") and path.parent == Path("."):
        path = MANIFEST_DIR / f"{path}.yaml"
    if not path.is_file():
        raise UserError(f"{path}: manifest not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    return parse_manifest(raw, path)


# ------------------------------------------------------------------------------------------- models
MODELS_FILE = MANIFEST_DIR / "models.yaml"
MODEL_FORMATS = ("diffusers", "open_clip_openai", "inception_weights", "timm")
_MODEL_KEYS = {"title": True, "homepage": True, "license": True, "revision": True, "format": True, "files": True,
               "citation": False, "notes": False, "repo_id": False}
HF_URL = "https://huggingface.co/"


def _check_keys(at: str, raw: dict, spec: dict[str, bool]) -> None:
    """Unknown keys and missing required keys (``spec``: key -> required) are one-line errors naming them."""
    unknown = sorted(set(raw) - set(spec), key=str)
    if unknown:
        raise UserError(f"{at}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(spec))})")
    missing = [k for k, required in spec.items() if required and k not in raw]
    if missing:
        raise UserError(f"{at}: missing key '{missing[0]}'")



@dataclass(frozen=True)
class ModelSpec:
    """One pretrained model of ``models.yaml``: its files (fetched like a dataset manifest) and their format."""

    name: str
    title: str
    homepage: str
    license: str
    revision: str
    format: str
    files: tuple[FileEntry, ...]
    citation: str = ""
    notes: str = ""
    source: Path | None = None
    repo_id: str = ""  # a Hugging Face Hub repository: fetched with huggingface_hub at ``revision``

    def as_manifest(self) -> Manifest:
        """The same files as a dataset :class:`Manifest`, so that ``fetch_manifest`` fetches them."""
        return Manifest(name=self.name, title=self.title, homepage=self.homepage, license=self.license,
                        files=self.files, selection_rule="(a model: nothing is selected)", source=self.source)


def parse_models(raw: Any, source: str | Path) -> dict[str, ModelSpec]:
    where = str(source)
    if not isinstance(raw, dict) or set(raw) != {"models"} or not isinstance(raw["models"], dict) or not raw["models"]:
        raise UserError(f"{where}: expected one top-level key 'models' mapping model names to their entries")
    out = {}
    for name, entry in raw["models"].items():
        at = f"{where}: models.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_]+", name):
            raise UserError(f"{at}: model names are lower-case letters, digits and '_'")
        if not isinstance(entry, dict):
            raise UserError(f"{at}: expected a mapping")
        _check_keys(at, entry, _MODEL_KEYS)
        fmt = entry["format"]
        if fmt not in MODEL_FORMATS:
            raise UserError(f"{at}: format must be one of {', '.join(MODEL_FORMATS)}, got {fmt!r}")
        revision = _text(at, "revision", entry["revision"], required=True)
        if not isinstance(entry["files"], list) or not entry["files"]:
            raise UserError(f"{at}: 'files' must be a non-empty list")
        files = tuple(_file_entry(f"{at}: files[{i}]", f) for i, f in enumerate(entry["files"]))
        if len({f.path for f in files}) != len(files):
            raise UserError(f"{at}: a path appears twice in 'files'")
        repo_id = _text(at, "repo_id", entry.get("repo_id"), required=False)
        if repo_id and not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise UserError(f"{at}: 'repo_id' must be <owner>/<name>, got {repo_id!r}")
        for f in files:
            if f.url.startswith(HF_URL) and not repo_id:
                raise UserError(f"{at}: {f.path} is on the Hugging Face Hub: set 'repo_id' "
                                "(fetched with huggingface_hub)")
            if repo_id and f.url != f"{HF_URL}{repo_id}/resolve/{revision}/{f.path}":
                raise UserError(f"{at}: {f.path}: URL {f.url} is not {HF_URL}{repo_id}/resolve/{revision}/{f.path} "
                                f"(repo_id, revision and path)")
        out[name] = ModelSpec(name=name, title=_text(at, "title", entry["title"], required=True),
                              homepage=_url(at, "homepage", entry["homepage"]),
                              license=_text(at, "license", entry["license"], required=True), revision=revision,
                              format=fmt, files=files, citation=_text(at, "citation", entry.get("citation"), required=False),
                              notes=_text(at, "notes", entry.get("notes"), required=False), source=Path(source),
                              repo_id=repo_id)
    return out


def load_models(path: str | Path | None = None) -> dict[str, ModelSpec]:
    """Read and validate ``models.yaml`` (default: the one in ``data_manifests/``)."""
    path = Path(path) if path is not None else MODELS_FILE
    if not path.is_file():
        raise UserError(f"{path}: models manifest not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    return parse_models(raw, path)
