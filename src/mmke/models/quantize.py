"""Int8 weights for the language model's decoder layers (torchao), full precision where methods edit.

EasyEdit's MiniGPT-4 figures (issue 97: IKE 21.5 GB, MEND 27.6 GB on the GPU) are less than twice
the bf16 Vicuna-7B and EVA ViT-g weights alone (15.8 GB), so no editor halves them while the
language model is held in 16 bits. Held as int8 with one scale per output row (torchao's
``Int8WeightOnlyConfig``: weight-only, symmetric, per channel), each decoder layer's linear
weights take half the bytes. Activations, gradients and every other weight stay in the model's
dtype, so an edit's backward reaches the layers it trains through the int8 ones.

A quantised model is another model: its outputs differ from the 16-bit one's (each weight is rounded
to a multiple of 1/127 of its row's largest), so its table rows are its own, and its baseline, its
meta-networks and its evaluate jobs all load it the same way (``models.<name>.quantize``).
What a method writes, wraps or hooks must stay in full precision: the config lists those scopes
(``keep``), and :meth:`~mmke.models.base.VLMAdapter.editable` refuses a scope holding int8
weights, so a method that would write one fails before its first edit, naming the scope.

Left as loaded: the embeddings and the output layer (transformers' quantisers keep them too: the
output layer's rounding shows in every logit), and the image path (FT-V trains it; stored image
features release it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from mmke.models.base import LANGUAGE_MODEL_SCOPE, VLMAdapter

#: The weight formats ``models.<name>.quantize.weights`` may name.
WEIGHT_FORMATS = ("int8",)


@dataclasses.dataclass(frozen=True)
class Quantized:
    """What :func:`quantize_language_model` did, as ``metrics.json`` records it."""

    weights: str
    keep: list[str]  # the scopes left in full precision
    layers: int  # linear layers now holding int8 weights
    bytes_before: int  # their weights' bytes before
    bytes_after: int  # and after (int8 values and their scales)


def tensor_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``tensor``'s data: itself, or for a tensor subclass made of others
    (torchao's int8 weight: values, scales, zero points) theirs. Such a subclass's own storage is a
    stand-in of the logical dtype's size, which holds nothing."""
    if not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    return [part for name in tensor.__tensor_flatten__()[0] for part in tensor_parts(getattr(tensor, name))]


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds (a quantised one's are those of its parts)."""
    return sum(part.nbytes for part in tensor_parts(tensor))


def quantize_language_model(adapter: VLMAdapter, weights: str, keep: Iterable[str] = ()) -> Quantized:
    """Store the linear weights of ``adapter``'s language model in ``weights`` (one of
    :data:`WEIGHT_FORMATS`), but those of the ``keep`` scopes, the embeddings and the output layer.

    Done once after loading, before the model moves to its device (the int8 weights move as such).
    Needs torchao (``pip install 'mmke[quantize]'``).
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"quantize.weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise ImportError("quantize: int8 weights need torchao: pip install 'mmke[quantize]'") from err
    keep = list(dict.fromkeys(keep))
    kept = {name for scope in keep for name in adapter.editable(scope)}
    language = set(adapter.scopes()[LANGUAGE_MODEL_SCOPE]) - kept
    output = adapter.model.get_output_embeddings()
    chosen = [path for path, module in adapter.model.named_modules()
              if isinstance(module, torch.nn.Linear) and module is not output and f"{path}.weight" in language]
    before = sum(tensor_bytes(adapter.model.get_submodule(path).weight) for path in chosen)
    paths = set(chosen)
    quantize_(adapter.model, Int8WeightOnlyConfig(set_inductor_config=False),
              filter_fn=lambda module, path: path in paths)
    after = sum(tensor_bytes(adapter.model.get_submodule(path).weight) for path in chosen)
    done = Quantized(weights, keep, len(chosen), before, after)
    adapter.mark_quantized({f"{path}.weight" for path in chosen}, dataclasses.asdict(done))
    return done
