"""The DAG end to end in a temporary copy of the workflow: outputs, caching, selective reruns.

Reruns are judged by what actually changed on disk (file mtimes), not by Snakemake's plan text.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workflow_copy import REPO, copy_workflow, snakemake_env

from mmke.image_features import StoredImageFeatures

METHODS = ("base", "FT-L", "FT-V", "IKE", "MEND")
FIRST_MODEL_ONLY = ("FT-L", "FT-V", "MEND")
MODELS = ("tiny-blip2", "tiny-blip2-b")
DATASETS = ("demo-evqa", "demo-eic")


def run_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--directory", str(workdir), *args],
        cwd=workdir, env=snakemake_env(), capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0:
        raise AssertionError(f"snakemake {args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def snapshot(workdir: Path) -> dict[str, int]:
    """mtime of every file the workflow wrote."""
    return {
        str(path.relative_to(workdir)): path.stat().st_mtime_ns
        for top in ("resources", "results")
        for path in (workdir / top).rglob("*")
        if path.is_file() and "benchmarks" not in path.parts
    }


#: What the tables/plots stage rewrites whenever any metrics.json changes.
TABLES = {f"results/tables/summary{suffix}" for suffix in (".csv", ".md", ".tex", "_long.csv")} | {
    f"results/plots/{d}.png" for d in ("demo-evqa", "demo-eic")
}


#: What the evaluate jobs of base on the second model write (demo-eic in 2 shards, gathered).
BASE_B_EVALUATIONS = {
    f"results/eval/base/tiny-blip2-b/{d}/{f}" for d in ("demo-evqa", "demo-eic") for f in ("metrics.json", "records.jsonl")
} | {f"results/eval/base/tiny-blip2-b/demo-eic/shards/{i}-of-2/{f}" for i in (1, 2) for f in ("metrics.json", "records.jsonl")}


def changed(before: dict[str, int], after: dict[str, int]) -> set[str]:
    return {path for path in after if before.get(path) != after[path]}


def demo_config(root: Path) -> dict:
    """Copy the workflow into ``root``; return the demo config with 6-record datasets, BLIP-2 only."""
    copy_workflow(root)
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    # the workflow's mechanics; demo-vlkeb's portability is tested in test_portability/test_demo_floors
    config["datasets"] = {name: config["datasets"][name] for name in DATASETS}
    for dataset in config["datasets"].values():
        dataset["demo"].update(n_train=6, n_eval=6)
    config["models"] = {"tiny-blip2": config["models"]["tiny-blip2"]}
    config.pop("exclude", None)
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of the workflow with a small two-model demo config, run once to completion.

    Its tests are marked slow (minutes: the whole DAG); `make test`, which CI runs, includes them.
    """
    root = tmp_path_factory.mktemp("wf")
    config = demo_config(root)
    config["datasets"]["demo-eic"]["shards"] = 2  # exercise evaluate_shard + gather_shards
    first = config["models"]["tiny-blip2"]
    first["pretrain"].update(steps=3, heldout_images=1)  # the stage's mechanics, not its accuracy
    # A second model straight from its random init: both ways of getting a model run in one DAG.
    second = {key: value for key, value in first.items() if key != "pretrain"}
    config["models"]["tiny-blip2-b"] = {**second, "path": "resources/tiny/tiny-blip2-b", "tiny": {**first["tiny"], "seed": 1}}
    config["methods"] = list(METHODS)
    # the second schedule: FT-L also edits the whole E-VQA split of the first model in one group
    config["evaluation"]["sequential"] = {"n_edits": "all", "methods": ["FT-L", "KE"], "models": ["tiny-blip2"],
                                          "datasets": ["demo-evqa"]}
    # FT and MEND on the second model would only repeat the first model's jobs; base and IKE run on both
    config["exclude"] = [{"method": method, "model": "tiny-blip2-b"} for method in FIRST_MODEL_ONLY]
    (root / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    mend = root / "config/hparams/MEND/tiny-blip2.yaml"  # a short meta-training: the stage's mechanics
    mend.write_text(yaml.safe_dump({**yaml.safe_load(mend.read_text()), "max_iters": 30, "val_interval": 10,
                                    "early_stop_patience": 30}))
    for method in ("base", "IKE"):  # model b gets model a's hparams
        source = root / f"config/hparams/{method}/tiny-blip2.yaml"
        (source.parent / "tiny-blip2-b.yaml").write_text(source.read_text().replace("model: tiny-blip2\n", "model: tiny-blip2-b\n"))
    run_snakemake(root)
    return root


@pytest.mark.slow
def test_full_run_writes_metrics_and_summary(workdir):
    rows = list(csv.DictReader((workdir / "results/tables/summary.csv").open()))
    combos = {(r["method"], r["model"], r["dataset"]) for r in rows}
    assert combos == {(method, m, d) for method in METHODS for m in MODELS for d in DATASETS
                      if not (method in FIRST_MODEL_ONLY and m == "tiny-blip2-b")}
    assert [r["method"] for r in rows[:len(METHODS)]] == list(METHODS)  # config order within a model x dataset
    for row in rows:
        assert int(row["n"]) == 6
    for row in (r for r in rows if r["method"] == "base"):
        # the unedited model agrees with its own pre-edit predictions everywhere
        assert float(row["locality_acc"]) == 1.0
        assert float(row["multimodal_locality_acc"]) == 1.0
    for row in (r for r in rows if r["method"] == "FT-V"):
        assert float(row["locality_acc"]) == 1.0  # the Q-Former never sees the text-only NQ item
    metrics = json.loads((workdir / "results/eval/base/tiny-blip2/demo-evqa/metrics.json").read_text())
    records = [json.loads(line) for line in (workdir / "results/eval/base/tiny-blip2/demo-evqa/records.jsonl").open()]
    assert metrics["n"] == len(records) == 6
    # summary = mean of the per-record values; base post values equal the baseline's pre values
    mean = sum(r["post"]["rewrite_acc"] for r in records) / len(records)
    assert metrics["summary"]["rewrite_acc"] == pytest.approx(mean)
    assert all(r["post"]["rewrite_acc"] == r["pre"]["rewrite_acc"] for r in records)
    assert metrics["evaluation"] == {"mode": "single", "n_edits": 1}
    markdown = (workdir / "results/tables/summary.md").read_text()
    assert all(f"| {method} " in markdown for method in METHODS)
    assert (workdir / "logs/evaluate/base/tiny-blip2/demo-evqa.log").exists()
    assert (workdir / "results/benchmarks/evaluate/base/tiny-blip2/demo-evqa.tsv").exists()
    report = json.loads((workdir / "resources/world/tiny-blip2.pretrain.json").read_text())
    assert report["steps"] == 3 and report["n_train_items"] == 3 * report["settings"]["batch_size"]
    assert (workdir / "resources/world/tiny-blip2/model.safetensors").is_file()
    assert not (workdir / "resources/world/tiny-blip2-b").exists()


@pytest.mark.slow
def test_sequential_schedule_has_its_own_results_and_tables(workdir):
    """KE is not a method of this config: the sequential list filters the configured combos."""
    prefix = workdir / "results/sequential"
    metrics = json.loads((prefix / "eval/FT-L/tiny-blip2/demo-evqa/metrics.json").read_text())
    assert metrics["evaluation"] == {"mode": "sequential", "n_edits": "all"} and metrics["n"] == 6
    assert sorted(p.relative_to(prefix).as_posix() for p in (prefix / "eval").rglob("metrics.json")) == [
        "eval/FT-L/tiny-blip2/demo-evqa/metrics.json"]
    rows = list(csv.DictReader((prefix / "tables/summary.csv").open()))
    assert [(r["method"], r["model"], r["dataset"]) for r in rows] == [("FT-L", "tiny-blip2", "demo-evqa")]
    assert "Sequential editing: the edits of all n records accumulate" in (prefix / "tables/summary.md").read_text()
    assert (prefix / "plots/demo-evqa.png").stat().st_size > 0
    single = json.loads((workdir / "results/eval/FT-L/tiny-blip2/demo-evqa/metrics.json").read_text())
    assert single["evaluation"] == {"mode": "single", "n_edits": 1}
    assert (workdir / "logs/evaluate_sequential/FT-L/tiny-blip2/demo-evqa.log").exists()


@pytest.mark.slow
def test_sharded_dataset_is_gathered_in_record_order(workdir):
    prefix = workdir / "results/eval/base/tiny-blip2/demo-eic"
    shards = [[json.loads(line) for line in (prefix / f"shards/{i}-of-2/records.jsonl").open()] for i in (1, 2)]
    merged = [json.loads(line) for line in (prefix / "records.jsonl").open()]
    assert [len(rows) for rows in shards] == [3, 3] and merged == shards[0] + shards[1]
    metrics = json.loads((prefix / "metrics.json").read_text())
    assert metrics["n"] == 6 and metrics["shards"] == 2
    assert "base: 100%" in (workdir / "logs/evaluate/base/tiny-blip2/demo-eic/2-of-2.log").read_text()  # tqdm bar


@pytest.mark.slow
def test_tables_plots_and_html_report(workdir):
    tex = (workdir / "results/tables/summary.tex").read_text()
    assert "\\multicolumn{6}{c}{tiny-blip2 / demo-evqa}" in tex and "\\textit{Base Methods}" in tex
    assert tex.count("Base & ") == 1
    long = list(csv.DictReader((workdir / "results/tables/summary_long.csv").open()))
    # per combo: the 5 headline metrics, exact match and token accuracy of the 3 edit metrics, pre
    assert len(long) == len(DATASETS) * (len(METHODS) * len(MODELS) - len(FIRST_MODEL_ONLY)) * 12
    for dataset in ("demo-evqa", "demo-eic"):
        assert (workdir / f"results/plots/{dataset}.png").read_bytes()[:4] == b"\x89PNG"
    run_snakemake(workdir, "--report", "report.html")
    html = (workdir / "report.html").read_text(errors="replace")
    assert "Methods compared on dataset demo-evqa" in html  # rendered caption of the plot
    assert "summary.tex" in html and "demo-eic.png" in html


@pytest.mark.slow
def test_one_embedding_job_per_dataset_shared_by_both_models(workdir):
    proc = run_snakemake(workdir, "--dry-run", "--forceall", "--quiet", "rules")
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout + proc.stderr, flags=re.MULTILINE))
    assert counts["embed"] == str(len(DATASETS))
    combos = len(METHODS) * len(MODELS) - len(FIRST_MODEL_ONLY)  # per dataset
    assert counts["evaluate"] == str(combos)  # demo-evqa
    assert counts["evaluate_shard"] == str(2 * combos)  # demo-eic, 2 shards
    made = sorted(str(p.relative_to(workdir)) for p in (workdir / "resources/embeddings").rglob("*.safetensors"))
    assert made == [f"resources/embeddings/{d}/all-MiniLM-L6-v2/{name}.safetensors" for d in sorted(DATASETS)
                    for name in ("embeddings", "queries")]
    for dataset in DATASETS:
        sentences = json.loads((workdir / f"resources/embeddings/{dataset}/all-MiniLM-L6-v2/sentences.json").read_text())
        assert len(sentences) == 3 * 6  # three per training record
        queries = json.loads((workdir / f"resources/embeddings/{dataset}/all-MiniLM-L6-v2/queries.json").read_text())
        assert 1 <= len(queries) == len(set(queries)) <= 6  # one per distinct eval fact
        for model in MODELS:
            assert json.loads((workdir / f"results/eval/IKE/{model}/{dataset}/metrics.json").read_text())["n"] == 6


