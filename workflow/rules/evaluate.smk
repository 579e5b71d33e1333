# Edit + measure one method x model x dataset combo.


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        metrics="results/eval/{method}/{model}/{dataset}/metrics.json",
        records="results/eval/{method}/{model}/{dataset}/records.jsonl",
    params:
        model=lambda wc: MODELS[wc.model],
        dataset=lambda wc: DATASETS[wc.dataset],
        protocol=config["protocol"],
        evaluation=config["evaluation"],
        device=config.get("device", "auto"),
        resources=lambda wc: list(method_resources(wc)),
    log:
        "logs/evaluate/{method}/{model}/{dataset}.log",
    benchmark:
        "results/benchmarks/evaluate/{method}/{model}/{dataset}.tsv"
    threads: stage_resources("evaluate", "threads", 1)
    resources:
        gpu=stage_resources("evaluate", "gpu", 0),
        mem_mb=stage_resources("evaluate", "mem_mb", 4000),
        runtime=stage_resources("evaluate", "runtime", 60),
    conda:
        ENV
    script:
        "../../scripts/evaluate.py"
