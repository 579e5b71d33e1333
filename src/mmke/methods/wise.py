"""WISE (Wang et al., 2024): a side memory beside one MLP weight, and a router between the two.

The main memory is the model's own weight of one Linear layer (the ``scope``; EasyEdit: OPT
layer 23's ``fc1`` for BLIP-2, layer 23's ``down_proj`` for MiniGPT-4), which WISE never writes.
The side memory starts as a copy of it and takes the edits:

* **Editing.** Each edit trains the side copy for up to ``n_iter`` SGD steps (``edit_lr``) on the
  target's NLL plus an activation margin loss: with ``d(x)`` the mean over a row's tokens of
  ``|act(main output) - act(side output)|`` (``act`` the LM's activation function), the edit's
  own row should get ``d >= beta``, an unrelated row (the record's text locality question, as
  EasyEdit's multimodal WISE uses it) ``d <= alpha``, and the two should be ``gamma`` apart
  (``act_margin = [alpha, beta, gamma]``). Only a random share ``mask_ratio`` of the side weight's
  entries learns, one mask per knowledge shard of ``save_freq`` edits; the side weight stays within
  ``norm_constraint`` of the main weight per entry. Each edit's own ``d`` when trained is kept:
  ``act_ratio`` times the smallest of them is the router's threshold.
* **Shards.** Every ``save_freq`` edits the side copy is put aside as a shard and a fresh copy
  starts from the main weight, with a new mask.
* **Merging** (EasyEdit's WISE-Merge, ``retrieve: false``). Every ``merge_freq`` edits the shards
  and the earlier merged memory merge into one memory by TIES, as EasyEdit's ``GTA('magnitude',
  'sum', normalize=True)``: keep the ``densities`` share of each change by magnitude (peft's
  pruning), elect a sign per entry, take the weighted mean of the agreeing changes; shards weigh
  ``weights / n`` in the first merge, and in a later one ``0.4 / n`` each beside ``0.6`` for the
  earlier merged memory. The router chooses, per row, between the main memory, the merged one and
  the current side copy. When a row is measured after at least ``save_freq`` edits, shards not
  merged yet and the side copy count as merged with the rest, as EasyEdit merges them before it
  answers; the stored memory is not changed by measuring.
* **Retrieving** (WISE-Retrieve, ``retrieve: true``). Every ``merge_freq`` edits only the shards
  since the last merge merge into one memory, kept apart from the earlier ones with its own
  threshold (the smallest ``d`` of its edits); shards not merged yet are memories of their own.
  Per row the router takes the stored memory with the largest ``d`` above its threshold if that
  ``d`` beats the side copy's, else the side copy if its ``d`` reaches the side's threshold.
* **Routing.** ``d`` is the mean over the row's real tokens (the largest token distance for rows
  over 100 tokens, as EasyEdit). A row no memory claims keeps the main memory's output exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from peft.utils.merge_utils import calculate_majority_sign_mask, magnitude_based_pruning
from transformers.activations import ACT2FN

from mmke.data.records import EditRecord
from mmke.hparams import HParams
from mmke.methods.base import register_method
from mmke.metrics import target_nll
from mmke.methods.lifelong import HookedMemory, LifelongEditor, by_row, scope_module
from mmke.models.base import Batch, VLMAdapter

#: Rows longer than this are routed on their largest token distance, shorter ones on the mean.
LONG_ROW = 100
#: EasyEdit's early stop: the loss moved less than this ...
STOP_DELTA = 1e-4
#: ... and is below this.
STOP_LOSS = 0.02
#: EasyEdit's weight decay of the side memory's SGD.
WEIGHT_DECAY = 1e-5
#: EasyEdit's weights in a WISE-Merge after the first: the earlier merged memory's, and the
#: share of all new shards together.
MERGED_WEIGHT, SHARDS_WEIGHT = 0.6, 0.4


class LayerReached(Exception):
    """Ends a forward at the hooked layer, once :meth:`WISEMemory.layer_io` has what it reads."""


@dataclasses.dataclass(frozen=True)
class WISEHParams(HParams):
    scope: str = "llm.layers.-1.mlp.in"  # one weight matrix: the main memory
    mask_ratio: float = 0.2
    edit_lr: float = 1.0
    n_iter: int = 10
    norm_constraint: float = 1.0
    act_margin: list[float] = dataclasses.field(default_factory=lambda: [5.0, 20.0, 10.0])  # alpha, beta, gamma
    act_ratio: float = 0.4
    save_freq: int = 500  # edits per knowledge shard (one gradient mask each)
    merge_freq: int = 1000  # edits between TIES merges
    merge_alg: str = "ties"
    densities: float = 0.53
    weights: float = 1.0
    objective_optimization: str = "only_label"
    retrieve: bool = False  # WISE-Retrieve: each merge kept apart, routed to by its own threshold
    replay: bool = False
    seed: int = 0  # of the shard masks

    def __post_init__(self) -> None:
        if self.merge_alg != "ties" or self.objective_optimization != "only_label":
            raise ValueError(f"WISE supports merge_alg 'ties' and objective_optimization 'only_label' (EasyEdit's "
                             f"multimodal setting), got {self.merge_alg!r}, {self.objective_optimization!r}")
        if self.replay:
            raise ValueError("WISE supports replay: false (the replay of the WISE paper's appendix B.3 is not built)")
        if len(self.act_margin) != 3:
            raise ValueError(f"WISE act_margin is [alpha, beta, gamma], got {self.act_margin}")
        if self.save_freq < 1 or self.merge_freq % self.save_freq:
            raise ValueError(f"WISE merge_freq ({self.merge_freq}) must be a multiple of save_freq ({self.save_freq})")
        if not 0 < self.mask_ratio <= 1 or not 0 < self.densities <= 1:
            raise ValueError(f"WISE mask_ratio and densities lie in (0, 1], got {self.mask_ratio}, {self.densities}")


@dataclasses.dataclass(frozen=True)
class Shard:
    """A side weight put aside (or merged), and the smallest ``d`` its edits reached when trained."""

    weight: torch.Tensor
    min_act: float


@dataclasses.dataclass(frozen=True)
class SideMemory:
    """Everything WISE has learnt; tensors are replaced, never written in place."""

    side: torch.Tensor | None = None  # the current shard's weight (None: no edit since the last shard)
    mask: torch.Tensor | None = None  # the current shard's gradient mask
    acts: tuple[float, ...] = ()  # the d of each edit trained into ``side``
    shards: tuple[Shard, ...] = ()  # put aside since the last merge
    merged: tuple[Shard, ...] = ()  # WISE-Merge: at most one; WISE-Retrieve: one per merge

    def min_act(self) -> float:
        """The smallest ``d`` any edit reached when trained (inf before the first)."""
        return min([*self.acts, *(shard.min_act for shard in (*self.shards, *self.merged))], default=math.inf)


def ties_merge(main: torch.Tensor, shards: Sequence[Shard], weights: Sequence[float], density: float) -> Shard:
    """TIES as EasyEdit's ``GTA('magnitude', 'sum', normalize=True)``: the weighted mean of the
    shards' agreeing changes, each change first cut to its ``density`` share by magnitude."""
    changes = [shard.weight - main for shard in shards]
    if density < 1:
        changes = [magnitude_based_pruning(change, density) for change in changes]
    stacked = torch.stack(changes)
    weight = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * main.dim())
    weighted = stacked * weight
    agree = calculate_majority_sign_mask(weighted, method="total")
    divisor = (weight * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return Shard(main + (weighted * agree).sum(dim=0) / divisor, min(shard.min_act for shard in shards))


def merge(main: torch.Tensor, shards: Sequence[Shard], merged: Shard | None, hp: "WISEHParams") -> Shard:
    """One merged memory of ``shards`` (and, in WISE-Merge, the earlier merged memory)."""
    if merged is None:
        return ties_merge(main, shards, [hp.weights / len(shards)] * len(shards), hp.densities)
    return ties_merge(main, [*shards, merged], [SHARDS_WEIGHT / len(shards)] * len(shards) + [MERGED_WEIGHT],
                      hp.densities)


def route(d: torch.Tensor, thresholds: Sequence[float], side: bool, retrieve: bool) -> torch.Tensor:
    """Per row, the index of the memory that answers (-1: the main memory), as EasyEdit's router.

    ``d`` is [memories, rows], the side copy first if ``side``, with one threshold per memory.
    WISE-Merge: the memory with the larger ``d``, if it reaches the (shared) threshold.
    WISE-Retrieve: the stored memory with the largest ``d`` above its own threshold, if that ``d``
    beats the side copy's; else the side copy, if it reaches its threshold.
    """
    if not retrieve:
        best, which = d.max(dim=0)
        return torch.where(best >= thresholds[0], which, -1)
    which = torch.full(d.shape[1:], -1, dtype=torch.long, device=d.device)
    floor = torch.zeros_like(d[0])
    if side:
        which, floor = torch.where(d[0] >= thresholds[0], 0, -1), d[0]
    first = int(side)
    if len(d) > first:
        limits = d.new_tensor(list(thresholds[first:]))[:, None]
        best, index = torch.where(d[first:] > limits, d[first:], -math.inf).max(dim=0)
        which = torch.where(best > floor, index + first, which)
    return which


class WISEMemory(HookedMemory):
    """The side memory (``book``) and the router between it and the layer's own weight."""

    book: SideMemory

    def __init__(self, model: VLMAdapter, layer: torch.nn.Linear, act: str, hp: "WISEHParams"):
        super().__init__(model, layer, SideMemory())
        self.hp = hp
        self.act = ACT2FN[act]
        self.distance: torch.Tensor | None = None  # per row, the last forward's d (training only)
        self.seen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # see layer_io
        self._capturing = False
        #: per row, the last forward's memory: 0 main, 1 the side copy, 2 + k the k-th stored memory
        self.routes: torch.Tensor | None = None
        self._consulted: tuple[SideMemory, torch.Tensor | None, list[Shard]] | None = None

    def consulted(self) -> tuple[torch.Tensor | None, list[Shard]]:
        """The side copy and the stored memories the router chooses from, as EasyEdit answers:
        WISE-Merge merges what is pending once ``save_freq`` edits were made (here into a view,
        computed once per memory state), WISE-Retrieve consults every shard and merge apart."""
        book, hp = self.book, self.hp
        if self._consulted is None or self._consulted[0] is not book:
            side, stored = book.side, [*book.merged, *book.shards]
            if not hp.retrieve:
                pending = [*book.shards, *([Shard(book.side, min(book.acts))] if book.side is not None else [])]
                if pending and self.edits >= hp.save_freq:
                    side, stored = None, [merge(self.layer.weight.detach(), pending, next(iter(book.merged), None), hp)]
                else:
                    stored = list(book.merged)
            self._consulted = book, side, stored
        return self._consulted[1], self._consulted[2]

    def main_activations(self, output: torch.Tensor) -> torch.Tensor:
        """``act`` of the main memory's output, which every :meth:`distances` of that output measures
        from: taken once per forward for all candidate memories, and once per edit for the
        unrelated row, whose main output is the same at every step."""
        return self.act(output.float())

    def distances(self, main: torch.Tensor, other: torch.Tensor, mask: torch.Tensor, infer: bool) -> torch.Tensor:
        """Per row, ``|main - act(other)|`` over the hidden size (``main``: :meth:`main_activations`),
        averaged over real tokens (at inference, the largest for a row of more than
        :data:`LONG_ROW` real tokens).

        Each row is judged by its own length, never the batch's padded one: a row is routed the
        same whatever it is measured beside."""
        norms = (main - self.act(other.float())).norm(dim=-1) * mask
        lengths = mask.sum(dim=1)
        mean = norms.sum(dim=1) / lengths.clamp(min=1)
        if not infer:
            return mean
        return torch.where(lengths > LONG_ROW, norms.max(dim=1).values, mean)

    def layer_io(self, model: VLMAdapter, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's input and its own (main) output on ``batch``'s rows, ``[B, T, width]``, and
        the rows' attention mask, from one forward without gradients that stops at the layer.

        While an edit trains, everything upstream of the layer is frozen and only the side weight
        changes, so the unrelated row's input is the same at every step: one forward per edit
        gives it, where EasyEdit reruns the whole model at each step for it. Nothing above the
        layer is needed, so the hook ends the forward there (ROME's ``nethook`` stops the same way):
        at BLIP-2's layer 23 of 32, 8 layers and the output layer are never run."""
        self._capturing = True
        try:
            with torch.no_grad(), contextlib.suppress(LayerReached):
                model.logits(batch)
        finally:
            self._capturing = False
        seen, self.seen = self.seen, None
        return seen

    def trained(self, x: torch.Tensor, main: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output of the side weight being trained on the layer input ``x`` and, per row, its
        ``d`` from the main output's activations ``main`` (:meth:`main_activations`)."""
        side = F.linear(x, self.training.to(x.dtype), self.layer.bias)
        return side, self.distances(main, side, mask, infer=False)

    def hook(self, module: torch.nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
        batch = self.tap.current("WISE")
        mask = batch.attention_mask.to(output.device, torch.float32)
        shape, x, output = output.shape, by_row(batch, args[0]), by_row(batch, output)
        if self._capturing:
            self.seen = x, output, mask
            raise LayerReached  # see layer_io
        if self.training is not None:
            side, self.distance = self.trained(x, self.main_activations(output), mask)
            return side.view(shape)
        side, stored = self.consulted()
        candidates = [*([side] if side is not None else []), *(shard.weight for shard in stored)]
        if not candidates:
            return output.view(shape)
        ratio = self.hp.act_ratio
        if self.hp.retrieve:
            thresholds = [*([min(self.book.acts) * ratio] if side is not None else []),
                          *(shard.min_act * ratio for shard in stored)]
        else:
            thresholds = [self.book.min_act() * ratio] * len(candidates)
        outputs = torch.stack([F.linear(x, weight, module.bias) for weight in candidates])
        main = self.main_activations(output)
        d = torch.stack([self.distances(main, other, mask, infer=True) for other in outputs])
        which = route(d, thresholds, side is not None, self.hp.retrieve)
        self.routes = torch.where(which < 0, 0, which + 1 + (side is None))
        if not (which >= 0).any():
            return output.view(shape)  # the main memory's output, untouched
        chosen = outputs[which.clamp(min=0), torch.arange(len(which))]
        return torch.where((which >= 0)[:, None, None], chosen, output).view(shape)


@register_method
class WISE(LifelongEditor):
    name = "WISE"
    hparams_class = WISEHParams
    hparams: WISEHParams

    def scopes(self) -> list[str]:
        return [self.hparams.scope]

    def install(self, model: VLMAdapter) -> WISEMemory:
        _, layer = scope_module(model, self.hparams.scope, self.name)
        config = model.model.config.get_text_config()
        act = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
        if act not in ACT2FN:
            raise ValueError(f"WISE: cannot tell the language model's activation function ({act!r})")
        return WISEMemory(model, layer, act, self.hparams)

    def edit(self, memory: WISEMemory, model: VLMAdapter, record: EditRecord) -> None:
        hp = self.hparams
        book = memory.book
        main = memory.layer.weight.detach()
        mask = book.mask if memory.edits % hp.save_freq else self._shard_mask(main, memory.edits // hp.save_freq)
        start = main if book.side is None else book.side
        side = start.clone().requires_grad_(True)
        edit = model.teacher_forced([record.prompt], [record.target], [self.images(record)["image"]])
        x, output, rows = memory.layer_io(model, model.teacher_forced([record.loc], [record.loc_ans], None))
        unrelated = x, memory.main_activations(output), rows
        alpha, beta, gamma = hp.act_margin
        optimiser = torch.optim.SGD([side], lr=hp.edit_lr, weight_decay=WEIGHT_DECAY)
        low, high = main - hp.norm_constraint, main + hp.norm_constraint  # the box the side weight stays in
        memory.training = side
        previous, act = float("inf"), 0.0
        try:  # only the side weight trains; the lower layers run once per edit
            with model.trainable_only(()), model.frozen_layers_below(self.edited_parameters(model)):
                for _ in range(hp.n_iter):
                    nll = target_nll(model.logits(edit), edit.labels)
                    inside = memory.distance[0]
                    outside = memory.trained(*unrelated)[1][0]
                    loss = (nll + F.relu(outside - inside + gamma) + F.relu(outside - alpha) + F.relu(beta - inside))
                    act, value = inside.item(), loss.item()
                    if abs(value - previous) <= STOP_DELTA and value <= STOP_LOSS:
                        break
                    previous = value
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    side.grad.mul_(mask)
                    optimiser.step()
                    with torch.no_grad():
                        side.clamp_(low, high)
        finally:
            memory.training = None
        memory.edits += 1
        memory.book = self._bookkeep(dataclasses.replace(book, side=side.detach(), mask=mask,
                                                         acts=(*book.acts, act)), main, memory.edits)

    def _shard_mask(self, main: torch.Tensor, shard: int) -> torch.Tensor:
        """The entries of the side weight this shard's edits may change (a share ``mask_ratio``)."""
        generator = torch.Generator().manual_seed(self.hparams.seed + shard)
        return (torch.rand(main.shape, generator=generator) < self.hparams.mask_ratio).to(main)

    def _bookkeep(self, book: SideMemory, main: torch.Tensor, edits: int) -> SideMemory:
        """Put the shard aside every ``save_freq`` edits; merge the shards every ``merge_freq``."""
        hp = self.hparams
        if edits % hp.save_freq == 0:
            book = dataclasses.replace(book, side=None, mask=None, acts=(),
                                       shards=(*book.shards, Shard(book.side, min(book.acts))))
        if edits % hp.merge_freq == 0:
            if hp.retrieve:
                merged = (*book.merged, merge(main, book.shards, None, hp))
            else:
                merged = (merge(main, book.shards, next(iter(book.merged), None), hp),)
            book = dataclasses.replace(book, shards=(), merged=merged)
        return book
