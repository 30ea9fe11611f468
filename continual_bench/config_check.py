"""The workflow's configuration, checked as a whole when the Snakefile loads (before any job runs).

The schema (``workflow/schemas/config.schema.yaml``) checks names, types and the ranges of the workflow's own
keys. This module checks what the schema cannot know: method names against the registry (built-ins and
plugins), every method's settings against its ``Settings`` dataclass and the ranges declared there
(:func:`continual_bench.methods.base.setting`), and each sequence length against the benchmark's concept or
class count. Every problem is a one-line :class:`~continual_bench.utils.UserError` naming the key, the value
and what is allowed, so ``snakemake -n`` fails in seconds instead of a job failing hours later.
"""
from __future__ import annotations

import re
from pathlib import Path

from .utils import UserError

_INT = re.compile(r"[+-]?\d+")


def coerce_cli_ints(config: dict, keys=("n_tasks", "seeds", "cls_n_tasks", "cls_seeds")) -> None:
    """``--config 'seeds=[-1,2]'`` gives strings inside lists: make integers of the ones that are (signs included,
    so a negative seed is refused for being negative, not for being text)."""
    for key in keys:
        if isinstance(config.get(key), list):
            config[key] = [int(v) if isinstance(v, str) and _INT.fullmatch(v.strip()) else v for v in config[key]]


