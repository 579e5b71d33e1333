# Meta-training of MEND / SERAC / KE: one job per method x model x training set. The checkpoint
# is an input of that method's evaluate jobs; the hparams file and the training data are inputs
# here, so only a change of either retrains.


rule pretrain:
    input:
        unpack(pretrain_inputs),
    output:
        checkpoint="resources/checkpoints/{method}/{model}/{dataset}/editor.safetensors",
        report="resources/checkpoints/{method}/{model}/{dataset}/train.json",
    params:
        model=model_spec,
        dataset=lambda wc: DATASETS[wc.dataset],
        protocol=config["protocol"],
        device=config.get("device", "auto"),
        # resume files of interrupted runs (kept by Snakemake when a job fails)
        state_dir="resources/checkpoints/{method}/{model}/{dataset}/resume",
    log:
        "logs/pretrain/{method}/{model}/{dataset}.log",
    benchmark:
        "results/benchmarks/pretrain/{method}/{model}/{dataset}.tsv"
    threads: stage_resources("pretrain", "threads", 1)
    resources:
        gpu=stage_resources("pretrain", "gpu", 0),
        mem_mb=stage_resources("pretrain", "mem_mb", 8000),
        runtime=stage_resources("pretrain", "runtime", 120),
    conda:
        ENV
    script:
        "../../scripts/pretrain.py"


rule tiny_aux_model:
    input:
        code=generator_sources("models/tiny_aux.py", "models/tiny.py", "data/demo.py"),
    output:
        directory("resources/tiny/aux/{kind}"),
    log:
        "logs/tiny_aux_model/{kind}.log",
    benchmark:
        "results/benchmarks/tiny_aux_model/{kind}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    conda:
        ENV
    script:
        "../../scripts/tiny_aux_model.py"
