"""MEND (Mitchell et al., 2022): gradient decomposition editor networks.

The gradient of a Linear weight over a sequence is a sum of rank-1 terms ``delta_t^T x_t`` (layer
input ``x_t``, gradient of the layer output ``delta_t``). MEND feeds each pair through a small
network (normalised, concatenated when ``combine``, a residual low-rank MLP initialised to the
identity when ``init: id``) and rebuilds a pseudo-gradient ``sum_t delta'_t^T x'_t`` from its
outputs; the edit is ``W - edit_lr_W * pseudo_grad`` with a learned step size per weight
(trained with ``lr_lr``). With ``shared`` one network serves all weights of a shape, told apart
by a learned per-weight scale and shift ("mode"). Hyperparameters: spec §4.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from mmke.data.records import EditRecord
from mmke.methods.base import register_method
from mmke.methods.meta import GradientFactors, MetaHParams, WeightDeltaEditor
from mmke.models.base import VLMAdapter


@dataclasses.dataclass(frozen=True)
class MENDHParams(MetaHParams):
    scope: str = "llm.mlp.last3"  # the adapter scope MEND edits (fc1/fc2 of the last 3 layers)
    edit_lr: float = 1e-4  # initial step size of every edited weight
    lr_lr: float = 1e-4  # learning rate of the step sizes
    rank: int = 1920  # rank of the MLP's low-rank layers (capped at the input width)
    n_hidden: int = 1
    init: str = "id"
    norm: bool = True
    combine: bool = True
    mlp_class: str = "IDMLP"
    shared: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "id" or self.mlp_class != "IDMLP":
            raise ValueError(f"MEND supports mlp_class 'IDMLP' with init 'id' (the MMEdit setting), "
                             f"got mlp_class {self.mlp_class!r}, init {self.init!r}")


class RunningNorm(nn.Module):
    """Standardise inputs with a running mean/variance (Welford), updated while training."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("m2", torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                n = x.shape[0]
                batch_mean = x.mean(0)
                shift = batch_mean - self.mean
                total = self.count + n
                self.mean += shift * n / total
                self.m2 += ((x - batch_mean) ** 2).sum(0) + shift ** 2 * self.count * n / total
                self.count.copy_(total)
        if self.count < 2:
            return x
        std = (self.m2 / (self.count - 1)).sqrt()
        return (x - self.mean) / (std + 1e-7)


class LowRankResidual(nn.Module):
    """``x + act(U V x + b)`` with per-mode scale/shift; U starts at zero, so the layer starts as identity."""

    def __init__(self, width: int, rank: int, n_modes: int, relu: bool):
        super().__init__()
        self.v = nn.Parameter(torch.empty(rank, width))
        nn.init.xavier_uniform_(self.v)
        self.u = nn.Parameter(torch.zeros(width, rank))
        self.bias = nn.Parameter(torch.zeros(width))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, width))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, width))
        self.relu = relu

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        out = x @ self.v.T @ self.u.T + self.bias
        if self.relu:
            out = out.relu()
        return x + out * self.mode_scale[mode] + self.mode_shift[mode]


class GradientTransform(nn.Module):
    """Maps the (x, delta) rows of one weight shape to transformed rows (the IDMLP of MEND)."""

    def __init__(self, in_width: int, out_width: int, hp: MENDHParams, n_modes: int):
        super().__init__()
        self.in_width, self.out_width, self.combine = in_width, out_width, hp.combine
        widths = [in_width + out_width] if hp.combine else [in_width, out_width]
        self.norms = nn.ModuleList(RunningNorm(w) for w in widths) if hp.norm else None
        self.mlps = nn.ModuleList(
            nn.ModuleList(LowRankResidual(w, min(hp.rank, w), n_modes, relu=i < hp.n_hidden) for i in range(hp.n_hidden + 1))
            for w in widths
        )

    def forward(self, x: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [torch.cat([x, delta], -1)] if self.combine else [x, delta]
        outs = []
        for index, part in enumerate(parts):
            if self.norms is not None:
                part = self.norms[index](part)
            for layer in self.mlps[index]:
                part = layer(part, mode)
            outs.append(part)
        if self.combine:
            return outs[0].split([self.in_width, self.out_width], -1)
        return outs[0], outs[1]


class MENDNetwork(nn.Module):
    """The editor networks and learned step sizes for a list of edited weights."""

    def __init__(self, shapes: dict[str, torch.Size], hp: MENDHParams):
        super().__init__()
        self.names = list(shapes)
        # one network per shape (shared) or per weight; the key names it in the checkpoint
        self.keys = [f"{s[0]}x{s[1]}" if hp.shared else f"w{i}" for i, s in enumerate(shapes.values())]
        self.modes = [self.keys[:i].count(key) for i, key in enumerate(self.keys)]
        self.transforms = nn.ModuleDict()
        for key, shape in zip(self.keys, shapes.values()):
            if key not in self.transforms:
                out_width, in_width = shape
                self.transforms[key] = GradientTransform(in_width, out_width, hp, n_modes=self.keys.count(key))
        self.edit_lrs = nn.Parameter(torch.full((len(shapes),), hp.edit_lr))


@register_method
class MEND(WeightDeltaEditor):
    name = "MEND"
    hparams_class = MENDHParams

    def make_network(self, model: VLMAdapter) -> MENDNetwork:
        return MENDNetwork({name: p.shape for name, p in self.edited_parameters(model).items()}, self.hparams)

    def param_groups(self) -> list[dict]:
        network = self.network
        return [{"params": list(network.transforms.parameters()), "lr": self.hparams.lr},
                {"params": [network.edit_lrs], "lr": self.hparams.lr_lr}]

    def deltas(self, model: VLMAdapter, records: Sequence[EditRecord],
               gradients: GradientFactors) -> Iterator[tuple[str, torch.Tensor]]:
        network = self.network
        for index, (name, key, mode) in enumerate(zip(network.names, network.keys, network.modes)):
            # the network computes in its own dtype (float32) whatever the model's (bf16 at scale)
            x, delta = (factor.to(network.edit_lrs.dtype) for factor in gradients.pop(name))
            x_new, delta_new = network.transforms[key](x, delta, mode)
            # an edit (no grad) scales the product in place: one full-size matrix, not two
            product = delta_new.T @ x_new
            yield name, (network.edit_lrs[index] * product if torch.is_grad_enabled()
                         else product.mul_(network.edit_lrs[index]))
