"""LAVIS-named checkpoints written from tiny models convert back to identical logits."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmke.models import load_model
from mmke.models.convert import convert_lavis, hf_to_lavis, load_pth, main
from mmke.models.tiny import build_tiny

TINY_HEADS = {"vision_config": {"num_attention_heads": 2}, "qformer_config": {"num_attention_heads": 2}}


def export_lavis(adapter, root, projection):
    """Write the adapter's model as LAVIS pieces plus an LM directory; return convert kwargs."""
    pieces = hf_to_lavis(adapter.model.state_dict(), projection)
    paths = {}
    for piece, state in pieces.items():
        paths[piece] = root / f"{piece}.pth"
        torch.save({"model": state}, paths[piece])
    adapter.model.language_model.save_pretrained(root / "llm")
    adapter.tokenizer.save_pretrained(root / "llm")
    return {**paths, "llm": root / "llm"}


@pytest.fixture(scope="module", params=[("blip2", "opt_proj"), ("minigpt4", "llama_proj")], ids=["blip2", "minigpt4"])
def exported(request, tmp_path_factory):
    family, projection = request.param
    root = tmp_path_factory.mktemp(family)
    adapter = load_model(family, build_tiny(family, root / "tiny"))
    with torch.no_grad():  # give the EVA q/v biases values, keeping the key part zero as in EVA
        for layer in adapter.model.vision_model.encoder.layers:
            bias = layer.self_attn.qkv.bias.view(3, -1)
            bias[0].normal_(), bias[2].normal_()
    return family, adapter, root, export_lavis(adapter, root, projection)


def test_lavis_names_are_the_published_ones(exported):
    family, _, _, paths = exported
    vision, qformer = load_pth(paths["vision"]), load_pth(paths["qformer"])
    assert {"cls_token", "pos_embed", "blocks.1.attn.q_bias", "blocks.1.attn.qkv.weight"} <= set(vision)
    assert {"query_tokens", "ln_vision.weight", "Qformer.bert.embeddings.LayerNorm.weight",
            "Qformer.bert.encoder.layer.0.crossattention.self.query.weight",
            "Qformer.bert.encoder.layer.1.output_query.dense.weight"} <= set(qformer)
    if family == "blip2":
        assert "opt_proj.weight" in qformer and "projection" not in paths
    else:
        assert set(load_pth(paths["projection"])) == {"llama_proj.weight", "llama_proj.bias"}


def test_round_trip_gives_identical_logits(exported, tmp_path):
    family, adapter, _, paths = exported
    converted = load_model(family, convert_lavis(tmp_path / "out", **paths, **TINY_HEADS))
    images = [Image.new("RGB", (40, 24), (220, 40, 40)), Image.new("RGB", (32, 32), (10, 200, 90))]
    batch = adapter.teacher_forced(["What colour is it?", "a photo of"], [" red", " a green square"], images)
    # same text and labels; only the query placeholder id may differ (LAVIS has no <image> token)
    again = converted.teacher_forced(["What colour is it?", "a photo of"], [" red", " a green square"], images)
    assert torch.equal(again.labels, batch.labels) and torch.equal(again.pixel_values, batch.pixel_values)
    assert torch.equal(converted.logits(batch), adapter.logits(batch))
    assert converted.scopes() == adapter.scopes()  # the same module tree, parameter for parameter


def test_unused_keys_are_reported_by_name_with_reason(exported, tmp_path):
    family, _, root, paths = exported
    qformer = load_pth(paths["qformer"]) | {"Qformer.cls.predictions.bias": torch.zeros(3), "temp": torch.ones(()),
                                            "t5_proj.weight": torch.zeros(2, 2)}
    if family == "minigpt4":  # a BLIP-2 OPT Q-Former file: its projection is replaced by llama_proj
        qformer |= {"opt_proj.weight": torch.zeros(2, 2)}
    vision = load_pth(paths["vision"]) | {"blocks.2.norm1.weight": torch.zeros(32), "norm.weight": torch.ones(32)}
    torch.save({"model": qformer}, root / "q_extra.pth")
    torch.save(vision, root / "v_extra.pth")  # a bare state dict, like eva_vit_g.pth
    out = convert_lavis(tmp_path / "out", **{**paths, "qformer": root / "q_extra.pth", "vision": root / "v_extra.pth"},
                        vision_config={"num_attention_heads": 2, "num_hidden_layers": 2},
                        qformer_config={"num_attention_heads": 2})
    unused = json.loads((out / "conversion.json").read_text())["unused"]
    assert unused["qformer:Qformer.cls.predictions.bias"].startswith("the Q-Former's masked-LM head")
    assert unused["qformer:temp"] == "stage-1 contrastive temperature"
    assert unused["vision:blocks.2.norm1.weight"] == "EVA block beyond the 2 blocks LAVIS builds"
    assert unused["vision:norm.weight"].startswith("EVA-CLIP's final norm")
    assert unused["qformer:t5_proj.weight"].startswith("projection into Flan-T5")
    if family == "minigpt4":
        assert unused["qformer:opt_proj.weight"] == "LM projection replaced by the projection checkpoint"


def test_unknown_and_missing_keys_are_errors_naming_them(exported, tmp_path):
    _, _, root, paths = exported
    vision = load_pth(paths["vision"])
    torch.save(vision | {"blocks.0.gamma_1": torch.ones(32)}, root / "v_unknown.pth")  # EVA layer scale
    with pytest.raises(ValueError, match=r"vision checkpoint: unknown keys.*blocks\.0\.gamma_1"):
        convert_lavis(tmp_path / "a", **{**paths, "vision": root / "v_unknown.pth"}, **TINY_HEADS)
    del vision["blocks.1.mlp.fc2.bias"]
    torch.save(vision, root / "v_missing.pth")
    with pytest.raises(ValueError, match=r"missing \['vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias'\]"):
        convert_lavis(tmp_path / "b", **{**paths, "vision": root / "v_missing.pth"}, **TINY_HEADS)
    with pytest.raises(ValueError, match="vision_config.num_attention_heads is required"):
        convert_lavis(tmp_path / "c", **paths)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pickled_code_is_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "cfg": object()}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth: cannot load as a weights-only checkpoint"):
        load_pth(tmp_path / "bad.pth")


def test_cli_converts_in_half_precision(exported, tmp_path):
    family, adapter, _, paths = exported
    args = [str(tmp_path / "out"), "--vision", str(paths["vision"]), "--qformer", str(paths["qformer"]),
            "--llm", str(paths["llm"]), "--dtype", "bfloat16",
            "--vision-config", '{"num_attention_heads": 2}', "--qformer-config", '{"num_attention_heads": 2}']
    if "projection" in paths:
        args += ["--projection", str(paths["projection"])]
    main(args)
    saved = load_file(tmp_path / "out/model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.bfloat16}
    expected = adapter.model.state_dict()["language_projection.weight"].to(torch.bfloat16)
    assert torch.equal(saved["language_projection.weight"], expected)
    assert load_model(family, tmp_path / "out", dtype=torch.bfloat16).model.dtype == torch.bfloat16
