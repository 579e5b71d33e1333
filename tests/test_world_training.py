"""A tiny BLIP-2 pretrained on the synthetic world knows it; a random one does not.

The module fixture runs the pretraining stage once with the demo config's own settings, so the
accuracy asserted here is the one `make demo` gets (on a shared CPU it may take a few minutes).
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch
import yaml

from mmke.data.demo import ATTRIBUTES, write_demo_dataset
from mmke.io import read_json
from mmke.models.tiny import build_tiny
from mmke.stages import baseline_stage, evaluate_stage, load_configured_model, pretrain_base_stage
from mmke.world_training import accuracy, eval_split_items

REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "config/config.yaml").read_text())
MODEL = DEMO["models"]["tiny-blip2"]
# Exact match on questions about scenes never seen in training. The tiny model learns colour,
# background and size (>= 0.9) and counting, shape partly, and does not yet see position: the
# issue's target of >= 0.9 on everything is not reached (see README, "The demo world").
LEARNT = ("colour", "background", "size")
LEARNT_THRESHOLD = 0.9
OVERALL_THRESHOLD = 0.55
PROTOCOL = DEMO["protocol"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Demo datasets, the random init and the pretrained model, all built as the demo builds them."""
    root = tmp_path_factory.mktemp("world")
    datasets = {}
    for name in MODEL["pretrain"]["datasets"]:
        spec = DEMO["datasets"][name]
        paths = write_demo_dataset(root / name, spec["kind"], **spec["demo"])
        datasets[name] = {"kind": spec["kind"], "train": str(paths["train"]), "eval": str(paths["eval"]),
                          "image_root": str(paths["images"])}
    init = build_tiny(MODEL["family"], root / "init", **MODEL["tiny"])
    model = {**MODEL, "path": str(root / "trained")}
    settings = {key: value for key, value in MODEL["pretrain"].items() if key != "datasets"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the stage runs (threads: 1); two threads on a busy CPU crawl
    try:
        report = pretrain_base_stage(model=model, init_dir=init, datasets=list(datasets.values()), protocol=PROTOCOL,
                                     settings=settings, out_dir=root / "trained", report_out=root / "trained.json",
                                     device="cpu")
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "datasets": datasets, "init": init, "model": model, "report": report}


def test_pretrained_model_answers_heldout_scenes(world):
    report = world["report"]
    print(json.dumps(report, indent=1))  # the figures for the README, visible with pytest -s
    assert report == read_json(world["root"] / "trained.json")
    heldout = report["heldout_accuracy"]
    assert set(heldout) == {*ATTRIBUTES, "caption", "count", "all"}
    assert {attribute: heldout[attribute] >= LEARNT_THRESHOLD for attribute in LEARNT} == dict.fromkeys(LEARNT, True)
    assert heldout["count"] >= 0.6 and heldout["all"] >= OVERALL_THRESHOLD
    # the demo datasets' eval records (the facts the demo edits), read through the real loaders
    assert report["eval_split_accuracy"]["vqa"] >= OVERALL_THRESHOLD
    assert report["n_eval_split_items"] == 4 * sum(DEMO["datasets"][n]["demo"]["n_eval"] for n in world["datasets"])
    assert report["steps"] >= 1 and report["train_s"] > 0


def test_random_model_is_near_chance(world):
    # Exact match over a 1024-token vocabulary: a model that knows nothing scores about zero,
    # below even guessing among the world's answers (1/6 colours .. 1/2 sizes).
    assert world["report"]["before"]["heldout_accuracy"]["all"] <= 0.1
    random_model = load_configured_model({**MODEL, "path": str(world["init"])}, "cpu")
    items = eval_split_items(list(world["datasets"].values()), PROTOCOL["mloc_template"])
    assert accuracy(random_model, items)["all"] <= 0.1


def test_saved_directory_is_the_trained_model_with_the_inits_tokenizer(world):
    reloaded = load_configured_model(world["model"], "cpu")
    items = eval_split_items(list(world["datasets"].values()), PROTOCOL["mloc_template"])
    assert accuracy(reloaded, items) == pytest.approx(world["report"]["eval_split_accuracy"])
    trained = world["root"] / "trained"
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        assert filecmp.cmp(world["init"] / name, trained / name, shallow=False), name
    assert not filecmp.cmp(world["init"] / "model.safetensors", trained / "model.safetensors", shallow=False)
    assert sorted(p.name for p in world["root"].iterdir() if p.name.startswith(".")) == []  # no temp dirs left


def test_base_rows_keep_perfect_locality_and_do_not_know_the_counterfactual(world):
    """The unedited model agrees with itself (locality 1.0) and answers the truth, not ``alt``."""
    root, dataset = world["root"], world["datasets"]["demo-evqa"]
    (root / "hparams").mkdir()
    hparams = root / "hparams/base.yaml"
    hparams.write_text("method: base\nmodel: tiny-blip2\n")
    baseline_stage(world["model"], dataset, PROTOCOL, root / "pre.jsonl", root / "pre.safetensors", "cpu")
    report = evaluate_stage(
        names={"method": "base", "model": "tiny-blip2", "dataset": "demo-evqa"}, model=world["model"],
        dataset=dataset, protocol=PROTOCOL, hparams_path=hparams, baseline_rows=root / "pre.jsonl",
        baseline_tensors=root / "pre.safetensors", metrics_out=root / "metrics.json",
        records_out=root / "records.jsonl", device="cpu",
    )
    summary = report["summary"]
    assert summary["locality_acc"] == summary["multimodal_locality_acc"] == 1.0
    # it answers what it learnt; only facts it does not know (position) can coincide with ``alt``
    assert summary["rewrite_acc"] <= 0.3 and summary["image_rephrase_acc"] <= 0.3
