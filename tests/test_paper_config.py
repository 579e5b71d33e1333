"""The paper config plans the full grid offline, and the profiles request the right resources.

Dry runs only (``-n``): nothing is downloaded or computed, in a private copy of the workflow.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from workflow_copy import REPO, copy_workflow, dry_run_config, snakemake_env

from mmke.hparams import HParams, read_hparams

PAPER = yaml.safe_load((REPO / "config/mmedit.yaml").read_text())
METHODS = ["base", "FT-L", "FT-V", "KE", "IKE", "SERAC", "MEND", "LoRA", "GRACE", "WISE"]
MODELS = ["blip2-opt-2.7b", "minigpt4-vicuna-7b"]
#: The methods of the sequential schedule: every one that edits weights.
SEQUENTIAL_METHODS = ["FT-L", "FT-V", "KE", "MEND", "LoRA", "GRACE", "WISE"]
#: Rules of the paper DAG that run on a GPU (the others run on CPU nodes or the submitting host).
GPU_RULES = ("baseline", "evaluate_shard", "evaluate_sequential", "embed", "pretrain")


@pytest.fixture(scope="module")
def paper_workdir(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("paper"))


def read_every_hparams_file(config: dict) -> dict[tuple[str, str], HParams]:
    """Each method x model hparams file of ``config``, read and type-checked by the library.

    The dry runs only check that the files exist; this reads their values as a job would.
    """
    root = REPO / config.get("hparams_dir", "config/hparams")
    files = {}
    for method in config["methods"]:
        for model in config["models"]:
            hparams = read_hparams(root / method / f"{model}.yaml", expect_method=method)
            assert hparams.model == model, (method, model)
            files[method, model] = hparams
    return files


def download_rule(dest: str) -> str:
    """The generated download rule that writes ``dest``."""
    (name,) = [name for name, entry in PAPER["downloads"].items() if entry["dest"] == dest]
    return "download_" + re.sub(r"\W", "_", name)


def dry_run(workdir: Path, *args: str) -> str:
    return dry_run_config(workdir, "config/mmedit.yaml", *args)


def planned_jobs(text: str) -> list[dict]:
    """Each planned job's rule, wildcards and requested resources, from the dry-run listing."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", text):
        rule = re.search(r"^(?:local)?rule (\S+):", block, re.M)
        if not rule:
            continue
        fields = {key: dict(item.split("=", 1) for item in value.split(", ") if "=" in item)
                  for key, value in re.findall(r"^\s+(wildcards|resources): (.*)$", block, re.M)}
        jobs.append({"rule": rule.group(1), **{k: fields.get(k, {}) for k in ("wildcards", "resources")}})
    return jobs


def test_plans_the_full_grid_offline(paper_workdir):
    jobs = planned_jobs(dry_run(paper_workdir))
    counts = Counter(job["rule"] for job in jobs)
    shards = PAPER["datasets"]["evqa"]["shards"] + PAPER["datasets"]["eic"]["shards"]
    assert counts["evaluate_shard"] == len(METHODS) * len(MODELS) * shards
    assert counts["gather_shards"] == len(METHODS) * len(MODELS) * 2
    assert counts["baseline"] == len(MODELS) * 2
    assert counts["download_editing_data"] == counts["download_images"] == counts["extract_images"] == 1
    assert counts["summary"] == 1 and counts["plot"] == 2
    assert counts["convert_model"] == len(MODELS)  # each model assembled once from its LAVIS pieces
    assert counts["pretrain"] == 3 * len(MODELS) * 2  # MEND, SERAC, KE x model x training set
    assert counts["embed"] == 2  # one IKE index per dataset, shared by both models
    assert "evaluate" not in counts  # every paper dataset is sharded
    gathered = {(j["wildcards"]["method"], j["wildcards"]["model"], j["wildcards"]["dataset"])
                for j in jobs if j["rule"] == "gather_shards"}
    assert gathered == {(me, mo, d) for me in METHODS for mo in MODELS for d in ("evqa", "eic")}
    assert {j["wildcards"]["shard"] for j in jobs if j["rule"] == "evaluate_shard"
            and j["wildcards"]["dataset"] == "eic"} == {"1", "2", "3", "4"}


