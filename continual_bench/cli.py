"""``continual-bench``: the command line of the benchmark suite.

User commands (``methods``, ``tables``, ``compare`` ...) and the workflow's steps, which the Snakemake rules
(``workflow/rules/*.smk``) run one per job (``train``, ``generate``, ``evaluate``, the toy world's and the paper
profile's preparation). Every command is a ``cmd_*`` function registered where it is defined, by the
:func:`command` decorator above it: its name, its group in ``--help``, its help line and its options. An option
a rule fills from the configuration names that key (``config="toy.vae_steps"``) and defaults to the default run's
value of it (:mod:`continual_bench.config_defaults`), so a command run by hand without it does what the default
run's job does. The functions take the parsed options and call into the package (importing it only then: ``--help``
stays fast).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from typing import Callable

from . import __version__
from .utils import UserError, setup_logging

log = logging.getLogger("continual_bench")
USER, STEPS = "user commands", "workflow steps (the Snakemake rules in workflow/rules/ run one per job)"
GROUPS = {  # heading of each group of commands in `continual-bench --help`, in order; all but "user" are STEPS
    "user": USER,
    "toy": "the toy world's data and backbones",
    "t2i": "text-to-image runs",
    "cls": "classification runs",
    "paper": "the paper profile's real data and models",
}


# ------------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Option:
    """One option of a command: argparse's ``add_argument`` arguments, and the config key its default comes from."""

    flags: tuple[str, ...]
    kwargs: dict
    config: str | None = None


def opt(*flags: str, config: str | None = None, **kwargs) -> Option:
    """An option (``add_argument``'s arguments); with ``config`` (a dotted key) its default is the default run's value
    of that key, whatever ``default`` says."""
    return Option(flags, kwargs, config)


@dataclass(frozen=True)
class Command:
    name: str
    func: Callable
    help: str
    group: str
    options: tuple[Option, ...] = ()
    gpu: bool = False  # its rule declares resources: gpu=1; the command takes a free GPU first (gpu_slots.py)


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, *options: Option, group: str, gpu: bool = False):
    """Register the decorated function as command ``name`` of ``group`` (a key of GROUPS) with ``options``."""
    if group not in GROUPS:
        raise ValueError(f"command {name!r}: unknown group {group!r}; known: {list(GROUPS)}")

    def deco(func):
        if name in COMMANDS:
            raise ValueError(f"command {name!r} is registered twice ({COMMANDS[name].func.__name__}, {func.__name__})")
        COMMANDS[name] = Command(name, func, help, group, tuple(options), gpu)
        return func

    return deco


def _json_arg(text: str, option: str = "--settings") -> dict:
    try:
        val = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise UserError(f"{option}: not valid JSON ({e.msg}): {text!r}") from None
    if val is None:
        return {}
    if not isinstance(val, dict):
        raise UserError(f"{option}: expected a JSON object, got {text!r}")
    return val


# options several commands share
def _out(help: str) -> Option:
    return opt("--out", required=True, help=help)


DATA = opt("--data", required=True, help="prepared dataset folder (manifest.csv)")
DATA_DIRS = opt("--data", nargs="+", required=True, help="prepared dataset folders (manifest.csv), one or more")
SEED0 = opt("--seed", type=int, default=0, help="random seed")
DEVICE = opt("--device", config="device", help="torch device: auto (cuda if available), cpu, cuda, cuda:N")
SETTINGS = opt("--settings", default="{}", help="method settings as a JSON object (config method_settings.<method>)")
RUN_ID = (opt("--benchmark", required=True, help="benchmark name (data/toy/<name> or data/paper/<name>)"),
          opt("--method", required=True, help="registered method name (continual-bench methods)"),
          opt("--n-tasks", type=int, required=True, help="tasks in the sequence"),
          opt("--seed", type=int, required=True, help="run seed (draws the concept sequence and the initialisation)"))
RUN = (opt("--backbone", required=True, help="pipeline folder (save_pretrained layout)"), DATA, *RUN_ID, SETTINGS,
       opt("--ckpt-dir", required=True, help="checkpoint folder of the run (one sub-folder per task; resumable)"),
       DEVICE)
DATA_SEED = opt("--data-seed", type=int, config="paper.data_seed", help="seed that draws the concept pool")
SELECTION = opt("--settings", default="{}", help="JSON object overriding the manifest's selection params "
                                                 "(config paper.<dataset>)")
OFFLINE = (opt("--offline", action="store_true", config="paper.offline",
               help="download nothing; verify the files present and name the missing"),
           opt("--base-url", config="paper.base_url", help="fetch from a mirror laid out as <base-url>/<host>/<path>"))


def _manifest(name: str) -> Option:
    return opt("--manifest", default=name, help="manifest name (data_manifests/<name>.yaml) or YAML file")


# ------------------------------------------------------------------------------------------- user commands
@command("methods", "list the registered methods, or one method's settings (--settings NAME)",
         opt("--json", action="store_true", help="print JSON instead of a table"),
         opt("--settings", metavar="NAME", help="print method NAME's settings: type, default, valid range and help"),
         opt("--track", choices=["t2i", "cls"], help="with --settings: only this track's method of that name"),
         group="user")
