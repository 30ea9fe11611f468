"""``continual-bench``: the command line. User commands (``methods``, ``tables``, ``noise-floor`` ...) and the steps the
Snakemake rules call (``train``, ``generate``, ``evaluate``, the toy world's and the paper profile's preparation);
each ``cmd_*`` function parses nothing itself: it takes the parsed arguments and calls into the package."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .utils import UserError, setup_logging

log = logging.getLogger("continual_bench")
GPU_COMMANDS = frozenset({"train", "generate", "train-cls"})  # the rules that declare resources: gpu=1


def _json_arg(text: str) -> dict:
    try:
        val = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise UserError(f"--settings: not valid JSON ({e.msg}): {text!r}") from None
    if val is None:
        return {}
    if not isinstance(val, dict):
        raise UserError(f"--settings: expected a JSON object, got {text!r}")
    return val


# ------------------------------------------------------------------------------------------- commands
def cmd_methods(a):
    from .methods import list_methods

    rows = list_methods()
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            flags = "".join(f" [{f}]" for f, on in (("stores user data", r["stores_user_data"]),
                                                     ("uses past data", r["uses_past_data"])) if on)
            print(f"{r['track']:4s}  {r['name']:40s} {r['paper']}{flags}")


def cmd_make_toy_data(a):
    from .data.toy import write_world

    write_world(a.world, a.out, seed=a.seed, n_concepts=a.n_concepts, n_train=a.n_train, n_eval=a.n_eval,
                n_generic=a.n_generic, n_generic_ids=a.n_generic_ids)


def cmd_write_tokenizer(a):
    from .backbones.t2i import write_clip_tokenizer

    write_clip_tokenizer(a.out, model_max_length=a.max_length)


def cmd_pretrain_vae(a):
    from .backbones.t2i import ToyT2IConfig
    from .backbones.toy_pretrain import pretrain_vae

    pretrain_vae(a.data, a.out, steps=a.steps, batch_size=a.batch_size, seed=a.seed,
                 cfg=ToyT2IConfig.for_latent_size(a.latent_size))


def cmd_pretrain_text_encoder(a):
    from .backbones.toy_pretrain import pretrain_text_encoder

    pretrain_text_encoder(a.data, a.tokenizer, a.out, steps=a.steps, batch_size=a.batch_size, seed=a.seed)


def cmd_pretrain_t2i(a):
    from .backbones.toy_pretrain import pretrain_t2i

    pretrain_t2i(a.data, a.vae, a.tokenizer, a.text_encoder, a.out, steps=a.steps, batch_size=a.batch_size,
                 lr=a.lr, seed=a.seed)


def cmd_train_judge(a):
    from .evaluation.judge import train_toy_judge

    train_toy_judge(a.data, a.out, steps=a.steps, batch_size=a.batch_size, seed=a.seed)


def cmd_train_oracle(a):
    from .evaluation.oracle import train_oracle

    train_oracle(a.data, a.out, epochs=a.epochs, seed=a.seed)


def _spec(a):
    from .engine.t2i import RunSpec

    from .data.benchmarks import get_benchmark

    return RunSpec(backbone=a.backbone, data_dir=a.data, method=a.method, n_tasks=a.n_tasks, seed=a.seed,
                   settings=_json_arg(a.settings), class_word=get_benchmark(a.benchmark).class_word,
                   device=a.device)


def cmd_train(a):
    from .engine.t2i import train_sequence, write_train_summary

    spec = _spec(a)
    metas = train_sequence(spec, a.ckpt_dir)
    write_train_summary(spec, metas, a.out)


def cmd_generate(a):
    from .evaluation.t2i_eval import generate_run

    generate_run(_spec(a), a.ckpt_dir, a.out, n_samples=a.n_samples, steps=a.sample_steps, guidance=a.guidance,
                 full_matrix=a.full_matrix, text_templates=a.text_template)


def cmd_evaluate(a):
    from .evaluation.judge import load_judge
    from .evaluation.oracle import Oracle
    from .evaluation.t2i_eval import evaluate_run
    from .reporting.grids import sample_grid_from_npz
    from .utils import provenance

    from .run_files import read_json

    train_info = read_json(a.train_json)
    judge = load_judge(a.judge)
    oracle = Oracle.load(a.oracle) if a.oracle else None
    ident = {"track": "t2i", "benchmark": a.benchmark, "n_tasks": a.n_tasks, "method": a.method, "seed": a.seed}
    cfg = {"run": ident, "settings": train_info["settings"], "eval": _json_arg(a.eval_settings),
           "sequence": train_info["sequence"]}
    evaluate_run(train_json=a.train_json, samples_npz=a.samples, data_dir=a.data, judge=judge, oracle=oracle,
                 ident=ident, provenance=provenance(cfg), out_metrics=a.out_metrics, out_R=a.out_R)
    if a.figure:
        sample_grid_from_npz(a.samples, train_info, a.figure, title=f"{a.benchmark}, {a.method}, seed {a.seed}")


def cmd_noise_floor(a):
    from .backbones.model import T2IModel
    from .data.benchmarks import get_benchmark
    from .engine.t2i import resolve_device
    from .evaluation.judge import load_judge
    from .evaluation.noise_floor import write_noise_floor
    from .evaluation.oracle import Oracle

    ev = _json_arg(a.eval_settings)
    model = T2IModel.from_pretrained(a.backbone, device=resolve_device(a.device)) if a.backbone else None
    write_noise_floor(data_dir=a.data, judge=load_judge(a.judge), oracle=Oracle.load(a.oracle) if a.oracle else None,
                      benchmark=a.benchmark, out=a.out, model=model, n_samples=int(ev.get("n_samples", 32)),
                      steps=int(ev.get("sample_steps", 15)), guidance=float(ev.get("guidance", 1.5)),
                      max_concepts=a.max_concepts, repeats=a.repeats,
                      class_word=get_benchmark(a.benchmark).class_word, seed=a.seed)


def cmd_write_config(a):
    import yaml

    from .utils import atomic_write_text

    atomic_write_text(a.out, "# the run's configuration as Snakemake validated it (defaults filled in)\n"
                      + yaml.safe_dump(_json_arg(a.json), sort_keys=True))


def cmd_make_toy_imagenet_r(a):
    from .data.toy_imagenet_r import write_toy_imagenet_r

    write_toy_imagenet_r(a.out, seed=a.seed, n_classes=a.n_classes, n_train=a.n_train, n_test=a.n_test,
                         n_pretrain=a.n_pretrain)


def cmd_prepare_imagenet_r(a):
    from .data.imagenet_r import prepare_imagenet_r

    prepare_imagenet_r(a.images, a.splits, a.out, mode=a.mode)


def cmd_pretrain_vit(a):
    from .backbones.vit import ToyViTConfig, pretrain_toy_vit

    cfg = ToyViTConfig(patch_size=a.patch_size, embed_dim=a.embed_dim, depth=a.depth, num_heads=a.heads)
    pretrain_toy_vit(a.data, a.out, cfg=cfg, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed)


def cmd_train_cls(a):
    from .engine.cls import ClsRunSpec, accuracy_matrix, train_sequence, write_train_summary
    from .evaluation.cls_metrics import write_cls_results
    from .utils import provenance

    spec = ClsRunSpec(backbone=a.backbone, backbone_name=a.backbone_name, data_dir=a.data, method=a.method,
                      n_tasks=a.n_tasks, seed=a.seed, settings=_json_arg(a.settings), device=a.device,
                      augment=a.augment, image_size=a.image_size, workers=a.workers)
    metas = train_sequence(spec, a.ckpt_dir)
    write_train_summary(spec, metas, a.out_train)
    ident = {"track": "cls", "benchmark": a.benchmark, "n_tasks": a.n_tasks, "method": a.method, "seed": a.seed}
    cfg = {"run": ident, "settings": spec.settings.__dict__, "order": spec.order, "augment": spec.augment,
           "backbone": str(spec.backbone)}
    n_test = [len(spec.ds.split("test").select(t.classes)) for t in spec.tasks]
    write_cls_results(accuracy_matrix(spec, metas), n_test=n_test, n_train=sum(m["N_train"] for m in metas) / len(metas),
                      n_store=metas[-1]["N_store"], ident=ident, provenance=provenance(cfg), out_metrics=a.out_metrics,
                      out_acc=a.out_acc, out_R=a.out_R, full=not spec.method_cls.joint)


def cmd_compare(a) -> int:
    from .reporting.compare import compare_runs, format_comparison
    from .utils import atomic_write_text

    df = compare_runs(a.run_dir, a.ref_dir)
    print(format_comparison(df))
    if a.out:
        atomic_write_text(a.out, df.to_csv(index=False, float_format="%.6g"))
    return 1 if df.verdict.isin(["differs", "missing"]).any() else 0


def cmd_tables(a):
    from .reporting.report import build_report

    build_report(a.run_dir, a.metrics, noise_floor_paths=a.noise_floor, allow_missing=a.allow_missing)


# ------------------------------------------------------------------------- paper profile: data and models
def cmd_fetch(a):
    from .data.paper import fetch_dataset

    rec = fetch_dataset(a.manifest, a.out, manual_dir=a.manual_dir, offline=a.offline, base_url=a.base_url,
                        record=a.record, lock=a.lock)
    log.info("fetched %s into %s (%s)", a.manifest, a.out, rec)


def cmd_prepare_celeba_hq(a):
    from .data.celeba_hq import prepare_celeba_hq

    prepare_celeba_hq(a.raw, a.out, data_seed=a.data_seed, settings=_json_arg(a.settings), manifest=a.manifest)


def cmd_select_gldv2_waterfalls(a):
    from .data.gldv2 import select_waterfalls

    select_waterfalls(a.raw, a.out, data_seed=a.data_seed, settings=_json_arg(a.settings), manifest=a.manifest)


def cmd_fetch_gldv2_images(a):
    from .data.gldv2 import fetch_waterfall_images

    stats = fetch_waterfall_images(a.raw, a.selection, a.out, settings=_json_arg(a.settings), manifest=a.manifest,
                                   lock=a.lock, base_url=a.base_url, offline=a.offline)
    log.info("gldv2 images: %s", stats)


def cmd_prepare_gldv2_waterfalls(a):
    from .data.gldv2 import prepare_gldv2_waterfalls

    prepare_gldv2_waterfalls(a.raw, a.fetched, a.out, data_seed=a.data_seed, settings=_json_arg(a.settings),
                             manifest=a.manifest)


def cmd_prepare_imagenet_r_fetched(a):
    from .data.paper import prepare_imagenet_r_from_manifest

    prepare_imagenet_r_from_manifest(a.raw, a.out, manifest=a.manifest, mode=a.mode)


def cmd_fetch_models(a):
    from .data.manifests import load_models
    from .data.model_resources import fetch_model

    names = a.model or sorted(load_models(a.models_file))
    for name in names:
        out = fetch_model(name, a.resources, offline=a.offline, base_url=a.base_url, models_file=a.models_file,
                          allow_unpinned=a.allow_unpinned)
        log.info("model %s ready in %s", name, out)


def cmd_build_paper_judge(a):
    from .data.model_resources import build_paper_judge

    build_paper_judge(a.clip, a.inception, a.out)


# ------------------------------------------------------------------------------------------- parser
def _add_run_args(p):
    p.add_argument("--backbone", required=True, help="pipeline directory (save_pretrained layout)")
    p.add_argument("--data", required=True, help="prepared dataset directory (manifest.csv)")
    p.add_argument("--method", required=True)
    p.add_argument("--n-tasks", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--settings", default="{}", help="JSON object of method settings")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="continual-bench", description=__doc__)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (the Snakemake job's threads)")
    ap.add_argument("--log-file", default=None)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list registered methods")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("make-toy-data", help="generate a toy dataset")
    p.add_argument("--world", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-concepts", type=int, default=10)
    p.add_argument("--n-train", type=int, default=16)
    p.add_argument("--n-eval", type=int, default=32)
    p.add_argument("--n-generic", type=int, default=2000)
    p.add_argument("--n-generic-ids", type=int, default=500)
    p.set_defaults(func=cmd_make_toy_data)

    p = sub.add_parser("write-tokenizer", help="write OpenAI CLIP's BPE tokenizer from open_clip's vocabulary")
    p.add_argument("--out", required=True)
    p.add_argument("--max-length", type=int, default=77)
    p.set_defaults(func=cmd_write_tokenizer)

    for name, func, steps, bs in (("pretrain-vae", cmd_pretrain_vae, 1600, 16),
                                  ("pretrain-text-encoder", cmd_pretrain_text_encoder, 400, 128),
                                  ("pretrain-t2i", cmd_pretrain_t2i, 1000, 32),
                                  ("train-judge", cmd_train_judge, 600, 128)):
        p = sub.add_parser(name)
        p.add_argument("--data", nargs="+", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch-size", type=int, default=bs)
        p.add_argument("--seed", type=int, default=0)
        if name in ("pretrain-t2i", "pretrain-text-encoder"):
            p.add_argument("--tokenizer", required=True)
        if name == "pretrain-vae":
            p.add_argument("--latent-size", type=int, default=8, choices=(8, 16))
        if name == "pretrain-t2i":
            p.add_argument("--vae", required=True)
            p.add_argument("--text-encoder", required=True)
            p.add_argument("--lr", type=float, default=2e-3)
        p.set_defaults(func=func)

    p = sub.add_parser("train-oracle")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_oracle)

    p = sub.add_parser("train", help="train one continual run (all tasks, resumable)")
    _add_run_args(p)
    p.add_argument("--out", required=True, help="train.json written when every task is done")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample a trained run's concepts after each task")
    _add_run_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--n-samples", type=int, default=48)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--full-matrix", action="store_true")
    p.add_argument("--text-template", action="append", default=[],
                   help="a held-out prompt for CLIP text alignment, with {prompt} for the concept's prompt (repeatable)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="metrics of a run's samples")
    p.add_argument("--train-json", required=True)
    p.add_argument("--samples", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--judge", required=True)
    p.add_argument("--oracle", default=None)
    p.add_argument("--benchmark", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--n-tasks", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--eval-settings", default="{}")
    p.add_argument("--out-metrics", required=True)
    p.add_argument("--out-R", required=True)
    p.add_argument("--figure", default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("noise-floor", help="a benchmark's metric noise floor: real-vs-real and seed-vs-seed null "
                                          "differences (noise_floor.csv rows)")
    p.add_argument("--data", required=True, help="prepared dataset folder of the benchmark")
    p.add_argument("--judge", required=True, help="judge folder (CLIP features, KID features)")
    p.add_argument("--oracle", default=None, help="oracle folder (toy world only)")
    p.add_argument("--backbone", default=None,
                   help="base text-to-image backbone for the seed-vs-seed part (default: none, real images only)")
    p.add_argument("--device", default="auto", help="device of the backbone (default: %(default)s)")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--eval-settings", default="{}", help="the evaluation's settings as JSON (n_samples, "
                   "sample_steps, guidance) (default: %(default)s)")
    p.add_argument("--max-concepts", type=int, default=20, help="concepts measured, a seeded choice (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="random splits of each concept's real images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits and samples (default: %(default)s)")
    p.add_argument("--out", required=True, help="CSV to write")
    p.set_defaults(func=cmd_noise_floor)

    p = sub.add_parser("write-config", help="write a run's resolved configuration (JSON) as YAML")
    p.add_argument("--json", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_write_config)

    # ---- classification track
    p = sub.add_parser("make-toy-imagenet-r", help="generate the toy_imagenet_r classification world")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-classes", type=int, default=40)
    p.add_argument("--n-train", type=int, default=12, help="training images per class and rendition")
    p.add_argument("--n-test", type=int, default=3, help="test images per class and rendition")
    p.add_argument("--n-pretrain", type=int, default=200, help="photo images per class for the backbone")
    p.set_defaults(func=cmd_make_toy_imagenet_r)

    p = sub.add_parser("prepare-imagenet-r", help="link extracted ImageNet-R + CODA-P split files into a dataset folder")
    p.add_argument("--images", required=True, help="folder holding imagenet-r/<wnid>/<file>.jpg")
    p.add_argument("--splits", required=True, help="folder holding imagenet-r_train.yaml and imagenet-r_test.yaml")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=["symlink", "hardlink", "copy"], default="symlink")
    p.set_defaults(func=cmd_prepare_imagenet_r)

    p = sub.add_parser("pretrain-vit", help="pretrain the toy ViT on a toy classification world's photo rendition")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_pretrain_vit)

    p = sub.add_parser("train-cls", help="train + evaluate one class-incremental run (resumable)")
    p.add_argument("--backbone", required=True, help="ViT safetensors file or folder")
    p.add_argument("--backbone-name", default=None, help="timm model name when the folder does not say")
    p.add_argument("--data", required=True, help="prepared classification dataset (class folders = label ids)")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--n-tasks", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--settings", default="{}", help="JSON object of method settings")
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--augment", choices=["flip", "rrc", "none"], default="flip")
    p.add_argument("--image-size", type=int, default=None, help="default: the backbone's")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (augment=rrc)")
    p.add_argument("--out-train", required=True)
    p.add_argument("--out-metrics", required=True)
    p.add_argument("--out-acc", required=True)
    p.add_argument("--out-R", default=None, help="the accuracy matrix in the R-matrix format the figures read")
    p.set_defaults(func=cmd_train_cls)

    # ---- paper profile: real data and pretrained models (workflow/rules/fetch.smk)
    def _fetch_args(p, manifest_default=None):
        p.add_argument("--offline", action="store_true", help="download nothing; verify the files present, name the missing")
        p.add_argument("--base-url", default=None, help="fetch from a mirror laid out as <base-url>/<host>/<path>")
        if manifest_default is not None:
            p.add_argument("--manifest", default=manifest_default, help="manifest name or YAML file")

    p = sub.add_parser("fetch", help="fetch and verify a dataset manifest's files (data_manifests/<name>.yaml)")
    p.add_argument("--manifest", required=True, help="manifest name (imagenet_r, celeba_hq, gldv2_waterfalls) or YAML file")
    p.add_argument("--out", required=True)
    p.add_argument("--manual-dir", default=None, help="folder with the files downloaded by hand (TFDS manual_dir)")
    p.add_argument("--record", default=None, help="fetched.json written last (default: <out>/fetched.json)")
    p.add_argument("--lock", default=None, help="checksum lock file (default: <out>/checksums.lock.json)")
    _fetch_args(p)
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("prepare-celeba-hq", help="Celeb-A HQ identities -> the prepared layout (folder per concept)")
    p.add_argument("--raw", required=True, help="the folder `fetch --manifest celeba_hq` filled")
    p.add_argument("--out", required=True)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--settings", default="{}", help="JSON object overriding the manifest's selection params")
    p.add_argument("--manifest", default="celeba_hq")
    p.set_defaults(func=cmd_prepare_celeba_hq)

    p = sub.add_parser("select-gldv2-waterfalls", help="GLDv2 metadata -> selection.csv (waterfall candidates, draw order)")
    p.add_argument("--raw", required=True, help="the folder `fetch --manifest gldv2_waterfalls` filled")
    p.add_argument("--out", required=True, help="selection.csv")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--settings", default="{}")
    p.add_argument("--manifest", default="gldv2_waterfalls")
    p.set_defaults(func=cmd_select_gldv2_waterfalls)

    p = sub.add_parser("fetch-gldv2-images", help="download only the selected GLDv2 images (polite, resumable, locked)")
    p.add_argument("--raw", required=True)
    p.add_argument("--selection", required=True)
    p.add_argument("--out", required=True, help="fetched.csv")
    p.add_argument("--lock", default=None, help="checksum lock file (default: <raw>/images.lock.json)")
    p.add_argument("--settings", default="{}")
    _fetch_args(p, "gldv2_waterfalls")
    p.set_defaults(func=cmd_fetch_gldv2_images)

    p = sub.add_parser("prepare-gldv2-waterfalls", help="fetched GLDv2 waterfalls -> the prepared layout + attribution.csv")
    p.add_argument("--raw", required=True)
    p.add_argument("--fetched", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--settings", default="{}")
    p.add_argument("--manifest", default="gldv2_waterfalls")
    p.set_defaults(func=cmd_prepare_gldv2_waterfalls)

    p = sub.add_parser("prepare-imagenet-r-fetched", help="ImageNet-R fetched with its manifest -> the prepared layout")
    p.add_argument("--raw", required=True, help="the folder `fetch --manifest imagenet_r` filled (images/, splits/)")
    p.add_argument("--out", required=True)
    p.add_argument("--manifest", default="imagenet_r")
    p.add_argument("--mode", choices=["symlink", "hardlink", "copy"], default="symlink")
    p.set_defaults(func=cmd_prepare_imagenet_r_fetched)

    p = sub.add_parser("fetch-models", help="fetch pretrained models (data_manifests/models.yaml) into local folders")
    p.add_argument("--resources", required=True, help="models go to <resources>/<name>/")
    p.add_argument("--model", action="append", default=None, help="a name in models.yaml (repeatable; default: all)")
    p.add_argument("--models-file", default=None, help="default: data_manifests/models.yaml")
    p.add_argument("--allow-unpinned", action="store_true",
                   help="accept a Hugging Face revision that is a branch or tag; its commit is resolved once and locked")
    _fetch_args(p)
    p.set_defaults(func=cmd_fetch_models)

    p = sub.add_parser("build-paper-judge", help="CLIP ViT-B/32 local-dir + Inception weights -> one judge folder")
    p.add_argument("--clip", required=True)
    p.add_argument("--inception", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_build_paper_judge)

    p = sub.add_parser("tables", help="summary.csv, tables and figures of a run directory from its metric files")
    p.add_argument("run_dir")
    p.add_argument("--metrics", nargs="*", default=None,
                   help="the expected runs' metric files (default: run_dir/runs/**/metrics.csv, and the runs "
                        "run_dir/config.yaml asks for must be among them)")
    p.add_argument("--allow-missing", action="store_true",
                   help="build partial tables when expected runs have no metrics file (a warning names them; "
                        "n_seeds says how many seeds each cell has); without it that is an error")
    p.add_argument("--noise-floor", nargs="*", default=None,
                   help="per-benchmark noise-floor files (default: run_dir/noise_floor/*.csv)")
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("compare", help="did RUN_DIR reproduce REF_DIR? every cell of both summary.csv files: the "
                                       "difference in seed stds and noise floors, and a verdict; exit 1 if any differs")
    p.add_argument("run_dir", help="the result folder to check (e.g. a fresh clone's results/toy)")
    p.add_argument("ref_dir", help="the reference result folder (e.g. the committed results/toy)")
    p.add_argument("--out", default=None, help="also write every cell as CSV here (default: print only)")
    p.set_defaults(func=cmd_compare)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_file)
    from .utils import set_threads

    if args.threads:
        set_threads(args.threads)
    if args.command in GPU_COMMANDS:  # before CUDA is initialised: one GPU per job (gpu_slots.py)
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
