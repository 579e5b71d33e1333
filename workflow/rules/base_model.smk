# Base models that know the synthetic world: a tiny random init trained on the world's train scenes.


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
        model=lambda wc: MODELS[wc.model],
        datasets=lambda wc: [
            DATASETS[name] for name in MODELS[wc.model]["pretrain"].get("datasets", [])
        ],
        settings=lambda wc: pretrain_base_settings(wc.model),
        protocol=config["protocol"],
        device=config.get("device", "auto"),
    log:
        "logs/pretrain_base/{model}.log",
    benchmark:
        "results/benchmarks/pretrain_base/{model}.tsv"
    threads: stage_resources("pretrain_base", "threads", 1)
    resources:
        gpu=stage_resources("pretrain_base", "gpu", 0),
        mem_mb=stage_resources("pretrain_base", "mem_mb", 4000),
        runtime=stage_resources("pretrain_base", "runtime", 30),
    conda:
        ENV
    script:
        "../../scripts/pretrain_base.py"