def _key(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "config"


def schema_error(config: dict, schema: dict) -> str | None:
    """The most relevant schema violation of ``config`` as one line (``key: message``), or None."""
    from jsonschema import validators
    from jsonschema.exceptions import best_match

    cls = validators.validator_for(schema)
    err = best_match(cls(schema).iter_errors(config))
    if err is None:
        return None
    message = " ".join(err.message.split())
    if len(message) > 300:
        message = message[:300] + "..."
    described = err.schema.get("description") if isinstance(err.schema, dict) else None
    hint = f" ({' '.join(str(described).split())})" if described and err.validator in ("pattern", "enum") else ""
    return f"{_key(err.absolute_path)}: {message}{hint}"


# ------------------------------------------------------------------------------------------- methods and settings
def _method(track: str, name, key: str):
    from .methods.registry import get_method

    try:
        return get_method(track, name)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None


def check_methods_and_settings(config: dict) -> None:
    """Method names against the registry; every method's settings (as the rules merge them) through build_settings."""
    from .data.benchmarks import BENCHMARKS
    from .methods.base import build_settings

    t2i = {m: _method("t2i", m, f"methods: {m!r}") for m in config.get("methods", [])}
    cls = {m: _method("cls", m, f"cls_methods: {m!r}") for m in config.get("cls_methods", [])}
    for name, settings in config.get("method_settings", {}).items():
        S = _method("t2i", name, f"method_settings.{name}").Settings
        build_settings(S, settings, f"method_settings.{name}")
    known = sorted(b.name for b in BENCHMARKS.values() if b.track == "t2i")
    for bench, extra in config.get("benchmark_settings", {}).items():
        if bench not in known:
            raise UserError(f"benchmark_settings.{bench}: not a text-to-image benchmark; known: {sorted(known)}")
        for name, method in t2i.items():  # benchmark_settings win over method_settings (common.smk)
            build_settings(method.Settings, {**config.get("method_settings", {}).get(name, {}), **extra},
                           f"benchmark_settings.{bench} (method {name})")
    cls_train = config.get("cls_train", {})
    for name, method in cls.items():
        build_settings(method.Settings, cls_train, f"cls_train (method {name})")
    for name, settings in config.get("cls_method_settings", {}).items():
        S = _method("cls", name, f"cls_method_settings.{name}").Settings
        build_settings(S, {**cls_train, **settings}, f"cls_method_settings.{name}")


# ------------------------------------------------------------------------------------------- sequence lengths
def _prepared_count(manifest: Path, what: str) -> int | None:
    """Concepts or classes of a prepared dataset folder, if it is there (else None: the job checks)."""
    if not manifest.is_file():
        return None
    try:
        if what == "classes":
            from .data.cls_data import ClsDataset

            return ClsDataset(manifest.parent).n_classes
        from .data.datasets import PreparedDataset

        return len(PreparedDataset(manifest.parent).concepts())
    except (UserError, OSError, ValueError, KeyError):
        return None


def concept_count(config: dict, benchmark: str, workdir: Path) -> tuple[int | None, str]:
    """Concepts of a text-to-image benchmark and where the number comes from."""
    if benchmark.startswith("toy_"):
        return int(config.get("toy", {}).get("n_concepts", 20)), "toy.n_concepts"
    manifest = workdir / "data" / "paper" / benchmark / "manifest.csv"
    return _prepared_count(manifest, "concepts"), str(manifest)


def class_count(config: dict, benchmark: str, workdir: Path) -> tuple[int | None, str]:
    if benchmark.startswith("toy_"):
        return int(config.get("toy_cls", {}).get("n_classes", 40)), "toy_cls.n_classes"
    manifest = workdir / "data" / "paper" / benchmark / "manifest.csv"
    n = _prepared_count(manifest, "classes")
    if n is None and benchmark == "imagenet_r":
        from .data.imagenet_r import N_CLASSES

        return N_CLASSES, "ImageNet-R"
    return n, str(manifest)


def check_n_tasks(config: dict, workdir: str | Path = ".") -> None:
    workdir = Path(workdir)
    if config.get("methods"):
        for bench in config.get("benchmarks", []):
            n, source = concept_count(config, bench, workdir)
            for t in config.get("n_tasks", []):
                if n is not None and t > n:
                    raise UserError(f"n_tasks: {t} is out of range for {bench}, which has {n} concepts ({source}); "
                                    f"allowed: 1..{n}")
    if config.get("cls_methods"):
        for bench in config.get("cls_benchmarks", []):
            n, source = class_count(config, bench, workdir)
            for t in config.get("cls_n_tasks", []):
                if n is not None and (t > n or n % t):
                    ok = [d for d in range(1, n + 1) if n % d == 0]
                    raise UserError(f"cls_n_tasks: {t} does not split {bench}'s {n} classes ({source}) into equal "
                                    f"tasks; allowed: {', '.join(map(str, ok))}")


def check_config(config: dict, workdir: str | Path = ".") -> None:
    """Everything above; the first problem raises a one-line UserError."""
    check_methods_and_settings(config)
    check_n_tasks(config, workdir)


def check_workflow_config(config: dict, schema_path: str | Path, workdir: str | Path = ".", *, validate,
                          plan: bool = True) -> None:
    """What the Snakefile runs on ``config`` when it loads, in this order, before any job: the ``--config`` strings
    made the integers and booleans they stand for, the schema (first problem as one line), the schema's defaults
    filled in by ``validate`` (the Snakefile passes ``snakemake.utils.validate``: the jobs' environment has no
    Snakemake, so this package never imports it), then (``plan``: the Snakemake that plans the DAG, not each job)
    :func:`check_config`. The first problem raises a one-line UserError; an ImportError from :func:`check_config`
    (Snakemake without the package's dependencies) is the caller's to report."""
    import yaml

    # `--config 'n_tasks=[5,10]'` gives strings inside lists: make them the integers the schema expects
    coerce_cli_ints(config)
    # ... and strings inside mappings: `--config 'paper={offline: true}'` gives offline="true"
    paper = config.get("paper")
    for key in ("offline", "allow_unpinned_models"):
        if isinstance(paper, dict) and isinstance(paper.get(key), str):
            paper[key] = {"true": True, "false": False}.get(paper[key].strip().lower(), paper[key])
    with open(schema_path) as f:
        problem = schema_error(config, yaml.safe_load(f))
    if problem:
        raise UserError(problem)
    validate(config, str(schema_path))  # fills in the defaults
    if plan:
        check_config(config, workdir)
