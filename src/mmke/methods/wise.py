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
  ``norm_constraint`` of the main weight per entry.
* **Merging.** Every ``save_freq`` edits the side copy is put aside as a shard and a fresh copy
  starts; every ``merge_freq`` edits the shards (and the earlier merged memory) merge into one
  merged side memory by TIES (``peft.utils.merge_utils.ties``: keep the ``densities`` share of
  each shard's change by magnitude, elect a sign per entry, average the agreeing changes with
  ``weights``). Shards put aside but not merged yet are not consulted (EasyEdit's WISE-Merge).
* **Routing.** Per row, ``d`` is measured for the merged and the current side memory (the mean
  over the row's real tokens; the largest token distance for rows over 100 tokens, as EasyEdit).
  Below ``act_ratio`` times the smallest ``d`` any edit reached while training, the row keeps the
  main memory's output exactly; otherwise it gets the memory with the larger ``d``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from peft.utils.merge_utils import ties
from transformers.activations import ACT2FN

from mmke.data.records import EditRecord
from mmke.hparams import HParams
from mmke.methods.base import register_method
from mmke.methods.ft import target_nll
from mmke.methods.lifelong import HookedMemory, LifelongEditor, by_row, frozen, scope_module, unfreeze
from mmke.models.base import VLMAdapter

#: Rows longer than this are routed on their largest token distance, shorter ones on the mean.
LONG_ROW = 100
#: EasyEdit's early stop: the loss moved less than this ...
STOP_DELTA = 1e-4
#: ... and is below this.
STOP_LOSS = 0.02
#: EasyEdit's weight decay of the side memory's SGD.
WEIGHT_DECAY = 1e-5


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
    seed: int = 0  # of the shard masks

    def __post_init__(self) -> None:
        if self.merge_alg != "ties" or self.objective_optimization != "only_label":
            raise ValueError(f"WISE supports merge_alg 'ties' and objective_optimization 'only_label' (EasyEdit's "
                             f"multimodal setting), got {self.merge_alg!r}, {self.objective_optimization!r}")
        if len(self.act_margin) != 3:
            raise ValueError(f"WISE act_margin is [alpha, beta, gamma], got {self.act_margin}")
        if self.save_freq < 1 or self.merge_freq % self.save_freq:
            raise ValueError(f"WISE merge_freq ({self.merge_freq}) must be a multiple of save_freq ({self.save_freq})")
        if not 0 < self.mask_ratio <= 1 or not 0 < self.densities <= 1:
            raise ValueError(f"WISE mask_ratio and densities lie in (0, 1], got {self.mask_ratio}, {self.densities}")


@dataclasses.dataclass(frozen=True)
class SideMemory:
    """Everything WISE has learnt; tensors are replaced, never written in place."""

    side: torch.Tensor | None = None  # the current shard's weight (None: no edit since the last shard)
    mask: torch.Tensor | None = None  # the current shard's gradient mask
    shards: tuple[torch.Tensor, ...] = ()  # put aside, waiting for the next merge
    merged: torch.Tensor | None = None
    acts: tuple[float, ...] = ()  # each edit's distance d on its own row when trained


class WISEMemory(HookedMemory):
    """The side memory (``book``) and the router between it and the layer's own weight."""

    book: SideMemory

    def __init__(self, model: VLMAdapter, layer: torch.nn.Linear, act: str, act_ratio: float):
        super().__init__(model, layer, SideMemory())
        self.act_ratio = act_ratio
        self.act = ACT2FN[act]
        self.distance: torch.Tensor | None = None  # per row, the last forward's d (training only)
        self.routes: torch.Tensor | None = None  # per row, the last forward's memory: 0 main, 1 merged, 2 side

    def distances(self, main: torch.Tensor, other: torch.Tensor, mask: torch.Tensor, infer: bool) -> torch.Tensor:
        """Per row, ``|act(main) - act(other)|`` over the hidden size, averaged over real tokens
        (at inference, the largest for a row of more than :data:`LONG_ROW` real tokens).

        Each row is judged by its own length, never the batch's padded one: a row is routed the
        same whatever it is measured beside."""
        norms = (self.act(main.float()) - self.act(other.float())).norm(dim=-1) * mask
        lengths = mask.sum(dim=1)
        mean = norms.sum(dim=1) / lengths.clamp(min=1)
        if not infer:
            return mean
        return torch.where(lengths > LONG_ROW, norms.max(dim=1).values, mean)

    def hook(self, module: torch.nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
        batch = self.tap.current("WISE")
        mask = batch.attention_mask.to(output.device, torch.float32)
        shape, x, output = output.shape, by_row(batch, args[0]), by_row(batch, output)
        if self.training is not None:
            side = F.linear(x, self.training.to(x.dtype), module.bias)
            self.distance = self.distances(output, side, mask, infer=False)
            return side.view(shape)
        book = self.book
        memories = [w for w in (book.merged, book.side) if w is not None]
        if not memories:
            return output.view(shape)
        outputs = [F.linear(x, w, module.bias) for w in memories]
        distances = torch.stack([self.distances(output, other, mask, infer=True) for other in outputs])
        best, which = distances.max(dim=0)
        side = best >= min(book.acts) * self.act_ratio
        self.routes = torch.where(side, which + 1 + (book.merged is None), 0)
        if not side.any():
            return output.view(shape)  # the main memory's output, untouched
        chosen = torch.stack(outputs)[which, torch.arange(len(which))]
        return torch.where(side[:, None, None], chosen, output).view(shape)


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
        return WISEMemory(model, layer, act, self.hparams.act_ratio)

    def edit(self, memory: WISEMemory, model: VLMAdapter, record: EditRecord) -> None:
        hp = self.hparams
        book = memory.book
        main = memory.layer.weight.detach()
        mask = book.mask if memory.edits % hp.save_freq else self._shard_mask(main, memory.edits // hp.save_freq)
        start = main if book.side is None else book.side
        side = start.clone().requires_grad_(True)
        edit = model.teacher_forced([record.prompt], [record.target], [self.images(record)["image"]])
        unrelated = model.teacher_forced([record.loc], [record.loc_ans], None)
        skip_head = torch.zeros_like(unrelated.attention_mask, dtype=torch.bool)
        alpha, beta, gamma = hp.act_margin
        optimiser = torch.optim.SGD([side], lr=hp.edit_lr, weight_decay=WEIGHT_DECAY)
        flags = frozen(model)
        memory.training = side
        previous, act = float("inf"), 0.0
        try:
            for _ in range(hp.n_iter):
                nll = target_nll(model.logits(edit), edit.labels)
                inside = memory.distance[0]
                model.logits(unrelated, positions=skip_head)
                outside = memory.distance[0]
                loss = (nll + F.relu(outside - inside + gamma) + F.relu(outside - alpha) + F.relu(beta - inside))
                act = inside.item()
                if abs(loss.item() - previous) <= STOP_DELTA and loss.item() <= STOP_LOSS:
                    break
                previous = loss.item()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                side.grad.mul_(mask)
                optimiser.step()
                with torch.no_grad():
                    side.copy_(torch.clamp(side, min=main - hp.norm_constraint, max=main + hp.norm_constraint))
        finally:
            memory.training = None
            unfreeze(model, flags)
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
            book = dataclasses.replace(book, side=None, mask=None, shards=(*book.shards, book.side))
        if edits % hp.merge_freq == 0:
            changes = [shard - main for shard in book.shards]
            if book.merged is not None:
                changes.append(book.merged - main)
            weights = torch.full((len(changes),), hp.weights, dtype=main.dtype, device=main.device)
            merged = main + ties(changes, weights, hp.densities)
            book = dataclasses.replace(book, shards=(), merged=merged)
        return book
