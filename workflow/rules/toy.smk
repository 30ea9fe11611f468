# The toy world: procedurally generated data and the tiny backbones, pretrained once and cached.
TOY_BENCHMARKS = ["toy_faces", "toy_landmarks"]
TOY_DATA = expand("data/toy/{benchmark}/manifest.csv", benchmark=TOY_BENCHMARKS)


rule toy_data:
    output:
        "data/toy/{benchmark}/manifest.csv",
    log:
        "logs/toy/data_{benchmark}.log",
    benchmark:
        "logs/toy/data_{benchmark}.tsv",
    params:
        out=lambda w, output: Path(output[0]).parent,
        # only the keys that shape the data: changing a pretraining length must not regenerate it
        cfg={k: config["toy"][k] for k in ("data_seed", "n_concepts", "n_train", "n_eval", "n_generic", "n_generic_ids")},
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} make-toy-data --world {wildcards.benchmark} --out {params.out} --seed {params.cfg[data_seed]} "
        "--n-concepts {params.cfg[n_concepts]} --n-train {params.cfg[n_train]} --n-eval {params.cfg[n_eval]} "
        "--n-generic {params.cfg[n_generic]} --n-generic-ids {params.cfg[n_generic_ids]} 2> {log}"


rule toy_tokenizer:
    output:
        f"{TOY}/tokenizer/vocab.json",
    log:
        "logs/toy/tokenizer.log",
    benchmark:
        "logs/toy/tokenizer.tsv",
    params:
        out=lambda w, output: Path(output[0]).parent,
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} write-tokenizer --out {params.out} --max-length 32 2> {log}"


rule toy_vae:
    input:
        TOY_DATA,
    output:
        f"{TOY}/vae/pretrain_stats.json",  # written last; its content changes with every training (see common.smk)
    log:
        "logs/toy/vae.log",
    benchmark:
        "logs/toy/vae.tsv",
    params:
        data=lambda w, input: toy_dirs(input),
        out=lambda w, output: Path(output[0]).parent,
        steps=toy("vae_steps"),
        latent_size=toy("latent_size"),
    priority: 100  # the critical path: pretraining the backbone (Snakemake sums priorities over jobs that could run together: 10 tied with two priority-5 jobs)
    threads: 1  # runs beside the text encoder, judge and oracles
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} --threads {threads} pretrain-vae --data {params.data} --out {params.out} --steps {params.steps} --latent-size {params.latent_size} 2> {log}"


rule toy_text_encoder:
    input:
        TOY_DATA,
        tok=f"{TOY}/tokenizer/vocab.json",
    output:
        f"{TOY}/text_encoder/pretrain_stats.json",
    log:
        "logs/toy/text_encoder.log",
    benchmark:
        "logs/toy/text_encoder.tsv",
    params:
        data=lambda w, input: toy_dirs(input),
        tok=lambda w, input: Path(input.tok).parent,
        out=lambda w, output: Path(output[0]).parent,
        steps=toy("text_encoder_steps"),
    priority: 100  # the critical path: pretraining the backbone (Snakemake sums priorities over jobs that could run together: 10 tied with two priority-5 jobs)
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} --threads {threads} pretrain-text-encoder --data {params.data} --tokenizer {params.tok} "
        "--out {params.out} --steps {params.steps} 2> {log}"


rule toy_t2i:
    input:
        TOY_DATA,
        vae=f"{TOY}/vae/pretrain_stats.json",
        te=f"{TOY}/text_encoder/pretrain_stats.json",
        tok=f"{TOY}/tokenizer/vocab.json",
    output:
        f"{TOY}/sd-tiny/pretrain_stats.json",
    log:
        "logs/toy/t2i.log",
    benchmark:
        "logs/toy/t2i.tsv",
    params:
        data=lambda w, input: toy_dirs(input),
        vae=lambda w, input: Path(input.vae).parent,
        te=lambda w, input: Path(input.te).parent,
        tok=lambda w, input: Path(input.tok).parent,
        out=lambda w, output: Path(output[0]).parent,
        steps=toy("t2i_steps"),
        batch=toy("t2i_batch_size"),
    priority: 100  # the critical path: pretraining the backbone (Snakemake sums priorities over jobs that could run together: 10 tied with two priority-5 jobs)
    threads: 1  # measured on 2 cores: 2 threads 219 s, 1 thread 260 s; the second core does more beside it (judge, oracle, ViT)
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} --threads {threads} pretrain-t2i --data {params.data} --vae {params.vae} --tokenizer {params.tok} "
        "--text-encoder {params.te} --out {params.out} --steps {params.steps} --batch-size {params.batch} 2> {log}"


# The judge and the oracles are needed only for evaluation. They wait for the VAE (an input they do not
# read) so that on a small machine they never take the cores the VAE and text encoder need before the
# UNet's pretraining; they then run beside it.
rule toy_judge:
    input:
        TOY_DATA,
        after=f"{TOY}/vae/pretrain_stats.json",
    output:
        f"{TOY}/judge/train_stats.json",
    log:
        "logs/toy/judge.log",
    benchmark:
        "logs/toy/judge.tsv",
    params:
        data=lambda w, input: toy_dirs(input),
        out=lambda w, output: Path(output[0]).parent,
        steps=toy("judge_steps"),
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} --threads {threads} train-judge --data {params.data} --out {params.out} --steps {params.steps} 2> {log}"


rule toy_oracle:
    input:
        "data/toy/{benchmark}/manifest.csv",
        after=f"{TOY}/vae/pretrain_stats.json",
    output:
        f"{TOY}/oracle/{{benchmark}}/oracle.json",
    log:
        "logs/toy/oracle_{benchmark}.log",
    benchmark:
        "logs/toy/oracle_{benchmark}.tsv",
    params:
        data=lambda w, input: Path(input[0]).parent,
        out=lambda w, output: Path(output[0]).parent,
        epochs=toy("oracle_epochs"),
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} --threads {threads} train-oracle --data {params.data} --out {params.out} --epochs {params.epochs} 2> {log}"