def cmd_methods(a):
    from .methods import list_methods

    if a.settings:
        return _print_settings(a.settings, a.track, a.json)
    rows = list_methods()
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    for r in rows:
        flags = "".join(f" [{f}]" for f, on in (("stores user data", r["stores_user_data"]),
                                                 ("uses past data", r["uses_past_data"])) if on)
        print(f"{r['track']:4s}  {r['name']:40s} {r['paper']}{flags}")


def settings_rows(method) -> list[dict]:
    """One row per field of ``method.Settings``: name, type, default, valid range (in words) and help."""
    import dataclasses

    from .methods.base import allowed, setting_meta

    rows = []
    for f in dataclasses.fields(method.Settings):
        meta = setting_meta(method.Settings, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rng = "true or false" if kind == "bool" and not meta.keys() - {"help"} else allowed(meta, f.name)
        rows.append({"name": f.name, "type": kind, "default": default, "range": rng, "help": meta.get("help", "")})
    return rows


def _print_settings(name: str, track: str | None, as_json: bool) -> None:
    from .methods.registry import TRACKS, get_method, list_methods

    rows = list_methods()
    tracks = [track] if track else [t for t in TRACKS if any(r["name"] == name and r["track"] == t for r in rows)]
    if not tracks:
        known = "; ".join(f"{t}: {', '.join(r['name'] for r in rows if r['track'] == t)}" for t in TRACKS)
        raise UserError(f"methods --settings: unknown method {name!r}; known: {known}")
    methods = [get_method(t, name) for t in tracks]  # with --track: get_method names that track's methods
    if as_json:
        print(json.dumps([{"track": m.track, "name": m.name, "settings": settings_rows(m)} for m in methods],
                         indent=1, default=str))
        return
    for i, m in enumerate(methods):
        rows = settings_rows(m)
        cols = ("name", "type", "default", "range", "help")
        width = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols[:-1]}
        print(("\n" if i else "") + f"{m.track} {m.name}: {getattr(m, 'paper', '')}".rstrip(": "))
        print("  " + "  ".join(c.ljust(width.get(c, 0)) for c in cols).rstrip())
        for r in rows:
            print("  " + "  ".join(str(r[c]).ljust(width.get(c, 0)) for c in cols).rstrip())


@command("tables", "summary.csv, tables and figures of a result folder from its metric files",
         opt("run_dir", help="the result folder (results/<run_name>)"),
         opt("--metrics", nargs="*", help="the expected runs' metric files (default: run_dir/runs/**/metrics.csv, and "
                                          "the runs run_dir/config.yaml asks for must be among them)"),
         opt("--allow-missing", action="store_true",
             help="build partial tables when expected runs have no metrics file (a warning names them; n_seeds says "
                  "how many seeds each cell has); without it that is an error"),
         opt("--noise-floor", nargs="*", help="per-benchmark noise-floor files (default: run_dir/noise_floor/*.csv)"),
         group="user")
def cmd_tables(a):
    from .reporting.report import build_report

    build_report(a.run_dir, a.metrics, noise_floor_paths=a.noise_floor, allow_missing=a.allow_missing)


@command("compare", "did RUN_DIR reproduce REF_DIR? a verdict per summary.csv cell (seed stds, noise floors); "
                    "exit status 1 if any differs",
         opt("run_dir", help="the result folder to check (e.g. a fresh clone's results/toy)"),
         opt("ref_dir", help="the reference result folder (e.g. the committed results/toy)"),
         opt("--out", help="also write every cell as CSV here (default: print only)"),
         group="user")
def cmd_compare(a) -> int:
    from .reporting.compare import compare_runs, format_comparison, weights_note
    from .utils import atomic_write_text

    df = compare_runs(a.run_dir, a.ref_dir)
    print(weights_note(a.run_dir, a.ref_dir))
    print(format_comparison(df))
    if a.out:
        atomic_write_text(a.out, df.to_csv(index=False, float_format="%.6g"))
    return 1 if df.verdict.isin(["differs", "missing"]).any() else 0


@command("profile", "where a DAG run's time went: its jobs' wall and CPU time and peak memory (Snakemake's "
                    "benchmark files) per step and per method, and the fastest any schedule could be",
         opt("run_dir", help="the result folder (results/<run_name>)"),
         opt("--shared", nargs="*", default=["logs/toy", "logs/paper"],
             help="folders of the benchmark files of the shared models and data (default: logs/toy logs/paper)"),
         opt("--cores", type=int, default=2, help="cores (or GPUs) the bound is computed for (default: 2)"),
         opt("--elapsed", type=float, help="the run's elapsed seconds (Snakemake prints them): adds its efficiency"),
         opt("--out", help="also write every job as CSV here"),
         group="user")
def cmd_profile(a):
    from .reporting.profile import benchmark_files, format_profile, profile, read_benchmarks
    from .utils import atomic_write_text

    jobs = read_benchmarks(benchmark_files(a.run_dir, a.shared), a.run_dir)
    print(format_profile(profile(jobs, a.cores), a.elapsed))
    if a.out:
        atomic_write_text(a.out, jobs.to_csv(index=False, float_format="%.6g"))