@pytest.mark.slow
def test_pretrain_writes_checkpoint_report_and_feeds_evaluate(workdir):
    prefix = workdir / "resources/checkpoints/MEND/tiny-blip2/demo-evqa"
    report = json.loads((prefix / "train.json").read_text())
    metrics = json.loads((workdir / "results/eval/MEND/tiny-blip2/demo-evqa/metrics.json").read_text())
    assert report["hparams_digest"] == metrics["hparams_digest"]
    assert report["steps"] == metrics["hparams"]["max_iters"]
    assert (report["n_train"], report["n_val"]) == (4, 2)  # 6 training records, the last 20% held out
    assert [h["step"] for h in report["history"]] == [0, 10, 20, 30]
    assert all(set(h["val_acc"]) == {"inner", "edit", "image_rephrase", "loc", "image_loc"} for h in report["history"])
    assert (prefix / "editor.safetensors").stat().st_size > 0
    assert not (prefix / "resume").exists()  # the resume state is removed once training finished
    assert (workdir / "logs/pretrain/MEND/tiny-blip2/demo-evqa.log").exists()
    # MEND edits: the edited model is not the unedited one
    records = [json.loads(line) for line in (workdir / "results/eval/MEND/tiny-blip2/demo-evqa/records.jsonl").open()]
    assert any(r["post"]["locality_acc"] < 1.0 for r in records)


