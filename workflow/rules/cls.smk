# Class-incremental classification (CODA-Prompt protocol): data -> backbone -> train + evaluate each run.
# toy world: toy_imagenet_r generated here + a tiny ViT pretrained here on its photo rendition;
# paper profile: ImageNet-R (images + CODA-P split files) and ViT-B/16 safetensors, fetched and prepared by
# the rules in fetch.smk.
# Runs write metrics.csv (same long format as t2i, so the tables rule summarizes both tracks),
# acc_matrix.csv, R.csv (the same matrix in the t2i R format, for the figures), train.json and predictions.npz
# (every test image's predicted class after every task; not committed, so a fresh clone trains the runs again);
# checkpoints live next to them, undeclared, so a killed job resumes; its log is appended to (see t2i.smk),
# and its outputs are update(): a failed rerun puts the previous files back.
ruleorder: toy_imagenet_r_data > toy_data
ruleorder: train_cls > train
ruleorder: train_cls > evaluate


rule toy_imagenet_r_data:
    output:
        TOY_CLS_DATA,
    log:
        "logs/toy/data_toy_imagenet_r.log",
    benchmark:
        "logs/toy/data_toy_imagenet_r.tsv",
    params:
        out=lambda w, output: Path(output[0]).parent,
        cfg=config["toy_cls"],
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} make-toy-imagenet-r --out {params.out} --seed {params.cfg[data_seed]} "
        "--n-classes {params.cfg[n_classes]} --n-train {params.cfg[n_train]} --n-test {params.cfg[n_test]} "
        "--n-pretrain {params.cfg[n_pretrain]} 2> {log}"


rule toy_vit:
    input:
        TOY_CLS_DATA,
    output:
        f"{TOY_VIT}/vit_config.json",
    log:
        "logs/toy/vit.log",
    benchmark:
        "logs/toy/vit.tsv",
    params:
        data=lambda w, input: Path(input[0]).parent,
        out=lambda w, output: Path(output[0]).parent,
        cfg=config["toy_cls"],
    priority: 10  # the classification track's critical path
    threads: 1  # runs beside the text-to-image pretraining
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} --threads {threads} pretrain-vit --data {params.data} --out {params.out} "
        "--steps {params.cfg[vit_steps]} --batch-size {params.cfg[vit_batch_size]} --lr {params.cfg[vit_lr]} "
        "--patch-size {params.cfg[vit_patch_size]} --embed-dim {params.cfg[vit_embed_dim]} "
        "--depth {params.cfg[vit_depth]} --heads {params.cfg[vit_heads]} 2> {log}"


rule train_cls:
    input:
        backbone=cls_backbone_input,
        data=lambda w: f"{cls_data_dir(w.benchmark)}/manifest.csv",
    output:
        metrics=update(f"{CLS_RUN_DIR}/metrics.csv"),
        acc=update(f"{CLS_RUN_DIR}/acc_matrix.csv"),
        R=update(f"{CLS_RUN_DIR}/R.csv"),
        train=update(f"{CLS_RUN_DIR}/train.json"),
        # not committed (.gitignore), like the text-to-image runs' samples.npz: a fresh clone recomputes the run
        pred=update(f"{CLS_RUN_DIR}/predictions.npz"),
    benchmark:
        f"{CLS_RUN_DIR}/logs/train_cls.tsv",
    params:
        log=lambda w, output: Path(output.metrics).parent / "logs" / "train_cls.log",
        backbone=cls_backbone,
        data=lambda w: cls_data_dir(w.benchmark),
        settings=cls_settings,
        extra=cls_data_args,
        ckpt=lambda w, output: Path(output.metrics).with_name("checkpoints"),
        device=config["device"],
    wildcard_constraints:
        benchmark="toy_imagenet_r|imagenet_r",
    priority: 5
    threads: config["threads_per_run"]
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    shell:
        "mkdir -p \"$(dirname {params.log:q})\"; echo \"== $(date -u +%Y-%m-%dT%H:%M:%SZ) train-cls on $(uname -n)\" "
        ">> {params.log:q}; "
        "{CLI:q} --threads {threads} train-cls "
        "--backbone {params.backbone:q} --data {params.data:q} --benchmark {wildcards.benchmark:q} "
        "--method {wildcards.method:q} --n-tasks {wildcards.n_tasks:q} --seed {wildcards.seed:q} "
        "--settings {params.settings:q} --ckpt-dir {params.ckpt:q} --device {params.device:q} {params.extra} "
        "--out-train {output.train:q} --out-metrics {output.metrics:q} --out-acc {output.acc:q} --out-R {output.R:q} "
        "--out-pred {output.pred:q} "
        "2>> {params.log:q} "
        # the log is not a declared output, so --show-failed-logs cannot print it: a failure prints its tail instead
        "|| {{ rc=$?; echo last lines of {params.log:q} >&2; tail -n 20 {params.log:q} >&2; exit $rc; }}"