@command("bench", "time our training and sampling paths beside the field's reference recipes "
                  "(results/bench/<host>.csv; random weights, nothing downloaded)",
         opt("--out", help="CSV to write (default: results/bench/<host>.csv)"),
         opt("--host", help="name of this machine in the file name and rows (default: the host name)"),
         opt("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda, cuda:N"),
         opt("--cases", nargs="+", default=["t2i_train", "t2i_sample", "cls_train", "cls_eval"],
             help="which comparisons (t2i_train, t2i_sample, cls_train, cls_eval)"),
         opt("--t2i-arch", default="sd15", choices=["sd15", "toy"], help="Stable Diffusion v1.x or the toy pipeline"),
         opt("--cls-arch", default="vitb16", choices=["vitb16", "toy"], help="ViT-B/16 or the toy ViT"),
         opt("--resolution", type=int, default=0, help="t2i pixels (0: 512 on a GPU, 64 on a CPU; toy: 32)"),
         opt("--steps", type=int, default=4, help="timed training steps after the warm-up step"),
         opt("--batch", type=int, default=2, help="t2i training batch (the paper profile's 2)"),
         opt("--rank", type=int, default=16, help="LoRA rank, both ways (the paper profile's 16)"),
         opt("--sample-steps", type=int, default=0, help="sampling steps (0: 200 on a GPU, 2 on a CPU)"),
         opt("--n-images", type=int, default=4, help="images generated each way"),
         opt("--cls-batch", type=int, default=0, help="classification batch (0: 128 on a GPU, 4 on a CPU)"),
         opt("--cost-config", help="also write the cost table of this run configuration (config/paper.yaml) as "
                                   "Markdown next to the CSV (<out>.costs.md)"),
         opt("--methods", nargs="+", default=[],
             help="also time these text-to-image methods through the engine (their step, sampling inside training, "
                  "checkpoint bytes) with their settings in --cost-config; 'config': every method of --cost-config"),
         opt("--cls-methods", nargs="+", default=[],
             help="also time these classification methods the way the engine trains them (their step, passes over "
                  "the images, evaluation, kept state) with their settings in --cost-config; 'config': every "
                  "cls method of --cost-config"),
         opt("--method-tasks", type=int, default=3, help="tasks each method trains (--methods, --cls-methods)"),
         group="user", gpu=True)
def cmd_bench(a):
    import socket
    from pathlib import Path

    import yaml

    from .bench import BenchOptions, bench, cls_settings, cost_markdown
    from .utils import atomic_write_text

    if a.cost_config and not Path(a.cost_config).is_file():
        raise UserError(f"bench --cost-config {a.cost_config}: no such file")
    host = a.host or socket.gethostname().split(".")[0]
    out = Path(a.out or f"results/bench/{host}.csv")
    cfg = yaml.safe_load(Path(a.cost_config).read_text()) if a.cost_config else {}
    names = list(cfg.get("methods", [])) if a.methods == ["config"] else a.methods
    if a.methods == ["config"] and not names:
        raise UserError("bench --methods config: give --cost-config with a methods list")
    cls_names = list(cfg.get("cls_methods", [])) if a.cls_methods == ["config"] else a.cls_methods
    if a.cls_methods == ["config"] and not cls_names:
        raise UserError("bench --cls-methods config: give --cost-config with a cls_methods list")
    if a.method_tasks < 1:
        raise UserError(f"bench --method-tasks {a.method_tasks}: at least 1")
    o = BenchOptions(device=a.device, t2i_arch=a.t2i_arch, cls_arch=a.cls_arch, resolution=a.resolution,
                     steps=a.steps, batch=a.batch, rank=a.rank, sample_steps=a.sample_steps, n_images=a.n_images,
                     cls_batch=a.cls_batch, method_tasks=a.method_tasks)
    settings = cfg.get("method_settings") or {}
    df = bench(o, a.cases, host, out, methods={m: settings.get(m, {}) for m in names},
               cls_methods={m: cls_settings(cfg, m) for m in cls_names})
    cols = ["case", "way", "arch", "dtype", "rate", "unit", "ratio", "peak_memory_gb", "mfu"] + \
        (["method"] if "method" in df else [])
    print(df[cols].to_string(index=False))
    if a.cost_config:
        atomic_write_text(out.with_suffix(".costs.md"), cost_markdown(df, cfg))


@command("prepare-imagenet-r", "link ImageNet-R extracted by hand + CODA-P's split files into a dataset folder",
         opt("--images", required=True, help="folder holding imagenet-r/<wnid>/<file>.jpg"),
         opt("--splits", required=True, help="folder holding imagenet-r_train.yaml and imagenet-r_test.yaml"),
         _out("the prepared dataset folder"),
         opt("--mode", choices=["symlink", "hardlink", "copy"], default="symlink", help="how images are placed"),
         group="user")
def cmd_prepare_imagenet_r(a):
    from .data.imagenet_r import prepare_imagenet_r

    prepare_imagenet_r(a.images, a.splits, a.out, mode=a.mode)


