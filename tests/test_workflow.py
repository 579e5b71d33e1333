"""The DAG end to end in a temporary copy of the workflow: outputs, caching, selective reruns.

Reruns are judged by what actually changed on disk (file mtimes), not by Snakemake's plan text.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_PARTS = ("Snakefile", "workflow", "scripts", "config", "envs")
METHODS = ("base", "FT-L", "FT-V", "IKE")
FT_METHODS = ("FT-L", "FT-V")
MODELS = ("tiny-blip2", "tiny-blip2-b")
DATASETS = ("demo-evqa", "demo-eic")


def run_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--directory", str(workdir), *args],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=900,
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


def changed(before: dict[str, int], after: dict[str, int]) -> set[str]:
    return {path for path in after if before.get(path) != after[path]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of the workflow with a small two-model demo config, run once to completion."""
    root = tmp_path_factory.mktemp("wf")
    for part in WORKFLOW_PARTS:
        src = REPO / part
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / part)
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    for dataset in config["datasets"].values():
        dataset["demo"].update(n_train=6, n_eval=6)
    first = config["models"]["tiny-blip2"]
    config["models"]["tiny-blip2-b"] = {**first, "path": "resources/tiny/tiny-blip2-b", "tiny": {**first["tiny"], "seed": 1}}
    # FT on the second model would only repeat the first model's jobs; base and IKE run on both
    config["exclude"] = [{"method": method, "model": "tiny-blip2-b"} for method in FT_METHODS]
    (root / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for method in ("base", "IKE"):  # model b gets model a's hparams
        source = root / f"config/hparams/{method}/tiny-blip2.yaml"
        (source.parent / "tiny-blip2-b.yaml").write_text(source.read_text().replace("model: tiny-blip2\n", "model: tiny-blip2-b\n"))
    run_snakemake(root)
    return root


def test_full_run_writes_metrics_and_summary(workdir):
    rows = list(csv.DictReader((workdir / "results/tables/summary.csv").open()))
    combos = {(r["method"], r["model"], r["dataset"]) for r in rows}
    assert combos == {(method, m, d) for method in METHODS for m in MODELS for d in DATASETS
                      if not (method in FT_METHODS and m == "tiny-blip2-b")}
    assert [r["method"] for r in rows[:4]] == list(METHODS)  # config order within a model x dataset
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


def test_one_embedding_job_per_dataset_shared_by_both_models(workdir):
    proc = run_snakemake(workdir, "--dry-run", "--forceall", "--quiet", "rules")
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout + proc.stderr, flags=re.MULTILINE))
    assert counts["embed"] == str(len(DATASETS))
    assert counts["evaluate"] == str((len(METHODS) * len(MODELS) - len(FT_METHODS)) * len(DATASETS))
    made = sorted(str(p.relative_to(workdir)) for p in (workdir / "resources/embeddings").rglob("*.safetensors"))
    assert made == [f"resources/embeddings/{d}/all-MiniLM-L6-v2/embeddings.safetensors" for d in sorted(DATASETS)]
    for dataset in DATASETS:
        sentences = json.loads((workdir / f"resources/embeddings/{dataset}/all-MiniLM-L6-v2/sentences.json").read_text())
        assert len(sentences) == 3 * 6  # three per training record
        for model in MODELS:
            log = (workdir / f"logs/evaluate/IKE/{model}/{dataset}.log").read_text()
            assert "Traceback" not in log
            assert json.loads((workdir / f"results/eval/IKE/{model}/{dataset}/metrics.json").read_text())["n"] == 6


def test_second_run_does_nothing(workdir):
    before = snapshot(workdir)
    proc = run_snakemake(workdir)
    assert changed(before, snapshot(workdir)) == set()
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_changed_hparams_reruns_only_its_jobs(workdir):
    hparams = workdir / "config/hparams/base/tiny-blip2-b.yaml"
    hparams.write_text(hparams.read_text() + "# touched\n")
    before = snapshot(workdir)
    run_snakemake(workdir)
    assert changed(before, snapshot(workdir)) == {
        f"results/eval/base/tiny-blip2-b/{d}/{f}" for d in ("demo-evqa", "demo-eic") for f in ("metrics.json", "records.jsonl")
    } | {"results/tables/summary.csv", "results/tables/summary.md"}


def test_deleted_metrics_reruns_only_that_job_and_merge(workdir):
    target = workdir / "results/eval/base/tiny-blip2/demo-eic/metrics.json"
    target.unlink()
    before = snapshot(workdir)
    run_snakemake(workdir)
    assert changed(before, snapshot(workdir)) == {
        "results/eval/base/tiny-blip2/demo-eic/metrics.json",
        "results/eval/base/tiny-blip2/demo-eic/records.jsonl",
        "results/tables/summary.csv",
        "results/tables/summary.md",
    }


def test_lint_is_clean():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr
