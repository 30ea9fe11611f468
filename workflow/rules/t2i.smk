import shlex

# Continual customization runs: train (resumable, one checkpoint per task) -> generate -> evaluate.
# Checkpoints live next to train.json but are not declared outputs, so Snakemake never deletes them
# when a job is killed: the rerun resumes at the first task without a checkpoint.
RUN_DIR = "{results}/runs/{benchmark}/T{n_tasks}/{method}/seed{seed}"

rule train:
    input:
        backbone=backbone_input,
        data=lambda w: f"{data_dir(w.benchmark)}/manifest.csv",
    output:
        f"{RUN_DIR}/train.json",
    log:
        f"{RUN_DIR}/logs/train.log",
    params:
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
        "continual-bench --threads {threads} train "
        "--backbone {params.backbone} --data {params.data} --benchmark {wildcards.benchmark} "
        "--method {wildcards.method} --n-tasks {wildcards.n_tasks} --seed {wildcards.seed} "
        "--settings {params.settings:q} --ckpt-dir {params.ckpt} --device {params.device} "
        "--out {output} 2> {log}"


rule generate:
    input:
        rules.train.output,
        backbone=backbone_input,
    output:
        f"{RUN_DIR}/samples.npz",
    log:
        f"{RUN_DIR}/logs/generate.log",
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
        "continual-bench --threads {threads} generate "
        "--backbone {params.backbone} --data {params.data} --benchmark {wildcards.benchmark} "
        "--method {wildcards.method} --n-tasks {wildcards.n_tasks} --seed {wildcards.seed} "
        "--settings {params.settings:q} --ckpt-dir {params.ckpt} --device {params.device} "
        "--out {output} --n-samples {params.ev[n_samples]} "
        "--sample-steps {params.ev[sample_steps]} --guidance {params.ev[guidance]} {params.full} {params.text} 2> {log}"


rule evaluate:
    input:
        train=rules.train.output,
        samples=rules.generate.output,
        judge=judge_input,
        oracle=oracle_input,
    output:
        metrics=f"{RUN_DIR}/metrics.csv",
        R=f"{RUN_DIR}/R.csv",
        figure=report("{results}/figures/samples/{benchmark}_T{n_tasks}_{method}_seed{seed}.png",
                      category="Samples", subcategory="{benchmark}, {n_tasks} tasks",
                      labels={"method": "{method}", "seed": "{seed}"}),
    log:
        f"{RUN_DIR}/logs/evaluate.log",
    params:
        data=lambda w: data_dir(w.benchmark),
        judge=lambda w: judge_dir(w),
        oracle=lambda w, input: f"--oracle {Path(input.oracle).parent}" if input.oracle else "",
        ev=lambda w: eval_settings(),  # a function: the settings hold "{prompt}" templates, not wildcards
    threads: config["threads_per_run"]
    conda:
        CONDA_ENV
    shell:
        "continual-bench --threads {threads} evaluate --train-json {input.train} --samples {input.samples} "
        "--data {params.data} --judge {params.judge} {params.oracle} --benchmark {wildcards.benchmark} "
        "--method {wildcards.method} --n-tasks {wildcards.n_tasks} --seed {wildcards.seed} "
        "--eval-settings {params.ev:q} --out-metrics {output.metrics} --out-R {output.R} "
        "--figure {output.figure} 2> {log}"


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
    params:
        backbone=lambda w: t2i_backbone(w),
        data=lambda w: data_dir(w.benchmark),
        judge=lambda w: judge_dir(w),
        oracle=lambda w, input: f"--oracle {Path(input.oracle).parent}" if input.oracle else "",
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
        "continual-bench --threads {threads} noise-floor --backbone {params.backbone} --data {params.data} "
        "--judge {params.judge} {params.oracle} --benchmark {wildcards.benchmark} --eval-settings {params.ev:q} "
        "--max-concepts {params.concepts} --repeats {params.repeats} --device {params.device} --out {output} 2> {log}"
