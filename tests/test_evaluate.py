"""The edit-measure-revert loop: exact revert, sequential accumulation, baseline-based locality."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import REPO
from mmke.evaluate import Protocol, Schedule, evaluate, run_baseline
from mmke.hparams import build_hparams, read_hparams
from mmke.methods.base import Edit, Editor, get_method, make_editor

PROBE = "language_model.model.decoder.layers.1.fc2.bias"


def state(adapter) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in adapter.model.state_dict().items()}


def assert_bit_identical(before: dict[str, torch.Tensor], adapter) -> None:
    after = adapter.model.state_dict()
    assert after.keys() == before.keys()
    different = [name for name in before if not torch.equal(before[name], after[name])]
    assert different == []


def ft_editor(method: str, **values) -> Editor:
    cls = get_method(method)
    return cls(build_hparams(cls.hparams_class, {"method": method, **values}))


class ShiftEditor(Editor):
    """Adds 1.0 to one weight per edit, through the adapter's snapshot: counts live edits."""

    name = "shift"

    def edited_parameters(self, model):
        return {PROBE: model.named_parameters()[PROBE]}

    def apply(self, model, records):
        snapshot = model.snapshot([PROBE])
        with torch.no_grad():
            dict(model.model.named_parameters())[PROBE].add_(1.0)
        return Edit(model, snapshot)


@pytest.mark.parametrize("method,scope", [("FT-L", "llm.mlp.last1"), ("FT-V", "qformer")])
def test_revert_is_bit_for_bit(adapter, eval_records, roots, method, scope):
    editor = ft_editor(method, scopes=[scope], num_steps=3, lr=1e-2)
    editor.bind_images(roots)
    before = state(adapter)
    grads = {name: p.requires_grad for name, p in adapter.model.named_parameters()}
    edit = editor.apply(adapter, eval_records[:1])
    assert any(not torch.equal(before[name], p) for name, p in adapter.editable(scope).items())
    edit.revert()
    assert_bit_identical(before, adapter)
    assert {name: p.requires_grad for name, p in adapter.model.named_parameters()} == grads


def test_whole_loop_leaves_the_model_bit_for_bit_unchanged(adapter, eval_records, roots, baseline):
    before = state(adapter)
    editor = ft_editor("FT-L", scopes=["llm.mlp.last2"], num_steps=2, lr=1e-2)
    result = evaluate(adapter, editor, eval_records, roots, baseline, Protocol())
    assert [row["id"] for row in result.rows] == [r.id for r in eval_records]
    assert_bit_identical(before, adapter)


@pytest.mark.parametrize("batch_size,forwards", [(1, [2, 2, 1]), (8, [2, 1])])  # one forward per record / group
def test_sequential_edits_accumulate_then_revert_newest_first(adapter, eval_records, roots, baseline, monkeypatch,
                                                              batch_size, forwards):
    original = dict(adapter.model.named_parameters())[PROBE].detach().clone()
    seen: list[float] = []
    logits = adapter.logits

    def spy(batch, positions=None):  # the number of live edits, read off the probe weight at every measurement
        seen.append(round((dict(adapter.model.named_parameters())[PROBE] - original).mean().item()))
        return logits(batch, positions)

    monkeypatch.setattr(adapter, "logits", spy)
    records = eval_records[:3]  # groups of two: [r0, r1] measured with 2 live edits, [r2] with 1
    result = evaluate(adapter, ShiftEditor(build_hparams(ShiftEditor.hparams_class, {"method": "shift"})),
                      records, roots, baseline, Protocol(), Schedule("sequential", 2), batch_size=batch_size)
    assert seen == forwards
    assert len(result.rows) == 3
    assert torch.equal(dict(adapter.model.named_parameters())[PROBE], original)


def test_single_schedule_measures_one_live_edit(adapter, eval_records, roots, baseline, monkeypatch):
    original = dict(adapter.model.named_parameters())[PROBE].detach().clone()
    seen: list[int] = []
    logits = adapter.logits
    monkeypatch.setattr(adapter, "logits", lambda batch, positions=None: seen.append(
        round((dict(adapter.model.named_parameters())[PROBE] - original).mean().item())) or logits(batch, positions))
    evaluate(adapter, ShiftEditor(build_hparams(ShiftEditor.hparams_class, {"method": "shift"})),
             eval_records[:2], roots, baseline, Protocol())
    assert set(seen) == {1}


