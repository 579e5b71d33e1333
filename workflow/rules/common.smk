# Combos, input functions, wildcard constraints and resource helpers shared by all rules.
import functools
import importlib.util
import os
import re
import sys
from pathlib import Path

import yaml

DATASETS = config["datasets"]
MODELS = config["models"]
METHODS = config["methods"]
DOWNLOADS = config.get("downloads", {})
ENV = "../../envs/mmke.yaml"
# Methods whose network is meta-trained by the pretrain stage before they can edit.
PRETRAINED_METHODS = ("MEND", "SERAC", "KE")
# Hparams keys naming SERAC's auxiliary model directories (inputs of its pretrain job).
AUX_MODEL_KEYS = ("classifier", "counterfactual")


def _mmke_dir():
    """The mmke package the stages import: this interpreter's (as `make` runs it), else the repository's."""
    spec = importlib.util.find_spec("mmke")
    return Path(spec.origin).parent if spec is not None else Path(workflow.basedir) / "src" / "mmke"


MMKE_DIR = _mmke_dir()


def generator_sources(*files):
    """Source files (relative to the mmke package) of the code that generates a rule's output: the
    demo's datasets, the tiny random inits, the base models trained on the world. They are the
    rule's inputs, so that changing a generator reruns what it made (Snakemake tracks a rule's own
    script, not the library the script calls); a stale synthetic dataset would otherwise survive it.
    """
    return [str(MMKE_DIR / name) for name in files]


def _alternatives(names):
    """A regex matching exactly these names; one that matches nothing for an empty list."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


def shard_count(dataset):
    return DATASETS[dataset].get("shards", 1)


SHARDED_DATASETS = [name for name in DATASETS if shard_count(name) > 1]
UNSHARDED_DATASETS = [name for name in DATASETS if shard_count(name) == 1]
SHARD_DIR = "results/eval/{method}/{model}/{dataset}/shards/{shard}-of-{shards}"


wildcard_constraints:
    method=_alternatives(METHODS),
    model=_alternatives(MODELS),
    dataset=_alternatives(DATASETS),
    shard=r"\d+",
    shards=r"\d+",
    sentence_model=r"[A-Za-z0-9._-]+",
    kind="counterfactual|classifier",


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


# The second schedule (config `evaluation.sequential`): the same combos edited sequentially, with
# results, tables and plots of their own under SEQUENTIAL_DIR (a table never mixes schedules).
SEQUENTIAL = config.get("evaluation", {}).get("sequential")
SEQUENTIAL_DIR = "results/sequential"


def single_evaluation():
    """The `evaluation:` block the single-schedule evaluate jobs run with (loop settings)."""
    return {key: value for key, value in config.get("evaluation", {}).items()
            if key not in ("sequential", "store_image_features")}


# `evaluation.store_image_features`: true, false or a list of model names.
STORE_IMAGE_FEATURES = config.get("evaluation", {}).get("store_image_features", False)


def stores_image_features(model):
    """Whether the baseline jobs of `model` store the eval images' features for the evaluate jobs."""
    return STORE_IMAGE_FEATURES if isinstance(STORE_IMAGE_FEATURES, bool) else model in STORE_IMAGE_FEATURES


def _check_store_image_features():
    unknown = [] if isinstance(STORE_IMAGE_FEATURES, bool) else sorted(set(STORE_IMAGE_FEATURES) - set(MODELS))
    if unknown:
        raise ValueError(f"config evaluation.store_image_features names unknown models {unknown}; "
                         f"models: {', '.join(MODELS)}")


_check_store_image_features()


def sequential_evaluation():
    """The loop settings of the sequential schedule: those of `evaluation:`, edits accumulating."""
    return single_evaluation() | {"mode": "sequential", "n_edits": SEQUENTIAL.get("n_edits", "all")}


def sequential_combos():
    """The combos of the sequential schedule: its methods (and models, datasets) among combos().

    A filter over the configured combos: a name the config does not run selects nothing, so a
    copy of the demo config with other methods or models keeps working (config/README.md).
    """
    if not SEQUENTIAL:
        return []
    keep = {key: SEQUENTIAL.get(key) for key in ("methods", "models", "datasets")}
    return [
        combo
        for combo in combos()
        if all(keep[key] is None or name in keep[key] for key, name in zip(keep, combo))
    ]


def sequential_metrics():
    return [
        f"{SEQUENTIAL_DIR}/eval/{method}/{model}/{dataset}/metrics.json"
        for method, model, dataset in sequential_combos()
    ]


