# IKE's retrieval index: sentence embeddings of a training set, and of the eval split's retrieval
# queries, once per dataset x sentence model (independent of the edited model, so every model's IKE
# job reads the same files and none loads the sentence model).


rule embed:
    input:
        unpack(embed_inputs),
    output:
        embeddings="resources/embeddings/{dataset}/{sentence_model}/embeddings.safetensors",
        sentences="resources/embeddings/{dataset}/{sentence_model}/sentences.json",
        queries="resources/embeddings/{dataset}/{sentence_model}/queries.safetensors",
        query_sentences="resources/embeddings/{dataset}/{sentence_model}/queries.json",
    params:
        dataset=lambda wc: DATASETS[wc.dataset],
        sentence_model=lambda wc: sentence_models()[wc.sentence_model],
        device=config.get("device", "auto"),
    log:
        "logs/embed/{dataset}/{sentence_model}.log",
    benchmark:
        "results/benchmarks/embed/{dataset}/{sentence_model}.tsv"
    threads: stage_resources("embed", "threads", 1)
    resources:
        gpu=stage_resources("embed", "gpu", 0),
        mem_mb=stage_resources("embed", "mem_mb", 2000),
        runtime=stage_resources("embed", "runtime", 10),
    conda:
        ENV
    script:
        "../../scripts/embed.py"
