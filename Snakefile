# continual-bench: the whole benchmark as one DAG.
#   snakemake --cores all                                   # the default toy run (config/config.yaml)
#   snakemake --cores all --config 'n_tasks=[5,10,20]'      # override any key
#   snakemake --cores all --configfile config/paper.yaml --use-conda --profile profiles/default   # real data, GPUs
#   snakemake --configfile config/paper.yaml --use-conda --profile profiles/slurm                # on SLURM
import os
import sys

from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, workflow.basedir)  # this checkout's package, the one the rules' jobs run
from continual_bench.config_check import check_workflow_config  # noqa: E402
from continual_bench.utils import UserError  # noqa: E402


configfile: "config/config.yaml"


def config_error(message):
    """A bad configuration stops here, before any job: one line naming the key, the value and what is allowed."""
    print(f"continual-bench: configuration error: {message}", file=sys.stderr)
    sys.exit(1)


# The schema, then method names, every method's settings and their ranges, sequence lengths against the benchmarks:
# checked once, by the Snakemake that plans the DAG (not again in each job a cluster executor or a job subprocess
# starts, which only fill in the schema's defaults).
try:
    check_workflow_config(config, os.path.join(workflow.basedir, "workflow/schemas/config.schema.yaml"), os.getcwd(),
                          validate=validate, plan=not (workflow.remote_exec or workflow.subprocess_exec))
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
