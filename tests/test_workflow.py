"""The DAG end to end in a temporary copy of the workflow: outputs, caching, selective reruns.

Reruns are judged by what actually changed on disk (file mtimes), not by Snakemake's plan text.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_PARTS = ("Snakefile", "workflow", "scripts", "config", "envs")


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
    first["pretrain"].update(steps=3, max_seconds=None)  # the stage's mechanics, not its accuracy
    # A second model straight from its random init: both ways of getting a model run in one DAG.
    second = {key: value for key, value in first.items() if key != "pretrain"}
    config["models"]["tiny-blip2-b"] = {**second, "path": "resources/tiny/tiny-blip2-b", "tiny": {**first["tiny"], "seed": 1}}
    (root / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "config/hparams/base/tiny-blip2-b.yaml").write_text("method: base\nmodel: tiny-blip2-b\n")
    run_snakemake(root)
    return root


def test_full_run_writes_metrics_and_summary(workdir):
    rows = list(csv.DictReader((workdir / "results/tables/summary.csv").open()))
    combos = {(r["method"], r["model"], r["dataset"]) for r in rows}
    assert combos == {("base", m, d) for m in ("tiny-blip2", "tiny-blip2-b") for d in ("demo-evqa", "demo-eic")}
    for row in rows:
        assert int(row["n"]) == 6
        # the unedited model agrees with its own pre-edit predictions everywhere
        assert float(row["locality_acc"]) == 1.0
        assert float(row["multimodal_locality_acc"]) == 1.0
    metrics = json.loads((workdir / "results/eval/base/tiny-blip2/demo-evqa/metrics.json").read_text())
    records = [json.loads(line) for line in (workdir / "results/eval/base/tiny-blip2/demo-evqa/records.jsonl").open()]
    assert metrics["n"] == len(records) == 6
    # summary = mean of the per-record values; base post values equal the baseline's pre values
    mean = sum(r["post"]["rewrite_acc"] for r in records) / len(records)
    assert metrics["summary"]["rewrite_acc"] == pytest.approx(mean)
    assert all(r["post"]["rewrite_acc"] == r["pre"]["rewrite_acc"] for r in records)
    assert "| base" in (workdir / "results/tables/summary.md").read_text()
    assert (workdir / "logs/evaluate/base/tiny-blip2/demo-evqa.log").exists()
    assert (workdir / "results/benchmarks/evaluate/base/tiny-blip2/demo-evqa.tsv").exists()
    report = json.loads((workdir / "resources/world/tiny-blip2.pretrain.json").read_text())
    assert report["steps"] == 3 and report["n_train_items"] == 3 * report["settings"]["batch_size"]
    assert (workdir / "resources/world/tiny-blip2/model.safetensors").is_file()
    assert not (workdir / "resources/world/tiny-blip2-b").exists()


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