def sequential_outputs():
    """Everything the sequential schedule adds to `rule all` (nothing without one)."""
    if not sequential_combos():
        return []
    datasets = dict.fromkeys(dataset for _, _, dataset in sequential_combos())
    return (
        sequential_metrics()
        + summary_tables(f"{SEQUENTIAL_DIR}/tables")
        + [f"{SEQUENTIAL_DIR}/plots/{dataset}.png" for dataset in datasets]
    )


def summary_tables(folder="results/tables"):
    return [f"{folder}/summary.{ext}" for ext in ("csv", "md", "tex")] + [
        f"{folder}/summary_long.csv"
    ]


def plots():
    """One comparison plot per dataset that has at least one combo."""
    return [
        f"results/plots/{dataset}.png"
        for dataset in dict.fromkeys(dataset for _, _, dataset in combos())
    ]


def shard_outputs(wildcards):
    """The shard results of one combo, in shard order (the gather step concatenates them)."""
    count = shard_count(wildcards.dataset)
    paths = [
        SHARD_DIR.format(**wildcards, shard=index, shards=count)
        for index in range(1, count + 1)
    ]
    return {
        "metrics": [f"{path}/metrics.json" for path in paths],
        "records": [f"{path}/records.jsonl" for path in paths],
    }


def shard_param(wildcards):
    """(0-based index, count) of an evaluate_shard job; None for a whole-dataset evaluate job."""
    if "shard" not in wildcards.keys():
        return None
    return int(wildcards.shard) - 1, int(wildcards.shards)


def dataset_inputs(wildcards):
    """The eval split and its image folders (produced by a rule or placed by hand)."""
    spec = DATASETS[wildcards.dataset]
    inputs = {"eval": spec["eval"], "images": spec["image_root"]}
    if spec.get("rephrase_image_root"):
        inputs["rephrase_images"] = spec["rephrase_image_root"]
    return inputs


def model_inputs(wildcards):
    return {"model": MODELS[wildcards.model]["path"]}


def model_spec(wildcards):
    """A model's settings as its jobs see them (a job's params, so a change reruns the job).

    Without ``hparams``, the map that only picks which hparams files a model reuses: the files
    are inputs of the jobs that read them, so remapping one method's file reruns that method's
    jobs and not the model's pretraining, baselines or other methods."""
    return {key: value for key, value in MODELS[wildcards.model].items() if key != "hparams"}


def trained_model_spec(wildcards):
    """:func:`model_spec` as base-model pretraining sees it: without ``quantize``, which only the
    jobs that edit the trained model apply, so quantising it does not retrain it."""
    return {key: value for key, value in model_spec(wildcards).items() if key != "quantize"}


CONVERTED_DIR = "resources/models"


def _check_converted_paths():
    """A `lavis:` model is written by convert_model, whose output is resources/models/<name>."""
    for name, spec in MODELS.items():
        expected = f"{CONVERTED_DIR}/{name}"
        if "lavis" in spec and spec["path"].rstrip("/") != expected:
            raise ValueError(
                f"models.{name}.path: a model with `lavis:` pieces is assembled at {expected}, "
                f"got {spec['path']!r}"
            )


_check_converted_paths()


def config_problems():
    """Cross-references of the config that the schema cannot check, one line per broken one.

    Checked before the DAG is built: a name that points nowhere would otherwise surface as a
    KeyError inside an input function, far from the key that holds it.
    """
    problems = []
    for name, spec in MODELS.items():
        for index, dataset in enumerate(spec.get("pretrain", {}).get("datasets", [])):
            if dataset not in DATASETS:
                problems.append(
                    f"models.{name}.pretrain.datasets[{index}]: {dataset!r} is not a dataset of "
                    f"this config (datasets: {', '.join(DATASETS)})"
                )
    declared = {"method": METHODS, "model": list(MODELS), "dataset": list(DATASETS)}
    for index, entry in enumerate(config.get("exclude", [])):
        for key, value in entry.items():
            if value not in declared[key]:
                problems.append(
                    f"exclude[{index}].{key}: {value!r} is not one of the config's {key}s "
                    f"({', '.join(declared[key])})"
                )
    for method, model in dict.fromkeys((method, model) for method, model, _ in combos()):
        path = hparams_path(method, model)
        if not os.path.isfile(path):
            hint = (
                f" (models.{model}.hparams points there)"
                if path != own_hparams_path(method, model)
                else f", or reuse another model's files with `hparams: <model>` in models.{model}"
            )
            problems.append(
                f"models.{model}: no {method} hparams file, {path} does not exist; "
                f"write one{hint}; see config/README.md"
            )
        elif "quantize" in MODELS[model]:
            unkept = unkept_scopes(model, path)
            if unkept:
                problems.append(
                    f"models.{model}.quantize.keep: {method} edits {', '.join(unkept)} ({path}), "
                    "which would be held in int8; add them to keep"
                )
    return problems


