"""Int8 language-model weights (models.<name>.quantize, mmke.models.quantize): what is held in int8,
what stays as loaded, and that every method edits around the int8 layers without writing them."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import REPO
from mmke.data.records import RecordImages
from mmke.evaluate import Protocol, evaluate, run_baseline
from mmke.hparams import language_model_scopes, named_scopes, read_hparams
from mmke.metrics import target_nll
from mmke.methods.base import Edit, make_editor
from mmke.methods.meta import MetaEditor
from mmke.models.base import LANGUAGE_MODEL_SCOPE
from mmke.models.quantize import quantize_language_model, tensor_bytes, tensor_parts
from mmke.stages import baseline_stage, evaluate_stage, load_configured_model, load_eval_split


def states(adapter) -> dict[str, torch.Tensor]:
    """Every tensor the model holds, an int8 weight as its parts (values, scales, zero points)."""
    return {f"{name}.{i}": part.clone() for name, tensor in adapter.model.state_dict().items()
            for i, part in enumerate(tensor_parts(tensor))}


@pytest.mark.parametrize("family", ["blip2", "minigpt4", "llava", "qwen2vl"])
def test_the_decoder_layers_linear_weights_go_int8_but_the_kept_scopes_embeddings_and_output(family,
                                                                                              family_adapters):
    adapter = family_adapters[family]()
    before = {name: p.detach().clone() for name, p in adapter.model.named_parameters()}
    batch = adapter.teacher_forced(["Question: what colour is it? Short answer:"] * 2, [" red"] * 2,
                                   [Image.new("RGB", (32, 32), (200, 20, 20)), None])
    with torch.no_grad():
        logits = adapter.logits(batch)

    done = quantize_language_model(adapter, "int8", keep=["llm.mlp.last1"])

    kept = set(adapter.editable("llm.mlp.last1"))
    language = set(adapter.scopes()[LANGUAGE_MODEL_SCOPE])
    int8 = {name for name, p in adapter.model.named_parameters() if hasattr(p, "qdata")}
    linear = {f"{path}.weight" for path, module in adapter.model.named_modules()
              if isinstance(module, torch.nn.Linear) and module is not adapter.model.get_output_embeddings()}
    assert int8 == (linear & language) - kept and len(int8) == done.layers > 0
    scopes = adapter.scopes()  # every decoder layer's attention and MLP matrices but the kept ones
    assert set(scopes["llm.attn.qv"]) | (set(scopes["llm.mlp.last2"]) - kept) <= int8
    for name, p in adapter.model.named_parameters():
        if name in int8:
            assert p.qdata.dtype == torch.int8 and p.qdata.shape == before[name].shape
            # each row is rounded to 1/127 of its largest value, no further
            step = before[name].abs().amax(dim=1, keepdim=True) / 127
            assert ((p.dequantize() - before[name]).abs() <= step / 2 + 1e-6).all(), name
        else:  # kept scopes, embeddings, the output layer, norms, biases and the image path
            assert torch.equal(p, before[name]), name
    assert done.bytes_before == sum(before[name].nbytes for name in int8)
    assert done.bytes_after == sum(tensor_bytes(adapter.named_parameters()[name]) for name in int8)
    assert done.bytes_after < done.bytes_before / 3  # float32 -> int8 and one scale per row
    assert adapter.quantization == {"weights": "int8", "keep": ["llm.mlp.last1"], "layers": done.layers,
                                    "bytes_before": done.bytes_before, "bytes_after": done.bytes_after}
    with torch.no_grad():
        quantized = adapter.logits(batch)
    assert 0 < (quantized - logits).abs().max() < 0.05 * logits.abs().max()

    # an edit's gradient reaches a kept weight and the input side through the int8 layers
    weight = adapter.editable("llm.mlp.last1")
    with adapter.trainable_only(weight.values()):
        target_nll(adapter.logits(batch), batch.labels).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weight.values())


@pytest.mark.parametrize("family", ["blip2", "minigpt4", "llava", "qwen2vl"])
def test_only_the_scopes_named_llm_can_hold_int8_weights_so_only_they_must_be_kept(family, family_adapters):
    """The workflow checks quantize.keep by name, before any model is loaded (language_model_scopes)."""
    adapter = family_adapters[family]()
    quantize_language_model(adapter, "int8")
    int8 = {name for name, p in adapter.model.named_parameters() if hasattr(p, "qdata")}
    for scope, names in adapter.scopes().items():
        named_llm = language_model_scopes({"scope": scope}) == [scope]
        assert named_llm == (bool(names) and set(names) <= set(adapter.scopes()[LANGUAGE_MODEL_SCOPE])), scope
        if not named_llm:  # the image path (qformer, vision_proj, vision) is never int8
            assert not set(names) & int8, scope
    assert language_model_scopes({"scopes": ["qformer", "llm.mlp.last1", "vision_proj", "llm"]}) == [
        "llm.mlp.last1", "llm"]


def test_a_scope_holding_int8_weights_cannot_be_edited_and_the_error_says_what_to_keep(adapter, eval_records, roots):
    quantize_language_model(adapter, "int8", keep=["llm.attn.qv"])
    editor = make_editor(read_hparams(REPO / "config/hparams/FT-L/tiny-blip2.yaml"))  # llm.mlp.last1
    editor.bind_images(roots)
    held = states(adapter)
    with pytest.raises(ValueError, match=r"scope 'llm.mlp.last1' holds quantised weights .*quantize.keep"):
        editor.apply(adapter, [eval_records[0]])
    after = states(adapter)
    assert all(torch.equal(after[name], value) for name, value in held.items())
    with pytest.raises(ValueError, match="quantize.weights must be one of int8, got 'int4'"):
        quantize_language_model(adapter, "int4")


@pytest.mark.parametrize("method", ["base", "FT-L", "FT-V", "KE", "MEND", "LoRA", "GRACE", "WISE"])
def test_every_method_edits_an_int8_model_around_its_int8_layers_and_puts_it_back(method, adapter, eval_records,
                                                                                    roots):
    """With the method's scopes kept, an edit trains, writes or hooks those only: it moves the
    edit target's loss (down, where the method optimises it), and reverting leaves the model as
    quantised, int8 parts included, also through the whole evaluation loop."""
    hparams = read_hparams(REPO / f"config/hparams/{method}/tiny-blip2.yaml")
    editor = make_editor(hparams)
    quantize_language_model(adapter, "int8", keep=named_scopes(hparams))
    if isinstance(editor, MetaEditor):
        editor.build(adapter).eval()  # an untrained network: it edits, how well does not matter here
    editor.bind_images(roots)
    held = states(adapter)
    record = eval_records[0]
    image = RecordImages(roots)(record)["image"]

    def target_loss(edit) -> float:
        batch = adapter.teacher_forced([edit.prompt(record.prompt)], [record.target], [image])
        with torch.no_grad():
            return target_nll(adapter.logits(batch), batch.labels).item()

    with editor.session(adapter):
        unedited = target_loss(Edit())
        edit = editor.apply(adapter, [record])
        edited = target_loss(edit)
        edit.revert()
    if method == "base":
        assert edited == unedited
    elif isinstance(editor, MetaEditor):
        assert edited != unedited
    else:
        assert edited < unedited
    baseline = run_baseline(adapter, eval_records[:2], roots, Protocol())
    rows = evaluate(adapter, editor, eval_records[:2], roots, baseline, Protocol()).rows
    after = states(adapter)
    assert after.keys() == held.keys()
    assert all(torch.equal(after[name], value) for name, value in held.items())
    if method == "base":
        assert all(row["post"]["locality_acc"] == 1.0 and row["post"]["multimodal_locality_acc"] == 1.0 for row in rows)


def test_a_quantised_model_entry_gives_its_baseline_and_evaluate_jobs_the_same_model(tiny_blip2_dir, demo_evqa,
                                                                                      tmp_path):
    """The config's ``quantize`` reaches every job that loads the model, so that the base method's
    locality against the baseline job's outputs is exact, and metrics.json says what was done."""
    model = {"family": "blip2", "path": str(tiny_blip2_dir), "image_size": 32,
             "quantize": {"weights": "int8", "keep": ["llm.mlp.last1"]}}
    dataset = {"kind": "evqa", "train": str(demo_evqa["train"]), "eval": str(demo_evqa["eval"]),
               "image_root": str(demo_evqa["images"])}
    adapter = load_configured_model(model, "cpu")
    assert adapter.quantization["layers"] > 0 and adapter.device == torch.device("cpu")
    plain = load_configured_model({key: value for key, value in model.items() if key != "quantize"}, "cpu")
    assert plain.quantization is None
    rows, tensors = tmp_path / "pre.jsonl", tmp_path / "pre.safetensors"
    baseline = baseline_stage(model, dataset, {}, rows, tensors, device="cpu")
    assert baseline.accuracy == run_baseline(adapter, *load_eval_split(dataset), Protocol()).accuracy
    hparams = tmp_path / "base.yaml"
    hparams.write_text("method: base\n")
    report = evaluate_stage(names={"method": "base", "model": "q", "dataset": "d"}, model=model, dataset=dataset,
                            protocol={}, hparams_path=hparams, baseline_rows=rows, baseline_tensors=tensors,
                            metrics_out=tmp_path / "metrics.json", records_out=tmp_path / "records.jsonl", device="cpu")
    assert report["summary"]["locality_acc"] == 1.0 and report["summary"]["multimodal_locality_acc"] == 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["quantization"] == adapter.quantization
    with pytest.raises(KeyError, match="unknown scope 'llm.mlp.last9'"):
        load_configured_model({**model, "quantize": {"weights": "int8", "keep": ["llm.mlp.last9"]}}, "cpu")

