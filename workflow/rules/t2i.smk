# Continual customization runs: train (resumable, one checkpoint per task) -> generate -> evaluate.
# Checkpoints live next to train.json but are not declared outputs, so Snakemake never deletes them
# when a job is killed: the rerun resumes at the first task without a checkpoint (and retrains a task whose
# checkpoint fails its recorded sha256). The training log is not declared either: Snakemake would empty it
# before a rerun, and a resumed job appends to the killed attempt's log instead.
# Outputs are flagged update(): Snakemake keeps the previous file while the job runs and puts it back when the
# job fails, so a failed rerun never removes the last good result (the commands write each file atomically).
RUN_DIR = "{results}/runs/{benchmark}/T{n_tasks}/{method}/seed{seed}"

# Runs of other lengths (here, or in config reuse_states_from) lend the states of the leading tasks they share with
# a run (same method, settings, seed, backbone and concepts; continual_bench/engine/runner.py, reuse_states): the
# 5-task run is the first five tasks of the 20-task run. Not a param: it never changes what a run computes.
REUSE_FROM = "".join(f"--reuse-states-from {shlex.quote(p)} " for p in config["reuse_states_from"])


rule train:
    input:
        backbone=backbone_input,
        data=lambda w: f"{data_dir(w.benchmark)}/manifest.csv",
    output:
        update(f"{RUN_DIR}/train.json"),
    benchmark:  # Snakemake's record of the job's latest attempt: wall and CPU time, peak memory (continual-bench profile)
        f"{RUN_DIR}/logs/train.tsv",
    params:
        log=lambda w, output: Path(output[0]).parent / "logs" / "train.log",
        backbone=lambda w: t2i_backbone(w),
        data=lambda w: data_dir(w.benchmark),
        settings=method_settings,
        ckpt=lambda w, output: Path(output[0]).with_name("checkpoints"),
        device=config["device"],
    priority: 5
    threads: config["threads_per_run"]
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    shell:
        "mkdir -p \"$(dirname {params.log:q})\"; echo \"== $(date -u +%Y-%m-%dT%H:%M:%SZ) train on $(uname -n)\" "
        ">> {params.log:q}; "
        "{CLI:q} --threads {threads} train "
        "--backbone {params.backbone:q} --data {params.data:q} --benchmark {wildcards.benchmark:q} "
        "--method {wildcards.method:q} --n-tasks {wildcards.n_tasks:q} --seed {wildcards.seed:q} "
        "--settings {params.settings:q} --ckpt-dir {params.ckpt:q} --device {params.device:q} "
        "--reuse-states-from {wildcards.results:q} " + REUSE_FROM +
        "--out {output:q} 2>> {params.log:q} "
        # the log is not a declared output, so --show-failed-logs cannot print it: a failure prints its tail instead
        "|| {{ rc=$?; echo last lines of {params.log:q} >&2; tail -n 20 {params.log:q} >&2; exit $rc; }}"


rule generate:
    input:
        rules.train.output,
        backbone=backbone_input,
    output:
        update(f"{RUN_DIR}/samples.npz"),
    log:
        f"{RUN_DIR}/logs/generate.log",
    benchmark:
        f"{RUN_DIR}/logs/generate.tsv",
    params:
        backbone=lambda w: t2i_backbone(w),
        data=lambda w: data_dir(w.benchmark),
        settings=method_settings,
        ckpt=lambda w, output: Path(output[0]).with_name("checkpoints"),
        device=config["device"],
        full=lambda w: "--full-matrix" if config["evaluation"]["full_matrix"] else "",
        # a function, not a string: Snakemake would format a string param and read {prompt} as a wildcard
        text=lambda w: " ".join(f"--text-template {shlex.quote(t)}" for t in config["evaluation"]["text_templates"]),
        ev=config["evaluation"],
    threads: config["threads_per_run"]
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} --threads {threads} generate "
        "--backbone {params.backbone:q} --data {params.data:q} --benchmark {wildcards.benchmark:q} "
        "--method {wildcards.method:q} --n-tasks {wildcards.n_tasks:q} --seed {wildcards.seed:q} "
        "--settings {params.settings:q} --ckpt-dir {params.ckpt:q} --device {params.device:q} "
        "--out {output:q} --n-samples {params.ev[n_samples]:q} "
        "--sample-steps {params.ev[sample_steps]:q} --guidance {params.ev[guidance]:q} {params.full} {params.text} "
        "2> {log:q}"


rule evaluate:
    input:
        train=rules.train.output,
        samples=rules.generate.output,
        judge=judge_input,
        oracle=oracle_input,
    output:
        metrics=update(f"{RUN_DIR}/metrics.csv"),
        R=update(f"{RUN_DIR}/R.csv"),
        figure=report(update("{results}/figures/samples/{benchmark}_T{n_tasks}_{method}_seed{seed}.png"),
                      category="Samples", subcategory="{benchmark}, {n_tasks} tasks",
                      labels={"method": "{method}", "seed": "{seed}"}),
    log:
        f"{RUN_DIR}/logs/evaluate.log",
    benchmark:
        f"{RUN_DIR}/logs/evaluate.tsv",
    params:
        data=lambda w: data_dir(w.benchmark),
        judge=lambda w: judge_dir(w),
        oracle=lambda w, input: ["--oracle", str(Path(input.oracle).parent)] if input.oracle else [],
        ev=lambda w: eval_settings(),  # a function: the settings hold "{prompt}" templates, not wildcards
    threads: config["threads_per_run"]
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} --threads {threads} evaluate --train-json {input.train:q} --samples {input.samples:q} "
        "--data {params.data:q} --judge {params.judge:q} {params.oracle:q} --benchmark {wildcards.benchmark:q} "
        "--method {wildcards.method:q} --n-tasks {wildcards.n_tasks:q} --seed {wildcards.seed:q} "
        "--eval-settings {params.ev:q} --out-metrics {output.metrics:q} --out-R {output.R:q} "
        "--figure {output.figure:q} 2> {log:q}"


rule noise_floor:
    # The metrics' own noise on a benchmark (real-vs-real and seed-vs-seed null differences), printed under every
    # table and used to decide what the tables may mark as better (continual_bench/evaluation/noise_floor.py)
    input:
        backbone=backbone_input,
        judge=judge_input,
        oracle=oracle_input,
        data=lambda w: f"{data_dir(w.benchmark)}/manifest.csv",
    output:
        "{results}/noise_floor/{benchmark}.csv",
    log:
        "{results}/noise_floor/{benchmark}.log",
    benchmark:
        "{results}/logs/noise_floor_{benchmark}.tsv",
    params:
        backbone=lambda w: t2i_backbone(w),
        data=lambda w: data_dir(w.benchmark),
        judge=lambda w: judge_dir(w),
        oracle=lambda w, input: ["--oracle", str(Path(input.oracle).parent)] if input.oracle else [],
        ev=lambda w: eval_settings(),
        device=config["device"],
        concepts=config["noise_floor"]["concepts"],
        repeats=config["noise_floor"]["repeats"],
    threads: config["threads_per_run"]
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} --threads {threads} noise-floor --backbone {params.backbone:q} --data {params.data:q} "
        "--judge {params.judge:q} {params.oracle:q} --benchmark {wildcards.benchmark:q} --eval-settings {params.ev:q} "
        "--max-concepts {params.concepts:q} --repeats {params.repeats:q} --device {params.device:q} --out {output:q} "
        "2> {log:q}"
