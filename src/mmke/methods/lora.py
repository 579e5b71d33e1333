"""LoRA and AdaLoRA edits through peft, as EasyEdit's multimodal LoRA editor trains them.

peft's tuner (``LoraModel`` for ``lora_type: lora``, ``AdaLoraModel`` for ``adalora``) injects
low-rank adapters of rank ``rank`` (scaled by ``lora_alpha``) in place into the Linear layers of
the adapter ``scopes`` (EasyEdit: every LM layer's attention ``q_proj`` and ``v_proj``, the scope
``llm.attn.qv``). An edit trains only the adapter matrices for ``num_steps`` SGD steps (``lr``,
``weight_decay``) on the target's NLL, the learning rate decaying by ``sh_lr`` after each step
(EasyEdit's ExponentialLR). The model's own weights never change; the first edit injects the
adapters, later edits of a sequential group train the same adapters further (EasyEdit reuses its
peft model), and reverting the first edit ``unload``s them, which gives back the original modules.

The model stays in eval mode, so ``lora_dropout`` is passed to peft but inactive and an edit is a
deterministic function of model, record and ``seed`` (the adapters' initialisation); EasyEdit
trains in train mode. AdaLoRA's rank reallocation (``update_and_allocate``) is not called during
the few steps of an edit, as in EasyEdit.
"""

from __future__ import annotations

import dataclasses

import torch
from peft import AdaLoraConfig, AdaLoraModel, LoraConfig, LoraModel

from mmke.data.records import EditRecord
from mmke.hparams import HParams
from mmke.methods.base import register_method
from mmke.metrics import target_nll
from mmke.methods.lifelong import LifelongEditor, Memory, scope_modules, unfreeze
from mmke.models.base import VLMAdapter

ADAPTER = "mmke_edit"  # the peft adapter's name
TUNERS = {"lora": (LoraConfig, LoraModel), "adalora": (AdaLoraConfig, AdaLoraModel)}


@dataclasses.dataclass(frozen=True)
class LoRAHParams(HParams):
    scopes: list[str] = dataclasses.field(default_factory=lambda: ["llm.attn.qv"])
    lora_type: str = "adalora"
    rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    num_steps: int = 5
    lr: float = 0.1
    sh_lr: float = 0.9  # learning-rate decay factor per step
    weight_decay: float = 0.0
    kl_factor: float = 0.0
    seed: int = 0  # of the adapters' initialisation

    def __post_init__(self) -> None:
        if self.lora_type not in TUNERS:
            raise ValueError(f"LoRA lora_type must be one of {sorted(TUNERS)}, got {self.lora_type!r}")
        if self.kl_factor != 0:
            raise ValueError(f"LoRA supports kl_factor 0 (EasyEdit's multimodal setting), got {self.kl_factor}")
        if self.num_steps < 1 or self.rank < 1:
            raise ValueError(f"LoRA needs num_steps >= 1 and rank >= 1, got {self.num_steps}, {self.rank}")


class LoRAMemory(Memory):
    """The injected adapters; their parameters are the state.

    Kept between edits within a session: its empty state is the adapters as injected (``B = 0``,
    ``A`` drawn from ``seed``), which computes as the model alone and is what injecting again
    would give, so an edit from it equals an edit from a fresh injection.
    """

    kept_between_edits = True

    def __init__(self, model: VLMAdapter, hp: LoRAHParams, targets: list[str]):
        config_class, tuner_class = TUNERS[hp.lora_type]
        options = {"total_step": hp.num_steps} if hp.lora_type == "adalora" else {}
        config = config_class(r=hp.rank, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                              target_modules=targets, **options)
        self.flags = {name: p.requires_grad for name, p in model.model.named_parameters()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)
            self.tuner = tuner_class(model.model, config, ADAPTER)
        # peft's new modules are built in train mode: put them in the model's mode, or the
        # adapters' dropout would draw from the unseeded global generator at every step
        model.model.train(model.model.training)
        self.model = model
        # what peft made trainable: the adapter matrices (AdaLoRA's rank counters stay fixed)
        self.params = {name: p for name, p in model.model.named_parameters()
                       if f".{ADAPTER}" in name and p.requires_grad}
        self.edits = 0

    def state(self) -> tuple[dict[str, torch.Tensor], int]:
        return {name: p.detach().clone() for name, p in self.params.items()}, self.edits

    def load(self, state: tuple[dict[str, torch.Tensor], int]) -> None:
        values, self.edits = state
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(values[name])

    def remove(self) -> None:
        self.tuner.unload()
        unfreeze(self.model, self.flags)


@register_method
class LoRA(LifelongEditor):
    name = "LoRA"
    hparams_class = LoRAHParams
    hparams: LoRAHParams

    def scopes(self) -> list[str]:
        return self.hparams.scopes

    def install(self, model: VLMAdapter) -> LoRAMemory:
        return LoRAMemory(model, self.hparams, scope_modules(model, self.hparams.scopes, self.name))

    def edit(self, memory: LoRAMemory, model: VLMAdapter, record: EditRecord) -> None:
        hp = self.hparams
        batch = model.teacher_forced([record.prompt], [record.target], [self.images(record)["image"]])
        optimiser = torch.optim.SGD(memory.params.values(), lr=hp.lr, weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=hp.sh_lr)
        with model.trainable_only(memory.params.values()):
            for _ in range(hp.num_steps):
                optimiser.zero_grad(set_to_none=True)
                target_nll(model.logits(batch), batch.labels).backward()
                optimiser.step()
                schedule.step()
            optimiser.zero_grad(set_to_none=True)
        memory.edits += 1
