"""A tiny BLIP-2 pretrained on the synthetic world knows it; a random one does not.

The module fixture runs the pretraining stage once with the demo config's own settings, so the
accuracy asserted here is the one `make demo` gets (on a shared CPU it may take a few minutes).
"""

from __future__ import annotations

import filecmp
import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml

from mmke.data.demo import ATTRIBUTES, write_demo_dataset
from mmke.io import read_json
from mmke.models.tiny import build_tiny
from mmke.stages import baseline_stage, evaluate_stage, load_configured_model, pretrain_base_stage
from mmke.world_training import FACT_KINDS, PretrainConfig, accuracy, eval_split_items, pretrain, world_stream

REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "config/config.yaml").read_text())
MODEL = DEMO["models"]["tiny-blip2"]
# Exact match on questions about scenes never seen in training: over all questions, and for every
# attribute, the caption (all of its words right) and counting.
HELDOUT_THRESHOLD = 0.9
KIND_THRESHOLD = 0.85
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
    assert heldout["all"] >= HELDOUT_THRESHOLD
    assert {kind: value >= KIND_THRESHOLD for kind, value in heldout.items()} == dict.fromkeys(heldout, True)
    # the demo datasets' eval records (the facts the demo edits), read through the real loaders
    assert report["eval_split_accuracy"]["vqa"] >= HELDOUT_THRESHOLD
    assert report["eval_split_accuracy"]["caption"] >= HELDOUT_THRESHOLD
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


def evaluate_on_world(world, method: str, hparams: dict) -> dict:
    """One method's metrics.json summary on the demo's E-VQA eval records, as the evaluate stage writes it."""
    root, dataset = world["root"], world["datasets"]["demo-evqa"]
    pre_rows, pre_tensors = root / "pre.jsonl", root / "pre.safetensors"
    if not pre_rows.exists():
        baseline_stage(world["model"], dataset, PROTOCOL, pre_rows, pre_tensors, "cpu")
    hparams_path = root / f"{method}.yaml"
    hparams_path.write_text(yaml.safe_dump({"method": method, "model": "tiny-blip2", **hparams}))
    report = evaluate_stage(
        names={"method": method, "model": "tiny-blip2", "dataset": "demo-evqa"}, model=world["model"],
        dataset=dataset, protocol=PROTOCOL, hparams_path=hparams_path, baseline_rows=pre_rows,
        baseline_tensors=pre_tensors, metrics_out=root / f"{method}.metrics.json",
        records_out=root / f"{method}.records.jsonl", device="cpu",
    )
    return report["summary"]


def test_base_rows_keep_perfect_locality_and_do_not_know_the_counterfactual(world):
    """The unedited model agrees with itself (locality 1.0) and answers the truth, not ``alt``."""
    summary = evaluate_on_world(world, "base", {})
    assert summary["locality_acc"] == summary["multimodal_locality_acc"] == 1.0
    assert summary["rewrite_acc"] <= 0.1 and summary["image_rephrase_acc"] <= 0.1


def test_ft_l_edit_takes_and_text_locality_stays_high(world):
    """The demo's FT-L makes the counterfactual answer on the edited scene and its other rendering,
    while the unrelated text facts mostly keep their answers."""
    hparams = yaml.safe_load((REPO / "config/hparams/FT-L/tiny-blip2.yaml").read_text())
    summary = evaluate_on_world(world, "FT-L", {k: v for k, v in hparams.items() if k not in ("method", "model")})
    assert summary["rewrite_acc"] >= 0.9 and summary["image_rephrase_acc"] >= 0.8
    assert summary["locality_acc"] >= 0.7


def test_stream_draws_fact_kinds_by_weight():
    only_position = dict.fromkeys(FACT_KINDS, 0.0) | {"position": 1.0}
    items = list(itertools.islice(world_stream("train", 0, 32, "trainer", only_position), 30))
    assert {item.kind for item in items} == {"position"}
    assert {item.answer for item in items} <= {f" {value}" for value in ATTRIBUTES["position"]}
    weighted = list(itertools.islice(world_stream("train", 0, 32, "trainer", {"count": 10.0}), 600))
    # 2 counting questions of weight 10 against 19 other facts of weight 1: about half the stream
    assert 0.4 < sum(item.kind == "count" for item in weighted) / len(weighted) < 0.6
    with pytest.raises(ValueError, match=r"unknown fact kinds \['colur'\]"):
        next(world_stream("train", 0, 32, "trainer", {"colur": 2.0}))


def test_frozen_parameters_keep_their_init(tmp_path):
    adapter = load_configured_model({"family": "blip2", "path": str(build_tiny("blip2", tmp_path / "m"))}, "cpu")
    before = {name: p.detach().clone() for name, p in adapter.model.named_parameters()}
    frozen = "vision_model.embeddings.position_embedding"
    config = PretrainConfig(steps=2, batch_size=2, frozen=[frozen])
    pretrain(adapter, world_stream("train", 0, 32, "trainer"), config)
    after = dict(adapter.model.named_parameters())
    assert torch.equal(after[frozen], before[frozen])
    patches = "vision_model.embeddings.patch_embedding.weight"
    assert not torch.equal(after[patches], before[patches])
    with pytest.raises(ValueError, match=r"cannot freeze \['vision_model.nope'\]"):
        pretrain(adapter, world_stream("train", 0, 32, "trainer"), PretrainConfig(steps=1, frozen=["vision_model.nope"]))


def test_weight_decay_is_decoupled_from_the_gradient_step(tmp_path):
    """AdamW: one step with decay differs from one without by exactly lr x decay x the initial weight."""
    init = build_tiny("blip2", tmp_path / "m")
    runs = {}
    for decay in (0.0, 0.5):
        adapter = load_configured_model({"family": "blip2", "path": str(init)}, "cpu")
        start = {name: p.detach().clone() for name, p in adapter.model.named_parameters()}
        pretrain(adapter, world_stream("train", 0, 32, "trainer"), PretrainConfig(steps=1, batch_size=2, lr=0.01,
                                                                                  weight_decay=decay))
        runs[decay] = dict(adapter.model.named_parameters())
    name = "language_model.model.decoder.layers.1.fc2.weight"
    assert torch.allclose(runs[0.0][name] - runs[0.5][name], 0.01 * 0.5 * start[name], atol=1e-7)
