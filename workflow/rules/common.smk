# Paths and helpers shared by the rule files. Logic lives in the continual_bench package; this only
# maps config values to file names.
import json
import os
import shlex
import sys
import sysconfig

from snakemake.settings.types import DeploymentMethod

# Every cache inside the repository: a run writes nothing to the home directory.
for _var, _sub in (("HF_HOME", "huggingface"), ("TORCH_HOME", "torch"), ("XDG_CACHE_HOME", "xdg"),
                   ("MPLCONFIGDIR", "matplotlib")):
    os.environ.setdefault(_var, os.path.join(workflow.basedir, ".cache", _sub))

RUN = config["run_name"]
RESULTS = f"results/{RUN}"
LOGS = f"{RESULTS}/logs"
# Every value from the config that reaches a shell command is quoted: {...:q}, or shlex.quote inside a param that
# holds several arguments (inserted as is; such params keep their earlier text for ordinary values, so Snakemake's
# params trigger reruns nothing). A config value is never shell code, and a path may hold spaces. (The toy world's
# rules pass only integers the schema checked and fixed paths.)
shell.executable("bash")


def _cli():
    """What the rules run, as `{CLI:q} <command> ...`: the console script `continual-bench` (pyproject.toml,
    [project.scripts]) installed beside the Python that runs Snakemake (the project's venv; without the package
    installed there, that Python runs the same entry point, `python -m continual_bench`). With --use-conda the env holds
    the dependencies, not the package: the env's python runs `-m continual_bench`. Either way the job imports this
    checkout's package: shell.prefix puts the checkout first on PYTHONPATH. (`snakemake --lint` notes that the shell
    commands read CLI from outside the rules: it is not a param on purpose, as params are rerun triggers and CLI
    differs between a venv and --use-conda.)"""
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
        return ["python", "-m", "continual_bench"]
    script = Path(sysconfig.get_path("scripts")) / "continual-bench"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "continual_bench"]


CLI = _cli()
_PYTHONPATH = f'export PYTHONPATH={shlex.quote(str(workflow.basedir))}"${{PYTHONPATH:+:$PYTHONPATH}}"; '
_PYTHONPATH = _PYTHONPATH.replace("{", "{{").replace("}", "}}")  # Snakemake formats the prefix like the command


def _machine_gpus():
    """GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else the /dev/nvidia<N> devices."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len(list(Path(os.sep, "dev").glob("nvidia[0-9]*")))  # the driver's device files, one per GPU


def _gpu_slots():
    """The `gpu` resource of this run: --resources gpu=N when given (profiles/slurm gives one, so a login node's
    GPUs are never counted); otherwise this machine's GPU count, registered as the limit; None without GPUs."""
    try:
        res = workflow.global_resources["gpu"]
        value = getattr(res, "value", res)
        return value if isinstance(value, int) and value > 0 else None
    except (KeyError, TypeError):
        pass
    if not workflow.local_exec or workflow.remote_exec or os.environ.get("SLURM_JOB_ID"):
        return None
    n = _machine_gpus()
    if n:
        workflow.register_resource("gpu", n)
    return n or None


# Snakemake limits how many GPU jobs run but never says which GPU a job gets (it never sets
# CUDA_VISIBLE_DEVICES): with N GPU slots every GPU job takes one and sees only that GPU (continual_bench/gpu_slots.py).
_GPU_SLOTS = _gpu_slots()
_GPU_ENV = f"export CONTINUAL_BENCH_GPU_SLOTS={_GPU_SLOTS}; " if _GPU_SLOTS else ""
shell.prefix(f"set -euo pipefail; {_GPU_ENV}{_PYTHONPATH}")
CONDA_ENV = "../envs/continual-bench.yaml"
TOY = "resources/toy"


# ---- the paper profile's real benchmarks and models (rules in fetch.smk); toy benchmarks keep the toy paths
PAPER = config["paper"]
PAPER_T2I = ("celeba_hq", "gldv2_waterfalls")
PAPER_CLS = ("imagenet_r",)
PAPER_DATASETS = PAPER_T2I + PAPER_CLS
PAPER_RES = PAPER["resources_dir"]
PAPER_RAW = PAPER["raw_dir"]
PAPER_MODELS = ("stable_diffusion", "clip_vit_b_32", "inception_kid", "vit_b_16")


def is_paper(benchmark):
    return benchmark in PAPER_DATASETS


def _paper(w):
    """A rule's wildcards name a paper benchmark; without wildcards: the configured world."""
    return is_paper(w.benchmark) if w is not None and hasattr(w, "benchmark") else config["world"] == "paper"


def paper_manifest(name):
    """A manifest file; a relative paper.manifests_dir is the repository's (data_manifests/)."""
    return os.path.join(workflow.basedir, PAPER["manifests_dir"], f"{name}.yaml")


def paper_fetch_flags():
    """--offline / --base-url for the fetch commands (paper.offline, paper.base_url), quoted for the shell."""
    flags = "--offline" if PAPER["offline"] else ""
    return flags + (f" --base-url {shlex.quote(PAPER['base_url'])}" if PAPER["base_url"] else "")


def t2i_backbone(w=None):
    if not _paper(w):
        return f"{TOY}/sd-tiny"
    return PAPER["t2i_backbone"] or f"{PAPER_RES}/stable_diffusion"


def judge_dir(w=None):
    if not _paper(w):
        return f"{TOY}/judge"
    return PAPER["judge"] or f"{PAPER_RES}/judge"


