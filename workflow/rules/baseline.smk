# Pre-edit outputs of a model on a dataset: computed once, shared by every method; with
# `evaluation.store_image_features` also the eval images' features (else an empty file).


rule baseline:
    input:
        unpack(baseline_inputs),
    output:
        rows="results/baseline/{model}/{dataset}/pre.jsonl",
        tensors="results/baseline/{model}/{dataset}/pre.safetensors",
        image_features="results/baseline/{model}/{dataset}/image_features.safetensors",
    params:
        model=model_spec,
        dataset=lambda wc: DATASETS[wc.dataset],
        protocol=config["protocol"],
        batch_size=config["evaluation"].get("batch_size"),
        batch_tokens=config["evaluation"].get("batch_tokens"),
        store_image_features=lambda wc: stores_image_features(wc.model),
        device=config.get("device", "auto"),
    log:
        "logs/baseline/{model}/{dataset}.log",
    benchmark:
        "results/benchmarks/baseline/{model}/{dataset}.tsv"
    threads: stage_resources("baseline", "threads", 1)
    resources:
        gpu=stage_resources("baseline", "gpu", 0),
        mem_mb=stage_resources("baseline", "mem_mb", 4000),
        runtime=stage_resources("baseline", "runtime", 30),
    conda:
        ENV
    script:
        "../../scripts/baseline.py"