def test_locality_is_read_from_the_baseline_not_recomputed(adapter, eval_records, roots, baseline):
    record = eval_records[0]
    tampered = dataclasses.replace(baseline, loc=dict(baseline.loc), m_loc=dict(baseline.m_loc))
    loc = baseline.loc[record.id].clone()
    half = loc.shape[0] // 2
    loc[:half] = (loc[:half] + 1) % adapter.model.config.text_config.vocab_size  # wrong at `half` positions
    tampered.loc[record.id] = loc
    noedit = get_method("base")(build_hparams(get_method("base").hparams_class, {"method": "base"}))
    (row,) = evaluate(adapter, noedit, [record], roots, tampered, Protocol()).rows
    assert row["post"]["locality_acc"] == pytest.approx(1 - half / loc.shape[0])
    assert row["post"]["multimodal_locality_acc"] == 1.0
    assert row["pre"] == baseline.accuracy[record.id]


def test_schedule_is_validated():
    with pytest.raises(ValueError, match="'single' or 'sequential'"):
        Schedule("batch", 2)
    with pytest.raises(ValueError, match="n_edits must be >= 1"):
        Schedule("sequential", 0)
    with pytest.raises(ValueError, match="n_edits must be an integer or 'all', got 'many'"):
        Schedule("sequential", "many")
    assert Schedule("sequential", "all").group_size(24) == 24 and Schedule("sequential", 5).group_size(24) == 5
    with pytest.raises(ValueError, match="mode 'single' edits one record at a time; n_edits is 3"):
        Schedule("single", 3)


def test_baseline_of_another_protocol_is_refused(adapter, eval_records, roots, baseline):
    noedit = get_method("base")(build_hparams(get_method("base").hparams_class, {"method": "base"}))
    with pytest.raises(ValueError, match="baseline was computed with"):
        evaluate(adapter, noedit, eval_records, roots, baseline, Protocol(exact_match=False))


def test_pre_says_whether_the_unedited_model_answers_pred(adapter, eval_records, roots):
    """Teach the model one record's old answer, then the baseline finds it knows that one only."""
    known, unknown = eval_records[0], eval_records[1]
    teach = make_editor(read_hparams(REPO / "config/hparams/FT-L/tiny-blip2.yaml"))
    teach.bind_images(roots)
    teach.apply(adapter, [dataclasses.replace(known, target=" " + known.pred)])  # kept: no revert
    baseline = run_baseline(adapter, [known, unknown], roots, Protocol())
    assert baseline.knows_pred == {known.id: 1.0, unknown.id: 0.0}
    noedit = get_method("base")(build_hparams(get_method("base").hparams_class, {"method": "base"}))
    result = evaluate(adapter, noedit, [known, unknown], roots, baseline, Protocol())
    assert [row["knows_pred"] for row in result.rows] == [1.0, 0.0]
    assert result.summary["pre"] == 0.5


def test_rows_carry_both_definitions_and_the_headline(adapter, eval_records, roots, baseline):
    noedit = get_method("base")(build_hparams(get_method("base").hparams_class, {"method": "base"}))
    for exact_match in (True, False):
        protocol = Protocol(exact_match=exact_match)
        base = baseline if exact_match else run_baseline(adapter, eval_records[:2], roots, protocol)
        result = evaluate(adapter, noedit, eval_records[:2], roots, base, protocol)
        for row in result.rows:
            for metric in ("rewrite_acc", "rephrase_acc", "image_rephrase_acc"):
                chosen = row["post"][f"{metric}_{'em' if exact_match else 'token'}"]
                assert row["post"][metric] == chosen
                assert row["post"][f"{metric}_em"] <= row["post"][f"{metric}_token"]
        assert {"rewrite_acc_em", "rewrite_acc_token", "pre"} <= set(result.summary)


def test_baseline_of_another_target_join_is_refused(adapter, eval_records, roots, baseline):
    noedit = get_method("base")(build_hparams(get_method("base").hparams_class, {"method": "base"}))
    adapter.target_join = "raw"
    with pytest.raises(ValueError, match="baseline was computed with target_join 'space', the model joins targets 'raw'"):
        evaluate(adapter, noedit, eval_records, roots, baseline, Protocol())
