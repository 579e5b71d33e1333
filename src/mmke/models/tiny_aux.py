"""Tiny stand-ins for SERAC's auxiliary models, built offline like :mod:`mmke.models.tiny`.

MMEdit's SERAC uses OPT-125m as counterfactual model and distilbert-base-cased as scope
classifier. The demo and the tests need the same kinds of model at toy size: a 2-layer
``OPTForCausalLM`` with the tiny BLIP-2's tokenizer (SERAC requires a shared vocabulary) and a
2-layer DistilBERT encoder. Both are saved as transformers directories so SERAC loads real and
tiny ones through one ``from_pretrained`` path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DistilBertConfig, DistilBertModel, OPTConfig, OPTForCausalLM

from mmke.io import atomic_dir
from mmke.models.tiny import seeded, train_tokenizer


def build_tiny_counterfactual(out_dir: str | os.PathLike, *, seed: int = 0, vocab_size: int = 1024) -> Path:
    """A tiny random OPT causal LM sharing the tokenizer of ``build_tiny_blip2(vocab_size=...)``."""
    tokenizer = train_tokenizer(vocab_size)
    config = OPTConfig(vocab_size=vocab_size, hidden_size=64, word_embed_proj_dim=64, num_hidden_layers=2,
                       ffn_dim=128, num_attention_heads=2, max_position_embeddings=2048,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    return save_seeded(out_dir, lambda: OPTForCausalLM(config), tokenizer, seed)


def build_tiny_classifier(out_dir: str | os.PathLike, *, seed: int = 0, vocab_size: int = 1024) -> Path:
    """A tiny random DistilBERT encoder with the offline byte-level tokenizer."""
    tokenizer = train_tokenizer(vocab_size)
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=32, hidden_dim=64, n_layers=2, n_heads=2,
                              max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    return save_seeded(out_dir, lambda: DistilBertModel(config), tokenizer, seed)


def save_seeded(out_dir: str | os.PathLike, make_model: Callable[[], torch.nn.Module], tokenizer, seed: int) -> Path:
    """Initialise ``make_model()`` from ``seed`` (the caller's RNG untouched) and save it atomically."""
    with seeded(seed):
        model = make_model()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


AUX_BUILDERS: dict[str, Callable[..., Path]] = {
    "counterfactual": build_tiny_counterfactual,
    "classifier": build_tiny_classifier,
}


def build_tiny_aux(kind: str, out_dir: str | os.PathLike, **kwargs) -> Path:
    if kind not in AUX_BUILDERS:
        raise ValueError(f"no tiny auxiliary model {kind!r}; available: {', '.join(sorted(AUX_BUILDERS))}")
    return AUX_BUILDERS[kind](out_dir, **kwargs)
