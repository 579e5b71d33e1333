"""config/lifelong.yaml plans EasyEdit's Qwen2-VL / LLaVA-OneVision grid offline, in both schedules.

Dry runs only (``-n``), in a private copy of the workflow: nothing is downloaded or computed.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from test_paper_config import planned_jobs, read_every_hparams_file
from workflow_copy import REPO, copy_workflow, dry_run_config, snakemake_env

LIFELONG = yaml.safe_load((REPO / "config/lifelong.yaml").read_text())
METHODS = ["base", "FT-L", "IKE", "LoRA", "GRACE", "WISE"]
SEQUENTIAL_METHODS = ["FT-L", "LoRA", "GRACE", "WISE"]
MODELS = ["qwen2-vl-7b", "llava-onevision-7b"]
DATASETS = ["evqa", "eic"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("lifelong"))


def dry_run(workdir: Path, *args: str) -> str:
    return dry_run_config(workdir, "config/lifelong.yaml", *args)


def combos(jobs: list[dict], rule: str) -> set[tuple[str, str, str]]:
    return {(j["wildcards"]["method"], j["wildcards"]["model"], j["wildcards"]["dataset"]) for j in jobs
            if j["rule"] == rule}


def test_plans_both_schedules_on_every_model_and_dataset_offline(workdir):
    assert LIFELONG["methods"] == METHODS and list(LIFELONG["models"]) == MODELS
    assert {spec["family"] for spec in LIFELONG["models"].values()} == {"hf_vlm"}
    sequential = LIFELONG["evaluation"]["sequential"]
    assert sequential["methods"] == SEQUENTIAL_METHODS and sequential["n_edits"] == 1000
    jobs = planned_jobs(dry_run(workdir))
    counts = Counter(job["rule"] for job in jobs)
    shards = sum(LIFELONG["datasets"][name]["shards"] for name in DATASETS)
    assert counts["evaluate_shard"] == len(METHODS) * len(MODELS) * shards
    assert combos(jobs, "gather_shards") == {(me, mo, d) for me in METHODS for mo in MODELS for d in DATASETS}
    assert combos(jobs, "evaluate_sequential") == {(me, mo, d) for me in SEQUENTIAL_METHODS for mo in MODELS
                                                   for d in DATASETS}
    assert counts["baseline"] == len(MODELS) * len(DATASETS)
    assert counts["summary"] == counts["summary_sequential"] == 1
    assert counts["plot"] == counts["plot_sequential"] == len(DATASETS)
    # IKE is EasyEdit's k: 0 (no retrieval): no embeddings; nothing is meta-trained or converted
    assert not {"embed", "pretrain", "convert_model", "evaluate"} & set(counts)
    for name in ("editing_data", "images", "Qwen2_VL_7B_Instruct", "llava_onevision_qwen2_7b_ov_hf"):
        assert counts[f"download_{name}"] == 1, name


def test_both_schedules_targets_are_in_the_plan(workdir):
    planned = dry_run(workdir)
    for folder in ("results", "results/sequential"):
        for name in ("tables/summary.csv", "tables/summary.md", "plots/evqa.png", "plots/eic.png"):
            assert f"{folder}/{name}" in planned, f"{folder}/{name}"
    assert "results/sequential/eval/WISE/llava-onevision-7b/eic/metrics.json" in planned
    assert "results/sequential/eval/IKE/" not in planned  # IKE edits no weights: single only


def test_every_model_is_downloaded_from_the_hub(workdir):
    downloads = LIFELONG["downloads"]
    assert not [name for name, entry in downloads.items() if "manual" in entry]
    hub = {entry["dest"]: entry["hf"] for entry in downloads.values() if "hf" in entry}
    assert {spec["path"]: hub.get(spec["path"]) for spec in LIFELONG["models"].values()} == {
        "resources/checkpoints/Qwen2-VL-7B-Instruct": "Qwen/Qwen2-VL-7B-Instruct",
        "resources/checkpoints/llava-onevision-qwen2-7b-ov-hf": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    }
    counts = Counter(job["rule"] for job in planned_jobs(dry_run(workdir, "downloads")))
    assert set(counts.values()) == {1} and len(counts) == len(downloads) + 2  # + extract, + the target


def test_every_method_x_model_has_a_typed_hparams_file():
    files = read_every_hparams_file(LIFELONG)
    assert set(files) == {(method, model) for method in METHODS for model in MODELS}
    for model in MODELS:  # EasyEdit's qwen2vl-7b / llavaov-7b values, one file per model
        assert (files["IKE", model].mode, files["IKE", model].k) == ("fact_prefix", 0)
        assert files["GRACE", model].scope == "llm.layers.18.mlp.out"
        assert files["WISE", model].scope == "llm.layers.23.mlp.out"
        assert files["LoRA", model].lora_type == "adalora"


def test_lint_of_the_lifelong_config_is_clean():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--configfile", "config/lifelong.yaml"],
                          cwd=REPO, env=snakemake_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Congratulations" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
