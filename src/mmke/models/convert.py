"""LAVIS / MiniGPT-4 ``.pth`` checkpoints -> an ordinary transformers BLIP-2 directory.

The paper's models are published as LAVIS pieces: EVA ViT-g (``eva_vit_g.pth``), a Q-Former
checkpoint (``blip2_pretrained_opt2.7b.pth`` / ``blip2_pretrained_flant5xxl.pth``: Q-Former,
query tokens, ``ln_vision`` and the LM projection) and, for MiniGPT-4, the projection
``pretrained_minigpt4_7b.pth`` (``llama_proj``). ``salesforce-lavis`` pins transformers < 4.27, so
instead of importing it the keys are renamed onto transformers' ``Blip2VisionModel``,
``Blip2QFormerModel`` and ``language_projection`` (facts from transformers'
``convert_blip_2_original_to_pytorch.py`` and LAVIS' ``eva_vit.py`` / ``Qformer.py``), and the LM
comes from its own transformers directory. The result has the module tree of
``Blip2ForConditionalGeneration`` whatever the LM (OPT for BLIP-2, Llama/Vicuna for MiniGPT-4), so
the adapters load it like any other directory.

Nothing is dropped silently: every source key is either mapped, listed as unused with the reason
in ``conversion.json`` (text-side Q-Former weights, stage-1 heads, EVA-CLIP blocks beyond the depth
LAVIS builds), or an error naming it; every target key must be provided. Known numerical
difference: LAVIS' ``ln_vision`` uses LayerNorm eps 1e-5 while transformers applies the vision
config's ``layer_norm_eps`` (1e-6, EVA's block eps) to ``post_layernorm``; transformers' own
BLIP-2 conversion has the same difference.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
)

from mmke.io import atomic_dir, write_json

# (LAVIS name, transformers name) templates; "{n}" is a layer index, a trailing "." maps a prefix.
VISION_RULES = (
    ("cls_token", "vision_model.embeddings.class_embedding"),
    ("pos_embed", "vision_model.embeddings.position_embedding"),
    ("patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("blocks.{n}.norm1.", "vision_model.encoder.layers.{n}.layer_norm1."),
    ("blocks.{n}.norm2.", "vision_model.encoder.layers.{n}.layer_norm2."),
    ("blocks.{n}.attn.qkv.", "vision_model.encoder.layers.{n}.self_attn.qkv."),
    ("blocks.{n}.attn.proj.", "vision_model.encoder.layers.{n}.self_attn.projection."),
    ("blocks.{n}.mlp.fc1.", "vision_model.encoder.layers.{n}.mlp.fc1."),
    ("blocks.{n}.mlp.fc2.", "vision_model.encoder.layers.{n}.mlp.fc2."),
)
QFORMER_RULES = (
    ("ln_vision.", "vision_model.post_layernorm."),
    ("query_tokens", "query_tokens"),
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.layernorm."),
    *(
        (f"Qformer.bert.encoder.layer.{{n}}.{lavis}", f"qformer.encoder.layer.{{n}}.{hf}")
        for lavis, hf in (
            ("attention.self.", "attention.attention."),
            ("attention.output.", "attention.output."),
            ("crossattention.self.", "crossattention.attention."),
            ("crossattention.output.", "crossattention.output."),
            ("intermediate_query.", "intermediate_query."),
            ("output_query.", "output_query."),
        )
    ),
)
# The LM projection: BLIP-2 OPT's opt_proj lives in the Q-Former checkpoint, MiniGPT-4's
# llama_proj in pretrained_minigpt4_7b.pth.
PROJECTION_RULES = (("opt_proj.", "language_projection."), ("llama_proj.", "language_projection."))
# Keys of the published files that the assembled model does not use, with the reason.
UNUSED_KEYS = (
    ("norm.", "EVA-CLIP's final norm: LAVIS feeds the last block's output to ln_vision"),
    ("fc_norm.", "EVA-CLIP's pooling norm: not used by LAVIS"),
    ("head.", "EVA-CLIP's classification head: not used by LAVIS"),
    ("Qformer.cls.", "the Q-Former's masked-LM head (stage-1 training only)"),
    ("Qformer.bert.embeddings.word_embeddings.", "the Q-Former's text embeddings (text path only)"),
    ("Qformer.bert.embeddings.position_embeddings.", "the Q-Former's text embeddings (text path only)"),
    ("Qformer.bert.embeddings.position_ids", "the Q-Former's text position ids (text path only)"),
    ("Qformer.bert.encoder.layer.{n}.intermediate.", "the Q-Former's text feed-forward (text path only)"),
    ("Qformer.bert.encoder.layer.{n}.output.", "the Q-Former's text feed-forward (text path only)"),
    ("vision_proj.", "stage-1 image-text contrastive head"),
    ("text_proj.", "stage-1 image-text contrastive head"),
    ("itm_head.", "stage-1 image-text matching head"),
    ("temp", "stage-1 contrastive temperature"),
    ("t5_proj.", "projection into Flan-T5, not into this model's language model"),
    ("opt_model.", "language model weights: the LM comes from the `llm` directory"),
    ("t5_model.", "language model weights: the LM comes from the `llm` directory"),
    ("llama_model.", "language model weights: the LM comes from the `llm` directory"),
)
# LAVIS' create_eva_vit_g: 39 of EVA-CLIP's 40 blocks (penultimate features), head dim 88.
EVA_VIT_G = {"hidden_size": 1408, "num_hidden_layers": 39, "num_attention_heads": 1408 // 88}
BERT_BASE_HEADS = {768: 12}


def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)")
    return re.compile(f"^{regex}(?P<rest>.+)$" if template.endswith(".") else f"^{regex}$")


def _rename(key: str, source: str, target: str) -> str | None:
    """``key`` rewritten from the ``source`` template to the ``target`` one, or None if no match."""
    match = _pattern(source).match(key)
    if match is None:
        return None
    fields = match.groupdict()
    return target.replace("{n}", fields.get("n") or "") + (fields.get("rest") or "")


def load_pth(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A LAVIS/MiniGPT-4 checkpoint's tensors (``{"model": ...}`` or a bare state dict), safely.

    ``weights_only=True`` refuses pickled code; a file that needs it is an error, not a risk.
    """
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, OSError, ...
        raise ValueError(f"{path}: cannot load as a weights-only checkpoint: {err}") from err
    state = raw.get("model", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict (or {{'model': state dict}}), got {type(state).__name__}")
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:10]))}")
    return dict(state)