def unkept_scopes(model, path):
    """The language-model scopes an hparams file names that a quantised model's ``quantize.keep``
    leaves out: its jobs would stop at the first edit (mmke.models.quantize). A scope left to the
    method's default is checked there only."""
    from mmke.hparams import language_model_scopes  # only for a quantised model: a no-op rerun imports no mmke

    keep = MODELS[model]["quantize"].get("keep", [])
    with open(path, encoding="utf-8") as file:
        return [scope for scope in language_model_scopes(yaml.safe_load(file) or {}) if scope not in keep]


def check_config():
    """Stop with every broken cross-reference, one line each, before anything runs."""
    problems = config_problems()
    if problems:
        sys.exit("config: " + "\nconfig: ".join(problems))


def lavis_inputs(wildcards):
    """The LAVIS / MiniGPT-4 checkpoint files and LLM directory a converted model is built from."""
    pieces = MODELS[wildcards.model]["lavis"]
    return {key: pieces[key] for key in ("vision", "qformer", "llm", "projection") if key in pieces}


def train_split_inputs(names):
    """The train split and image folders of each named dataset (what a pretraining reads)."""
    inputs = {}
    for name in names:
        dataset = DATASETS[name]
        inputs |= {f"{name}_train": dataset["train"], f"{name}_images": dataset["image_root"]}
        if dataset.get("rephrase_image_root"):
            inputs[f"{name}_rephrase_images"] = dataset["rephrase_image_root"]
    return inputs


# The world and its facts a base model (or SERAC's counterfactual LM) is trained on.
WORLD_TRAINING_SOURCES = generator_sources("world_training.py", "facts.py", "data/demo.py")


def pretrain_base_inputs(wildcards):
    """The random init and the train splits it learns (world pictures are rendered by the stage)."""
    spec = MODELS[wildcards.model]["pretrain"]
    init = {"init": spec.get("init", f"resources/tiny/{wildcards.model}")}
    return init | train_split_inputs(spec.get("datasets", [])) | {"code": WORLD_TRAINING_SOURCES}


# SERAC's counterfactual LM of the demo, trained from the tiny init (config `counterfactual:`).
COUNTERFACTUAL_DIR = "resources/world/counterfactual"


def pretrain_counterfactual_inputs(wildcards):
    spec = config["counterfactual"]["pretrain"]
    init = {"init": spec.get("init", "resources/tiny/aux/counterfactual")}
    return init | train_split_inputs(spec.get("datasets", [])) | {"code": WORLD_TRAINING_SOURCES}


def pretrain_datasets(spec):
    """Name -> config entry of the datasets a ``pretrain:`` entry learns."""
    return {name: DATASETS[name] for name in spec.get("datasets", [])}


def pretrain_settings(spec):
    """The optimisation settings of a ``pretrain:`` entry (what mmke.world_training reads)."""
    return {key: value for key, value in spec.items() if key not in ("datasets", "init")}


def baseline_inputs(wildcards):
    return {**dataset_inputs(wildcards), **model_inputs(wildcards)}


def method_resources(wildcards):
    """Stage outputs the editor of this combo loads in ``Editor.prepare``, by name.

    IKE gets its training-set and query embeddings, MEND/SERAC/KE their meta-network checkpoint; a
    method with no entry needs nothing. Names are passed through to ``prepare(resources)``.
    """
    if wildcards.method == "IKE" and ike_retrieves(wildcards.model):
        prefix = embeddings_prefix(wildcards.dataset, ike_sentence_model(wildcards.model))
        return {
            "embeddings": f"{prefix}/embeddings.safetensors",
            "sentences": f"{prefix}/sentences.json",
            "queries": f"{prefix}/queries.safetensors",
            "query_sentences": f"{prefix}/queries.json",
        }
    if wildcards.method in PRETRAINED_METHODS:
        return {"checkpoint": checkpoint_file(wildcards)}
    return {}


@functools.lru_cache(maxsize=None)
def hparams_values(method, model):
    """The YAML mapping of a method x model hparams file (the library validates it in the job).

    Read once per Snakemake run (input functions ask for it per job), with libyaml's parser when
    present: on the demo DAG this was a tenth of a no-op rerun's CPU time. Callers must not
    mutate the returned mapping.
    """
    path = hparams_path(method, model)
    with open(path, encoding="utf-8") as handle:
        values = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: hparams must be a mapping")
    return values


def ike_retrieves(model):
    """False for IKE's ``mode: fact_prefix`` (EasyEdit's k: 0), which needs no embeddings."""
    return hparams_values("IKE", model).get("mode", "retrieve") != "fact_prefix"


