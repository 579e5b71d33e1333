"""FT: fine-tune a few named parameter groups on the edit item, as EasyEdit's multimodal FT does.

One edit = ``num_steps`` AdamW steps (learning rate ``lr``) on the masked target NLL of the edit
prompt + edit image, on the parameters of ``scopes`` only; everything else is frozen for the
duration. The MMEdit paper reports two variants that differ only in where they may tune:

* ``FT-L`` tunes language-model parameters (EasyEdit: the MLP of OPT layer 31 / Vicuna layer 31,
  the adapter scope ``llm.mlp.last1``);
* ``FT-V`` tunes the vision side (EasyEdit: the Q-Former, scope ``qformer``; ``vision_proj`` and
  ``vision`` are allowed too).

Scopes are adapter names, never module paths, so one hparams file fits the tiny and the real model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

from mmke.data.records import EditRecord
from mmke.hparams import HParams
from mmke.methods.base import Edit, Editor, register_method
from mmke.metrics import target_nll
from mmke.models.base import LANGUAGE_MODEL_SCOPE, Batch, VLMAdapter


@dataclasses.dataclass(frozen=True)
class FTHParams(HParams):
    scopes: list[str] = dataclasses.field(default_factory=lambda: ["llm.mlp.last1"])
    num_steps: int = 15
    lr: float = 2e-4
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which EasyEdit's FT leaves in place
    # Optional L-inf bound on each tuned parameter's change (EasyEdit's text FT ``norm_constraint``).
    norm_constraint: float | None = None


class FineTune(Editor):
    """Shared FT loop; the registered subclasses only say which side of the model they may tune."""

    hparams_class = FTHParams
    hparams: FTHParams
    #: True: every scope must lie in the language model; False: none of it may.
    language_side: ClassVar[bool]

    def __init__(self, hparams: HParams):
        super().__init__(hparams)
        if not self.hparams.scopes:
            raise ValueError(f"{self.name}: hparams field 'scopes' is empty")
        if self.hparams.num_steps < 1:
            raise ValueError(f"{self.name}: hparams field 'num_steps' must be >= 1, got {self.hparams.num_steps}")

    def apply(self, model: VLMAdapter, records: Sequence[EditRecord]) -> Edit:
        params = self.edited_parameters(model)
        snapshot = model.snapshot(params)
        batch = model.teacher_forced([r.prompt for r in records], [r.target for r in records],
                                     [self.images(r)["image"] for r in records])
        # FT-L: every step reads the edit image's features from one computation (FT-V trains them)
        frozen = model.frozen_image_features() if model.downstream_of_features(params) else contextlib.nullcontext()
        with model.restored_on_failure(snapshot), model.trainable_only(params.values()), frozen:
            self._optimise(model, params, snapshot, batch)
        return Edit(model, snapshot)

    def _optimise(self, model: VLMAdapter, params: dict[str, torch.nn.Parameter],
                  original: dict[str, torch.Tensor], batch: Batch) -> None:
        """AdamW on the target NLL. The model stays in eval mode (no dropout), so an edit is a
        deterministic function of model and record; EasyEdit trains in train mode."""
        # foreach: one multi-tensor update per step instead of a Python loop over the tensors (FT-V's
        # Q-Former has hundreds); the same arithmetic, bit for bit (tests/test_ft.py).
        optimiser = torch.optim.AdamW(params.values(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                      foreach=True)
        bound = self.hparams.norm_constraint
        with model.frozen_layers_below(params):  # the layers under the tuned ones run once per edit
            for _ in range(self.hparams.num_steps):
                optimiser.zero_grad(set_to_none=True)
                target_nll(model.logits(batch), batch.labels).backward()
                optimiser.step()
                if bound is not None:
                    with torch.no_grad():
                        for name, p in params.items():
                            p.copy_(torch.clamp(p, min=original[name] - bound, max=original[name] + bound))
        optimiser.zero_grad(set_to_none=True)  # free the gradients; the edit keeps only the weights

    def edited_parameters(self, model: VLMAdapter) -> dict[str, torch.nn.Parameter]:
        language = set(model.scopes()[LANGUAGE_MODEL_SCOPE])
        params: dict[str, torch.nn.Parameter] = {}
        for scope in self.hparams.scopes:
            group = model.editable(scope)
            on_side = set(group) <= language if self.language_side else not set(group) & language
            if not group or not on_side:
                side = "the language model" if self.language_side else "the vision side (outside the language model)"
                raise ValueError(f"{self.name}: scope {scope!r} is not on {side}")
            params.update(group)
        return params


@register_method
class FineTuneLanguage(FineTune):
    name = "FT-L"
    language_side = True


@register_method
class FineTuneVision(FineTune):
    name = "FT-V"
    language_side = False