def test_plans_the_sequential_schedule_beside_the_single_one(paper_workdir):
    sequential = PAPER["evaluation"]["sequential"]
    assert sequential["methods"] == SEQUENTIAL_METHODS and sequential["n_edits"] == 1000
    assert "models" not in sequential and "datasets" not in sequential  # both models, both datasets
    jobs = planned_jobs(dry_run(paper_workdir))
    counts = Counter(job["rule"] for job in jobs)
    combos = {(me, mo, d) for me in SEQUENTIAL_METHODS for mo in MODELS for d in ("evqa", "eic")}
    assert counts["evaluate_sequential"] == len(combos)  # one unsharded job per combo
    assert {(j["wildcards"]["method"], j["wildcards"]["model"], j["wildcards"]["dataset"])
            for j in jobs if j["rule"] == "evaluate_sequential"} == combos
    assert counts["summary_sequential"] == 1 and counts["plot_sequential"] == 2
    assert counts["pretrain"] == 3 * len(MODELS) * 2  # KE and MEND reuse the single schedule's networks


def test_every_method_x_model_has_a_typed_hparams_file():
    files = read_every_hparams_file(PAPER)
    assert set(files) == {(method, model) for method in METHODS for model in MODELS}
    assert {files["WISE", model].scope for model in MODELS} == {"llm.layers.23.mlp.in", "llm.layers.23.mlp.out"}
    assert {files["GRACE", model].scope for model in MODELS} == {"llm.layers.18.mlp.out"}


def test_downloads_target_fetches_every_checkpoint(paper_workdir):
    counts = Counter(job["rule"] for job in planned_jobs(dry_run(paper_workdir, "downloads")))
    expected = {"download_" + re.sub(r"\W", "_", name) for name in PAPER["downloads"]} | {"extract_images", "downloads"}
    assert set(counts) == expected and set(counts.values()) == {1}
    for spec in PAPER["models"].values():  # every LAVIS piece a model is converted from is downloaded
        assert set(spec["lavis"].values()) <= {entry["dest"] for entry in PAPER["downloads"].values()}


def test_local_profile_requests_gpus_per_job(paper_workdir):
    profile = yaml.safe_load((REPO / "config/profiles/local/config.yaml").read_text())
    assert "gpu=2" in profile["resources"]
    jobs = planned_jobs(dry_run(paper_workdir, "--profile", "config/profiles/local"))
    by_rule = {job["rule"]: job["resources"] for job in jobs}
    for rule, stage in (("evaluate_shard", "evaluate"), ("evaluate_sequential", "evaluate"), ("baseline", "baseline"),
                        ("embed", "embed"), ("pretrain", "pretrain")):
        wanted = PAPER["resources"][stage]
        assert by_rule[rule]["gpu"] == str(wanted["gpu"]) == "1"
        assert by_rule[rule]["mem_mb"] == str(wanted["mem_mb"])
        assert by_rule[rule]["runtime"] == str(wanted["runtime"])
    for rule in ("download_images", "gather_shards", "summary", "plot"):
        assert by_rule[rule].get("gpu", "0") == "0", rule


def test_slurm_profile_maps_gpu_jobs_to_the_gpu_partition(paper_workdir):
    profile = yaml.safe_load((REPO / "config/profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert {"slurm_account", "slurm_partition", "mem_mb", "runtime"} <= set(profile["default-resources"])
    assert set(profile["set-resources"]) == set(GPU_RULES) | {"evaluate"}
    assert profile["set-resources"]["evaluate_sequential"]["runtime"] == 8 * PAPER["resources"]["evaluate"]["runtime"]
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm not installed (pip install .[slurm]): profile parsed only")
    jobs = planned_jobs(dry_run(paper_workdir, "--profile", "config/profiles/slurm"))
    gpu_partition = profile["set-resources"]["evaluate"]["slurm_partition"]
    for job in jobs:
        if job["rule"] in GPU_RULES:
            assert job["resources"]["slurm_partition"] == gpu_partition and job["resources"]["gpu"] == "1"
        elif job["rule"] in ("summary", "gather_shards"):
            assert job["resources"]["slurm_partition"] == profile["default-resources"]["slurm_partition"]
    planned = {j["rule"] for j in jobs if j["rule"].startswith("download_")}
    pieces = {download_rule(dest) for spec in PAPER["models"].values() for dest in spec["lavis"].values()}
    assert {"download_editing_data", "download_images"} | pieces <= planned


def test_lint_of_the_paper_config_is_clean():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--configfile", "config/mmedit.yaml"],
                          cwd=REPO, env=snakemake_env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Congratulations" in output, output
    assert "only valid for outputs" not in output  # generated download rules use flags correctly
