"""Pretraining tiny models on facts: the loop, its losses, its report and what it reads.

What the demo's own settings buy (held-out accuracy of the world model, the methods' figures)
is asserted by tests/test_demo_floors.py, which runs the demo's stages once.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mmke.data.demo import write_demo_dataset
from mmke.facts import ContextConfig, WorldFacts, fact_stream
from mmke.io import read_json
from mmke.metrics import IGNORE_INDEX, shift
from mmke.models.tiny import build_tiny
from mmke.models.tiny_aux import build_tiny_aux
from mmke.stages import load_configured_model, pretrain_base_stage
from mmke.world_training import PretrainConfig, counterfactual_batch, item_loss, pretrain

PROTOCOL = {"exact_match": True, "mloc_template": "trainer"}
FAMILIES = [("blip2", {"image_size": 32}), ("minigpt4", {"image_size": 32}), ("hf_vlm", {})]


def stream(share: float = 0.5, seed: int = 0, fact_weights: dict | None = None):
    source = WorldFacts("train", 32, "trainer", fact_weights)
    return fact_stream([source], seed, ContextConfig(share=share, max_demos=2))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: load_configured_model({"family": family, "path": str(build_tiny(family, root / family)), **extra},
                                          "cpu")
            for family, extra in FAMILIES}


@pytest.mark.parametrize("family", [family for family, _ in FAMILIES])
def test_text_labels_are_every_real_text_token(models, family):
    model = models[family]
    items = list(itertools.islice(stream(share=1.0, fact_weights={"fact": 0, "tie": 0}), 3))
    batch = model.teacher_forced([i.prompt for i in items], [i.answer for i in items], [i.image for i in items])
    labels = model.text_labels(batch)
    real = batch.attention_mask.bool()
    assert torch.equal(labels[~real], torch.full_like(labels[~real], IGNORE_INDEX))  # no padding
    assert not (labels == model.placeholder_id).any()  # no image position
    assert torch.equal(labels[labels != IGNORE_INDEX], batch.input_ids[labels != IGNORE_INDEX])
    # every answer token is a text token, and the context's tokens are too
    assert ((batch.labels != IGNORE_INDEX) <= (labels != IGNORE_INDEX)).all()
    assert (labels != IGNORE_INDEX).sum() > 3 * (batch.labels != IGNORE_INDEX).sum()


@pytest.mark.parametrize("family", [family for family, _ in FAMILIES])
def test_item_loss_is_the_answer_and_text_cross_entropy(models, family):
    """The selective output layer and the length buckets change nothing but the cost."""
    model = models[family]
    items = list(itertools.islice(stream(), 8))
    answer, text = [], []
    for group in ([i for i in items if i.image is not None], [i for i in items if i.image is None]):
        if not group:
            continue
        images = None if group[0].image is None else [i.image for i in group]
        batch = model.teacher_forced([i.prompt for i in group], [i.answer for i in group], images)
        logits = model.logits(batch)
        for store, labels in ((answer, batch.labels), (text, model.text_labels(batch))):
            pred, gold = shift(logits, labels)
            store.append(F.cross_entropy(pred.flatten(0, 1), gold.flatten(), ignore_index=IGNORE_INDEX,
                                         reduction="none")[gold.flatten() != IGNORE_INDEX])
    expected = torch.cat(answer).mean() + 0.3 * torch.cat(text).mean()
    with torch.no_grad():
        assert item_loss(model, items, 0.3).item() == pytest.approx(expected.item(), rel=1e-5)
        assert item_loss(model, items, 0.0).item() == pytest.approx(torch.cat(answer).mean().item(), rel=1e-5)


def test_selected_logits_equal_the_full_ones(models):
    model = models["blip2"]
    items = list(itertools.islice(stream(), 4))
    items = [i for i in items if i.image is not None]
    batch = model.teacher_forced([i.prompt for i in items], [i.answer for i in items], [i.image for i in items])
    mask = batch.labels != IGNORE_INDEX
    torch.testing.assert_close(model.logits(batch, mask), model.logits(batch)[mask], rtol=0, atol=1e-5)


def test_frozen_parameters_keep_their_init(tmp_path):
    adapter = load_configured_model({"family": "blip2", "path": str(build_tiny("blip2", tmp_path / "m"))}, "cpu")
    before = {name: p.detach().clone() for name, p in adapter.model.named_parameters()}
    frozen = "vision_model.embeddings.position_embedding"
    pretrain(adapter, stream(), PretrainConfig(steps=2, batch_size=4, frozen=[frozen], text_loss=0.3))
    after = dict(adapter.model.named_parameters())
    assert torch.equal(after[frozen], before[frozen])
    patches = "vision_model.embeddings.patch_embedding.weight"
    assert not torch.equal(after[patches], before[patches])
    with pytest.raises(ValueError, match=r"cannot freeze \['vision_model.nope'\]"):
        pretrain(adapter, stream(), PretrainConfig(steps=1, frozen=["vision_model.nope"]))


def test_weight_decay_is_decoupled_from_the_gradient_step(tmp_path):
    """AdamW: one step with decay differs from one without by exactly lr x decay x the initial weight."""
    init = build_tiny("blip2", tmp_path / "m")
    runs = {}
    for decay in (0.0, 0.5):
        adapter = load_configured_model({"family": "blip2", "path": str(init)}, "cpu")
        start = {name: p.detach().clone() for name, p in adapter.model.named_parameters()}
        pretrain(adapter, stream(), PretrainConfig(steps=1, batch_size=2, lr=0.01, weight_decay=decay))
        runs[decay] = dict(adapter.model.named_parameters())
    name = "language_model.model.decoder.layers.1.fc2.weight"
    assert torch.allclose(runs[0.0][name] - runs[0.5][name], 0.01 * 0.5 * start[name], atol=1e-7)


def test_settings_are_checked():
    with pytest.raises(ValueError, match=r"unknown pretraining settings \['max_seconds'\]"):
        PretrainConfig.from_settings({"steps": 3, "max_seconds": 300})
    config = PretrainConfig.from_settings({"context": {"share": 0.4, "after": 2}, "text_loss": 0.3})
    assert config.context == ContextConfig(share=0.4, after=2)


def test_stage_learns_world_and_train_splits_never_eval_splits(tmp_path):
    """A dataset is learnt from its train split, measured on its held-out tail; its eval split is not read."""
    paths = write_demo_dataset(tmp_path / "data", "evqa", n_train=10, n_eval=2)
    dataset = {"kind": "evqa", "train": str(paths["train"]), "eval": str(tmp_path / "missing.json"),
               "image_root": str(paths["images"])}
    init = build_tiny("blip2", tmp_path / "init")
    settings = {"steps": 3, "batch_size": 4, "heldout_images": 1, "heldout_fraction": 0.2,
                "context": {"share": 0.5, "max_demos": 1}, "text_loss": 0.3}
    report = pretrain_base_stage(model={"family": "blip2", "path": str(tmp_path / "out"), "image_size": 32},
                                 init_dir=init, datasets={"mine": dataset}, protocol=PROTOCOL, settings=settings,
                                 out_dir=tmp_path / "out", report_out=tmp_path / "out.json", device="cpu")
    assert report == read_json(tmp_path / "out.json")
    assert report["steps"] == 3 and report["n_train_items"] == 12
    assert set(report["heldout"]) == set(report["before"]) == {"world", "mine"}
    # 2 held-out records x 5 questions, each plain, after a relevant and after an unrelated fact
    assert report["n_heldout_items"]["mine"] == 2 * 5 * 3
    assert {"rewrite", "rephrase", "image_rephrase", "m_loc", "loc", "rewrite:edit", "loc:other"} <= set(
        report["heldout"]["mine"])
    assert "count" not in report["heldout"]["mine"]  # a dataset's questions keep their own names
    assert (tmp_path / "out/model.safetensors").is_file()
    world_only = pretrain_base_stage(model={"family": "blip2", "path": str(tmp_path / "w"), "image_size": 32},
                                     init_dir=init, datasets={}, protocol=PROTOCOL, settings=settings,
                                     out_dir=tmp_path / "w", report_out=tmp_path / "w.json", device="cpu")
    assert set(world_only["heldout"]) == {"world"}
    with pytest.raises(ValueError, match="nothing to learn"):
        pretrain_base_stage(model={"family": "blip2", "path": str(tmp_path / "x"), "image_size": 32}, init_dir=init,
                            datasets={}, protocol=PROTOCOL, settings={**settings, "world": False},
                            out_dir=tmp_path / "x", report_out=tmp_path / "x.json", device="cpu")


def test_counterfactual_rows_are_what_serac_feeds_its_model(tmp_path):
    from mmke.methods.serac import counterfactual_ids
    from transformers import AutoTokenizer

    from mmke.facts import FactItem

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_aux("counterfactual", tmp_path / "cf"))
    examples = [(("What colour is the shape?", " red"), FactItem("edit_rephrase", "What is the colour of the object shown?", " red", None)),
                (("How big is the shape?", " small"), FactItem("fact", "What is the capital of Veltria?", "Norhaven", None))]
    batch = counterfactual_batch(tokenizer, examples)
    for row, (edit, item) in enumerate(examples):
        ids, start = counterfactual_ids(tokenizer, edit, item.prompt, item.answer)
        assert batch["input_ids"][row, :len(ids)].tolist() == ids
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(labelled) == item.answer and labelled == ids[start:]
