# Combos, input functions, wildcard constraints and resource helpers shared by all rules.
import re

DATASETS = config["datasets"]
MODELS = config["models"]
METHODS = config["methods"]
ENV = "../../envs/mmke.yaml"


def _alternatives(names):
    return "|".join(re.escape(name) for name in names)


wildcard_constraints:
    method=_alternatives(METHODS),
    model=_alternatives(MODELS),
    dataset=_alternatives(DATASETS),


def _excluded(method, model, dataset):
    combo = {"method": method, "model": model, "dataset": dataset}
    return any(
        all(combo[key] == value for key, value in rule.items())
        for rule in config.get("exclude", [])
    )


def combos():
    """Every (method, model, dataset) the config asks for, in config order."""
    return [
        (method, model, dataset)
        for method in METHODS
        for model in MODELS
        for dataset in DATASETS
        if not _excluded(method, model, dataset)
    ]


def eval_metrics():
    return [
        f"results/eval/{method}/{model}/{dataset}/metrics.json"
        for method, model, dataset in combos()
    ]


def summary_tables():
    return ["results/tables/summary.csv", "results/tables/summary.md"]


def dataset_inputs(wildcards):
    """The eval split and its image folders (produced by a rule or placed by hand)."""
    spec = DATASETS[wildcards.dataset]
    inputs = {"eval": spec["eval"], "images": spec["image_root"]}
    if spec.get("rephrase_image_root"):
        inputs["rephrase_images"] = spec["rephrase_image_root"]
    return inputs


def model_inputs(wildcards):
    return {"model": MODELS[wildcards.model]["path"]}


def pretrain_inputs(wildcards):
    """The random init, and the eval split + images of each dataset whose facts the stage checks.

    Training pictures are rendered by the stage itself from the world's train scenes.
    """
    spec = MODELS[wildcards.model]["pretrain"]
    inputs = {"init": spec.get("init", f"resources/tiny/{wildcards.model}")}
    for name in spec.get("datasets", []):
        dataset = DATASETS[name]
        inputs |= {f"{name}_eval": dataset["eval"], f"{name}_images": dataset["image_root"]}
        if dataset.get("rephrase_image_root"):
            inputs[f"{name}_rephrase_images"] = dataset["rephrase_image_root"]
    return inputs


def pretrain_settings(model):
    """The optimisation settings of a model's ``pretrain:`` entry (what mmke.world_training reads)."""
    return {
        key: value
        for key, value in MODELS[model]["pretrain"].items()
        if key not in ("datasets", "init")
    }


def baseline_inputs(wildcards):
    return {**dataset_inputs(wildcards), **model_inputs(wildcards)}


def method_resources(wildcards):
    """Stage outputs the editor of this combo loads in ``Editor.prepare``, by name.

    IKE gets its training-set embeddings, MEND/SERAC/KE their meta-network checkpoint; a
    method with no entry needs nothing. Names are passed through to ``prepare(resources)``.
    """
    return {}


def evaluate_inputs(wildcards):
    prefix = f"results/baseline/{wildcards.model}/{wildcards.dataset}"
    return {
        **baseline_inputs(wildcards),
        **method_resources(wildcards),
        "hparams": hparams_file(wildcards),
        "baseline_rows": f"{prefix}/pre.jsonl",
        "baseline_tensors": f"{prefix}/pre.safetensors",
    }


def hparams_file(wildcards):
    return f"{config.get('hparams_dir', 'config/hparams')}/{wildcards.method}/{wildcards.model}.yaml"


def stage_resources(stage, key, default):
    """A per-stage resource from config['resources'][stage] (gpu, mem_mb, runtime, threads)."""
    return config["resources"].get(stage, {}).get(key, default)
