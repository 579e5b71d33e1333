# Datasets and models the demo builds itself (downloads for the paper config: see issue #6).


rule demo_dataset:
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
    output:
        directory("resources/tiny/{model}"),
    params:
        family=lambda wc: MODELS[wc.model]["family"],
        tiny=lambda wc: MODELS[wc.model]["tiny"],
    log:
        "logs/tiny_model/{model}.log",
    benchmark:
        "results/benchmarks/tiny_model/{model}.tsv"
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