def ike_sentence_model(model):
    """The sentence model named by IKE's hparams for ``model`` (embeddings depend on it alone).

    The library's default when the file names none (mmke.methods.ike.IKEHParams).
    """
    return hparams_values("IKE", model).get("sentence_model", "all-MiniLM-L6-v2")


def slug(name):
    """A folder name for a sentence model name or path (``a/b`` -> ``a--b``, as the HF cache does).

    Defined here, not imported from mmke: the Snakefile must parse without the package installed
    (``--sdm conda`` installs it only inside the rules' environment).
    """
    text = re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-")
    if not text:
        raise ValueError(f"cannot make a folder name from sentence model {name!r}")
    return text


def embeddings_prefix(dataset, sentence_model):
    """One folder per dataset x sentence model, shared by every edited model."""
    return f"resources/embeddings/{dataset}/{slug(sentence_model)}"


def sentence_models():
    """Folder name -> sentence model name, over the IKE combos of the config."""
    names = {
        ike_sentence_model(model)
        for method, model, _ in combos()
        if method == "IKE" and ike_retrieves(model)
    }
    return {slug(name): name for name in names}


def embed_inputs(wildcards):
    """The training split (IKE's facts) and the eval split (its queries); only the text is read."""
    spec = DATASETS[wildcards.dataset]
    return {"train": spec["train"], "eval": spec["eval"]}


def checkpoint_file(wildcards):
    """The trained network of a method x model, meta-trained on the dataset's own train split."""
    return f"resources/checkpoints/{wildcards.method}/{wildcards.model}/{wildcards.dataset}/editor.safetensors"


def pretrain_inputs(wildcards):
    """Train split + images, the model, the hparams file and the auxiliary models it names."""
    spec = DATASETS[wildcards.dataset]
    inputs = {key: path for key, path in dataset_inputs(wildcards).items() if key != "eval"}
    inputs |= {"train": spec["train"], **model_inputs(wildcards), "hparams": hparams_file(wildcards)}
    hparams = hparams_values(wildcards.method, wildcards.model)
    inputs |= {key: hparams[key] for key in AUX_MODEL_KEYS if key in hparams}
    return inputs


def evaluate_inputs(wildcards):
    prefix = f"results/baseline/{wildcards.model}/{wildcards.dataset}"
    return {
        **baseline_inputs(wildcards),
        **method_resources(wildcards),
        "hparams": hparams_file(wildcards),
        "baseline_rows": f"{prefix}/pre.jsonl",
        "baseline_tensors": f"{prefix}/pre.safetensors",
        "image_features": f"{prefix}/image_features.safetensors",
    }


def hparams_file(wildcards):
    return hparams_path(wildcards.method, wildcards.model)


def hparams_path(method, model):
    """``<hparams_dir>/<METHOD>/<model>.yaml``, unless the model entry's ``hparams:`` says otherwise.

    ``hparams: other-model`` reuses that model's file for every method; a mapping names, per
    method, another model (its file) or a ``.yaml`` path. Methods it does not list keep their own.
    """
    reuse = MODELS[model].get("hparams") or model
    chosen = reuse.get(method, model) if isinstance(reuse, dict) else reuse
    if chosen.endswith((".yaml", ".yml")):
        return chosen
    return own_hparams_path(method, chosen)


def own_hparams_path(method, model):
    """Where a model's own hparams file for a method lives."""
    return f"{config.get('hparams_dir', 'config/hparams')}/{method}/{model}.yaml"


def rule_id(name):
    """``name`` made an identifier for use in generated rule names (blip2-opt -> blip2_opt)."""
    return re.sub(r"\W", "_", name)


def download_outputs(name, as_output=True):
    """What the download ``name`` produces: a folder's listed files, a directory, or one file.

    ``as_output=False`` gives plain paths for use as another rule's input (directory() is an
    output-only flag).
    """
    entry = DOWNLOADS[name]
    if entry.get("files"):
        return [f"{entry['dest']}/{path}" for path in entry["files"]]
    if as_output and ("hf" in entry or entry.get("directory")):
        return [directory(entry["dest"])]
    return [entry["dest"]]


def all_downloads():
    return [
        path for name in DOWNLOADS for path in download_outputs(name, as_output=False)
    ] + [entry["extract"] for entry in DOWNLOADS.values() if "extract" in entry]


def stage_resources(stage, key, default):
    """A per-stage resource from config['resources'][stage] (gpu, mem_mb, runtime, threads)."""
    return config["resources"].get(stage, {}).get(key, default)


# Last, once every helper it uses is defined: nothing reaches the DAG with a dangling name.
check_config()
