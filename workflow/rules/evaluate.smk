# Edit + measure one method x model x dataset combo. A dataset with `shards: N > 1` is measured
# as N contiguous blocks (one job each, `evaluate_shard`), merged by `gather_shards` into the same
# metrics.json / records.jsonl an unsharded `evaluate` job writes, so nothing downstream changes.


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        metrics="results/eval/{method}/{model}/{dataset}/metrics.json",
        records="results/eval/{method}/{model}/{dataset}/records.jsonl",
    wildcard_constraints:
        dataset=_alternatives(UNSHARDED_DATASETS),
    params:
        model=model_spec,
        dataset=lambda wc: DATASETS[wc.dataset],
        protocol=config["protocol"],
        evaluation=single_evaluation(),
        device=config.get("device", "auto"),
        resources=lambda wc: list(method_resources(wc)),
        shard=shard_param,
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


# The sequential schedule: one job per combo (a group of edits cannot be split into shards).
use rule evaluate as evaluate_sequential with:
    output:
        metrics=f"{SEQUENTIAL_DIR}/eval/{{method}}/{{model}}/{{dataset}}/metrics.json",
        records=f"{SEQUENTIAL_DIR}/eval/{{method}}/{{model}}/{{dataset}}/records.jsonl",
    wildcard_constraints:
        dataset=_alternatives(DATASETS),
    params:
        evaluation=lambda wc: sequential_evaluation(),
    log:
        "logs/evaluate_sequential/{method}/{model}/{dataset}.log",
    benchmark:
        "results/benchmarks/evaluate_sequential/{method}/{model}/{dataset}.tsv"


use rule evaluate as evaluate_shard with:
    output:
        metrics=f"{SHARD_DIR}/metrics.json",
        records=f"{SHARD_DIR}/records.jsonl",
    wildcard_constraints:
        dataset=_alternatives(SHARDED_DATASETS),
    log:
        "logs/evaluate/{method}/{model}/{dataset}/{shard}-of-{shards}.log",
    benchmark:
        "results/benchmarks/evaluate/{method}/{model}/{dataset}/{shard}-of-{shards}.tsv"


rule gather_shards:
    input:
        unpack(shard_outputs),
    output:
        metrics="results/eval/{method}/{model}/{dataset}/metrics.json",
        records="results/eval/{method}/{model}/{dataset}/records.jsonl",
    wildcard_constraints:
        dataset=_alternatives(SHARDED_DATASETS),
    log:
        "logs/gather_shards/{method}/{model}/{dataset}.log",
    benchmark:
        "results/benchmarks/gather_shards/{method}/{model}/{dataset}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        ENV
    script:
        "../../scripts/gather_shards.py"
