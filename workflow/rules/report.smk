# Summary, tables and figures from the per-run metric files alone (seconds; no model is touched), and the
# resolved configuration of the run: `snakemake --report report.html` collects all of them.


rule tables:
    input:
        metrics=run_targets("{results}/runs/{benchmark}/T{n_tasks}/{method}/seed{seed}/metrics.csv"),
        # the metrics' noise floor of every text-to-image benchmark (t2i.smk: noise_floor)
        floor=expand("{results}/noise_floor/{benchmark}.csv", results=RESULTS,
                     benchmark=config["benchmarks"] if config["methods"] else []),
    output:
        summary=report(f"{RESULTS}/summary.csv", category="Results", labels={"table": "summary.csv (download)"}),
        # the HTML twins: the report shows them inline (a CSV would only be offered as a download)
        tables=report(directory(f"{RESULTS}/tables"), patterns=["{name}.html"], category="Results",
                      labels={"table": "{name}"}),
        figures=report(directory(f"{RESULTS}/figures/summary"), patterns=["{name}.png"], category="Figures",
                       labels={"figure": "{name}"}),
    log:
        f"{LOGS}/tables.log",
    benchmark:
        f"{LOGS}/tables.tsv",
    params:
        run_dir=lambda w, output: Path(output.summary).parent,
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} tables {params.run_dir:q} --metrics {input.metrics:q} --noise-floor {input.floor:q} 2> {log:q}"


rule run_config:
    output:
        report(f"{RESULTS}/config.yaml", category="Configuration", labels={"file": "config (validated, with defaults)"}),
    log:
        f"{LOGS}/config.log",
    params:
        cfg=lambda w: json.dumps(config, sort_keys=True),  # a function: Snakemake formats string params (braces)
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} write-config --json {params.cfg:q} --out {output:q} 2> {log:q}"


# `snakemake bench`: this machine's training and sampling speed, ours beside the reference recipes (diffusers'
# LoRA / Custom Diffusion examples, StableDiffusionPipeline's call, CODA-P's two passes), on Stable Diffusion v1.x
# and ViT-B/16 architectures with random weights; then every text-to-image method of config/paper.yaml through
# the engine (its step, its sampling inside training, its checkpoint bytes), and every classification method (its
# step, its passes over the images, its evaluation); and the paper profile's hours, disk and memory from those.
# Not part of `all`. On a GPU the paper's sizes run; on a CPU a reduced resolution (the CSV's rows say which).
BENCH_HOST = os.environ.get("CONTINUAL_BENCH_HOST") or __import__("socket").gethostname().split(".")[0]


rule bench:
    output:
        csv=f"results/bench/{BENCH_HOST}.csv",
        costs=f"results/bench/{BENCH_HOST}.costs.md",
    log:
        f"results/bench/{BENCH_HOST}.log",
    params:
        host=BENCH_HOST,
        cost_config="config/paper.yaml",
        device=config["device"],
    # A benchmark wants the machine to itself. Not `workflow.cores`: that raises under a cluster executor, which
    # has no --cores, and stops every DAG that includes this file. Snakemake lowers 16 to --cores on a
    # workstation; on a cluster it is the CPUs requested (change it with --set-threads bench=N).
    threads: 16
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} --threads {threads} bench --host {params.host:q} --device {params.device:q} --out {output.csv:q} "
        "--cost-config {params.cost_config:q} --methods config --cls-methods config > {log:q} 2>&1"
