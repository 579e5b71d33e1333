"""config/vlkeb.yaml plans VLKEB's grid offline: three models x every method on its 1-hop split.

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

VLKEB = yaml.safe_load((REPO / "config/vlkeb.yaml").read_text())
METHODS = ["base", "FT-L", "FT-V", "KE", "IKE", "SERAC", "MEND", "LoRA", "GRACE", "WISE"]
MODELS = ["blip2-opt-2.7b", "minigpt4-vicuna-7b", "llava-1.5-7b"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("vlkeb"))


def dry_run(workdir: Path, *args: str) -> str:
    return dry_run_config(workdir, "config/vlkeb.yaml", *args)


def test_plans_every_method_on_every_model_offline(workdir):
    assert VLKEB["methods"] == METHODS and list(VLKEB["models"]) == MODELS
    jobs = planned_jobs(dry_run(workdir))
    counts = Counter(job["rule"] for job in jobs)
    shards = VLKEB["datasets"]["vlkeb"]["shards"]
    assert counts["evaluate_shard"] == len(METHODS) * len(MODELS) * shards
    assert counts["gather_shards"] == len(METHODS) * len(MODELS)
    assert counts["baseline"] == len(MODELS) and counts["embed"] == 1
    assert counts["pretrain"] == 3 * len(MODELS)  # MEND, SERAC, KE meta-trained on train.json per model
    assert counts["convert_model"] == 2  # BLIP-2 and MiniGPT-4 from their LAVIS pieces; LLaVA as published
    for name in ("vlkeb_train", "vlkeb_eval_multihop", "vlkeb_images", "llava_1_5_7b_hf", "vicuna_7b_v1_5"):
        assert counts[f"download_{name}"] == 1, name
    assert counts["extract_vlkeb_images"] == 1 and counts["summary"] == 1 and counts["plot"] == 1
    gathered = {(j["wildcards"]["method"], j["wildcards"]["model"]) for j in jobs if j["rule"] == "gather_shards"}
    assert gathered == {(method, model) for method in METHODS for model in MODELS}


def test_every_method_x_model_has_a_typed_hparams_file():
    files = read_every_hparams_file(VLKEB)
    assert set(files) == {(method, model) for method in METHODS for model in MODELS}
    llava = {method: files[method, "llava-1.5-7b"] for method in ("LoRA", "GRACE", "WISE")}
    assert (llava["LoRA"].scopes, llava["LoRA"].lora_type, llava["LoRA"].rank) == (["llm.attn.qv"], "adalora", 8)
    assert (llava["GRACE"].scope, llava["GRACE"].n_iter) == ("llm.layers.18.mlp.out", 20)
    assert (llava["WISE"].scope, llava["WISE"].merge_freq) == ("llm.layers.23.mlp.out", 1000)


def test_every_source_is_scripted_and_every_model_piece_is_downloaded(workdir):
    downloads = VLKEB["downloads"]
    assert not [name for name, entry in downloads.items() if "manual" in entry]
    dests = {entry["dest"] for entry in downloads.values()} | {entry["extract"] for entry in downloads.values()
                                                              if "extract" in entry}
    dataset = VLKEB["datasets"]["vlkeb"]
    assert {dataset["train"], dataset["eval"], dataset["image_root"]} <= dests
    for spec in VLKEB["models"].values():
        assert set(spec.get("lavis", {"path": spec["path"]}).values()) <= dests
    counts = Counter(job["rule"] for job in planned_jobs(dry_run(workdir, "downloads")))
    assert set(counts.values()) == {1} and len(counts) == len(downloads) + 2  # + extract, + the target


def test_lint_of_the_vlkeb_config_is_clean():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--configfile", "config/vlkeb.yaml"],
                          cwd=REPO, env=snakemake_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Congratulations" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
