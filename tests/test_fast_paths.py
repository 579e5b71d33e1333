"""The edit loop's shortcuts give the values of the slow path.

Image features computed once per image, a record's items in one forward (text rows beside image
rows), records batched where the weights do not change: each is checked against recomputation,
separate calls, or batch size 1.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from conftest import REPO
from mmke.data.records import RecordImages
import mmke.evaluate as evaluate_module
from mmke.evaluate import (
    EDIT_ITEMS,
    MEASURED_ITEMS,
    Protocol,
    Request,
    evaluate,
    measure,
    read_positions,
    run_baseline,
    token_parts,
)
from mmke.hparams import build_hparams, read_hparams
from mmke.methods.base import get_method, make_editor
from mmke.methods.meta import edit_loss_factors
from mmke.models import load_model
from mmke.models.base import Batch, RepeatedCall, decoder_layer_prefixes
from mmke.models.tiny_aux import build_tiny_aux
from mmke.stages import embed_stage
from processor_path import UncachedHFVLM


def editor(method: str, **values):
    cls = get_method(method)
    return cls(build_hparams(cls.hparams_class, {"method": method, **values}))


def no_feature_memo(adapter, monkeypatch) -> None:
    """The slow path: every forward computes the image features from the pixels."""
    monkeypatch.setattr(adapter, "frozen_image_features", contextlib.nullcontext)


FAMILIES = ["blip2", "minigpt4", "llava", "qwen2vl"]


def record_items(record, images):
    """A record's measured items, as (prompts, targets, images)."""
    protocol = Protocol()
    items = [item for item in MEASURED_ITEMS if item.applies(record)]
    return ([item.question(record, protocol) for item in items],
            [item.answer(record) for item in items],
            [None if item.image is None else images[item.image] for item in items])


@pytest.mark.parametrize("family", FAMILIES)
def test_memoised_image_features_give_the_recomputed_logits(family, family_adapters, eval_records, roots):
    adapter = family_adapters[family]()
    record = eval_records[0]
    images = RecordImages(roots)(record)
    prompts, targets, pictures = record_items(record, images)
    batch = adapter.teacher_forced(prompts, targets, pictures)
    with torch.no_grad():
        recomputed = adapter.logits(batch)
        with adapter.frozen_image_features():
            first = adapter.logits(batch)
            calls = []
            features = adapter.image_features
            adapter.image_features = lambda b, which: calls.append(which) or features(b, which)
            again = adapter.logits(adapter.teacher_forced(prompts, targets, pictures))
            del adapter.image_features
    torch.testing.assert_close(first, recomputed, atol=1e-6, rtol=0)
    assert torch.equal(again, first)
    assert calls == []  # the second forward computed no image feature


@pytest.mark.parametrize("family", FAMILIES)
def test_without_a_memo_each_distinct_image_is_encoded_once(family, family_adapters, eval_records, roots,
                                                            monkeypatch):
    """Outside frozen_image_features (FT-V's measurement) a record's items still encode each of
    its images once, although the edit image is on three or four rows; the logits are those of
    encoding every row's pixels."""
    adapter = family_adapters[family]()
    record = eval_records[0]
    prompts, targets, pictures = record_items(record, RecordImages(roots)(record))
    batch = adapter.teacher_forced(prompts, targets, pictures)
    distinct = len({id(picture) for picture in pictures if picture is not None})
    assert len(batch.sources) > distinct == 3
    calls = []
    features = adapter.image_features
    monkeypatch.setattr(adapter, "image_features", lambda b, which: calls.append(list(which)) or features(b, which))
    with torch.no_grad():
        once = adapter.logits(batch)
        monkeypatch.setattr(adapter, "batch_image_features", lambda b: None)  # every row's pixels
        every_row = adapter.logits(batch)
    assert len(calls) == 1 and len(calls[0]) == distinct
    assert torch.equal(once, every_row)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_records_items_in_one_forward_equal_separate_calls(family, family_adapters, eval_records, roots):
    """Text-only row beside image rows: each row's logits and labels are those of its own call."""
    adapter = family_adapters[family]()
    record = eval_records[1]
    prompts, targets, pictures = record_items(record, RecordImages(roots)(record))
    with torch.no_grad():
        fused = adapter.teacher_forced(prompts, targets, pictures)
        fused_logits = adapter.logits(fused)
        for row, (prompt, target, picture) in enumerate(zip(prompts, targets, pictures)):
            alone = adapter.teacher_forced([prompt], [target], None if picture is None else [picture])
            length = alone.input_ids.shape[1]
            assert torch.equal(fused.input_ids[row, :length], alone.input_ids[0])
            assert torch.equal(fused.labels[row, :length], alone.labels[0])
            assert (fused.attention_mask[row, length:] == 0).all()
            torch.testing.assert_close(fused_logits[row, :length], adapter.logits(alone)[0], atol=1e-5, rtol=0)


def test_fused_measurement_scores_equal_the_per_item_scores(adapter, eval_records, roots):
    from mmke import metrics

    protocol = Protocol()
    for record in eval_records:
        images = RecordImages(roots)(record)
        (fused,) = measure(adapter, protocol, [Request(record, images, MEASURED_ITEMS, lambda text: text)])
        with torch.no_grad():
            for item in (item for item in MEASURED_ITEMS if item.applies(record)):
                picture = None if item.image is None else [images[item.image]]
                batch = adapter.teacher_forced([item.question(record, protocol)], [item.answer(record)], picture)
                logits = adapter.logits(batch)
                if item.top_k is None:
                    (alone,) = metrics.row_scores([item.name], logits.argmax(-1), batch.labels, protocol.exact_match)
                    assert {key: fused[key] for key in alone} == alone
                else:
                    (top,) = metrics.top_k_predictions(logits, batch.attention_mask, item.top_k)
                    assert torch.equal(fused[item.name], top)


@pytest.mark.parametrize("method,values", [("FT-L", {"scopes": ["llm.mlp.last2"], "num_steps": 4, "lr": 1e-2}),
                                           ("FT-V", {"scopes": ["qformer"], "num_steps": 2, "lr": 1e-2}),
                                           ("LoRA", {"lora_type": "lora", "num_steps": 3, "lr": 1e-2}),
                                           ("GRACE", {"scope": "llm.layers.0.mlp.out", "n_iter": 5}),
                                           ("WISE", {"scope": "llm.layers.-1.mlp.in", "n_iter": 3})])
def test_edits_with_image_features_once_equal_recomputing_them(method, values, tiny_blip2_dir, eval_records, roots,
                                                              baseline, monkeypatch):
    fast = load_model("blip2", tiny_blip2_dir, image_size=32)
    slow = load_model("blip2", tiny_blip2_dir, image_size=32)
    no_feature_memo(slow, monkeypatch)
    fast_rows = evaluate(fast, editor(method, **values), eval_records, roots, baseline, Protocol()).rows
    slow_rows = evaluate(slow, editor(method, **values), eval_records, roots, baseline, Protocol()).rows
    assert fast_rows == slow_rows
    record = eval_records[0]
    images = RecordImages(roots)(record)
    edits = [editor(method, **values) for _ in range(2)]
    for model, edit in zip((fast, slow), edits):
        edit.bind_images(roots)
    logits = []
    for model, edit in zip((fast, slow), edits):
        live = edit.apply(model, [record])
        with torch.no_grad():
            logits.append(model.logits(model.teacher_forced([record.rephrase], [record.target], [images["image"]])))
        live.revert()
    torch.testing.assert_close(logits[0], logits[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_hf_vlm_records_equal_the_uncached_processor_path(family, family_dirs, eval_records, roots):
    """hf_vlm's chat prompts, tokens and image processor outputs done once per text and image give
    the baseline and records.jsonl of the processor called on every batch (base: records batched;
    FT-L: training steps on the edit item)."""
    fast = load_model("hf_vlm", family_dirs[family])
    loaded = load_model("hf_vlm", family_dirs[family])
    slow = UncachedHFVLM(loaded.model, loaded.processor, loaded.device)
    baselines = [run_baseline(model, eval_records, roots, Protocol(), batch_size=3) for model in (fast, slow)]
    assert baselines[0].accuracy == baselines[1].accuracy and baselines[0].knows_pred == baselines[1].knows_pred
    for field in ("loc", "m_loc"):
        assert all(torch.equal(getattr(baselines[0], field)[i], getattr(baselines[1], field)[i])
                   for i in getattr(baselines[1], field))
    for method, values in (("base", {}), ("FT-L", {"scopes": ["llm.mlp.last2"], "num_steps": 3, "lr": 1e-2})):
        rows = [evaluate(model, editor(method, **values), eval_records, roots, model_baseline, Protocol(),
                         batch_size=3).rows for model, model_baseline in zip((fast, slow), baselines)]
        assert rows[0] == rows[1]


def test_which_edits_keep_the_image_features(adapter):
    assert editor("FT-L", scopes=["llm.mlp.last1"]).keeps_image_features(adapter)
    assert not editor("FT-V", scopes=["qformer"]).keeps_image_features(adapter)
    assert all(editor(method).keeps_image_features(adapter) for method in ("LoRA", "GRACE", "WISE"))
    assert editor("base").keeps_image_features(adapter) and editor("base").weights_unchanged
    assert not get_method("MEND").weights_unchanged and get_method("SERAC").weights_unchanged
    assert adapter.downstream_of_features(adapter.scopes()["llm"])
    assert not adapter.downstream_of_features(adapter.scopes()["vision_proj"])
    with pytest.raises(TypeError, match="FT-L changes the weights"):
        editor("FT-L").apply_each(adapter, [])


@pytest.fixture(scope="module")
def serac_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serac")
    return build_tiny_aux("classifier", root / "classifier"), build_tiny_aux("counterfactual", root / "counterfactual")


def batchable_editor(method, adapter, tmp_path, demo_evqa, serac_parts):
    if method == "base":
        return editor("base")
    if method == "IKE":
        embed_stage({"kind": "evqa", "train": demo_evqa["train"], "image_root": demo_evqa["images"]},
                    "all-MiniLM-L6-v2", tmp_path / "e.safetensors", tmp_path / "s.json", device="cpu")
        ike = editor("IKE", k=3)
        ike.prepare({"embeddings": tmp_path / "e.safetensors", "sentences": tmp_path / "s.json"})
        return ike
    values = read_hparams(REPO / "config/hparams/SERAC/tiny-blip2.yaml").__dict__
    serac = make_editor(build_hparams(get_method("SERAC").hparams_class,
                                      {**values, "classifier": str(serac_parts[0]),
                                       "counterfactual": str(serac_parts[1])}))
    serac.build(adapter)  # untrained: it routes some rows, which is what batching must keep per record
    return serac


@pytest.mark.parametrize("method", ["base", "IKE", "SERAC"])
def test_records_in_batches_equal_batch_size_one(method, adapter, eval_records, roots, baseline, tmp_path, demo_evqa,
                                                 serac_parts):
    edit = batchable_editor(method, adapter, tmp_path, demo_evqa, serac_parts)
    assert edit.weights_unchanged
    one = evaluate(adapter, edit, eval_records, roots, baseline, Protocol(), batch_size=1)
    three = evaluate(adapter, edit, eval_records, roots, baseline, Protocol(), batch_size=3)
    assert one.rows == three.rows
    assert one.summary == three.summary
    assert "logits" not in adapter.__dict__  # SERAC's nested routers all came off
    # A token budget smaller than a batch of three records: more, smaller forwards, the same values
    shapes = []
    logits = adapter.logits
    adapter.logits = lambda batch, positions=None: shapes.append(tuple(batch.input_ids.shape)) or logits(batch, positions)
    try:
        evaluate(adapter, edit, eval_records, roots, baseline, Protocol(), batch_size=3)
        whole = list(shapes)
        shapes.clear()
        capped = evaluate(adapter, edit, eval_records, roots, baseline, Protocol(), batch_size=3, batch_tokens=100)
    finally:
        del adapter.logits
    assert capped.rows == one.rows
    assert len(shapes) > len(whole)
    assert max(rows * width for rows, width in shapes) < max(rows * width for rows, width in whole)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gives_batch_size_ones_records_in_batches(family, family_adapters, eval_records, roots, tmp_path,
                                                               demo_evqa):
    """Batching across records changes no value on any family, whatever its image layout
    (Qwen2-VL packs its patches): the baseline, the methods that leave the weights alone (base,
    IKE's long rows, also split by a token budget) and the batched edit gradients (KE, MEND)."""
    adapter = family_adapters[family]()
    one = run_baseline(adapter, eval_records, roots, Protocol(), batch_size=1)
    three = run_baseline(adapter, eval_records, roots, Protocol(), batch_size=3)
    assert one.accuracy == three.accuracy and one.knows_pred == three.knows_pred
    for field in ("loc", "m_loc"):
        assert getattr(one, field).keys() == getattr(three, field).keys()
        assert all(torch.equal(getattr(one, field)[i], getattr(three, field)[i]) for i in getattr(one, field))
    ike = batchable_editor("IKE", adapter, tmp_path, demo_evqa, None)
    edits = [editor("base"), ike]
    for method in ("KE", "MEND"):
        edits.append(make_editor(read_hparams(REPO / f"config/hparams/{method}/tiny-blip2.yaml")))
        edits[-1].build(adapter).eval()  # an untrained network
        edits[-1].bind_images(roots)
    for edit in edits:
        rows = evaluate(adapter, edit, eval_records, roots, one, Protocol(), batch_size=1).rows
        assert evaluate(adapter, edit, eval_records, roots, one, Protocol(), batch_size=3).rows == rows, edit.name
        capped = evaluate(adapter, edit, eval_records, roots, one, Protocol(), batch_size=3, batch_tokens=100)
        assert capped.rows == rows, edit.name


@pytest.mark.parametrize("family", FAMILIES)
def test_wises_stopped_forward_reads_what_a_whole_forward_gives_on_every_family(family, family_adapters,
                                                                                  eval_records, roots):
    """WISE's unrelated-row forward ends at its layer on every family's language model (OPT,
    Llama, Qwen2): no layer above it runs, the layer's input and output equal a whole forward's,
    and the model answers as before afterwards (the interrupted forward left nothing behind)."""
    adapter = family_adapters[family]()
    editor = make_editor(read_hparams(REPO / "config/hparams/WISE/tiny-blip2.yaml"))  # layer 0 of 2
    record = eval_records[0]
    text = adapter.teacher_forced([record.loc], [record.loc_ans], None)
    with torch.no_grad():
        before = adapter.logits(text)
    memory = editor.install(adapter)
    above = adapter.model.get_submodule(decoder_layer_prefixes(adapter.model, adapter.model)[-1])
    ran_above = []
    handle = above.register_forward_hook(lambda *args: ran_above.append(1))
    try:
        x, output, _ = memory.layer_io(adapter, text)
    finally:
        handle.remove()
        memory.remove()
    assert memory.layer not in set(above.modules()) and ran_above == []
    whole = []
    handle = memory.layer.register_forward_hook(lambda module, args, out: whole.append((args[0], out)))
    try:
        with torch.no_grad():
            after = adapter.logits(text)
    finally:
        handle.remove()
    assert torch.equal(whole[0][0].view(x.shape), x) and torch.equal(whole[0][1].view(output.shape), output)
    assert torch.equal(after, before)


@pytest.mark.parametrize("method", ["KE", "MEND"])
def test_single_edits_take_a_batch_of_edit_gradients_in_one_pass(method, adapter, eval_records, roots, baseline,
                                                                 monkeypatch):
    """In single mode MEND and KE take ``batch_size`` records' edit gradients in one forward and
    backward, each row's of its own loss at the unedited weights: each edited weight is that of a
    one-record batch up to the padded rows' rounding, records.jsonl equals batch size 1's (one
    backward per record), and an edit left live when the next is asked for is refused."""
    edit = make_editor(read_hparams(REPO / f"config/hparams/{method}/tiny-blip2.yaml"))
    edit.build(adapter).eval()  # an untrained network, as a checkpoint's is used (MEND's norms fixed)
    edit.bind_images(roots)
    records = eval_records[:3]
    lengths = adapter.teacher_forced([r.prompt for r in records], [r.target for r in records],
                                     [edit.images(r)["image"] for r in records]).attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # some rows are padded
    params = edit.edited_parameters(adapter)
    unedited = {name: p.detach().clone() for name, p in params.items()}
    alone = []
    for record in records:
        one = edit.apply(adapter, [record])
        alone.append({name: p.detach().clone() for name, p in params.items()})
        one.revert()
    for record, single, expected in zip(records, edit.single_edits(adapter, records), alone):
        assert any(not torch.equal(p, unedited[name]) for name, p in params.items())
        for name, p in params.items():
            torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-7)
        single.revert()
    assert all(torch.equal(p, unedited[name]) for name, p in params.items())
    backwards = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *args, **kw: backwards.append(1) or grad(*args, **kw))
    one = evaluate(adapter, edit, eval_records, roots, baseline, Protocol(), batch_size=1)
    assert len(backwards) == len(eval_records) == 4
    backwards.clear()
    three = evaluate(adapter, edit, eval_records, roots, baseline, Protocol(), batch_size=3)
    assert len(backwards) == 2
    assert one.rows == three.rows
    edits = edit.single_edits(adapter, records)
    first = next(edits)
    with pytest.raises(RuntimeError, match="revert each single edit before asking for the next"):
        next(edits)
    first.revert()


@pytest.mark.parametrize("method", ["KE", "MEND"])
def test_a_weight_delta_edit_that_fails_part_way_puts_back_what_it_wrote(method, adapter, eval_records, roots):
    """MEND and KE write each layer's change as it is made: when the next one fails (a device out
    of memory), the changes already written are taken back and the error reaches the caller."""
    edit = make_editor(read_hparams(REPO / f"config/hparams/{method}/tiny-blip2.yaml"))
    edit.build(adapter).eval()
    edit.bind_images(roots)
    params = edit.edited_parameters(adapter)
    assert len(params) > 1
    unedited = {name: p.detach().clone() for name, p in params.items()}
    deltas = type(edit).deltas
    written = []

    def first_then_fail(self, *args):
        for name, delta in deltas(self, *args):
            written.append(name)
            yield name, delta
            raise RuntimeError("out of memory at the next layer")

    edit.deltas = first_then_fail.__get__(edit)
    with pytest.raises(RuntimeError, match="out of memory at the next layer"):
        edit.apply(adapter, [eval_records[0]])
    assert len(written) == 1
    assert all(torch.equal(p, unedited[name]) for name, p in params.items())


def test_edit_gradient_factors_refuse_a_weight_outside_a_linear_layer(adapter, eval_records, roots):
    """MEND and KE read a gradient as a Linear layer's inputs and output gradients: another
    parameter (a layer norm's) is named in the error, before any pass."""
    record = eval_records[0]
    batch = adapter.teacher_forced([record.prompt], [record.target], [RecordImages(roots)(record)["image"]])
    norm = next(name for name in adapter.scopes()["llm"] if "layer_norm.weight" in name)
    with pytest.raises(ValueError, match=rf"{norm}: the edit gradient's factors need a Linear weight, got LayerNorm"):
        edit_loss_factors(adapter, batch, [norm])


def test_token_parts_split_requests_where_their_padded_rows_outgrow_the_budget():
    """Rows of requests 0,0,1,2,2 with lengths 3,5,4,9,2: the requests are taken shortest first (1,
    widest row 4; 0, 5; 2, 9). Request 0 joins request 1 (3 rows x 5 <= 16); request 2 would make 5
    rows x 9, so it starts a part, alone even though above the budget."""
    mask = torch.tensor([[1] * n + [0] * (9 - n) for n in (3, 5, 4, 9, 2)])
    batch = Batch(torch.zeros_like(mask), mask, torch.zeros_like(mask), None)
    owners = [(index, None) for index in (0, 0, 1, 2, 2)]
    assert token_parts(batch, owners, 3, 16) == [[1, 0], [2]]
    assert token_parts(batch, owners, 3, 45) == [[1, 0, 2]]
    assert token_parts(batch, owners, 3, 5) == [[1], [0], [2]]
    # equal widths keep the requests' order
    same = torch.ones(3, 4, dtype=torch.long)
    assert token_parts(Batch(same, same, same, None), [(0, None), (1, None), (2, None)], 3, 8) == [[0, 1], [2]]


@pytest.mark.parametrize("max_tokens", [None, 1])
def test_serac_routes_each_row_by_its_own_records_edit(adapter, eval_records, roots, serac_parts, tmp_path, demo_evqa,
                                                       max_tokens):
    """Two live edits measured in one batch: each row is scored as under its own edit alone; also
    when a token budget measures each record's rows in a forward of their own, where the other
    record's edit owns no row."""
    serac = batchable_editor("SERAC", adapter, tmp_path, demo_evqa, serac_parts)
    serac.bind_images(roots)
    protocol = Protocol()
    records = eval_records[:2]
    images = [RecordImages(roots)(record) for record in records]
    alone = []
    for record, imgs in zip(records, images):
        live = serac.apply(adapter, [record])
        alone += measure(adapter, protocol, [Request(record, imgs, EDIT_ITEMS, live.prompt, live)])
        live.revert()
    edits = serac.apply_each(adapter, records)
    told = [[] for _ in edits]
    for calls, live in zip(told, edits):
        live.measure_rows = lambda rows, calls=calls, own=live.measure_rows: calls.append(rows) or own(rows)
    together = measure(adapter, protocol, [Request(record, imgs, EDIT_ITEMS, live.prompt, live)
                                           for record, imgs, live in zip(records, images, edits)], own_rows=True,
                       max_tokens=max_tokens)
    for live in reversed(edits):
        live.revert()
    assert together == alone
    assert len(EDIT_ITEMS) == 3  # rows 0-2 are the first record's, 3-5 the second's
    if max_tokens is None:
        assert told == [[[0, 1, 2], None], [[3, 4, 5], None]]
    else:  # one forward per record (the shorter first): the other record's edit owns none of its rows
        assert told in ([[[0, 1, 2], None, [], None], [[], None, [0, 1, 2], None]],
                        [[[], None, [0, 1, 2], None], [[0, 1, 2], None, [], None]])


def test_scopes_are_looked_up_once_per_adapter(adapter, monkeypatch):
    first = adapter.scopes()
    walks = []
    named_modules = adapter.model.named_modules
    monkeypatch.setattr(adapter.model, "named_modules", lambda *a, **k: walks.append(1) or named_modules(*a, **k))
    first["llm"].clear()  # a caller's copy: the adapter's own lists are untouched
    assert adapter.scopes()["llm"] and walks == []


def full_output_layer(adapter, monkeypatch) -> None:
    """The slow path: the output layer over every position, the read ones sliced out afterwards."""
    logits = adapter.logits
    monkeypatch.setattr(adapter, "logits",
                        lambda batch, positions=None: logits(batch) if positions is None else logits(batch)[positions])


@pytest.mark.parametrize("family", FAMILIES)
def test_output_layer_at_the_read_positions_gives_the_full_logits_values(family, family_adapters, eval_records, roots,
                                                                         monkeypatch):
    """measure() projects only the positions it reads; baseline and records equal the full [B, T, V] path."""
    fast, slow = family_adapters[family](), family_adapters[family]()
    full_output_layer(slow, monkeypatch)
    baselines = [run_baseline(model, eval_records, roots, Protocol(), batch_size=3) for model in (fast, slow)]
    assert baselines[0].accuracy == baselines[1].accuracy and baselines[0].knows_pred == baselines[1].knows_pred
    for field in ("loc", "m_loc"):
        assert all(torch.equal(getattr(baselines[0], field)[i], getattr(baselines[1], field)[i])
                   for i in getattr(baselines[1], field))
    rows = [evaluate(model, editor("FT-L", scopes=["llm.mlp.last1"], num_steps=2, lr=1e-2), eval_records, roots,
                     model_baseline, Protocol()).rows for model, model_baseline in zip((fast, slow), baselines)]
    assert rows[0] == rows[1]


@pytest.mark.parametrize("method", ["IKE", "SERAC"])
def test_in_context_and_routed_rows_at_the_read_positions_equal_the_full_logits(method, adapter, eval_records, roots,
                                                                               baseline, tmp_path, demo_evqa,
                                                                               serac_parts, monkeypatch):
    """IKE's demonstrations (long rows, pre- and post-edit requests) and SERAC's replaced answer rows."""
    edit = batchable_editor(method, adapter, tmp_path, demo_evqa, serac_parts)
    fast = evaluate(adapter, edit, eval_records, roots, baseline, Protocol(), batch_size=3).rows
    full_output_layer(adapter, monkeypatch)
    assert evaluate(adapter, edit, eval_records, roots, baseline, Protocol(), batch_size=3).rows == fast


def test_locality_rows_read_only_the_positions_the_baseline_covers(adapter, eval_records, roots, baseline, tmp_path,
                                                                   demo_evqa, serac_parts, monkeypatch):
    """IKE's locality rows carry its demonstrations before the question; locality compares them
    right-aligned with the context-free baseline, so only the baseline's length of last positions
    is read, with the records of reading every position."""
    edit = batchable_editor("IKE", adapter, tmp_path, demo_evqa, serac_parts)
    read, logits = [], adapter.logits
    monkeypatch.setattr(adapter, "logits", lambda batch, positions=None:
                        read.append(int(positions.sum()) if positions is not None else 0) or logits(batch, positions))
    tail = evaluate(adapter, edit, eval_records, roots, baseline, Protocol(), batch_size=3).rows
    tail_read = sum(read)
    every = evaluate_module.edit_requests
    monkeypatch.setattr(evaluate_module, "edit_requests", lambda *args: [
        dataclasses.replace(request, top_k_tail={}) for request in every(*args)])
    read.clear()
    assert evaluate(adapter, edit, eval_records, roots, baseline, Protocol(), batch_size=3).rows == tail
    assert sum(read) > tail_read + 5 * len(eval_records)  # demonstrations in front of each locality question


