# Summary, tables and figures from the per-run metric files alone (seconds; no model is touched).


rule tables:
    input:
        run_targets("{results}/runs/{benchmark}/T{n_tasks}/{method}/seed{seed}/metrics.csv"),
    output:
        summary=report(f"{RESULTS}/summary.csv", category="Results"),
    log:
        f"{LOGS}/tables.log",
    conda:
        CONDA_ENV
    shell:
        "{CB} tables {RESULTS} --metrics {input} 2> {log}"