# ------------------------------------------------------------------------------------------- the toy world
@command("make-toy-data", "generate a toy text-to-image world (concepts + generic images)",
         opt("--world", required=True, choices=["toy_faces", "toy_landmarks"], help="which toy world"),
         _out("the dataset folder"),
         opt("--seed", type=int, config="toy.data_seed", help="seed of the world"),
         opt("--n-concepts", type=int, config="toy.n_concepts", help="concept pool"),
         opt("--n-train", type=int, config="toy.n_train", help="training images per concept"),
         opt("--n-eval", type=int, config="toy.n_eval", help="held-out real images per concept"),
         opt("--n-generic", type=int, config="toy.n_generic", help="base-pretraining images"),
         opt("--n-generic-ids", type=int, config="toy.n_generic_ids", help="distinct identities among them"),
         group="toy")
def cmd_make_toy_data(a):
    from .data.toy import write_world

    write_world(a.world, a.out, seed=a.seed, n_concepts=a.n_concepts, n_train=a.n_train, n_eval=a.n_eval,
                n_generic=a.n_generic, n_generic_ids=a.n_generic_ids)


@command("write-tokenizer", "write OpenAI CLIP's BPE tokenizer from open_clip's vocabulary",
         _out("tokenizer folder"),
         opt("--max-length", type=int, default=77, help="model_max_length (the toy rule: 32)"),
         group="toy")
def cmd_write_tokenizer(a):
    from .backbones.t2i import write_clip_tokenizer

    write_clip_tokenizer(a.out, model_max_length=a.max_length)


def _pretrain(steps_key: str, batch: Option, *extra: Option) -> tuple[Option, ...]:
    return (DATA_DIRS, _out("model folder (save_pretrained layout)"),
            opt("--steps", type=int, config=steps_key, help="optimizer steps"), batch, SEED0, *extra)


def _batch(default: int | None = None, config: str | None = None) -> Option:
    return opt("--batch-size", type=int, default=default, config=config, help="images per step")


@command("pretrain-vae", "pretrain the toy VAE on toy worlds' images",
         *_pretrain("toy.vae_steps", _batch(16),
                    opt("--latent-size", type=int, choices=(8, 16), config="toy.latent_size",
                        help="latent grid of the 32x32 images (8: three encoder levels, 16: two)")),
         group="toy")
def cmd_pretrain_vae(a):
    from .backbones.t2i import ToyT2IConfig
    from .backbones.toy_pretrain import pretrain_vae

    pretrain_vae(a.data, a.out, steps=a.steps, batch_size=a.batch_size, seed=a.seed,
                 cfg=ToyT2IConfig.for_latent_size(a.latent_size))


TOKENIZER = opt("--tokenizer", required=True, help="tokenizer folder (write-tokenizer)")


@command("pretrain-text-encoder", "pretrain the toy CLIP text encoder on toy worlds' captions",
         *_pretrain("toy.text_encoder_steps", _batch(128), TOKENIZER), group="toy")
def cmd_pretrain_text_encoder(a):
    from .backbones.toy_pretrain import pretrain_text_encoder

    pretrain_text_encoder(a.data, a.tokenizer, a.out, steps=a.steps, batch_size=a.batch_size, seed=a.seed)


@command("pretrain-t2i", "pretrain the toy UNet into a StableDiffusionPipeline folder",
         *_pretrain("toy.t2i_steps", _batch(config="toy.t2i_batch_size"), TOKENIZER,
                    opt("--vae", required=True, help="VAE folder (pretrain-vae)"),
                    opt("--text-encoder", required=True, help="text encoder folder (pretrain-text-encoder)"),
                    opt("--lr", type=float, default=2e-3, help="learning rate")),
         group="toy")
def cmd_pretrain_t2i(a):
    from .backbones.toy_pretrain import pretrain_t2i

    pretrain_t2i(a.data, a.vae, a.tokenizer, a.text_encoder, a.out, steps=a.steps, batch_size=a.batch_size,
                 lr=a.lr, seed=a.seed)


@command("train-judge", "train the toy world's judge (a tiny open_clip CLIP: KID and CLIP features)",
         *_pretrain("toy.judge_steps", _batch(128)), group="toy")
def cmd_train_judge(a):
    from .evaluation.judge import train_toy_judge

    train_toy_judge(a.data, a.out, steps=a.steps, batch_size=a.batch_size, seed=a.seed)


@command("train-oracle", "train a toy world's oracle classifier (it knows the concepts)",
         DATA, _out("oracle folder"), opt("--epochs", type=int, config="toy.oracle_epochs", help="training epochs"),
         SEED0, group="toy")
def cmd_train_oracle(a):
    from .evaluation.oracle import train_oracle

    train_oracle(a.data, a.out, epochs=a.epochs, seed=a.seed)