def test_a_tail_longer_than_its_row_reads_the_whole_row():
    ids = torch.ones(3, 6, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.full_like(ids, -100)
    labels[2, 4:] = 1
    batch = Batch(ids, mask, labels, None)
    locality, scored = MEASURED_ITEMS[-1], MEASURED_ITEMS[0]
    requests = [Request(None, {}, (locality,), str, top_k_tail={locality.name: 2}),
                Request(None, {}, (locality,), str, top_k_tail={locality.name: 9}),
                Request(None, {}, (scored,), str, top_k_tail={locality.name: 2})]
    positions = read_positions(batch, [(0, locality), (1, locality), (2, scored)], requests)
    assert positions.int().tolist() == [[0, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]]


@pytest.mark.parametrize("method,values", [("GRACE", {"scope": "llm.layers.0.mlp.out", "n_iter": 5}),
                                           ("WISE", {"scope": "llm.layers.-1.mlp.in", "n_iter": 3})])
def test_lifelong_rows_at_the_read_positions_equal_the_full_logits(method, values, adapter, eval_records, roots,
                                                                   baseline, monkeypatch):
    fast = evaluate(adapter, editor(method, **values), eval_records, roots, baseline, Protocol()).rows
    full_output_layer(adapter, monkeypatch)
    patched = adapter.logits
    assert evaluate(adapter, editor(method, **values), eval_records, roots, baseline, Protocol()).rows == fast
    assert adapter.__dict__["logits"] is patched  # each memory's batch tap put the instance's logits back


def edited_weights(adapter, editor, record, hooks) -> dict[str, torch.Tensor]:
    """The model's parameters while ``editor``'s edit of ``record`` is live (it is reverted
    afterwards), with ``hooks`` (``(module, forward hook)`` pairs) on their modules meanwhile."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        done = editor.apply(adapter, [record])
        after = {name: p.detach().clone() for name, p in adapter.named_parameters().items()}
        done.revert()
    finally:
        for handle in handles:
            handle.remove()
    return after


@pytest.mark.parametrize("method, scopes, cached", [("FT-L", ["llm.mlp.last1"], True),
                                                     ("FT-L", ["llm.layers.0.mlp.in"], False),
                                                     ("GRACE", None, False), ("WISE", None, False)])
def test_layers_below_the_trained_ones_run_once_per_edit(adapter, eval_records, roots, monkeypatch, method, scopes,
                                                          cached):
    """The tiny LM has 2 layers: FT-L on the last one runs layer 0 once per edit and layer 1 at
    every step, with weights equal bit for bit to recomputing layer 0 at every step. Training in
    layer 0 (GRACE's and WISE's demo scope, or FT-L there) leaves nothing below to keep."""
    values = {"num_steps": 4} if method == "FT-L" else {"n_iter": 4}
    if scopes is not None:
        values["scopes"] = scopes
    hp = read_hparams(REPO / f"config/hparams/{method}/tiny-blip2.yaml", overrides=values)
    layers = [adapter.model.language_model.model.decoder.layers[i].fc1 for i in (0, 1)]
    record = eval_records[0]

    def edit() -> tuple[list[int], dict[str, torch.Tensor]]:
        calls = [0, 0]
        editor = make_editor(hp)
        editor.bind_images(roots)
        hooks = [(layer, lambda *args, i=i: calls.__setitem__(i, calls[i] + 1)) for i, layer in enumerate(layers)]
        return calls, edited_weights(adapter, editor, record, hooks)

    calls, kept = edit()
    monkeypatch.setattr(adapter, "frozen_layers_below", lambda names: contextlib.nullcontext())
    every_step, recomputed = edit()
    # WISE's unrelated row runs layer 0 once more per edit, in a forward that stops there
    assert every_step[0] == every_step[1] + (method == "WISE") and every_step[1] >= 4
    assert calls == ([1, every_step[1]] if cached else every_step)
    assert kept.keys() == recomputed.keys() and all(torch.equal(kept[k], recomputed[k]) for k in kept)


@pytest.mark.parametrize("family, scope, kept", [("blip2", "qformer", True), ("blip2", "vision_proj", True),
                                                 ("blip2", "vision", False), ("minigpt4", "qformer", True),
                                                 ("llava", "vision_proj", True), ("llava", "vision", False),
                                                 ("qwen2vl", "vision_proj", False)])
def test_ft_v_runs_the_frozen_vision_tower_once_per_edit(family, scope, kept, family_adapters, eval_records, roots,
                                                          monkeypatch):
    """FT-V computes the image features from the pixels at every step, but below the Q-Former or
    the projection it trains, the vision tower is frozen: it runs at the first step only, and the
    edited weights equal, bit for bit, those of running it at every step. Training the tower
    itself keeps nothing; nor does training Qwen2-VL's merger, which lies inside its vision module."""
    adapter = family_adapters[family]()
    tower = adapter.model.get_submodule(adapter.image_stages()[0][0])
    entry = next(module for module in tower.modules() if next(module.parameters(recurse=False), None) is not None)
    hp = {"scopes": [scope], "num_steps": 3}

    def edit() -> tuple[int, dict[str, torch.Tensor]]:
        calls = []
        ft = editor("FT-V", **hp)
        ft.bind_images(roots)
        after = edited_weights(adapter, ft, eval_records[0], [(entry, lambda *args: calls.append(1))])
        return len(calls), after

    calls, fast = edit()
    monkeypatch.setattr(adapter, "frozen_layers_below", lambda names: contextlib.nullcontext())
    every_step, slow = edit()
    assert every_step == 3 and calls == (1 if kept else 3)
    assert all(torch.equal(fast[name], slow[name]) for name in fast)
    assert any(not torch.equal(fast[name], p) for name, p in adapter.named_parameters().items())  # it edited


@pytest.mark.parametrize("method", ["KE", "MEND"])
def test_edit_gradients_record_no_graph_below_the_edited_layer(method, adapter, eval_records, roots, monkeypatch):
    """KE and MEND take the edit item's gradient with only the edited weights requiring grad (a
    loaded model has every flag set): layer 0, below the edited last layer, records no graph. The
    edited weights equal, bit for bit, those of taking it with every flag set; the flags come back."""
    hp = read_hparams(REPO / f"config/hparams/{method}/tiny-blip2.yaml", overrides={"scope": "llm.mlp.last1"})
    torch.manual_seed(0)
    edit = make_editor(hp)
    edit.build(adapter).eval()  # an untrained network, as a checkpoint's is used (MEND's norms fixed)
    edit.bind_images(roots)
    below = adapter.model.language_model.model.decoder.layers[0].fc1
    before = {name: p.detach().clone() for name, p in adapter.named_parameters().items()}

    def edited() -> tuple[list[bool], dict[str, torch.Tensor]]:
        graphs = []
        hook = (below, lambda module, args, output: graphs.append(output.requires_grad))
        return graphs, edited_weights(adapter, edit, eval_records[0], [hook])

    assert all(p.requires_grad for p in adapter.model.parameters())
    graphs, fast = edited()
    assert all(p.requires_grad for p in adapter.model.parameters())
    monkeypatch.setattr(adapter, "trainable_only", lambda params: contextlib.nullcontext())
    every_flag, slow = edited()
    assert graphs == [False] and every_flag == [True]
    changed = [name for name in fast if not torch.equal(fast[name], before[name])]
    assert changed and all(name.startswith("language_model.model.decoder.layers.1.") for name in changed)
    assert all(torch.equal(fast[name], slow[name]) for name in fast)


def test_trainable_only_puts_every_flag_back_also_after_an_error(adapter):
    """Only the given parameters require grad inside, a tensor injected after loading included;
    afterwards (here after an exception) every flag is what it was, False ones too."""
    params = adapter.named_parameters()
    frozen_before = next(iter(params.values()))
    chosen = params["language_model.model.decoder.layers.1.fc2.weight"]
    injected = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    frozen_before.requires_grad_(False)
    try:
        with pytest.raises(RuntimeError, match="inside"), adapter.trainable_only([chosen, injected]):
            assert [name for name, p in params.items() if p.requires_grad] == [
                "language_model.model.decoder.layers.1.fc2.weight"]
            assert injected.requires_grad
            raise RuntimeError("inside")
        assert not frozen_before.requires_grad and not injected.requires_grad
        assert sum(p.requires_grad for p in params.values()) == len(params) - 1
    finally:
        frozen_before.requires_grad_(True)


def test_a_repeated_call_returns_copies_and_puts_back_the_forward_it_found():
    """frozen_layers_below's stand-in: equal inputs give a copy of the kept output, other inputs
    are computed; an instance forward (as accelerate's device-map hooks set) comes back on removal."""
    layer = torch.nn.Linear(3, 3).requires_grad_(False)
    calls = []
    own = layer.forward

    def hooked(x):
        calls.append(1)
        return own(x)

    layer.forward = hooked
    memo = RepeatedCall(layer)
    x = torch.randn(2, 3)
    first = layer(x)
    again = layer(x.clone())
    assert torch.equal(again, first) and again is not first and len(calls) == 1
    again.add_(1)  # a caller writing into what it got
    assert torch.equal(layer(x), first) and len(calls) == 1
    assert torch.equal(layer(x + 1), own(x + 1)) and len(calls) == 2
    layer.weight.requires_grad_(True)
    layer(x + 2), layer(x + 2)  # outputs that require grad are never kept
    assert len(calls) == 4
    memo.remove()
    assert layer.forward is hooked
