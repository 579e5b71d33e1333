"""LoRA, GRACE and WISE: memories that accumulate across a sequential group and vanish on revert.

The parametrized method x family test (test_families.py) edits and reverts each of them on every
family; here: the peft adapters leave no trace, GRACE leaves out-of-radius outputs untouched, WISE
sends locality items to the main memory, and after N sequential edits the first one still holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmke.data.records import RecordImages, multimodal_locality_prompt
from mmke.evaluate import Protocol, Schedule, evaluate
from mmke.hparams import read_hparams
from mmke.methods.base import Editor, make_editor
from mmke.methods.lora import LoRAMemory
from mmke.methods.wise import Shard, merge, route, ties_merge

REPO = Path(__file__).resolve().parents[1]


def editor_for(method: str, roots, **overrides):
    editor = make_editor(read_hparams(REPO / f"config/hparams/{method}/tiny-blip2.yaml", overrides=overrides))
    editor.bind_images(roots)
    return editor


def edit_item(adapter, record, roots):
    images = RecordImages(roots)(record)
    return adapter.teacher_forced([record.prompt], [record.target], [images["image"]])


def unrelated_items(adapter, record, roots):
    """The record's two locality items (text, image) as the evaluation builds them."""
    images = RecordImages(roots)(record)
    text = adapter.teacher_forced([record.loc], [record.loc_ans], None)
    image = adapter.teacher_forced([multimodal_locality_prompt(record, "trainer")], [record.m_loc_a], [images["m_loc"]])
    return text, image


@torch.no_grad()
def logits(adapter, batch):
    return adapter.logits(batch)


def as_loaded(adapter) -> tuple[dict, dict, dict]:
    """What must come back after the memory is removed: module classes, state dict, grad flags."""
    return ({name: type(module) for name, module in adapter.model.named_modules()},
            {name: tensor.clone() for name, tensor in adapter.model.state_dict().items()},
            {name: p.requires_grad for name, p in adapter.model.named_parameters()})


def assert_as_loaded(adapter, loaded: tuple[dict, dict, dict]) -> None:
    classes, state, flags = as_loaded(adapter)
    assert classes == loaded[0] and flags == loaded[2]
    assert state.keys() == loaded[1].keys() and all(torch.equal(state[name], loaded[1][name]) for name in state)


@pytest.mark.parametrize("lora_type", ["lora", "adalora"])
def test_lora_injects_into_the_scopes_and_unloading_leaves_the_model_identical(adapter, eval_records, roots, lora_type):
    record = eval_records[0]
    loaded = as_loaded(adapter)
    targets = {name.removesuffix(".weight") for name in adapter.editable("llm.attn.qv")}
    before = logits(adapter, edit_item(adapter, record, roots))
    edit = editor_for("LoRA", roots, lora_type=lora_type).apply(adapter, [record])
    wrapped = {name for name, module in adapter.model.named_modules() if type(module) is not loaded[0].get(name)}
    assert targets <= wrapped  # peft's layers sit exactly on q_proj / v_proj
    assert not torch.equal(logits(adapter, edit_item(adapter, record, roots)), before)
    edit.revert()
    assert_as_loaded(adapter, loaded)
    assert not hasattr(adapter.model, "peft_config") and "logits" not in vars(adapter)
    assert torch.equal(logits(adapter, edit_item(adapter, record, roots)), before)