def _first_rename(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    return next((name for source, target in rules if (name := _rename(key, source, target)) is not None), None)


def _unused_reason(key: str, piece: str) -> str | None:
    for template, reason in UNUSED_KEYS:
        if _pattern(template).match(key):
            return reason
    if piece != "vision" and key.startswith("visual_encoder."):
        return "vision weights: read from the `vision` checkpoint"
    return None


def _merge_qv_biases(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EVA's separate ``attn.q_bias`` / ``attn.v_bias`` -> one ``attn.qkv.bias`` (key part zero).

    EVA has no key bias; transformers 5 stores the three as one ``qkv.bias``, which equals EVA's
    attention as long as its middle third stays zero.
    """
    merged = dict(state)
    for key in [key for key in state if key.endswith(".attn.q_bias")]:
        block = key.removesuffix("q_bias")
        if f"{block}v_bias" not in merged:
            raise ValueError(f"vision checkpoint: {key} has no matching {block}v_bias")
        q_bias, v_bias = merged.pop(key), merged.pop(f"{block}v_bias")
        merged[f"{block}qkv.bias"] = torch.cat([q_bias, torch.zeros_like(v_bias), v_bias])
    return merged


def _split_qkv_bias(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_merge_qv_biases`; a non-zero key bias has no EVA equivalent."""
    split = dict(state)
    for key in [key for key in state if key.endswith(".attn.qkv.bias")]:
        q_bias, k_bias, v_bias = split.pop(key).chunk(3)
        if k_bias.any():
            raise ValueError(f"{key}: EVA attention has no key bias, but this one is non-zero")
        block = key.removesuffix("qkv.bias")
        split[f"{block}q_bias"], split[f"{block}v_bias"] = q_bias, v_bias
    return split


def lavis_to_hf(sources: Mapping[str, Mapping[str, torch.Tensor]]
                ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """Rename the pieces (``vision``, ``qformer``, optional ``projection``) to transformers names.

    Returns the renamed tensors, ``{"<piece>:<key>": reason}`` for keys the model does not use, and
    the source ``"<piece>:<key>"`` of every renamed tensor (so later reports use LAVIS names).
    The projection piece, when given, is the LM projection, so the Q-Former file's own projection
    is then unused. Unknown keys raise a ValueError naming piece and keys.
    """
    rules = {"vision": VISION_RULES, "qformer": QFORMER_RULES + PROJECTION_RULES, "projection": PROJECTION_RULES}
    renamed: dict[str, torch.Tensor] = {}
    unused: dict[str, str] = {}
    origin: dict[str, str] = {}
    for piece, state in sources.items():
        unknown = []
        if piece == "vision":
            state = _merge_qv_biases({key.removeprefix("visual_encoder."): value for key, value in state.items()})
        for key, value in state.items():
            target = _first_rename(key, rules[piece])
            if target is None:
                reason = _unused_reason(key, piece)
                if reason is None:
                    unknown.append(key)
                else:
                    unused[f"{piece}:{key}"] = reason
            elif piece == "qformer" and "projection" in sources and target.startswith("language_projection."):
                unused[f"{piece}:{key}"] = "LM projection replaced by the projection checkpoint"
            elif target in renamed:
                raise ValueError(f"{piece} checkpoint: {key} maps to {target}, which another piece already provides")
            else:
                renamed[target] = value
                origin[target] = f"{piece}:{key}"
        if unknown:
            raise ValueError(f"{piece} checkpoint: unknown keys, not mapped onto transformers' BLIP-2 modules "
                             f"(e.g. EVA layer scale or relative position bias): {', '.join(sorted(unknown))}")
    return renamed, unused, origin


def hf_to_lavis(state: Mapping[str, torch.Tensor], projection: str = "opt_proj") -> dict[str, dict[str, torch.Tensor]]:
    """The inverse renaming: a transformers BLIP-2 state dict as LAVIS pieces (LM weights left out).

    ``projection`` names the LM projection (``opt_proj`` in the BLIP-2 Q-Former checkpoint,
    ``llama_proj`` in MiniGPT-4's own file, which then forms the ``projection`` piece). Used to
    export a model in the published layout, and by the tests to round-trip a tiny model.
    """
    pieces: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "qformer": {}}
    projection_rule = (f"{projection}.", "language_projection.")
    projection_piece = "qformer" if projection == "opt_proj" else "projection"
    for key, value in state.items():
        for piece, rules in (("vision", VISION_RULES), ("qformer", QFORMER_RULES),
                             (projection_piece, (projection_rule,))):
            name = next((n for source, target in rules if (n := _rename(key, target, source)) is not None), None)
            if name is not None:
                pieces.setdefault(piece, {})[name] = value
                break
        else:
            if not key.startswith("language_model."):
                raise ValueError(f"no LAVIS name for {key}")
    pieces["vision"] = _split_qkv_bias(pieces["vision"])
    return pieces


def infer_configs(state: Mapping[str, torch.Tensor], vision_overrides: Mapping[str, Any] | None = None,
                  qformer_overrides: Mapping[str, Any] | None = None) -> tuple[Blip2VisionConfig, Blip2QFormerConfig, int]:
    """Vision and Q-Former configs (and the query count) from the renamed tensors' shapes.

    Shapes fix sizes, patch, resolution and Q-Former depth; what shapes cannot tell (head counts,
    how many EVA blocks LAVIS uses) defaults to LAVIS' EVA ViT-g / BERT-base values and otherwise
    must come from the overrides (config ``lavis.vision_config`` / ``lavis.qformer_config``).
    """
    vision_overrides, qformer_overrides = dict(vision_overrides or {}), dict(qformer_overrides or {})
    hidden = state["vision_model.embeddings.class_embedding"].shape[-1]
    patch = state["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    grid = math.isqrt(state["vision_model.embeddings.position_embedding"].shape[1] - 1)
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", key))}
    vision = {"hidden_size": hidden, "patch_size": patch, "image_size": grid * patch,
              "intermediate_size": state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
              "num_hidden_layers": len(blocks)}
    if hidden == EVA_VIT_G["hidden_size"]:
        vision |= EVA_VIT_G
    vision |= vision_overrides
    q_hidden = state["qformer.layernorm.weight"].shape[0]
    layers = {int(m.group(1)) for key in state if (m := re.match(r"qformer\.encoder\.layer\.(\d+)\.", key))}
    cross = sorted({int(m.group(1)) for key in state
                    if (m := re.match(r"qformer\.encoder\.layer\.(\d+)\.crossattention\.", key))})
    qformer = {"hidden_size": q_hidden, "num_hidden_layers": len(layers), "encoder_hidden_size": hidden,
               "intermediate_size": state["qformer.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
               "cross_attention_frequency": cross[1] - cross[0] if len(cross) > 1 else max(len(layers), 1)}
    if q_hidden in BERT_BASE_HEADS:
        qformer["num_attention_heads"] = BERT_BASE_HEADS[q_hidden]
    qformer |= qformer_overrides
    for name, values in (("vision_config", vision), ("qformer_config", qformer)):
        if "num_attention_heads" not in values:
            raise ValueError(f"lavis.{name}.num_attention_heads is required for a hidden size of "
                             f"{values['hidden_size']} (cannot be read from the weights)")
    num_query_tokens = state["query_tokens"].shape[1]
    return Blip2VisionConfig(**vision), Blip2QFormerConfig(**qformer), num_query_tokens


def convert_lavis(out_dir: str | os.PathLike, *, vision: str | os.PathLike, qformer: str | os.PathLike,
                  llm: str | os.PathLike, projection: str | os.PathLike | None = None,
                  vision_config: Mapping[str, Any] | None = None, qformer_config: Mapping[str, Any] | None = None,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Assemble BLIP-2 (``llm`` = OPT) or MiniGPT-4 (``llm`` = Vicuna + ``projection``) at ``out_dir``.

    Writes config, safetensors weights, the LM's tokenizer (padding with EOS when it has no pad
    token, as EasyEdit does for Vicuna), a BLIP eval image processor at the checkpoint's
    resolution, and ``conversion.json`` (sources, unused keys with reasons).
    """
    sources = {"vision": load_pth(vision), "qformer": load_pth(qformer)}
    if projection is not None:
        sources["projection"] = load_pth(projection)
    state, unused, origin = lavis_to_hf(sources)
    language_model = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, local_files_only=True)
    vision_cfg, qformer_cfg, num_query_tokens = infer_configs(state, vision_config, qformer_config)
    config = Blip2Config(vision_config=vision_cfg.to_dict(), qformer_config=qformer_cfg.to_dict(),
                         text_config=language_model.config.to_dict(), num_query_tokens=num_query_tokens)
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    expected = {key: value for key, value in model.state_dict().items() if not key.startswith("language_model.")}
    for key in sorted(set(state) - set(expected)):
        depth = re.match(r"vision_model\.encoder\.layers\.(\d+)\.", key)
        if depth and int(depth.group(1)) >= vision_cfg.num_hidden_layers:
            unused[origin[key]] = f"EVA block beyond the {vision_cfg.num_hidden_layers} blocks LAVIS builds"
            del state[key]
    extra = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if extra or missing:
        raise ValueError(f"checkpoints do not fit the BLIP-2 modules: missing {missing or 'none'}; "
                         f"unexpected {extra or 'none'}")
    wrong = [f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
             for key in expected if state[key].shape != expected[key].shape]
    if wrong:
        raise ValueError("shape mismatch: " + "; ".join(wrong))
    state |= {f"language_model.{key}": value for key, value in language_model.state_dict().items()}
    model.load_state_dict({key: value.to(dtype) for key, value in state.items()}, strict=True, assign=True)
    tokenizer = AutoTokenizer.from_pretrained(llm, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    size = vision_cfg.image_size
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
    report = {"sources": {piece: str(path) for piece, path in
                          (("vision", vision), ("qformer", qformer), ("projection", projection), ("llm", llm))
                          if path is not None},
              "unused": dict(sorted(unused.items())), "num_query_tokens": num_query_tokens,
              "notes": ["ln_vision: LAVIS LayerNorm eps 1e-5, transformers post_layernorm uses "
                        f"vision layer_norm_eps {vision_cfg.layer_norm_eps}"]}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        write_json(tmp / "conversion.json", report)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    """``python -m mmke.models.convert OUT --vision ... --qformer ... --llm ... [--projection ...]``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m mmke.models.convert", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vision", required=True, help="eva_vit_g.pth")
    parser.add_argument("--qformer", required=True, help="blip2_pretrained_opt2.7b.pth / blip2_pretrained_flant5xxl.pth")
    parser.add_argument("--llm", required=True, help="transformers directory of OPT-2.7b / Vicuna-7B")
    parser.add_argument("--projection", help="pretrained_minigpt4_7b.pth (MiniGPT-4 only)")
    parser.add_argument("--vision-config", type=json.loads, default={}, help="JSON Blip2VisionConfig overrides")
    parser.add_argument("--qformer-config", type=json.loads, default={}, help="JSON Blip2QFormerConfig overrides")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)
    print(convert_lavis(args.out_dir, vision=args.vision, qformer=args.qformer, llm=args.llm,
                        projection=args.projection, vision_config=args.vision_config,
                        qformer_config=args.qformer_config, dtype=getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
