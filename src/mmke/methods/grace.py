"""GRACE (Hartvigsen et al., 2023): a codebook of (key, value, radius) at one layer's output.

A forward hook on one Linear layer of the language model (the ``scope``, EasyEdit: layer 18's
``mlp.down_proj`` of Qwen2-VL-7B) reads, per row, the layer's input at the last prompt token
(the position whose output predicts the answer's first token) as the query. If the nearest key
of the codebook lies within that key's radius (Euclidean distance), the layer's output at that
position is replaced by the key's value (``replacement: replace_last``); otherwise the output is
left exactly as the unedited layer computes it.

An edit adds its query as a key with a value trained for ``n_iter`` Adam steps (``edit_lr``) on
the target's NLL, the value starting at uniform noise (``val_init: cold``) and the radius at
``eps``. If the query falls within ``eps`` plus the nearest key's radius, the codebook is
adjusted instead, as EasyEdit's ``eps_expand: coverage``: for the same target the nearest key's
radius grows to reach the query and its value is retrained; for another target the new key is
added and both radii shrink to half the keys' distance, so their balls no longer overlap.
"""

from __future__ import annotations

import dataclasses

import torch

from mmke.data.records import EditRecord
from mmke.methods.base import register_method
from mmke.metrics import target_nll
from mmke.methods.lifelong import HookedMemory, LifelongEditor, by_row, key_positions, scope_module
from mmke.hparams import HParams
from mmke.models.base import VLMAdapter

#: A shrunk radius stays this much short of half the distance, so the balls do not touch.
SPLIT_MARGIN = 1e-5


@dataclasses.dataclass(frozen=True)
class GRACEHParams(HParams):
    scope: str = "llm.layers.-1.mlp.out"  # one weight matrix; its Linear layer is hooked
    edit_lr: float = 1.0
    n_iter: int = 20
    eps: float = 1.0  # initial radius of a key
    dist_fn: str = "euc"
    val_init: str = "cold"
    replacement: str = "replace_last"
    eps_expand: str = "coverage"
    seed: int = 0  # of the cold values' noise

    def __post_init__(self) -> None:
        fixed = {"dist_fn": "euc", "val_init": "cold", "replacement": "replace_last", "eps_expand": "coverage"}
        other = {key: getattr(self, key) for key, value in fixed.items() if getattr(self, key) != value}
        if other:
            raise ValueError(f"GRACE supports {fixed} (EasyEdit's multimodal setting), got {other}")
        if self.n_iter < 1 or self.eps <= 0:
            raise ValueError(f"GRACE needs n_iter >= 1 and eps > 0, got n_iter {self.n_iter}, eps {self.eps}")


@dataclasses.dataclass(frozen=True)
class Codebook:
    """Keys [N, in], values [N, out], radii [N] and each key's target; replaced, never mutated."""

    keys: torch.Tensor
    values: torch.Tensor
    radii: torch.Tensor
    targets: tuple[str, ...] = ()


class GRACEMemory(HookedMemory):
    """The codebook (``book``) and the hook that consults it."""

    book: Codebook

    def __init__(self, model: VLMAdapter, layer: torch.nn.Linear):
        weight = layer.weight  # keys and radii in float32 whatever the model's dtype
        super().__init__(model, layer, Codebook(weight.new_zeros(0, weight.shape[1], dtype=torch.float32),
                                                weight.new_zeros(0, weight.shape[0]),
                                                weight.new_zeros(0, dtype=torch.float32)))
        self.queries: torch.Tensor | None = None  # the last forward's queries, [B, in]

    def hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        batch = self.tap.current("GRACE")
        shape, output = output.shape, by_row(batch, output)
        positions = key_positions(batch).to(output.device)
        rows = torch.arange(output.shape[0], device=output.device)
        queries = by_row(batch, args[0])[rows, positions].float()
        self.queries = queries.detach()
        if self.training is not None:
            output = output.clone()
            output[rows, positions] = self.training.to(output.dtype).expand(len(rows), -1)
            return output.view(shape)
        book = self.book
        if not len(book.keys):
            return output.view(shape)
        distance, nearest = torch.cdist(queries, book.keys).min(dim=1)
        inside = distance <= book.radii[nearest]
        if not inside.any():
            return output.view(shape)  # the unedited output, untouched
        output = output.clone()
        output[rows[inside], positions[inside]] = book.values[nearest[inside]].to(output.dtype)
        return output.view(shape)


@register_method
class GRACE(LifelongEditor):
    name = "GRACE"
    hparams_class = GRACEHParams
    hparams: GRACEHParams

    def scopes(self) -> list[str]:
        return [self.hparams.scope]

    def install(self, model: VLMAdapter) -> GRACEMemory:
        _, layer = scope_module(model, self.hparams.scope, self.name)
        return GRACEMemory(model, layer)

    def edit(self, memory: GRACEMemory, model: VLMAdapter, record: EditRecord) -> None:
        hp = self.hparams
        batch = model.teacher_forced([record.prompt], [record.target], [self.images(record)["image"]])
        try:  # only the codebook value trains; the lower layers run once per edit
            with model.trainable_only(()), model.frozen_layers_below(self.edited_parameters(model)):
                with torch.no_grad():  # the query; the codebook does not change the layer's input
                    model.logits(batch, positions=torch.zeros_like(batch.attention_mask, dtype=torch.bool))
                query = memory.queries[0]
                book, index = self._place(memory.book, query, record.target)
                value = book.values[index].clone().requires_grad_(True)
                optimiser = torch.optim.Adam([value], lr=hp.edit_lr)
                memory.training = value
                for _ in range(hp.n_iter):
                    optimiser.zero_grad(set_to_none=True)
                    target_nll(model.logits(batch), batch.labels).backward()
                    optimiser.step()
        finally:
            memory.training = None
        values = book.values.clone()
        values[index] = value.detach()
        memory.book = dataclasses.replace(book, values=values)
        memory.edits += 1

    def _place(self, book: Codebook, query: torch.Tensor, target: str) -> tuple[Codebook, int]:
        """The codebook with room for this edit, and the index of the entry whose value it trains."""
        eps = self.hparams.eps
        if len(book.keys):
            distance, nearest = torch.cdist(query[None], book.keys)[0].min(dim=0)
            nearest = int(nearest)
            if distance <= eps + book.radii[nearest]:
                if book.targets[nearest] == target:  # same answer: cover the query
                    radii = book.radii.clone()
                    radii[nearest] = torch.maximum(radii[nearest], distance)
                    return dataclasses.replace(book, radii=radii), nearest
                grown = self._add(book, query, target)  # another answer: split the overlap
                radii = grown.radii.clone()
                radii[nearest] = distance / 2 - SPLIT_MARGIN
                radii[-1] = distance / 2
                return dataclasses.replace(grown, radii=radii), len(grown.keys) - 1
        grown = self._add(book, query, target)
        return grown, len(grown.keys) - 1

    def _add(self, book: Codebook, query: torch.Tensor, target: str) -> Codebook:
        generator = torch.Generator().manual_seed(self.hparams.seed + len(book.keys))
        value = torch.rand(1, book.values.shape[1], generator=generator).to(book.values)
        return Codebook(torch.cat([book.keys, query[None].to(book.keys)]), torch.cat([book.values, value]),
                        torch.cat([book.radii, book.radii.new_full((1,), self.hparams.eps)]), (*book.targets, target))