@command("make-toy-imagenet-r", "generate the toy_imagenet_r classification world",
         _out("the dataset folder"),
         opt("--seed", type=int, config="toy_cls.data_seed", help="seed of the world"),
         opt("--n-classes", type=int, config="toy_cls.n_classes", help="classes (10 shapes x 4 inner marks at most)"),
         opt("--n-train", type=int, config="toy_cls.n_train", help="training images per class and rendition"),
         opt("--n-test", type=int, config="toy_cls.n_test", help="test images per class and rendition"),
         opt("--n-pretrain", type=int, config="toy_cls.n_pretrain", help="photo images per class for the backbone"),
         group="toy")
def cmd_make_toy_imagenet_r(a):
    from .data.toy_imagenet_r import write_toy_imagenet_r

    write_toy_imagenet_r(a.out, seed=a.seed, n_classes=a.n_classes, n_train=a.n_train, n_test=a.n_test,
                         n_pretrain=a.n_pretrain)


@command("pretrain-vit", "pretrain the toy ViT on a toy classification world's photo rendition",
         DATA, _out("ViT folder"),
         opt("--steps", type=int, config="toy_cls.vit_steps", help="optimizer steps"),
         opt("--batch-size", type=int, config="toy_cls.vit_batch_size", help="images per step"),
         opt("--lr", type=float, config="toy_cls.vit_lr", help="learning rate"),
         opt("--patch-size", type=int, config="toy_cls.vit_patch_size", help="patch size in pixels"),
         opt("--embed-dim", type=int, config="toy_cls.vit_embed_dim", help="token width"),
         opt("--depth", type=int, config="toy_cls.vit_depth", help="transformer blocks"),
         opt("--heads", type=int, config="toy_cls.vit_heads", help="attention heads"),
         SEED0, group="toy")
def cmd_pretrain_vit(a):
    from .backbones.vit import ToyViTConfig, pretrain_toy_vit

    cfg = ToyViTConfig(patch_size=a.patch_size, embed_dim=a.embed_dim, depth=a.depth, num_heads=a.heads)
    pretrain_toy_vit(a.data, a.out, cfg=cfg, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed)


# ------------------------------------------------------------------------------------------- text-to-image runs
def _spec(a):
    from .data.benchmarks import get_benchmark
    from .engine.t2i import RunSpec

    return RunSpec(backbone=a.backbone, data_dir=a.data, method=a.method, n_tasks=a.n_tasks, seed=a.seed,
                   settings=_json_arg(a.settings), class_word=get_benchmark(a.benchmark).class_word,
                   device=a.device)


@command("train", "train one continual run (all tasks; resumes at the first task without a checkpoint)",
         *RUN, _out("train.json, written when every task is done"),
         opt("--reuse-states-from", action="append", default=[], metavar="RESULTS",
             help="a results folder whose runs of this method, seed and benchmark at other lengths lend the states "
                  "of the tasks they share with this run, checked by fingerprint (repeatable; the workflow passes "
                  "the run's own results folder and config reuse_states_from)"),
         group="t2i", gpu=True)
def cmd_train(a):
    from pathlib import Path

    from .engine.t2i import train_sequence, write_train_summary

    spec = _spec(a)
    metas = train_sequence(spec, a.ckpt_dir, reuse=[
        run_json.parent for root in a.reuse_states_from for run_json in
        sorted(Path(root, "runs", a.benchmark).glob(f"T*/{a.method}/seed{a.seed}/checkpoints/*/run.json"))])
    write_train_summary(spec, metas, a.out)


@command("generate", "sample a trained run's concepts after each task (samples.npz)",
         *RUN, _out("samples.npz"),
         opt("--n-samples", type=int, config="evaluation.n_samples", help="images per concept and task"),
         opt("--sample-steps", type=int, config="evaluation.sample_steps", help="DDIM steps"),
         opt("--guidance", type=float, config="evaluation.guidance", help="classifier-free guidance scale"),
         opt("--full-matrix", action="store_true", config="evaluation.full_matrix",
             help="sample every concept k <= t after every task t (O(T^2) generations)"),
         opt("--text-template", action="append", config="evaluation.text_templates",
             help="a held-out prompt for CLIP text alignment, with {prompt} for the concept's prompt (repeatable)"),
         group="t2i", gpu=True)
def cmd_generate(a):
    from .evaluation.t2i_eval import generate_run

    generate_run(_spec(a), a.ckpt_dir, a.out, n_samples=a.n_samples, steps=a.sample_steps, guidance=a.guidance,
                 full_matrix=a.full_matrix, text_templates=a.text_template)


JUDGE = opt("--judge", required=True, help="judge folder (CLIP features; KID features)")
ORACLE = opt("--oracle", help="oracle folder (toy world only; default: none)")
EVAL_SETTINGS = opt("--eval-settings", default="{}", help="the evaluation's settings as a JSON object (config "
                                                          "evaluation; recorded in the provenance)")


@command("evaluate", "metrics of a run's samples: R.csv (R[t][k] per metric) and metrics.csv (P/A/F, ...)",
         opt("--train-json", required=True, help="the run's train.json"),
         opt("--samples", required=True, help="the run's samples.npz (generate)"),
         DATA, JUDGE, ORACLE, *RUN_ID, EVAL_SETTINGS,
         opt("--out-metrics", required=True, help="metrics.csv to write"),
         opt("--out-R", required=True, help="R.csv to write"),
         opt("--figure", help="sample grid PNG to write (default: none)"),
         group="t2i")
