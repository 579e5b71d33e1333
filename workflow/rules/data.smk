# Datasets and checkpoints: downloaded for the paper config (`downloads:`, one rule per entry,
# run on the submitting host because cluster nodes are often offline), or built by the demo.


rule demo_dataset:
    input:
        code=generator_sources("data/demo.py"),
    output:
        train="resources/demo/{dataset}/train.json",
        eval="resources/demo/{dataset}/eval.json",
        images=directory("resources/demo/{dataset}/images"),
    params:
        kind=lambda wc: DATASETS[wc.dataset]["kind"],
        demo=lambda wc: DATASETS[wc.dataset]["demo"],
    log:
        "logs/demo_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/demo_dataset/{dataset}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        ENV
    script:
        "../../scripts/demo_dataset.py"


rule tiny_model:
    input:
        code=generator_sources("models/tiny.py", "data/demo.py"),
    output:
        directory("resources/tiny/{model}"),
    params:
        family=lambda wc: MODELS[wc.model]["family"],
        tiny=lambda wc: MODELS[wc.model]["tiny"],
    log:
        "logs/tiny_model/{model}.log",
    benchmark:
        "results/benchmarks/tiny_model/{model}.tsv"
    # the base models' pretraining is the DAG's longest path: start it before anything else
    priority: 10
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    conda:
        ENV
    script:
        "../../scripts/tiny_model.py"


rule convert_model:
    input:
        unpack(lavis_inputs),
    output:
        directory(f"{CONVERTED_DIR}/{{model}}"),
    params:
        vision_config=lambda wc: MODELS[wc.model]["lavis"].get("vision_config", {}),
        qformer_config=lambda wc: MODELS[wc.model]["lavis"].get("qformer_config", {}),
        dtype=lambda wc: MODELS[wc.model].get("dtype", "float32"),
    log:
        "logs/convert_model/{model}.log",
    benchmark:
        "results/benchmarks/convert_model/{model}.tsv"
    threads: stage_resources("convert_model", "threads", 1)
    resources:
        mem_mb=stage_resources("convert_model", "mem_mb", 40000),
        runtime=stage_resources("convert_model", "runtime", 60),
    conda:
        ENV
    script:
        "../../scripts/convert_model.py"


for _name, _entry in DOWNLOADS.items():

    rule:
        name:
            f"download_{rule_id(_name)}"
        output:
            download_outputs(_name),
        params:
            name=_name,
            entry=_entry,
        log:
            f"logs/download/{_name}.log",
        benchmark:
            f"results/benchmarks/download/{_name}.tsv"
        localrule: True
        threads: 1
        resources:
            mem_mb=2000,
            runtime=stage_resources("download", "runtime", 240),
        conda:
            ENV
        script:
            "../../scripts/download.py"

    if "extract" in _entry:

        rule:
            name:
                f"extract_{rule_id(_name)}"
            input:
                _entry["dest"],
            output:
                directory(_entry["extract"]),
            log:
                f"logs/extract/{_name}.log",
            benchmark:
                f"results/benchmarks/extract/{_name}.tsv"
            localrule: True
            threads: 1
            resources:
                mem_mb=2000,
                runtime=stage_resources("extract", "runtime", 120),
            conda:
                ENV
            script:
                "../../scripts/extract.py"


rule downloads:
    """Every download and extracted archive: run this first on a host with internet access."""
    input:
        all_downloads(),