@pytest.mark.slow
def test_changed_method_hparams_retrain_only_that_method(workdir):
    hparams = workdir / "config/hparams/MEND/tiny-blip2.yaml"
    hparams.write_text(hparams.read_text() + "# touched\n")
    before = snapshot(workdir)
    run_snakemake(workdir)
    assert changed(before, snapshot(workdir)) == {
        f"{top}/MEND/tiny-blip2/{d}/{f}"
        for d in ("demo-evqa", "demo-eic")
        for top, files in (("resources/checkpoints", ("editor.safetensors", "train.json")),
                           ("results/eval", ("metrics.json", "records.jsonl")))
        for f in files
    } | {f"results/eval/MEND/tiny-blip2/demo-eic/shards/{i}-of-2/{f}" for i in (1, 2)
         for f in ("metrics.json", "records.jsonl")} | TABLES


@pytest.mark.slow
def test_second_run_does_nothing(workdir):
    before = snapshot(workdir)
    proc = run_snakemake(workdir)
    assert changed(before, snapshot(workdir)) == set()
    assert "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_changed_hparams_reruns_only_its_jobs(workdir):
    hparams = workdir / "config/hparams/base/tiny-blip2-b.yaml"
    hparams.write_text(hparams.read_text() + "# touched\n")
    before = snapshot(workdir)
    run_snakemake(workdir)
    assert changed(before, snapshot(workdir)) == BASE_B_EVALUATIONS | TABLES