def cmd_evaluate(a):
    from .evaluation.judge import load_judge
    from .evaluation.oracle import Oracle
    from .evaluation.t2i_eval import evaluate_run
    from .reporting.grids import sample_grid_from_npz
    from .run_files import read_json
    from .utils import provenance, weights_fingerprint

    train_info = read_json(a.train_json)
    judge = load_judge(a.judge)
    oracle = Oracle.load(a.oracle) if a.oracle else None
    ident = {"track": "t2i", "benchmark": a.benchmark, "n_tasks": a.n_tasks, "method": a.method, "seed": a.seed}
    cfg = {"run": ident, "settings": train_info["settings"], "eval": _json_arg(a.eval_settings, "--eval-settings"),
           "sequence": train_info["sequence"]}
    evaluate_run(train_json=a.train_json, samples_npz=a.samples, data_dir=a.data, judge=judge, oracle=oracle,
                 ident=ident, out_metrics=a.out_metrics, out_R=a.out_R,
                 provenance=provenance(cfg, weights={"backbone": train_info.get("backbone_weights", "unknown"),
                                                     "judge": weights_fingerprint(a.judge),
                                                     "oracle": weights_fingerprint(a.oracle)}))
    if a.figure:
        sample_grid_from_npz(a.samples, train_info, a.figure, title=f"{a.benchmark}, {a.method}, seed {a.seed}")


@command("noise-floor", "a benchmark's metric noise floor: real-vs-real and seed-vs-seed null differences",
         opt("--data", required=True, help="prepared dataset folder of the benchmark"), JUDGE, ORACLE,
         opt("--backbone", help="base text-to-image backbone for the seed-vs-seed part (default: none, real images "
                                "only)"),
         DEVICE, opt("--benchmark", required=True, help="benchmark name"),
         opt("--eval-settings", default="{}", help="the evaluation's settings as JSON (n_samples, sample_steps, "
                                                   "guidance; each one missing: the config's evaluation.<key>)"),
         opt("--max-concepts", type=int, config="noise_floor.concepts", help="concepts measured, a seeded choice"),
         opt("--repeats", type=int, config="noise_floor.repeats", help="random splits of each concept's real images"),
         opt("--seed", type=int, default=0, help="seed of the splits and samples"),
         _out("CSV to write"), group="t2i", gpu=True)
def cmd_noise_floor(a):
    from .backbones.model import T2IModel
    from .config_defaults import config_default
    from .data.benchmarks import get_benchmark
    from .engine.t2i import resolve_device
    from .evaluation.judge import load_judge
    from .evaluation.noise_floor import write_noise_floor
    from .evaluation.oracle import Oracle

    ev = {**config_default("evaluation"), **_json_arg(a.eval_settings, "--eval-settings")}
    model = T2IModel.from_pretrained(a.backbone, device=resolve_device(a.device)) if a.backbone else None
    write_noise_floor(data_dir=a.data, judge=load_judge(a.judge), oracle=Oracle.load(a.oracle) if a.oracle else None,
                      benchmark=a.benchmark, out=a.out, model=model, n_samples=int(ev["n_samples"]),
                      steps=int(ev["sample_steps"]), guidance=float(ev["guidance"]),
                      max_concepts=a.max_concepts, repeats=a.repeats,
                      class_word=get_benchmark(a.benchmark).class_word, seed=a.seed)


@command("write-config", "write a run's resolved configuration (JSON) as YAML",
         opt("--json", required=True, help="the configuration as a JSON object"), _out("YAML file to write"),
         group="t2i")
def cmd_write_config(a):
    import yaml

    from .utils import atomic_write_text

    atomic_write_text(a.out, "# the run's configuration as Snakemake validated it (defaults filled in)\n"
                      + yaml.safe_dump(_json_arg(a.json, "--json"), sort_keys=True))


# ------------------------------------------------------------------------------------------- classification
@command("train-cls", "train + evaluate one class-incremental run (resumable)",
         opt("--backbone", required=True, help="ViT safetensors file or folder"),
         opt("--backbone-name", help="timm model name when the folder does not say (default: the folder's)"),
         opt("--data", required=True, help="prepared classification dataset (class folders = label ids)"),
         *RUN_ID, SETTINGS,
         opt("--ckpt-dir", required=True, help="checkpoint folder of the run (resumable)"), DEVICE,
         opt("--augment", choices=["flip", "rrc", "none"], default="flip",
             help="training augmentation (rrc: CODA-P's random resized crops)"),
         opt("--image-size", type=int, help="input size (default: the backbone's)"),
         opt("--workers", type=int, default=0, help="DataLoader workers (augment=rrc)"),
         opt("--out-train", required=True, help="train.json to write"),
         opt("--out-metrics", required=True, help="metrics.csv to write"),
         opt("--out-acc", required=True, help="acc_matrix.csv to write"),
         opt("--out-R", help="the accuracy matrix in the R-matrix format the figures read (default: not written)"),
         opt("--out-pred", help="predictions.npz: every evaluated image's predicted class after every task "
             "(default: not written)"),
         group="cls", gpu=True)