def judge_input(w):
    if _paper(w) and not PAPER["judge"]:
        return ancient(f"{PAPER_RES}/judge/judge.json")  # fetched once: a re-verification changes nothing
    if not _paper(w):
        return f"{TOY}/judge/train_stats.json"  # see backbone_input
    return f"{judge_dir(w)}/open_clip_config.json"


def data_dir(benchmark):
    return f"data/paper/{benchmark}" if is_paper(benchmark) else f"data/toy/{benchmark}"


def method_settings(w):
    """method_settings.<method>, then benchmark_settings.<benchmark> (which wins)."""
    settings = {**config["method_settings"].get(w.method, {}), **config["benchmark_settings"].get(w.benchmark, {})}
    return json.dumps(settings, sort_keys=True)


def eval_settings():
    return json.dumps(config["evaluation"], sort_keys=True)


def run_targets(pattern):
    """Files of every configured run: the t2i runs, plus the cls runs for files inside a run folder
    ("{results}/runs/..."), so the tables rule's metrics.csv inputs cover both tracks."""
    out = expand(pattern, results=RESULTS, benchmark=config["benchmarks"], n_tasks=config["n_tasks"],
                 method=config["methods"], seed=config["seeds"])
    if pattern.startswith("{results}/runs/"):
        out += cls_run_targets(pattern)
    return out


def cls_run_targets(pattern):
    """Files of every configured classification run."""
    return expand(pattern, results=RESULTS, benchmark=config["cls_benchmarks"], n_tasks=config["cls_n_tasks"],
                  method=config["cls_methods"], seed=config["cls_seeds"])


def all_outputs():
    # every run's metrics.csv is a target itself: a deleted one is rebuilt (as an input of the tables only, Snakemake
    # would leave it missing while summary.csv exists, and the tables would silently lose the run)
    return [f"{RESULTS}/summary.csv", f"{RESULTS}/config.yaml"] + run_targets(
        "{results}/runs/{benchmark}/T{n_tasks}/{method}/seed{seed}/metrics.csv") + run_targets(
        "{results}/figures/samples/{benchmark}_T{n_tasks}_{method}_seed{seed}.png") + cls_run_targets(
        # targets themselves, as the t2i runs' sample figures: nothing asks for an uncommitted file of a cls run
        # otherwise, and Snakemake keeps a job whose requested outputs exist (a fresh clone would keep the committed
        # cls runs instead of training them again)
        f"{CLS_RUN_DIR}/predictions.npz")


def toy(key):
    return config["toy"][key]


def toy_dirs(input_files):
    """Dataset folders of the manifest files among a rule's inputs."""
    return " ".join(str(Path(f).parent) for f in input_files if f.endswith("manifest.csv"))


# The toy models' rules declare as output the stats file each training writes last, not a config file:
# Snakemake skips a job whose newer input has the same checksum as recorded, and config.json or
# model_index.json read the same after a retraining with new weights (a retrained backbone once left
# every trained run standing). The stats hold the loss and the seconds, so they change every time.
def backbone_input(w):
    if _paper(w) and not PAPER["t2i_backbone"]:
        return ancient(f"{PAPER_RES}/stable_diffusion/fetched.json")
    if not _paper(w):
        return f"{TOY}/sd-tiny/pretrain_stats.json"
    return f"{t2i_backbone(w)}/model_index.json"


def oracle_input(w):
    """Only the toy world has an oracle (it knows the concepts it drew)."""
    return [] if is_paper(w.benchmark) else f"{TOY}/oracle/{w.benchmark}/oracle.json"


# ---- classification track (rules in cls.smk)
CLS_RUN_DIR = "{results}/runs/{benchmark}/T{n_tasks}/{method}/seed{seed}"
TOY_CLS_DATA = "data/toy/toy_imagenet_r/manifest.csv"
TOY_VIT = f"{TOY}/vit"


def cls_is_toy(benchmark):
    return benchmark.startswith("toy_")


def cls_data_dir(benchmark):
    return f"data/toy/{benchmark}" if cls_is_toy(benchmark) else f"data/paper/{benchmark}"


def cls_backbone(w):
    """toy: the toy ViT; paper: cls_paper.backbone, or the fetched timm ViT-B/16 (models.yaml: vit_b_16)."""
    return TOY_VIT if cls_is_toy(w.benchmark) else config["cls_paper"]["backbone"] or f"{PAPER_RES}/vit_b_16"


def cls_backbone_input(w):
    if cls_is_toy(w.benchmark):
        return f"{TOY_VIT}/vit_config.json"
    return config["cls_paper"]["backbone"] or ancient(f"{PAPER_RES}/vit_b_16/fetched.json")


def cls_settings(w):
    return json.dumps({**config["cls_train"], **config["cls_method_settings"].get(w.method, {})}, sort_keys=True)


def cls_data_args(w):
    """Augmentation and input size: toy = flips at the backbone's size; paper = CODA-P's crops at 224 (quoted)."""
    if cls_is_toy(w.benchmark):
        return "--augment flip"
    p = config["cls_paper"]
    return (f"--augment rrc --image-size {int(p['image_size'])} --workers {int(p['workers'])} "
            f"--backbone-name {shlex.quote(p['backbone_name'])}")


wildcard_constraints:
    benchmark="[A-Za-z0-9_]+",
    method="[A-Za-z0-9_]+",
    n_tasks=r"\d+",
    seed=r"\d+",
