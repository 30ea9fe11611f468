# Summary, tables and figures from the per-run metric files alone (seconds; no model is touched).


rule tables:
    input:
        run_targets("{results}/runs/{benchmark}/T{n_tasks}/{method}/seed{seed}/metrics.csv"),
    output:
        summary=report(f"{RESULTS}/summary.csv", category="Results"),
    log:
        f"{LOGS}/tables.log",
    params:
        run_dir=lambda w, output: Path(output.summary).parent,
    conda:
        CONDA_ENV
    shell:
        "continual-bench tables {params.run_dir} --metrics {input} 2> {log}"