def cmd_train_cls(a):
    from .engine.cls import ClsRunSpec, accuracy_matrix, train_sequence, write_predictions, write_train_summary
    from .evaluation.cls_metrics import write_cls_results
    from .utils import provenance, weights_fingerprint

    spec = ClsRunSpec(backbone=a.backbone, backbone_name=a.backbone_name, data_dir=a.data, method=a.method,
                      n_tasks=a.n_tasks, seed=a.seed, settings=_json_arg(a.settings), device=a.device,
                      augment=a.augment, image_size=a.image_size, workers=a.workers)
    metas = train_sequence(spec, a.ckpt_dir)
    write_train_summary(spec, metas, a.out_train)
    if a.out_pred:
        write_predictions(spec, metas, a.out_pred)
    ident = {"track": "cls", "benchmark": a.benchmark, "n_tasks": a.n_tasks, "method": a.method, "seed": a.seed}
    cfg = {"run": ident, "settings": spec.settings.__dict__, "order": spec.order, "augment": spec.augment,
           "backbone": str(spec.backbone)}
    n_test = [len(spec.ds.split("test").select(t.classes)) for t in spec.tasks]
    write_cls_results(accuracy_matrix(spec, metas), n_test=n_test, n_train=sum(m["N_train"] for m in metas) / len(metas),
                      n_store=metas[-1]["N_store"], ident=ident, out_metrics=a.out_metrics,
                      provenance=provenance(cfg, weights={"backbone": weights_fingerprint(spec.backbone)}),
                      out_acc=a.out_acc, out_R=a.out_R, full=not spec.method_cls.joint)


# ------------------------------------------------------------------------- paper profile: data and models
@command("fetch", "fetch and verify a dataset manifest's files (data_manifests/<name>.yaml)",
         opt("--manifest", required=True, help="manifest name (imagenet_r, celeba_hq, gldv2_waterfalls) or YAML file"),
         _out("the raw folder to fill"),
         opt("--manual-dir", help="folder with the files downloaded by hand (TFDS manual_dir; default: none)"),
         opt("--record", help="fetched.json written last (default: <out>/fetched.json)"),
         opt("--lock", help="checksum lock file (default: <out>/checksums.lock.json)"),
         *OFFLINE, group="paper")
def cmd_fetch(a):
    from .data.paper import fetch_dataset

    rec = fetch_dataset(a.manifest, a.out, manual_dir=a.manual_dir, offline=a.offline, base_url=a.base_url,
                        record=a.record, lock=a.lock)
    log.info("fetched %s into %s (%s)", a.manifest, a.out, rec)


@command("prepare-celeba-hq", "Celeb-A HQ identities -> the prepared layout (a folder per concept)",
         opt("--raw", required=True, help="the folder `fetch --manifest celeba_hq` filled"),
         _out("the prepared dataset folder"), DATA_SEED, SELECTION, _manifest("celeba_hq"), group="paper")
def cmd_prepare_celeba_hq(a):
    from .data.celeba_hq import prepare_celeba_hq

    prepare_celeba_hq(a.raw, a.out, data_seed=a.data_seed, settings=_json_arg(a.settings), manifest=a.manifest)


@command("select-gldv2-waterfalls", "GLDv2 metadata -> selection.csv (waterfall candidates, draw order)",
         opt("--raw", required=True, help="the folder `fetch --manifest gldv2_waterfalls` filled"),
         _out("selection.csv"), DATA_SEED, SELECTION, _manifest("gldv2_waterfalls"), group="paper")
def cmd_select_gldv2_waterfalls(a):
    from .data.gldv2 import select_waterfalls

    select_waterfalls(a.raw, a.out, data_seed=a.data_seed, settings=_json_arg(a.settings), manifest=a.manifest)


@command("fetch-gldv2-images", "download only the selected GLDv2 images (polite, resumable, checksum-locked)",
         opt("--raw", required=True, help="the GLDv2 raw folder (images go to <raw>/images/)"),
         opt("--selection", required=True, help="selection.csv (select-gldv2-waterfalls)"),
         _out("fetched.csv"),
         opt("--lock", help="checksum lock file (default: <raw>/images.lock.json)"),
         SELECTION, *OFFLINE, _manifest("gldv2_waterfalls"), group="paper")
def cmd_fetch_gldv2_images(a):
    from .data.gldv2 import fetch_waterfall_images

    stats = fetch_waterfall_images(a.raw, a.selection, a.out, settings=_json_arg(a.settings), manifest=a.manifest,
                                   lock=a.lock, base_url=a.base_url, offline=a.offline)
    log.info("gldv2 images: %s", stats)


@command("prepare-gldv2-waterfalls", "fetched GLDv2 waterfalls -> the prepared layout + attribution.csv",
         opt("--raw", required=True, help="the GLDv2 raw folder"),
         opt("--fetched", required=True, help="fetched.csv (fetch-gldv2-images)"),
         _out("the prepared dataset folder"), DATA_SEED, SELECTION, _manifest("gldv2_waterfalls"), group="paper")
