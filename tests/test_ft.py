"""FT-L and FT-V: reach the target, touch only their side of the model, obey the hparams."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO
from mmke.evaluate import Protocol, evaluate
from mmke.hparams import build_hparams, read_hparams
from mmke.methods.base import get_method, make_editor
from mmke.methods.ft import FineTuneLanguage, FineTuneVision


def editor(method: str, **values):
    cls = get_method(method)
    return cls(build_hparams(cls.hparams_class, {"method": method, **values}))


def changed_parameters(adapter, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, p in adapter.model.named_parameters() if not torch.equal(before[name], p)}


def parameters(adapter) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in adapter.model.named_parameters()}


def test_registered_under_the_paper_names():
    assert get_method("FT-L") is FineTuneLanguage
    assert get_method("FT-V") is FineTuneVision


def test_ft_l_reaches_the_target_within_its_budget(adapter, eval_records, roots, baseline):
    hparams = read_hparams(REPO / "config/hparams/FT-L/tiny-blip2.yaml")
    record = eval_records[0]
    assert baseline.accuracy[record.id]["rewrite_acc"] == 0.0  # the tiny model does not know the target
    (row,) = evaluate(adapter, make_editor(hparams), [record], roots, baseline, Protocol()).rows
    assert row["pre"]["rewrite_acc"] == 0.0
    assert row["post"]["rewrite_acc"] == 1.0
    # locality compares with the baseline: tuning the last MLP moved some of its predictions
    assert 0.0 <= row["post"]["locality_acc"] < 1.0


def test_ft_l_changes_only_its_scope(adapter, eval_records, roots):
    before = parameters(adapter)
    ft = editor("FT-L", scopes=["llm.mlp.last1"], num_steps=2, lr=1e-2)
    ft.bind_images(roots)
    ft.apply(adapter, eval_records[:1])
    assert changed_parameters(adapter, before) == set(adapter.editable("llm.mlp.last1"))


def test_ft_v_changes_only_vision_side_parameters(adapter, eval_records, roots):
    before = parameters(adapter)
    language = set(adapter.editable("llm"))
    ft = editor("FT-V", scopes=["qformer", "vision_proj"], num_steps=2, lr=1e-2)
    ft.bind_images(roots)
    ft.apply(adapter, eval_records[:1])
    changed = changed_parameters(adapter, before)
    allowed = set(adapter.editable("qformer")) | set(adapter.editable("vision_proj"))
    assert changed and changed <= allowed
    assert not changed & language
    assert not changed & set(adapter.editable("vision"))
    assert any(name.startswith("language_projection.") for name in changed)


@pytest.mark.parametrize("method,scopes", [("FT-V", ["qformer", "vision_proj"]), ("FT-L", ["llm.mlp.last2"])])
def test_multi_tensor_adamw_gives_the_per_tensor_loop_bit_for_bit(method, scopes, tiny_blip2_dir, eval_records, roots,
                                                                  baseline, monkeypatch):
    """FT's AdamW updates all tuned tensors in one foreach call: the edited weights and the
    records are those of torch's per-tensor loop (foreach=False)."""
    from mmke.models import load_model

    values = {"scopes": scopes, "num_steps": 3, "lr": 1e-2}
    weights, rows = [], []
    for foreach in (True, False):
        if not foreach:
            adamw = torch.optim.AdamW
            monkeypatch.setattr(torch.optim, "AdamW", lambda *a, foreach, **k: adamw(*a, foreach=False, **k))
        model = load_model("blip2", tiny_blip2_dir, image_size=32)
        ft = editor(method, **values)
        ft.bind_images(roots)
        edit = ft.apply(model, eval_records[:1])
        weights.append(parameters(model))
        edit.revert()
        rows.append(evaluate(model, editor(method, **values), eval_records, roots, baseline, Protocol()).rows)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert rows[0] == rows[1]


@pytest.mark.parametrize("method,scope", [("FT-L", "qformer"), ("FT-V", "llm.mlp.last1"), ("FT-V", "llm")])
def test_scope_on_the_wrong_side_is_refused(adapter, eval_records, roots, method, scope):
    ft = editor(method, scopes=[scope], num_steps=1)
    ft.bind_images(roots)
    with pytest.raises(ValueError, match=f"{method}: scope '{scope}' is not on"):
        ft.apply(adapter, eval_records[:1])


def test_norm_constraint_bounds_every_change(adapter, eval_records, roots):
    before = parameters(adapter)
    ft = editor("FT-L", scopes=["llm.mlp.last1"], num_steps=3, lr=1e-1, norm_constraint=1e-3)
    ft.bind_images(roots)
    ft.apply(adapter, eval_records[:1])
    changes = [(p - before[name]).abs().max().item() for name, p in adapter.editable("llm.mlp.last1").items()]
    assert max(changes) <= 1e-3 + 1e-7
    assert max(changes) > 5e-4  # lr 0.1 would move much further: the bound was hit


def test_unknown_scope_names_the_valid_ones(adapter, eval_records, roots):
    ft = editor("FT-L", scopes=["llm.mlp.last9"], num_steps=1)
    ft.bind_images(roots)
    with pytest.raises(KeyError, match="unknown scope 'llm.mlp.last9'.*valid scopes: llm.mlp.last1"):
        ft.apply(adapter, eval_records[:1])


def test_an_edit_that_fails_part_way_leaves_the_weights_as_they_were(adapter, eval_records, roots, monkeypatch):
    """A step that fails after earlier steps wrote the weights (a device out of memory) puts the
    weights back before the error reaches the caller, as a revert would."""
    ft = editor("FT-L", num_steps=3, lr=1e-2)
    ft.bind_images(roots)
    before = parameters(adapter)
    step, steps = torch.optim.AdamW.step, []

    def second_fails(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            raise RuntimeError("out of memory at step 2")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", second_fails)
    with pytest.raises(RuntimeError, match="out of memory at step 2"):
        ft.apply(adapter, eval_records[:1])
    assert len(steps) == 2 and changed_parameters(adapter, before) == set()


def test_apply_without_image_roots_is_an_error(adapter, eval_records):
    with pytest.raises(RuntimeError, match=r"FT-L: call bind_images\(roots\) before editing"):
        editor("FT-L", num_steps=1).apply(adapter, eval_records[:1])


def test_every_hparams_file_is_valid_and_named_after_its_folder():
    files = sorted((REPO / "config/hparams").glob("*/*.yaml"))
    assert {path.parent.name for path in files} >= {"base", "FT-L", "FT-V", "IKE"}
    for path in files:
        hparams = read_hparams(path)
        assert (hparams.method, hparams.model) == (path.parent.name, path.stem)


def test_empty_scopes_and_zero_steps_are_refused():
    with pytest.raises(ValueError, match="FT-V: hparams field 'scopes' is empty"):
        editor("FT-V", scopes=[])
    with pytest.raises(ValueError, match="FT-L: hparams field 'num_steps' must be >= 1, got 0"):
        editor("FT-L", num_steps=0)
