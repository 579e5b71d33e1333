# Base models that know their facts: a tiny random init trained on the synthetic world and/or
# datasets' train splits (mmke.world_training), and SERAC's counterfactual LM trained the same way.
# Each depends only on what it trains on: eval splits are never inputs here.


rule pretrain_base:
    input:
        unpack(pretrain_base_inputs),
    output:
        model=directory("resources/world/{model}"),
        report=report(
            "resources/world/{model}.pretrain.json",
            caption="../report/pretrain.rst",
            category="Base models",
        ),
    params:
        model=trained_model_spec,
        datasets=lambda wc: pretrain_datasets(MODELS[wc.model]["pretrain"]),
        settings=lambda wc: pretrain_settings(MODELS[wc.model]["pretrain"]),
        protocol=config["protocol"],
        device=config.get("device", "auto"),
    log:
        "logs/pretrain_base/{model}.log",
    benchmark:
        "results/benchmarks/pretrain_base/{model}.tsv"
    # the DAG's longest path: on few cores each base model starts before any job downstream of another
    priority: 10
    threads: stage_resources("pretrain_base", "threads", 1)
    resources:
        gpu=stage_resources("pretrain_base", "gpu", 0),
        mem_mb=stage_resources("pretrain_base", "mem_mb", 4000),
        runtime=stage_resources("pretrain_base", "runtime", 30),
    conda:
        ENV
    script:
        "../../scripts/pretrain_base.py"


rule pretrain_counterfactual:
    input:
        unpack(pretrain_counterfactual_inputs),
    output:
        model=directory(COUNTERFACTUAL_DIR),
        report=report(
            f"{COUNTERFACTUAL_DIR}.pretrain.json",
            caption="../report/pretrain.rst",
            category="Base models",
        ),
    params:
        datasets=lambda wc: pretrain_datasets(config["counterfactual"]["pretrain"]),
        settings=lambda wc: pretrain_settings(config["counterfactual"]["pretrain"]),
        protocol=config["protocol"],
        device=config.get("device", "auto"),
    log:
        "logs/pretrain_counterfactual.log",
    benchmark:
        "results/benchmarks/pretrain_counterfactual.tsv"
    threads: stage_resources("pretrain_base", "threads", 1)
    resources:
        gpu=stage_resources("pretrain_base", "gpu", 0),
        mem_mb=stage_resources("pretrain_base", "mem_mb", 4000),
        runtime=stage_resources("pretrain_base", "runtime", 30),
    conda:
        ENV
    script:
        "../../scripts/pretrain_counterfactual.py"
