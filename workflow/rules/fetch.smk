# The paper profile's real data and pretrained models: fetched once, verified, prepared into the toy world's
# layout (data/paper/<benchmark>/manifest.csv + a folder per concept + world.json) and into local model
# folders (<paper.resources_dir>/<model>/); every later job loads them from disk. Sources, checksums and
# selection rules: data_manifests/*.yaml and models.yaml. paper.offline: the fetch jobs download nothing,
# verify what is present and name what is missing. Each job writes its marker file last.
# Markers of fetch jobs are read as ancient(): toggling paper.offline (or the mirror) reruns the fetch jobs,
# which verify the files, but not the preparation, training and evaluation behind them. A changed manifest or
# selection setting still reruns the preparation (the manifest is an input, the settings are params).


rule fetch_dataset:
    input:
        manifest=lambda w: paper_manifest(w.dataset),
    output:
        f"{PAPER_RAW}/{{dataset}}/fetched.json",
    log:
        "logs/paper/fetch_{dataset}.log",
    benchmark:
        "logs/paper/fetch_{dataset}.tsv",
    params:
        out=lambda w, output: Path(output[0]).parent,
        # Celeb-A HQ is a manual download: its files are taken from <paper.manual_dir>/celeba_hq/
        manual=lambda w: f"--manual-dir {shlex.quote(PAPER['manual_dir'] + '/' + w.dataset)}" if w.dataset == "celeba_hq" else "",
        flags=paper_fetch_flags(),
    wildcard_constraints:
        dataset="|".join(PAPER_DATASETS),
    retries: 1
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} fetch --manifest {input.manifest:q} --out {params.out:q} {params.manual} {params.flags} "
        "2> {log:q}"


rule prepare_celeba_hq:
    input:
        fetched=ancient(f"{PAPER_RAW}/celeba_hq/fetched.json"),
        manifest=paper_manifest("celeba_hq"),
    output:
        "data/paper/celeba_hq/manifest.csv",
    log:
        "logs/paper/prepare_celeba_hq.log",
    benchmark:
        "logs/paper/prepare_celeba_hq.tsv",
    params:
        raw=lambda w, input: Path(input.fetched).parent,
        out=lambda w, output: Path(output[0]).parent,
        seed=PAPER["data_seed"],
        settings=json.dumps(PAPER["celeba_hq"], sort_keys=True),
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} prepare-celeba-hq --raw {params.raw:q} --out {params.out:q} --data-seed {params.seed:q} "
        "--settings {params.settings:q} --manifest {input.manifest:q} 2> {log:q}"


rule select_gldv2_waterfalls:
    input:
        fetched=ancient(f"{PAPER_RAW}/gldv2_waterfalls/fetched.json"),
        manifest=paper_manifest("gldv2_waterfalls"),
    output:
        f"{PAPER_RAW}/gldv2_waterfalls/selection.csv",
    log:
        "logs/paper/select_gldv2_waterfalls.log",
    benchmark:
        "logs/paper/select_gldv2_waterfalls.tsv",
    params:
        raw=lambda w, input: Path(input.fetched).parent,
        seed=PAPER["data_seed"],
        settings=json.dumps(PAPER["gldv2_waterfalls"], sort_keys=True),
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} select-gldv2-waterfalls --raw {params.raw:q} --out {output:q} --data-seed {params.seed:q} "
        "--settings {params.settings:q} --manifest {input.manifest:q} 2> {log:q}"


rule fetch_gldv2_images:
    input:
        selection=f"{PAPER_RAW}/gldv2_waterfalls/selection.csv",
        manifest=paper_manifest("gldv2_waterfalls"),
    output:
        f"{PAPER_RAW}/gldv2_waterfalls/fetched_images.csv",
    log:
        "logs/paper/fetch_gldv2_images.log",
    benchmark:
        "logs/paper/fetch_gldv2_images.tsv",
    params:
        raw=lambda w, input: Path(input.selection).parent,
        settings=json.dumps(PAPER["gldv2_waterfalls"], sort_keys=True),
        flags=paper_fetch_flags(),
    retries: 2  # images already verified are skipped: a retry resumes
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} fetch-gldv2-images --raw {params.raw:q} --selection {input.selection:q} --out {output:q} "
        "--settings {params.settings:q} --manifest {input.manifest:q} {params.flags} 2> {log:q}"


rule prepare_gldv2_waterfalls:
    input:
        fetched=ancient(f"{PAPER_RAW}/gldv2_waterfalls/fetched_images.csv"),
        manifest=paper_manifest("gldv2_waterfalls"),
    output:
        "data/paper/gldv2_waterfalls/manifest.csv",
    log:
        "logs/paper/prepare_gldv2_waterfalls.log",
    benchmark:
        "logs/paper/prepare_gldv2_waterfalls.tsv",
    params:
        raw=lambda w, input: Path(input.fetched).parent,
        out=lambda w, output: Path(output[0]).parent,
        seed=PAPER["data_seed"],
        settings=json.dumps(PAPER["gldv2_waterfalls"], sort_keys=True),
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} prepare-gldv2-waterfalls --raw {params.raw:q} --fetched {input.fetched:q} --out {params.out:q} "
        "--data-seed {params.seed:q} --settings {params.settings:q} --manifest {input.manifest:q} 2> {log:q}"


rule prepare_imagenet_r:
    input:
        fetched=ancient(f"{PAPER_RAW}/imagenet_r/fetched.json"),
        manifest=paper_manifest("imagenet_r"),
    output:
        "data/paper/imagenet_r/manifest.csv",
    log:
        "logs/paper/prepare_imagenet_r.log",
    benchmark:
        "logs/paper/prepare_imagenet_r.tsv",
    params:
        raw=lambda w, input: Path(input.fetched).parent,
        out=lambda w, output: Path(output[0]).parent,
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} prepare-imagenet-r-fetched --raw {params.raw:q} --out {params.out:q} "
        "--manifest {input.manifest:q} 2> {log:q}"


rule fetch_model:
    input:
        models=paper_manifest("models"),
    output:
        f"{PAPER_RES}/{{model}}/fetched.json",
    log:
        "logs/paper/fetch_model_{model}.log",
    benchmark:
        "logs/paper/fetch_model_{model}.tsv",
    params:
        resources=lambda w, output: Path(output[0]).parent.parent,
        flags=paper_fetch_flags() + (" --allow-unpinned" if PAPER["allow_unpinned_models"] else ""),
    wildcard_constraints:
        model="|".join(PAPER_MODELS),
    retries: 1
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} fetch-models --resources {params.resources:q} --model {wildcards.model:q} "
        "--models-file {input.models:q} {params.flags} 2> {log:q}"


rule paper_judge:
    input:
        clip=ancient(f"{PAPER_RES}/clip_vit_b_32/fetched.json"),
        inception=ancient(f"{PAPER_RES}/inception_kid/fetched.json"),
    output:
        f"{PAPER_RES}/judge/judge.json",
    log:
        "logs/paper/judge.log",
    benchmark:
        "logs/paper/judge.tsv",
    params:
        clip=lambda w, input: Path(input.clip).parent,
        inception=lambda w, input: Path(input.inception).parent,
        out=lambda w, output: Path(output[0]).parent,
    conda:
        CONDA_ENV
    shell:
        "{CLI:q} build-paper-judge --clip {params.clip:q} --inception {params.inception:q} --out {params.out:q} "
        "2> {log:q}"
