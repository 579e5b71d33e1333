"""VLKEB's portability item: scored on hand-built logits, summarized only where records have it,
and carried through the baseline and the edit loop."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from mmke.evaluate import PORTABILITY_ITEM, Baseline, Protocol, Request, evaluate, measure, run_baseline, summarize
from mmke.hparams import build_hparams
from mmke.methods.base import get_method

V = 6


class LogitsModel:
    """Stands in for an adapter: records what it is asked and returns hand-built logits."""

    def __init__(self, argmax: list[list[int]], labels: list[list[int]]):
        ids = torch.tensor(argmax)
        self.out = torch.zeros(*ids.shape, V).scatter_(2, ids.unsqueeze(-1), 1.0)
        self.labels = torch.tensor(labels)
        self.calls = []

    def teacher_forced(self, prompts, targets, images):
        self.calls.append((list(prompts), list(targets), images))
        return SimpleNamespace(labels=self.labels, attention_mask=torch.ones_like(self.labels))

    def logits(self, batch, positions=None):  # the adapter contract: only the masked rows if asked
        return self.out if positions is None else self.out[positions]


def record(portability):
    return SimpleNamespace(portability=portability)


def test_portability_is_teacher_forced_on_the_edit_image_with_both_definitions():
    # record 0: both answer tokens right (position t predicts t + 1); record 1: one of two right
    model = LogitsModel(argmax=[[3, 4, 0, 0], [3, 1, 0, 0]], labels=[[-100, 3, 4, -100], [-100, 3, 4, -100]])
    edit_image, other = object(), object()
    imgs = {"image": edit_image, "image_rephrase": other, "m_loc": other}
    records = [record((("Which metal?", " tin"),)), record((("Where mined?", " Arden"),))]
    context = lambda q: f"New Fact: x\nPrompt: {q}"  # noqa: E731
    requests = [Request(r, imgs, (PORTABILITY_ITEM,), context) for r in records]
    scores = measure(model, Protocol(), requests)
    assert scores == [{"portability_acc": 1.0, "portability_acc_em": 1.0, "portability_acc_token": 1.0},
                      {"portability_acc": 0.0, "portability_acc_em": 0.0, "portability_acc_token": 0.5}]
    (prompts, answers, images), = model.calls
    assert prompts == ["New Fact: x\nPrompt: Which metal?", "New Fact: x\nPrompt: Where mined?"]
    assert answers == [" tin", " Arden"] and images == [edit_image, edit_image]
    token = measure(model, Protocol(exact_match=False), [Request(r, imgs, (PORTABILITY_ITEM,), str) for r in records])
    assert [t["portability_acc"] for t in token] == [1.0, 0.5]  # the headline follows protocol.exact_match


def test_a_record_without_portability_questions_asks_nothing():
    assert not PORTABILITY_ITEM.applies(record(()))
    assert PORTABILITY_ITEM.applies(record((("Which metal?", " tin"),)))


def row(post_port: float | None, **extra) -> dict:
    keys = ("rewrite_acc", "rephrase_acc", "image_rephrase_acc", "locality_acc", "multimodal_locality_acc")
    post = {key: 1.0 for key in keys} | {f"{key}_{d}": 1.0 for key in keys[:3] for d in ("em", "token")}
    if post_port is not None:
        post |= {"portability_acc": post_port, "portability_acc_em": post_port, "portability_acc_token": 1.0}
    return {"post": post | extra, "knows_pred": 1.0}


def test_summary_averages_portability_over_the_records_that_have_it_and_only_then():
    summary = summarize([row(1.0), row(None), row(0.0), row(1.0)])
    assert summary["portability_acc"] == summary["portability_acc_em"] == pytest.approx(2 / 3)
    assert summary["portability_acc_token"] == 1.0 and summary["rewrite_acc"] == 1.0
    assert not any(key.startswith("portability") for key in summarize([row(None), row(None)]))


def test_baseline_computes_pre_edit_portability_once_and_the_loop_reports_it(adapter, eval_records, roots, tmp_path):
    ported = [dataclasses.replace(r, portability=(("What metal is the shape made of?", " copper"),))
              for r in eval_records[:2]] + [eval_records[2]]
    baseline = run_baseline(adapter, ported, roots, Protocol())
    assert {"portability_acc", "portability_acc_em", "portability_acc_token"} <= set(baseline.accuracy[ported[0].id])
    assert "portability_acc" not in baseline.accuracy[ported[2].id]
    baseline.save(tmp_path / "rows.jsonl", tmp_path / "tensors.safetensors")
    loaded = Baseline.load(tmp_path / "rows.jsonl", tmp_path / "tensors.safetensors")
    assert loaded.accuracy == baseline.accuracy
    noedit = get_method("base")(build_hparams(get_method("base").hparams_class, {"method": "base"}))
    result = evaluate(adapter, noedit, ported, roots, loaded, Protocol())
    for out in result.rows[:2]:  # unedited: post = pre, read from the baseline
        assert out["post"]["portability_acc_token"] == out["pre"]["portability_acc_token"]
    assert "portability_acc" not in result.rows[2]["post"]
    expected = sum(baseline.accuracy[r.id]["portability_acc"] for r in ported[:2]) / 2
    assert result.summary["portability_acc"] == expected