@pytest.mark.slow
def test_remapped_hparams_file_reruns_only_that_methods_jobs(workdir):
    """A model's `hparams` map picks files; it is no setting of the model's pretraining or baselines."""
    config_path = workdir / "config/config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["models"]["tiny-blip2-b"]["hparams"] = {"base": "tiny-blip2"}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    before = snapshot(workdir)
    run_snakemake(workdir)
    assert changed(before, snapshot(workdir)) == BASE_B_EVALUATIONS | TABLES


@pytest.mark.slow
def test_a_model_dropped_from_the_stored_features_reruns_only_its_baselines_and_evaluations(workdir):
    """The demo's baselines store every eval image's features; a model taken off the list writes
    empty files, and its evaluate jobs, which now encode the images, give the same records."""
    features = {(model, dataset): workdir / f"results/baseline/{model}/{dataset}/image_features.safetensors"
                for model in MODELS for dataset in DATASETS}
    assert all(len(StoredImageFeatures(path)) == 3 * 6 for path in features.values())  # 6 records, 3 images
    b_evaluations = BASE_B_EVALUATIONS | {path.replace("/base/", "/IKE/") for path in BASE_B_EVALUATIONS}
    records = {path: (workdir / path).read_text() for path in b_evaluations if path.endswith(".jsonl")}
    config_path = workdir / "config/config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["evaluation"]["store_image_features"] = ["tiny-blip2"]
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    before = snapshot(workdir)
    run_snakemake(workdir)
    b_baselines = {f"results/baseline/tiny-blip2-b/{d}/{f}" for d in DATASETS
                   for f in ("pre.jsonl", "pre.safetensors", "image_features.safetensors")}
    assert changed(before, snapshot(workdir)) == b_baselines | b_evaluations | TABLES
    assert [len(StoredImageFeatures(path)) for (model, _), path in sorted(features.items())] == [18, 18, 0, 0]
    assert {path: (workdir / path).read_text() for path in records} == records
    wrong = workdir / "config/unknown-model.yaml"
    wrong.write_text(yaml.safe_dump({**config, "evaluation": {**config["evaluation"],
                                                              "store_image_features": ["tiny-blip2", "tiny-blip2-c"]}}))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--dry-run", "--configfile", str(wrong), "--directory",
                           str(workdir)], cwd=workdir, env=snakemake_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "evaluation.store_image_features names unknown models ['tiny-blip2-c']" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_generators_source_files_are_inputs_of_what_they_generate(workdir):
    """Snakemake tracks a rule's script, not the library it calls: the generators' own modules are
    declared inputs, so a changed one (newer, with another checksum) reruns the data, inits and world."""
    plan = run_snakemake(workdir, "--dry-run", "--forcerun", "demo_dataset", "tiny_model").stdout
    inputs = {rule: line.split(", ") for rule, line in re.findall(r"rule (\w+):\n    input: (.*)", plan)}
    package = Path(importlib.util.find_spec("mmke").origin).parent
    assert str(package / "data/demo.py") in inputs["demo_dataset"]
    assert {str(package / "models/tiny.py"), str(package / "data/demo.py")} <= set(inputs["tiny_model"])
    assert str(package / "world_training.py") in inputs["pretrain_base"]  # downstream of the forced init


