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
# The package's CLI, run from this checkout (so it also works inside --use-conda envs, which hold the
# dependencies but not the package itself).
# Without --use-conda the jobs use the Python that runs Snakemake (the project's venv).
_PY = "python" if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method else sys.executable
CB = f"PYTHONPATH={workflow.basedir}${{PYTHONPATH:+:$PYTHONPATH}} {_PY} -m continual_bench"
CONDA_ENV = "../envs/continual-bench.yaml"
TOY = "resources/toy"


def run_dir(w):
    return f"{RESULTS}/runs/{w.benchmark}/T{w.n_tasks}/{w.method}/seed{w.seed}"


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
    return expand(pattern, results=RESULTS, benchmark=config["benchmarks"], n_tasks=config["n_tasks"],
                  method=config["methods"], seed=config["seeds"])


def all_outputs():
    return [f"{RESULTS}/summary.csv"] + run_targets(
        "{results}/figures/samples_{benchmark}_T{n_tasks}_{method}_seed{seed}.png")


wildcard_constraints:
    benchmark="[A-Za-z0-9_]+",
    method="[A-Za-z0-9_]+",
    n_tasks=r"\d+",
    seed=r"\d+",
