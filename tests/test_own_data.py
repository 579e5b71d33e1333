"""A user's own E-VQA set in place of the demo's: what the config check says, and a run that works.

The user copies config/config.yaml, replaces `datasets:` with their set (real 64-pixel PNGs, one
record with an empty field), and names their model. Every cross-reference the copy leaves
dangling must be a one-line error naming its key; the repaired config must plan and run.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw
from workflow_copy import copy_workflow, snakemake_env

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}


def picture(path: Path, colour: str, shape: str) -> None:
    """A 64-pixel picture of one coloured shape on grey."""
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    box = (14, 14, 50, 50)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def record(i: int, colour: str, alt: str, **changes) -> dict:
    picture_path = f"vqa/{i}.png"
    return {"src": "What colour is the shape?", "pred": colour, "alt": alt,
            "rephrase": "Which colour does the shape have?", "image": picture_path,
            "image_rephrase": f"vqa/{i}_again.png", "loc": "Who wrote Hamlet?", "loc_ans": "Shakespeare",
            "m_loc": "okvqa/0.png", "m_loc_q": "What shape is this?", "m_loc_a": "circle"} | changes


def write_user_dataset(root: Path) -> None:
    """data/easyvqa/{train,eval}.json + images: 4 train records, 4 eval records, one of them skipped."""
    images = root / "data/easyvqa/images"
    for i, (colour, shape) in enumerate([("red", "square"), ("green", "circle"), ("blue", "square"),
                                         ("red", "circle"), ("green", "square"), ("blue", "circle")]):
        picture(images / f"vqa/{i}.png", colour, shape)
        picture(images / f"vqa/{i}_again.png", colour, shape)
    picture(images / "okvqa/0.png", "blue", "circle")
    train = [record(i, c, a) for i, (c, a) in enumerate([("red", "green"), ("green", "blue"), ("blue", "red"),
                                                        ("red", "blue")])]
    evaluation = [record(4, "green", "red"), record(5, "blue", "green"), record(4, "green", "blue", rephrase=""),
                  record(5, "blue", "red")]
    (root / "data/easyvqa/train.json").write_text(json.dumps(train))
    (root / "data/easyvqa/eval.json").write_text(json.dumps(evaluation))


def users_copy(root: Path) -> dict:
    """The demo config with `datasets:` replaced by the user's set and the model renamed, as a user
    would leave it: pretrain and exclude still name the demo's datasets and models."""
    copy_workflow(root)
    write_user_dataset(root)
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    config["datasets"] = {"easyvqa": {"kind": "evqa", "train": "data/easyvqa/train.json",
                                      "eval": "data/easyvqa/eval.json", "image_root": "data/easyvqa/images"}}
    config["models"] = {"easyvqa-blip2": config["models"]["tiny-blip2"]}
    config["methods"] = ["base", "IKE"]
    # what a copy of a demo that learnt its own datasets and excluded other families would keep
    config["models"]["easyvqa-blip2"]["pretrain"]["datasets"] = ["demo-evqa", "demo-eic"]
    config["exclude"] = [{"model": "tiny-minigpt4", "dataset": "demo-eic"}, {"model": "tiny-llava", "dataset": "demo-eic"},
                         *({"method": method, "model": model} for method in ("KE", "SERAC", "MEND")
                           for model in ("tiny-minigpt4", "tiny-llava"))]
    return config


def write_config(root: Path, config: dict) -> None:
    (root / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def snakemake(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--directory", str(root), *args],
                          cwd=root, env=snakemake_env(), capture_output=True, text=True, timeout=900)


def test_dangling_names_of_a_copied_config_are_one_line_errors(tmp_path):
    write_config(tmp_path, users_copy(tmp_path))
    proc = snakemake(tmp_path, "-n")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("config: ")]
    # 2 stale pretrain datasets, 16 names in the 8 stale exclude entries, 2 missing hparams files
    assert len(lines) == 20 and lines == proc.stderr.strip().splitlines()[-20:]
    assert lines[:4] == [
        "config: models.easyvqa-blip2.pretrain.datasets[0]: 'demo-evqa' is not a dataset of this config "
        "(datasets: easyvqa)",
        "config: models.easyvqa-blip2.pretrain.datasets[1]: 'demo-eic' is not a dataset of this config "
        "(datasets: easyvqa)",
        "config: exclude[0].model: 'tiny-minigpt4' is not one of the config's models (easyvqa-blip2)",
        "config: exclude[0].dataset: 'demo-eic' is not one of the config's datasets (easyvqa)",
    ]
    assert "config: exclude[2].method: 'KE' is not one of the config's methods (base, IKE)" in lines
    assert lines[-2:] == [
        f"config: models.easyvqa-blip2: no {method} hparams file, config/hparams/{method}/easyvqa-blip2.yaml does "
        "not exist; write one, or reuse another model's files with `hparams: <model>` in models.easyvqa-blip2; "
        "see config/README.md" for method in ("base", "IKE")]
    assert "Traceback" not in proc.stderr and "KeyError" not in proc.stderr