def cmd_prepare_gldv2_waterfalls(a):
    from .data.gldv2 import prepare_gldv2_waterfalls

    prepare_gldv2_waterfalls(a.raw, a.fetched, a.out, data_seed=a.data_seed, settings=_json_arg(a.settings),
                             manifest=a.manifest)


@command("prepare-imagenet-r-fetched", "ImageNet-R fetched with its manifest -> the prepared layout",
         opt("--raw", required=True, help="the folder `fetch --manifest imagenet_r` filled (images/, splits/)"),
         _out("the prepared dataset folder"), _manifest("imagenet_r"),
         opt("--mode", choices=["symlink", "hardlink", "copy"], default="symlink", help="how images are placed"),
         group="paper")
def cmd_prepare_imagenet_r_fetched(a):
    from .data.paper import prepare_imagenet_r_from_manifest

    prepare_imagenet_r_from_manifest(a.raw, a.out, manifest=a.manifest, mode=a.mode)


@command("fetch-models", "fetch pretrained models (data_manifests/models.yaml) into local folders",
         opt("--resources", required=True, help="models go to <resources>/<name>/"),
         opt("--model", action="append", help="a name in models.yaml (repeatable; default: all)"),
         opt("--models-file", help="the models file (default: data_manifests/models.yaml)"),
         opt("--allow-unpinned", action="store_true", config="paper.allow_unpinned_models",
             help="accept a Hugging Face revision that is a branch or tag; its commit is resolved once and locked"),
         *OFFLINE, group="paper")
def cmd_fetch_models(a):
    from .data.manifests import load_models
    from .data.model_resources import fetch_model

    names = a.model or sorted(load_models(a.models_file))
    for name in names:
        out = fetch_model(name, a.resources, offline=a.offline, base_url=a.base_url, models_file=a.models_file,
                          allow_unpinned=a.allow_unpinned)
        log.info("model %s ready in %s", name, out)


@command("build-paper-judge", "CLIP ViT-B/32 local-dir + Inception weights -> one judge folder",
         opt("--clip", required=True, help="the converted CLIP folder (fetch-models --model clip_vit_b_32)"),
         opt("--inception", required=True, help="the Inception weights folder (fetch-models --model inception_kid)"),
         _out("the judge folder"), group="paper")
def cmd_build_paper_judge(a):
    from .data.model_resources import build_paper_judge

    build_paper_judge(a.clip, a.inception, a.out)


# ------------------------------------------------------------------------------------------- the parser
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, when it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.default != []
        if "%(default)" in text or not shown or action.required or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _option_kwargs(o: Option) -> dict:
    """``o``'s add_argument arguments, its default taken from the default run's configuration when it names a key."""
    kwargs = dict(o.kwargs)
    if o.config is not None:
        from .config_defaults import config_default

        kwargs["default"] = config_default(o.config)
        shown = "%(default)s" if kwargs["default"] not in (None, []) else "none"
        kwargs["help"] = f"{kwargs['help']} (default: {shown} = config {o.config})"
    return kwargs


def command_list() -> str:
    """The commands by group, one line each, for the end of ``continual-bench --help``."""
    width = max(len(name) for name in COMMANDS) + 2
    out = [f"{USER}:"] + [f"  {c.name:{width}}{c.help}" for c in COMMANDS.values() if c.group == "user"]
    out += ["", f"{STEPS}:"]
    for group, heading in GROUPS.items():
        if group != "user":
            out.append(f"  {heading}:")
            out += [f"    {c.name:{width}}{c.help}" for c in COMMANDS.values() if c.group == group]
    return "\n".join(out) + "\n\nRun `continual-bench COMMAND --help` for a command's options."


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="continual-bench", formatter_class=HelpFormatter, epilog=command_list(),
                                 description="A reproducible benchmark suite for continual learning with pretrained\n"
                                             "generative and vision models. The Snakemake workflow runs the workflow\n"
                                             "steps; the user commands are for you.")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                    help="print the version and exit")
    ap.add_argument("--threads", type=int, metavar="N", help="torch threads (a rule passes its job's threads; "
                                                             "default: torch's own choice)")
    ap.add_argument("--log-file", metavar="FILE", help="also write the log here (default: stderr only)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands listed below")
    for c in COMMANDS.values():  # no help= here: the epilog lists them by group
        p = sub.add_parser(c.name, description=c.help, formatter_class=HelpFormatter)
        for o in c.options:
            p.add_argument(*o.flags, **_option_kwargs(o))
        p.set_defaults(func=c.func)
    return ap


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UserError as e:
        print(f"continual-bench: error: {e}", file=sys.stderr)
        return 2
    setup_logging(args.log_file)
    from .utils import set_threads

    if args.threads:
        set_threads(args.threads)
    if COMMANDS[args.command].gpu:  # before CUDA is initialised: one GPU per job (gpu_slots.py)
        from .gpu_slots import acquire_gpu_slot

        acquire_gpu_slot()
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"continual-bench: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"continual-bench: error: {e}", file=sys.stderr)
        return 3
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