@pytest.mark.slow
def test_deleted_metrics_reruns_only_that_job_and_merge(workdir):
    """demo-eic is sharded: only the gather step reruns, not the shard jobs."""
    target = workdir / "results/eval/base/tiny-blip2/demo-eic/metrics.json"
    target.unlink()
    before = snapshot(workdir)
    run_snakemake(workdir)
    assert changed(before, snapshot(workdir)) == {
        "results/eval/base/tiny-blip2/demo-eic/metrics.json",
        "results/eval/base/tiny-blip2/demo-eic/records.jsonl",
    } | TABLES


@pytest.mark.slow
def test_a_quantised_model_reruns_what_edits_it_but_not_its_base_training(workdir):
    """``quantize`` is a setting of the model as every edit sees it (its baselines, meta-training
    and evaluations), not of the base model's pretraining, which is not rerun. The last test on
    ``workdir``: the first model stays quantised."""
    config_path = workdir / "config/config.yaml"
    config = yaml.safe_load(config_path.read_text())
    # every scope the methods' hparams name: FT-L's, MEND's and KE's MLPs, FT-V's Q-Former
    config["models"]["tiny-blip2"]["quantize"] = {"weights": "int8",
                                                  "keep": ["llm.mlp.last1", "llm.mlp.last2", "qformer"]}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    before = snapshot(workdir)
    run_snakemake(workdir)
    now = changed(before, snapshot(workdir))
    assert not {path for path in now if path.startswith("resources/world/") or "tiny-blip2-b" in path}
    assert {f"results/baseline/tiny-blip2/{d}/pre.jsonl" for d in DATASETS} <= now
    assert any(path.startswith("resources/checkpoints/MEND/tiny-blip2/") for path in now)
    for method in METHODS:
        for dataset in DATASETS:
            metrics = json.loads((workdir / f"results/eval/{method}/tiny-blip2/{dataset}/metrics.json").read_text())
            assert metrics["quantization"]["weights"] == "int8" and metrics["quantization"]["layers"] == 8
            if method == "base":  # the baseline job's model is the evaluate job's
                assert metrics["summary"]["locality_acc"] == metrics["summary"]["multimodal_locality_acc"] == 1.0


