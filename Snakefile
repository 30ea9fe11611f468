# continual-bench: the whole benchmark as one DAG.
#   snakemake --cores all                                   # the default toy run (config/config.yaml)
#   snakemake --cores all --config 'n_tasks=[5,10,20]'      # override any key
#   snakemake --cores all --configfile config/paper.yaml --use-conda --profile profiles/default   # real data, GPUs
#   snakemake --configfile config/paper.yaml --use-conda --profile profiles/slurm                # on SLURM
import os
import sys

import yaml
from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, workflow.basedir)  # this checkout's package, the one the rules' jobs run
from continual_bench.config_check import check_config, coerce_cli_ints, schema_error  # noqa: E402
from continual_bench.utils import UserError  # noqa: E402


configfile: "config/config.yaml"


def config_error(message):
    """A bad configuration stops here, before any job: one line naming the key, the value and what is allowed."""
    print(f"continual-bench: configuration error: {message}", file=sys.stderr)
    sys.exit(1)


# `--config 'n_tasks=[5,10]'` gives strings inside lists: make them the integers the schema expects
coerce_cli_ints(config)
# ... and strings inside mappings: `--config 'paper={offline: true}'` gives offline="true"
for _key in ("offline", "allow_unpinned_models"):
    if isinstance(config.get("paper"), dict) and isinstance(config["paper"].get(_key), str):
        _flag = config["paper"][_key].strip().lower()
        config["paper"][_key] = {"true": True, "false": False}.get(_flag, config["paper"][_key])


_SCHEMA = "workflow/schemas/config.schema.yaml"
with open(os.path.join(workflow.basedir, _SCHEMA)) as _f:
    _problem = schema_error(config, yaml.safe_load(_f))
if _problem:
    config_error(_problem)
validate(config, _SCHEMA)  # fills in the defaults
# Method names, every method's settings and their ranges, sequence lengths against the benchmarks: checked once,
# by the Snakemake that plans the DAG (not again in each job a cluster executor or a job subprocess starts).
if not (workflow.remote_exec or workflow.subprocess_exec):
    try:
        check_config(config, os.getcwd())
    except UserError as _e:
        config_error(_e)
    except ImportError as _e:  # an environment with Snakemake but without the package's dependencies
        print(f"continual-bench: warning: methods and settings not checked before the run ({_e}); "
              "each job checks its own", file=sys.stderr)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/toy.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/t2i.smk"
include: "workflow/rules/cls.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
