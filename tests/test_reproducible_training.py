"""Training results depend on config, seed and code only: never on machine load or wall time.

Each stage runs twice, once with a process burning CPU beside it; the weight files must be
byte-identical (sha256) and the reports equal apart from their timings.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from mmke.data.demo import write_demo_dataset
from mmke.io import read_json
from mmke.models.tiny import build_tiny
from mmke.models.tiny_aux import build_tiny_aux
from mmke.stages import pretrain_base_stage, pretrain_counterfactual_stage, pretrain_stage

PROTOCOL = {"exact_match": True, "mloc_template": "trainer"}
TIMINGS = {"train_s", "steps_per_s"}
SETTINGS = {"steps": 12, "batch_size": 6, "lr": 1e-3, "weight_decay": 0.1, "seed": 3, "heldout_images": 2,
            "context": {"share": 0.5, "max_demos": 2}, "text_loss": 0.3}


@contextlib.contextmanager
def cpu_burner() -> Iterator[None]:
    """A busy process on every core, as on a loaded shared machine."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def run_twice(run, tmp_path: Path) -> list[Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the stages run (threads: 1)
    try:
        outs = []
        for name, load in (("idle", contextlib.nullcontext()), ("loaded", cpu_burner())):
            with load:
                run(tmp_path / name)
            outs.append(tmp_path / name)
        return outs
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_world_stage_is_identical_under_load(tmp_path):
    init = build_tiny("blip2", tmp_path / "init", image_size=32, init_std=0.1, patch_size=4, position_sincos=3.0)

    def run(out: Path) -> None:
        pretrain_base_stage(model={"family": "blip2", "path": str(out / "model"), "image_size": 32}, init_dir=init,
                            datasets={}, protocol=PROTOCOL, settings=SETTINGS, out_dir=out / "model",
                            report_out=out / "report.json", device="cpu")

    idle, loaded = run_twice(run, tmp_path)
    assert sha256(idle / "model/model.safetensors") == sha256(loaded / "model/model.safetensors")
    first, second = read_json(idle / "report.json"), read_json(loaded / "report.json")
    assert first["steps"] == second["steps"] == SETTINGS["steps"]
    assert without_timings(first) == without_timings(second)
    assert first["train_s"] != second["train_s"]  # the timings are the only difference, and they do differ


@pytest.mark.slow
def test_counterfactual_stage_is_identical_under_load(tmp_path):
    init = build_tiny_aux("counterfactual", tmp_path / "init")

    def run(out: Path) -> None:
        pretrain_counterfactual_stage(init_dir=init, datasets={}, protocol=PROTOCOL, settings=SETTINGS,
                                      out_dir=out / "model", report_out=out / "report.json", device="cpu",
                                      n_heldout=20)

    idle, loaded = run_twice(run, tmp_path)
    assert sha256(idle / "model/model.safetensors") == sha256(loaded / "model/model.safetensors")
    assert without_timings(read_json(idle / "report.json")) == without_timings(read_json(loaded / "report.json"))


@pytest.mark.slow
def test_meta_training_is_identical_under_load(tmp_path):
    model_dir = build_tiny("blip2", tmp_path / "model", image_size=32)
    paths = write_demo_dataset(tmp_path / "data", "evqa", n_train=6, n_eval=1)
    dataset = {"kind": "evqa", "train": str(paths["train"]), "eval": str(paths["eval"]),
               "image_root": str(paths["images"])}
    hparams = tmp_path / "MEND.yaml"
    hparams.write_text(yaml.safe_dump({"method": "MEND", "model": "tiny-blip2", "scope": "llm.mlp.last2",
                                       "lr": 1e-3, "max_iters": 6, "val_interval": 3, "early_stop_patience": 6,
                                       "val_fraction": 0.2}))

    def run(out: Path) -> None:
        pretrain_stage(method="MEND", model={"family": "blip2", "path": str(model_dir), "image_size": 32},
                       dataset=dataset, protocol=PROTOCOL, hparams_path=hparams,
                       checkpoint_out=out / "editor.safetensors", report_out=out / "train.json",
                       state_dir=out / "resume", device="cpu")

    idle, loaded = run_twice(run, tmp_path)
    assert sha256(idle / "editor.safetensors") == sha256(loaded / "editor.safetensors")
    assert without_timings(read_json(idle / "train.json")) == without_timings(read_json(loaded / "train.json"))