@pytest.mark.parametrize("lora_type,mode", [("lora", "single"), ("lora", "sequential"), ("adalora", "single")])
def test_lora_injects_once_per_evaluation_with_the_records_of_injecting_per_edit(
        adapter, eval_records, roots, baseline, monkeypatch, lora_type, mode):
    """Within the loop's session peft injects the adapters once and each revert empties them; the
    records equal those of injecting afresh for every edit, and the model ends as loaded."""
    loaded = as_loaded(adapter)
    injections = []
    inject = LoRAMemory.__init__
    monkeypatch.setattr(LoRAMemory, "__init__", lambda memory, *args: injections.append(1) or inject(memory, *args))
    editor = editor_for("LoRA", roots, lora_type=lora_type, num_steps=4)
    schedule = Schedule(mode, 2) if mode == "sequential" else Schedule()
    groups = len(eval_records) if mode == "single" else -(-len(eval_records) // 2)
    rows, injected = [], None
    for session in (type(editor).session, Editor.session):  # the loop's, then none (an injection per edit)
        monkeypatch.setattr(type(editor), "session", session)
        injections.clear()
        rows.append(evaluate(adapter, editor, eval_records, roots, baseline, Protocol(), schedule).rows)
        assert not editor._memories
        assert_as_loaded(adapter, loaded)
        injected = injected if session is Editor.session else len(injections)
    assert injected == 1 and len(injections) == groups > 1
    assert rows[0] == rows[1]


def test_a_session_left_with_a_live_edit_removes_the_memory_when_it_is_reverted(adapter, eval_records, roots):
    editor = editor_for("LoRA", roots, num_steps=1)
    loaded = as_loaded(adapter)
    with editor.session(adapter):
        editor.apply(adapter, [eval_records[0]]).revert()
        assert editor._memories  # emptied, kept for the next edit
        live = editor.apply(adapter, [eval_records[1]])
    assert editor._memories  # still holds the live edit
    live.revert()
    assert not editor._memories
    assert_as_loaded(adapter, loaded)


def test_lora_edit_depends_on_its_seed_not_on_the_global_generator(adapter, eval_records, roots):
    """The adapters' dropout stays off (the model's eval mode) and their init draws from ``seed``."""
    record = eval_records[0]
    editor = editor_for("LoRA", roots)
    edited = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        edit = editor.apply(adapter, [record])
        edited.append(logits(adapter, edit_item(adapter, record, roots)))
        assert not any(module.training for module in adapter.model.modules())
        edit.revert()
    assert torch.equal(edited[0], edited[1])

def test_grace_leaves_out_of_radius_outputs_exactly_unedited(adapter, eval_records, roots):
    record = eval_records[0]
    items = [edit_item(adapter, record, roots), *unrelated_items(adapter, record, roots)]
    before = [logits(adapter, batch) for batch in items]
    editor = editor_for("GRACE", roots, eps=1e-3)
    edit = editor.apply(adapter, [record])
    try:
        after = [logits(adapter, batch) for batch in items]
    finally:
        edit.revert()
    assert not torch.equal(after[0], before[0])  # the edit's own key is within its radius
    assert all((a == b).all() for a, b in zip(after[1:], before[1:]))  # out of radius: bit for bit


def test_grace_same_target_covers_the_query_and_another_target_splits_the_radii(adapter, eval_records, roots):
    editor = editor_for("GRACE", roots, eps=1e6)  # every query within reach of the first key
    first, second = eval_records[0], eval_records[1]
    edits = [editor.apply(adapter, [first])]
    memory = next(iter(editor._memories.values()))
    edits.append(editor.apply(adapter, [first]))  # same target: no new key
    assert len(memory.book.keys) == 1
    other = second if second.target != first.target else eval_records[2]
    edits.append(editor.apply(adapter, [other]))
    book = memory.book
    distance = torch.dist(book.keys[0], book.keys[1])
    assert len(book.keys) == 2 and book.radii[0] < distance / 2 and book.radii[1] == pytest.approx(distance / 2)
    for edit in reversed(edits):
        edit.revert()


def test_wise_routes_locality_items_to_the_main_memory(adapter, eval_records, roots):
    record = eval_records[0]
    text, image = unrelated_items(adapter, record, roots)
    before = logits(adapter, text)
    editor = editor_for("WISE", roots)
    edit = editor.apply(adapter, [record])
    memory = next(iter(editor._memories.values()))
    try:
        logits(adapter, edit_item(adapter, record, roots))
        assert memory.routes.tolist() == [2]  # the edit's own item: its memory (the first stored one)
        after = logits(adapter, text)
        assert memory.routes.tolist() == [0]  # the text locality item: the main memory ...
    finally:
        edit.revert()
    assert torch.equal(after, before)  # ... whose output is the unedited one


def test_wise_takes_the_unrelated_rows_distance_from_one_forward_per_edit(adapter, eval_records, roots):
    """The unrelated row's layer input is read once per edit (by a forward that stops at the layer,
    tests/test_fast_paths.py): its d and d's gradient equal a whole forward's at any side weight,
    and an edit of n_iter steps runs the layer n_iter + 1 times."""
    record = eval_records[0]
    text, _ = unrelated_items(adapter, record, roots)
    editor = editor_for("WISE", roots, n_iter=3)
    memory = editor.install(adapter)
    try:
        with adapter.trainable_only(()):
            seen = memory.layer_io(adapter, text)
            side = (memory.layer.weight + 0.05 * torch.randn_like(memory.layer.weight)).requires_grad_(True)
            memory.training = side
            adapter.logits(text, positions=torch.zeros_like(text.attention_mask, dtype=torch.bool))
            whole = memory.distance
            x, output, rows = seen
            once = memory.trained(x, memory.main_activations(output), rows)[1]
            assert once.item() > 0 and torch.equal(once, whole)
            assert torch.equal(torch.autograd.grad(once.sum(), side)[0], torch.autograd.grad(whole.sum(), side)[0])
    finally:
        memory.training = None
        memory.remove()
    calls = []
    handle = memory.layer.register_forward_hook(lambda *args: calls.append(1))
    try:
        editor.apply(adapter, [record]).revert()
    finally:
        handle.remove()
    assert len(calls) == 3 + 1  # EasyEdit's loop: 2 per step


def test_wise_merges_shards_every_merge_freq_edits(adapter, eval_records, roots):
    editor = editor_for("WISE", roots, retrieve=False, save_freq=1, merge_freq=2)
    edits = [editor.apply(adapter, [eval_records[0]])]
    memory = next(iter(editor._memories.values()))
    assert len(memory.book.shards) == 1 and memory.book.merged == () and memory.book.side is None
    edits.append(editor.apply(adapter, [eval_records[1]]))
    assert memory.book.shards == () and len(memory.book.merged) == 1
    edits[1].revert()
    assert len(memory.book.shards) == 1 and memory.book.merged == ()  # what edit 2 found
    edits[0].revert()
    assert not editor._memories


def test_ties_merge_is_the_weighted_mean_of_the_agreeing_changes_after_pruning():
    """EasyEdit's GTA('magnitude', 'sum', normalize=True), worked by hand."""
    main = torch.full((2, 3), 10.0)
    a = Shard(main + torch.tensor([[1.0, -2.0, 0.0], [4.0, 0.0, 0.0]]), 3.0)
    b = Shard(main + torch.tensor([[3.0, 1.5, 0.0], [-1.0, 0.0, 5.0]]), 2.0)
    merged = ties_merge(main, [a, b], [0.25, 0.75], density=0.5)  # keeps 3 of 6: b's -1 goes
    expected = torch.tensor([[(0.25 * 1 + 0.75 * 3) / 1.0,  # both agree: weighted mean
                              1.5,  # -0.5 + 1.125 elects +: only b agrees
                              0.0],
                             [4.0,  # b's change was pruned: a alone
                              0.0, 5.0]])
    torch.testing.assert_close(merged.weight, main + expected)
    assert merged.min_act == 2.0


def test_a_later_wise_merge_weighs_the_earlier_merged_memory_0_6():
    main = torch.zeros(1, 2)
    shards = [Shard(torch.tensor([[1.0, 0.0]]), 1.0), Shard(torch.tensor([[3.0, 0.0]]), 1.0)]
    earlier = Shard(torch.tensor([[6.0, 2.0]]), 0.5)
    hp = read_hparams(REPO / "config/hparams/WISE/tiny-blip2.yaml", overrides={"densities": 1.0})
    merged = merge(main, shards, earlier, hp)
    torch.testing.assert_close(merged.weight, torch.tensor([[(0.2 * 1 + 0.2 * 3 + 0.6 * 6) / 1.0, 2.0]]))
    assert merged.min_act == 0.5


def test_wise_routers_as_easyedit():
    d = torch.tensor([[5.0, 5.0, 3.0, 1.0],   # the side copy
                      [9.0, 4.0, 2.0, 0.0],   # stored memory 1
                      [6.0, 7.0, 9.0, 0.0]])  # stored memory 2
    # Retrieve: a stored memory over its own threshold wins if its d beats the side's
    assert route(d, [4.0, 8.0, 8.0], side=True, retrieve=True).tolist() == [1, 0, 2, -1]
    assert route(d[1:], [8.0, 8.0], side=False, retrieve=True).tolist() == [0, -1, 1, -1]
    # Merge: the larger d, if it reaches the one threshold
    assert route(d[:2], [4.5, 4.5], side=True, retrieve=False).tolist() == [1, 0, -1, -1]


def test_wise_retrieve_keeps_each_merge_apart(adapter, eval_records, roots):
    editor = editor_for("WISE", roots, retrieve=True, save_freq=1, merge_freq=2)
    edits = [editor.apply(adapter, [eval_records[0]])]
    memory = next(iter(editor._memories.values()))
    first = memory.book.shards[0]
    edits += [editor.apply(adapter, [record]) for record in eval_records[1:3]]
    assert memory.book.merged[0].min_act <= first.min_act  # the merge's threshold: its edits' smallest d
    assert len(memory.book.merged) == 1 and len(memory.book.shards) == 1 and memory.book.side is None
    side, stored = memory.consulted()
    assert side is None and [shard.weight for shard in stored] == [memory.book.merged[0].weight,
                                                                   memory.book.shards[0].weight]
    for edit in reversed(edits):
        edit.revert()


def test_wise_merge_measures_pending_shards_as_merged_without_storing_the_merge(adapter, eval_records, roots):
    """EasyEdit merges what is pending before it answers, once save_freq edits were made."""
    editor = editor_for("WISE", roots, retrieve=False, save_freq=2, merge_freq=4)
    edits = [editor.apply(adapter, [eval_records[0]])]
    memory = next(iter(editor._memories.values()))
    assert memory.consulted() == (memory.book.side, [])  # fewer than save_freq edits: the side copy
    edits += [editor.apply(adapter, [record]) for record in eval_records[1:3]]
    book = memory.book
    assert len(book.shards) == 1 and book.side is not None and book.merged == ()
    side, stored = memory.consulted()
    pending = [book.shards[0], Shard(book.side, min(book.acts))]
    assert side is None and torch.equal(stored[0].weight, merge(memory.layer.weight, pending, None, editor.hparams).weight)
    assert memory.book is book and len(book.shards) == 1  # measuring stored nothing
    for edit in reversed(edits):
        edit.revert()


@pytest.mark.parametrize("method", ["GRACE", "WISE"])
def test_sequential_edits_keep_the_first_edit(adapter, eval_records, roots, baseline, method):
    """Reliability of edit 1 measured after all N edits of the group (the sequential schedule)."""
    editor = editor_for(method, roots)
    loaded = as_loaded(adapter)
    result = evaluate(adapter, editor, eval_records, roots, baseline, Protocol(),
                      Schedule("sequential", len(eval_records)))
    assert len(eval_records) >= 4 and result.rows[0]["post"]["rewrite_acc"] == 1.0
    assert_as_loaded(adapter, loaded)
    assert not editor._memories


def test_reverting_out_of_order_is_an_error(adapter, eval_records, roots):
    editor = editor_for("GRACE", roots)
    first = editor.apply(adapter, [eval_records[0]])
    second = editor.apply(adapter, [eval_records[1]])
    with pytest.raises(RuntimeError, match="newest first"):
        first.revert()
    second.revert()
    first.revert()


@pytest.mark.parametrize("method,values,message", [
    ("LoRA", {"lora_type": "dora"}, "LoRA lora_type must be one of \\['adalora', 'lora'\\], got 'dora'"),
    ("LoRA", {"kl_factor": 0.5}, "LoRA supports kl_factor 0"),
    ("GRACE", {"val_init": "warm"}, "GRACE supports .* got \\{'val_init': 'warm'\\}"),
    ("WISE", {"save_freq": 3, "merge_freq": 4}, "WISE merge_freq \\(4\\) must be a multiple of save_freq \\(3\\)"),
    ("WISE", {"act_margin": [5.0, 20.0]}, "WISE act_margin is \\[alpha, beta, gamma\\]"),
    ("WISE", {"replay": True}, "WISE supports replay: false"),
])
def test_settings_the_methods_do_not_implement_are_errors_naming_the_file(method, values, message):
    path = REPO / f"config/hparams/{method}/tiny-blip2.yaml"
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        read_hparams(path, overrides=values)


def test_a_scope_of_several_matrices_cannot_be_hooked(adapter, eval_records, roots):
    editor = editor_for("GRACE", roots, scope="llm.mlp.last1")
    with pytest.raises(ValueError, match="GRACE: scope 'llm.mlp.last1' must hold exactly one weight matrix"):
        editor.apply(adapter, [eval_records[0]])
    assert not editor._memories and "logits" not in vars(adapter)