def repaired(root: Path) -> dict:
    """The user's copy with the keys the errors named fixed: the model reuses tiny-blip2's hparams,
    learns nothing first (a random tiny model), and nothing is excluded."""
    config = users_copy(root)
    model = config["models"]["easyvqa-blip2"]
    del model["pretrain"]
    model |= {"path": "resources/tiny/easyvqa-blip2", "hparams": "tiny-blip2"}
    del config["exclude"]
    return config


TARGETS = [f"results/eval/{method}/easyvqa-blip2/easyvqa/metrics.json" for method in ("base", "IKE")]


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The repaired copy, planned in full, then run for two targets under umask 022 (its tests are slow)."""
    root = tmp_path_factory.mktemp("own")
    write_config(root, repaired(root))
    plan = snakemake(root, "-n", "--quiet", "rules")
    old = os.umask(0o022)
    try:
        run = snakemake(root, *TARGETS)
    finally:
        os.umask(old)
    assert run.returncode == 0, run.stderr[-4000:]
    return root, plan


@pytest.mark.slow
def test_a_users_dataset_plans_and_runs(ran):
    root, plan = ran
    assert plan.returncode == 0, plan.stderr
    assert "demo_dataset" not in plan.stdout and "pretrain_base" not in plan.stdout
    for target in TARGETS:
        metrics = json.loads((root / target).read_text())
        assert metrics["n"] == 3
        assert metrics["skipped"] == {"count": 1, "ids": [2]}  # the record with an empty rephrase
        assert metrics["protocol"]["target_join"] == {"blip2": "space"}
        assert 0.0 <= metrics["summary"]["pre"] <= 1.0
        assert stat.S_IMODE((root / target).stat().st_mode) == 0o644  # group and others may read
    assert stat.S_IMODE((root / "resources/tiny/easyvqa-blip2").stat().st_mode) == 0o755
    log = (root / "logs/evaluate/base/easyvqa-blip2/easyvqa.log").read_text()
    assert "data/easyvqa/eval.json: 1 of 4 records skipped (E-VQA skip rule: an empty field): ids 2" in log
    resized = "images are resized before the model sees them, e.g. 64x64 px -> 32x32 px"
    assert (root / "logs/baseline/easyvqa-blip2/easyvqa.log").read_text().count(resized) == 1
    # base reads the baseline's stored features, so its job decodes (and resizes) no image
    assert resized not in log


@pytest.mark.slow
def test_a_corrupt_baseline_file_names_itself_and_its_rule(ran):
    """A baseline whose tensors file was cut short: the evaluate job says which file and which rule."""
    root, _ = ran
    tensors = root / "results/baseline/easyvqa-blip2/easyvqa/pre.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:7])
    run = snakemake(root, "--forcerun", "evaluate", TARGETS[0])
    assert run.returncode != 0
    log = (root / "logs/evaluate/base/easyvqa-blip2/easyvqa.log").read_text()
    assert ("ValueError: results/baseline/easyvqa-blip2/easyvqa/pre.safetensors: corrupt or truncated safetensors "
            "file (Error while deserializing header: header too small); delete it and rerun snakemake: rule "
            "baseline writes it again") in log


def test_hparams_reuse_by_method_map(tmp_path):
    config = repaired(tmp_path)
    config["models"]["easyvqa-blip2"]["hparams"] = {"base": "tiny-blip2", "IKE": "config/hparams/IKE/tiny-llava.yaml"}
    write_config(tmp_path, config)
    plan = snakemake(tmp_path, "-n", "--quiet", "rules")
    assert plan.returncode == 0, plan.stderr
    config["models"]["easyvqa-blip2"]["hparams"] = {"IKE": "tiny-blip2", "base": "my-base.yaml"}
    write_config(tmp_path, config)
    proc = snakemake(tmp_path, "-n")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "config: models.easyvqa-blip2: no base hparams file, my-base.yaml does not exist; "
        "write one (models.easyvqa-blip2.hparams points there); see config/README.md")
