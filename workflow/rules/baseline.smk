# Pre-edit outputs of a model on a dataset: computed once, shared by every method.


rule baseline:
    input:
        unpack(baseline_inputs),
    output:
        rows="results/baseline/{model}/{dataset}/pre.jsonl",
        tensors="results/baseline/{model}/{dataset}/pre.safetensors",
    params:
        model=model_spec,
        dataset=lambda wc: DATASETS[wc.dataset],
        protocol=config["protocol"],
        batch_size=config["evaluation"].get("batch_size"),
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
