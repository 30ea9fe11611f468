# The toy world: procedurally generated data and the tiny backbones, pretrained once and cached.
T = config["toy"]


rule toy_data:
    output:
        "data/toy/{benchmark}/manifest.csv",
    log:
        "logs/toy/data_{benchmark}.log",
    params:
        out=lambda w: f"data/toy/{w.benchmark}",
    conda:
        CONDA_ENV
    shell:
        "{CB} make-toy-data --world {wildcards.benchmark} --out {params.out} --seed {T[data_seed]} "
        "--n-concepts {T[n_concepts]} --n-train {T[n_train]} --n-eval {T[n_eval]} "
        "--n-generic {T[n_generic]} --n-generic-ids {T[n_generic_ids]} 2> {log}"


TOY_DATA = expand("data/toy/{benchmark}/manifest.csv", benchmark=["toy_faces", "toy_landmarks"])
TOY_DIRS = " ".join(f"data/toy/{b}" for b in ["toy_faces", "toy_landmarks"])


rule toy_tokenizer:
    output:
        f"{TOY}/tokenizer/vocab.json",
    log:
        "logs/toy/tokenizer.log",
    conda:
        CONDA_ENV
    shell:
        "{CB} write-tokenizer --out {TOY}/tokenizer --max-length 32 2> {log}"


rule toy_vae:
    input:
        TOY_DATA,
    output:
        f"{TOY}/vae/config.json",
    log:
        "logs/toy/vae.log",
    threads: workflow.cores
    conda:
        CONDA_ENV
    shell:
        "{CB} --threads {threads} pretrain-vae --data {TOY_DIRS} --out {TOY}/vae --steps {T[vae_steps]} 2> {log}"


rule toy_text_encoder:
    input:
        TOY_DATA,
        f"{TOY}/tokenizer/vocab.json",
    output:
        f"{TOY}/text_encoder/config.json",
    log:
        "logs/toy/text_encoder.log",
    threads: workflow.cores
    conda:
        CONDA_ENV
    shell:
        "{CB} --threads {threads} pretrain-text-encoder --data {TOY_DIRS} --tokenizer {TOY}/tokenizer "
        "--out {TOY}/text_encoder --steps {T[text_encoder_steps]} 2> {log}"


rule toy_t2i:
    input:
        TOY_DATA,
        f"{TOY}/vae/config.json",
        f"{TOY}/text_encoder/config.json",
    output:
        f"{TOY}/sd-tiny/model_index.json",
    log:
        "logs/toy/t2i.log",
    threads: workflow.cores
    conda:
        CONDA_ENV
    shell:
        "{CB} --threads {threads} pretrain-t2i --data {TOY_DIRS} --vae {TOY}/vae --tokenizer {TOY}/tokenizer "
        "--text-encoder {TOY}/text_encoder --out {TOY}/sd-tiny --steps {T[t2i_steps]} "
        "--batch-size {T[t2i_batch_size]} 2> {log}"


rule toy_judge:
    input:
        TOY_DATA,
    output:
        f"{TOY}/judge/open_clip_config.json",
    log:
        "logs/toy/judge.log",
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "{CB} --threads {threads} train-judge --data {TOY_DIRS} --out {TOY}/judge --steps {T[judge_steps]} 2> {log}"


rule toy_oracle:
    input:
        "data/toy/{benchmark}/manifest.csv",
    output:
        f"{TOY}/oracle/{{benchmark}}/oracle.json",
    log:
        "logs/toy/oracle_{benchmark}.log",
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "{CB} --threads {threads} train-oracle --data data/toy/{wildcards.benchmark} "
        "--out {TOY}/oracle/{wildcards.benchmark} --epochs {T[oracle_epochs]} 2> {log}"
