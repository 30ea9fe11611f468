# Paths and helpers shared by the rule files. Logic lives in the continual_bench package; this only
# maps config values to file names.
import json
import os
import sys

from snakemake.settings.types import DeploymentMethod

# Every cache inside the repository: a run writes nothing to the home directory.
for _var, _sub in (("HF_HOME", "huggingface"), ("TORCH_HOME", "torch"), ("XDG_CACHE_HOME", "xdg"),
                   ("MPLCONFIGDIR", "matplotlib")):
    os.environ.setdefault(_var, os.path.join(workflow.basedir, ".cache", _sub))

RUN = config["run_name"]
RESULTS = f"results/{RUN}"
LOGS = f"{RESULTS}/logs"
# Rules call the package's CLI, `continual-bench`, defined for every job as a shell function that runs
# this checkout's package: inside --use-conda envs (which hold the dependencies, not the package) with the
# env's python, otherwise with the Python that runs Snakemake (the project's venv).
_PY = "python" if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method else sys.executable
shell.executable("bash")
_CLI = (f'continual-bench() {{ PYTHONPATH="{workflow.basedir}${{PYTHONPATH:+:$PYTHONPATH}}" '
        f'"{_PY}" -m continual_bench "$@"; }}; ')
_CLI = _CLI.replace("{", "{{").replace("}", "}}")  # Snakemake formats the prefix like the command
shell.prefix(f"set -euo pipefail; {_CLI}")
CONDA_ENV = "../envs/continual-bench.yaml"
TOY = "resources/toy"


def t2i_backbone():
    return f"{TOY}/sd-tiny" if config["world"] == "toy" else "resources/models/stable-diffusion"


def judge_dir():
    return f"{TOY}/judge" if config["world"] == "toy" else "resources/models/clip-vit-b-32"


def data_dir(benchmark):
    return f"data/{config['world']}/{benchmark}"


def method_settings(w):
    return json.dumps(config["method_settings"].get(w.method, {}), sort_keys=True)


def eval_settings():
    return json.dumps(config["evaluation"], sort_keys=True)


def run_targets(pattern):
    """Files of every configured run: the t2i runs, plus the cls runs for files inside a run folder
    ("{results}/runs/..."), so the tables rule's metrics.csv inputs cover both tracks."""
    out = expand(pattern, results=RESULTS, benchmark=config["benchmarks"], n_tasks=config["n_tasks"],
                 method=config["methods"], seed=config["seeds"])
    if pattern.startswith("{results}/runs/"):
        out += expand(pattern, results=RESULTS, benchmark=config["cls_benchmarks"], n_tasks=config["cls_n_tasks"],
                      method=config["cls_methods"], seed=config["cls_seeds"])
    return out


def all_outputs():
    return [f"{RESULTS}/summary.csv", f"{RESULTS}/config.yaml"] + run_targets(
        "{results}/figures/samples/{benchmark}_T{n_tasks}_{method}_seed{seed}.png")


def toy(key):
    return config["toy"][key]


def toy_dirs(input_files):
    """Dataset folders of the manifest files among a rule's inputs."""
    return " ".join(str(Path(f).parent) for f in input_files if f.endswith("manifest.csv"))


def backbone_input(w):
    return f"{t2i_backbone()}/model_index.json"


def oracle_input(w):
    return f"{TOY}/oracle/{w.benchmark}/oracle.json" if config["world"] == "toy" else []


# ---- classification track (rules in cls.smk)
CLS_RUN_DIR = "{results}/runs/{benchmark}/T{n_tasks}/{method}/seed{seed}"
TOY_CLS_DATA = "data/toy/toy_imagenet_r/manifest.csv"
TOY_VIT = f"{TOY}/vit"


def cls_is_toy(benchmark):
    return benchmark.startswith("toy_")


def cls_data_dir(benchmark):
    return f"data/toy/{benchmark}" if cls_is_toy(benchmark) else f"data/paper/{benchmark}"


def cls_backbone(w):
    return TOY_VIT if cls_is_toy(w.benchmark) else config["cls_paper"]["backbone"]


def cls_backbone_input(w):
    return f"{TOY_VIT}/vit_config.json" if cls_is_toy(w.benchmark) else config["cls_paper"]["backbone"]


def cls_settings(w):
    return json.dumps({**config["cls_train"], **config["cls_method_settings"].get(w.method, {})}, sort_keys=True)


def cls_data_args(w):
    """Augmentation and input size: toy = flips at the backbone's size; paper = CODA-P's crops at 224."""
    if cls_is_toy(w.benchmark):
        return "--augment flip"
    p = config["cls_paper"]
    return f"--augment rrc --image-size {p['image_size']} --workers {p['workers']} --backbone-name {p['backbone_name']}"


wildcard_constraints:
    benchmark="[A-Za-z0-9_]+",
    method="[A-Za-z0-9_]+",
    n_tasks=r"\d+",
    seed=r"\d+",