@pytest.mark.slow
def test_lavis_pieces_are_converted_once_and_loaded_by_the_baseline(tmp_path):
    """A `lavis:` model entry: convert_model assembles it, the baseline stage loads it like any model."""
    import torch

    from mmke.models import load_model
    from mmke.models.convert import hf_to_lavis
    from mmke.models.tiny import build_tiny

    config = demo_config(tmp_path)
    tiny = load_model("minigpt4", build_tiny("minigpt4", tmp_path / "src/tiny"))
    pieces = hf_to_lavis(tiny.model.state_dict(), "llama_proj")
    for piece, state in pieces.items():
        torch.save({"model": state}, tmp_path / f"src/{piece}.pth")
    tiny.model.language_model.save_pretrained(tmp_path / "src/llm")
    tiny.tokenizer.save_pretrained(tmp_path / "src/llm")
    config["models"] = {"lavis-minigpt4": {
        "family": "minigpt4", "path": "resources/models/lavis-minigpt4", "image_size": 32,
        "hparams": "tiny-minigpt4",  # every combo the config names needs an hparams file
        "lavis": {"vision": "src/vision.pth", "qformer": "src/qformer.pth", "projection": "src/projection.pth",
                  "llm": "src/llm", "vision_config": {"num_attention_heads": 2},
                  "qformer_config": {"num_attention_heads": 2}}}}
    config["methods"] = ["base"]
    (tmp_path / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run_snakemake(tmp_path, "results/baseline/lavis-minigpt4/demo-evqa/pre.jsonl")
    converted = tmp_path / "resources/models/lavis-minigpt4"
    report = json.loads((converted / "conversion.json").read_text())
    assert report["sources"]["projection"] == "src/projection.pth" and report["num_query_tokens"] == 4
    assert len((tmp_path / "results/baseline/lavis-minigpt4/demo-evqa/pre.jsonl").read_text().splitlines()) == 6
    assert (tmp_path / "logs/convert_model/lavis-minigpt4.log").exists()


def test_lavis_model_outside_resources_models_is_refused(tmp_path):
    config = demo_config(tmp_path)
    config["models"]["tiny-blip2"]["lavis"] = {"vision": "v.pth", "qformer": "q.pth", "llm": "llm"}
    (tmp_path / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--directory", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "models.tiny-blip2.path: a model with `lavis:` pieces is assembled at resources/models/tiny-blip2" in (
        proc.stdout + proc.stderr)


def test_a_quantised_model_that_would_hold_a_methods_scope_in_int8_is_refused_before_any_job(tmp_path):
    config = demo_config(tmp_path)
    config["methods"] = ["base", "FT-L", "FT-V", "MEND"]
    config["models"]["tiny-blip2"]["quantize"] = {"weights": "int8", "keep": ["llm.mlp.last1"]}
    (tmp_path / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--directory", str(tmp_path)], cwd=tmp_path,
                          env=snakemake_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("config: models.tiny-blip2.quantize.keep: MEND edits llm.mlp.last2 "
            "(config/hparams/MEND/tiny-blip2.yaml), which would be held in int8; add them to keep") in proc.stderr
    assert "FT-L edits" not in proc.stderr
    assert "FT-V edits" not in proc.stderr  # its qformer lies outside the language model: never int8


def test_lint_is_clean():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr
