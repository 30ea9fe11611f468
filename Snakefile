# continual-bench: the whole benchmark as one DAG.
#   snakemake --cores all                                   # the default toy run (config/config.yaml)
#   snakemake --cores all --config 'n_tasks=[5,10,20]'      # override any key
#   snakemake --cores all --configfile config/paper.yaml --use-conda --profile profiles/default   # real data, GPUs
#   snakemake --configfile config/paper.yaml --use-conda --profile profiles/slurm                # on SLURM
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


# `--config 'n_tasks=[5,10]'` gives strings inside lists: make them the integers the schema expects
for _key in ("n_tasks", "seeds", "cls_n_tasks", "cls_seeds"):
    if isinstance(config.get(_key), list):
        config[_key] = [int(v) if isinstance(v, str) and v.isdigit() else v for v in config[_key]]
# ... and strings inside mappings: `--config 'paper={offline: true}'` gives offline="true"
for _key in ("offline", "allow_unpinned_models"):
    if isinstance(config.get("paper"), dict) and isinstance(config["paper"].get(_key), str):
        _flag = config["paper"][_key].strip().lower()
        config["paper"][_key] = {"true": True, "false": False}.get(_flag, config["paper"][_key])


validate(config, "workflow/schemas/config.schema.yaml")


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
