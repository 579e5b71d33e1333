"""Meta-training loop shared by the editors that must learn before they edit (MEND, SERAC, KE).

One step (spec §4): edit the model on a batch of training records, then score the edited model
on the rephrased prompt and the rephrased image (they must give the new target) and on the text
and multimodal locality items (they must keep the pre-edit distribution)::

    loss = cedit * NLL(rephrase) + iedit * NLL(rephrased image) + cloc * (KL_text + KL_image)

Only the editor's own network is optimised (Adam, gradient clipping, ``accumulate_bs`` batches per
optimiser step); the base model stays frozen. Every ``val_interval`` steps the same loss on the
held-out records decides early stopping and which network is kept; the validation also records
the spec's training-time accuracies of the edited model (inner, edit, image_rephrase, loc,
image_loc), scored by the same metric functions as the evaluate stage. The resume state (network,
optimizer, data RNG, step, best so far) is written atomically at each validation, so an
interrupted run continues where its last validation left it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol
from pathlib import Path

import torch

from mmke import metrics
from mmke.data.records import EditRecord, multimodal_locality_prompt
from mmke.evaluate import IMAGE_LOC_K, TEXT_LOC_K
from mmke.hparams import digest
from mmke.io import atomic_path, read_safetensors, write_json
from mmke.metrics import IGNORE_INDEX, shift, target_nll
from mmke.models.base import Batch, VLMAdapter

#: Loads a record's three images (edit, rephrased, multimodal locality), e.g. evaluate.RecordImages.
ImageLoader = Callable[[EditRecord], dict[str, object]]


@dataclasses.dataclass
class Item:
    """One teacher-forced batch with the texts it was built from (SERAC's classifier reads them)."""

    batch: Batch
    prompts: list[str]
    targets: list[str]


@dataclasses.dataclass
class TrainBatch:
    """The five item kinds of a meta-training step, for the same records."""

    records: list[EditRecord]
    edit: Item  # prompt + edit image -> target: what the editor edits on
    rephrase: Item  # rephrased prompt + edit image -> target
    image_rephrase: Item  # prompt + rephrased image -> target
    loc: Item  # NQ question -> its answer, text only
    m_loc: Item  # OK-VQA question + its image -> its answer
    images: list[dict[str, object]]  # each record's loaded images, for items an editor adds


def edit_item(model: VLMAdapter, records: Sequence[EditRecord], images: Sequence[object]) -> Item:
    """The edit prompts with their edit images and new targets: what an editor edits on."""
    prompts, targets = [r.prompt for r in records], [r.target for r in records]
    return Item(model.teacher_forced(prompts, targets, list(images)), prompts, targets)


def make_batch(model: VLMAdapter, records: Sequence[EditRecord], images: ImageLoader,
               mloc_template: str = "trainer") -> TrainBatch:
    """Tensors of every item kind; the m_loc question uses EasyEdit's trainer template by default."""
    imgs = [images(record) for record in records]

    def item(prompts: list[str], targets: list[str], image_key: str | None) -> Item:
        pictures = None if image_key is None else [img[image_key] for img in imgs]
        return Item(model.teacher_forced(prompts, targets, pictures), prompts, targets)

    prompts = [r.prompt for r in records]
    targets = [r.target for r in records]
    return TrainBatch(
        records=list(records),
        edit=edit_item(model, records, [img["image"] for img in imgs]),
        rephrase=item([r.rephrase for r in records], targets, "image"),
        image_rephrase=item(prompts, targets, "image_rephrase"),
        loc=item([r.loc for r in records], [r.loc_ans for r in records], None),
        m_loc=item([multimodal_locality_prompt(r, mloc_template) for r in records],
                   [r.m_loc_a for r in records], "m_loc"),
        images=imgs,
    )


def target_unlikelihood(logits: torch.Tensor, labels: torch.Tensor,
                        eps: float = torch.finfo(torch.float32).eps) -> torch.Tensor:
    """Mean of ``-log(1 - p(label) + eps)`` over the target tokens: small when they are unlikely.

    EasyEdit's (and SERAC's) unlikelihood term, pooled over every target token of the batch like
    :func:`target_nll`; ``eps`` keeps the log finite when a token is certain.
    """
    pred, gold = shift(logits, labels)
    mask = gold != IGNORE_INDEX
    prob = pred.float().softmax(-1).gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -torch.log(1 - prob[mask] + eps).mean()


def masked_kl(pre: torch.Tensor, post: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(pre || post) of the token distributions, averaged over the real (unpadded) positions."""
    pre_log = pre.log_softmax(-1)
    kl = (pre_log.exp() * (pre_log - post.log_softmax(-1))).sum(-1)
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum()


class MetaLearner(Protocol):
    """What :func:`train` needs from an editor (implemented by ``methods.meta.MetaEditor``).

    ``training_edit(model, batch)`` is a context manager inside which ``model.logits`` gives the
    edited model's logits with gradients reaching the editor's network; ``auxiliary_loss``, called
    inside that context, returns method-specific terms by name, each as it is added to the total
    (SERAC's scope classifier and unlikelihood); ``param_groups`` sets learning rates.
    """

    hparams: Any
    network: torch.nn.Module

    def build(self, model: VLMAdapter) -> torch.nn.Module: ...
    def training_edit(self, model: VLMAdapter, batch: TrainBatch) -> AbstractContextManager: ...
    def auxiliary_loss(self, model: VLMAdapter, batch: TrainBatch) -> dict[str, torch.Tensor]: ...
    def auxiliary_accuracies(self, batch: TrainBatch) -> dict[str, list[float]]: ...
    def param_groups(self) -> list[dict]: ...


LOSS_ITEMS = ("rephrase", "image_rephrase", "loc", "m_loc")  # the items the loss scores after the edit
# training-time accuracy names (spec §4) -> the item each scores (and the top-k of locality)
TARGET_ACCURACIES = {"inner": "edit", "edit": "rephrase", "image_rephrase": "image_rephrase"}
LOCALITY_ACCURACIES = {"loc": ("loc", TEXT_LOC_K), "image_loc": ("m_loc", IMAGE_LOC_K)}
ACCURACY_NAMES = (*TARGET_ACCURACIES, *LOCALITY_ACCURACIES)


@dataclasses.dataclass
class EditedOutputs:
    """What one meta-training step computes: pre-edit locality logits, edited logits per item kind,
    and the editor's auxiliary terms."""

    pre: dict[str, torch.Tensor]  # "loc", "m_loc"
    post: dict[str, torch.Tensor]  # item kind of TrainBatch -> logits with the edit live
    aux: dict[str, torch.Tensor]


def edited_outputs(editor: MetaLearner, model: VLMAdapter, batch: TrainBatch,
                   kinds: Sequence[str] = LOSS_ITEMS) -> EditedOutputs:
    """Logits of the item ``kinds`` with the editor's training edit live (differentiable in its network)."""
    with torch.no_grad():
        pre = {kind: model.logits(getattr(batch, kind).batch) for kind in ("loc", "m_loc")}
    with editor.training_edit(model, batch):
        post = {kind: model.logits(getattr(batch, kind).batch) for kind in kinds}
        aux = editor.auxiliary_loss(model, batch)
    return EditedOutputs(pre, post, aux)


def loss_parts(hp: Any, batch: TrainBatch, out: EditedOutputs) -> dict[str, torch.Tensor]:
    """The spec's weighted loss with its parts (all scalars; ``total`` is what is optimised)."""
    parts = {
        "edit": target_nll(out.post["rephrase"], batch.rephrase.batch.labels),
        "image_edit": target_nll(out.post["image_rephrase"], batch.image_rephrase.batch.labels),
        "loc": masked_kl(out.pre["loc"], out.post["loc"], batch.loc.batch.attention_mask),
        "m_loc": masked_kl(out.pre["m_loc"], out.post["m_loc"], batch.m_loc.batch.attention_mask),
    }
    total = hp.cedit * parts["edit"] + hp.iedit * parts["image_edit"] + hp.cloc * (parts["loc"] + parts["m_loc"])
    for name, term in out.aux.items():
        parts[name] = term
        total = total + term
    parts["total"] = total
    return parts


def meta_loss(editor: MetaLearner, model: VLMAdapter, batch: TrainBatch) -> dict[str, torch.Tensor]:
    """The loss parts of one training step on ``batch``."""
    return loss_parts(editor.hparams, batch, edited_outputs(editor, model, batch))


@torch.no_grad()
def training_accuracies(batch: TrainBatch, out: EditedOutputs, exact_match: bool) -> list[dict[str, float]]:
    """Per record, the spec's training-time accuracies from the edited logits in ``out``.

    inner/edit/image_rephrase score the new target (token accuracy or exact match, as the
    evaluation protocol says); loc compares post- with pre-edit top-1 ids at every position of the
    NQ item, image_loc the top-10 lists of the OK-VQA item, exactly as the evaluate stage does.
    """
    scores = {name: metrics.per_item_accuracy(out.post[kind], getattr(batch, kind).batch.labels, exact_match).tolist()
              for name, kind in TARGET_ACCURACIES.items()}
    for name, (kind, k) in LOCALITY_ACCURACIES.items():
        mask = getattr(batch, kind).batch.attention_mask
        pairs = zip(metrics.top_k_predictions(out.pre[kind], mask, k), metrics.top_k_predictions(out.post[kind], mask, k))
        scores[name] = [metrics.locality_agreement(pre, post) for pre, post in pairs]
    return [{name: scores[name][i] for name in ACCURACY_NAMES} for i in range(len(batch.records))]


def split_train_val(records: Sequence[EditRecord], val_fraction: float) -> tuple[list, list]:
    """Hold out the last ``ceil(n * val_fraction)`` training records (at least one) for validation.

    A fixed tail (not a random draw) keeps the split independent of the seed and stable when
    records are appended elsewhere in the file.
    """
    if len(records) < 2:
        raise ValueError(f"meta-training needs at least 2 training records (1 for validation), got {len(records)}")
    n_val = min(len(records) - 1, max(1, math.ceil(len(records) * val_fraction)))
    return list(records[:-n_val]), list(records[-n_val:])


@dataclasses.dataclass
class TrainResult:
    step: int
    best_step: int
    best_val: float
    history: list[dict]  # one entry per validation: step, val losses, train loss, steps/s
    stopped: str  # "max_iters" or "early_stop"


def validate(editor: MetaLearner, model: VLMAdapter, batches: Sequence[TrainBatch],
             exact_match: bool = True) -> tuple[dict[str, float], dict[str, float]]:
    """Mean loss parts over the validation batches and mean training-time accuracies over their
    records (the editor's network in eval mode)."""
    editor.network.eval()
    sums: dict[str, float] = {}
    rows: list[dict[str, float]] = []
    for batch in batches:
        out = edited_outputs(editor, model, batch, kinds=(TARGET_ACCURACIES["inner"], *LOSS_ITEMS))
        for key, value in loss_parts(editor.hparams, batch, out).items():
            sums[key] = sums.get(key, 0.0) + value.item()
        extra = editor.auxiliary_accuracies(batch)
        rows += [{**row, **{name: values[i] for name, values in extra.items()}}
                 for i, row in enumerate(training_accuracies(batch, out, exact_match))]
    editor.network.train()
    return {key: value / len(batches) for key, value in sums.items()}, metrics.mean_metrics(rows, list(rows[0]))


def train(editor: MetaLearner, model: VLMAdapter, records: Sequence[EditRecord], images: ImageLoader,
          checkpoint: str | Path, state: str | Path, *, mloc_template: str = "trainer",
          exact_match: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    """Meta-train ``editor`` on ``records``; write the best network to ``checkpoint``.

    ``mloc_template`` and ``exact_match`` come from the evaluation protocol, so the validation
    accuracies mean what the evaluate stage's do.

    ``state`` is the resume file: if it exists with the same hparams digest, training continues
    from it; a different digest is an error (delete the file to start over). The base model's
    parameters are left with ``requires_grad=False``: training owns its process.
    """
    hp = editor.hparams
    for param in model.model.parameters():  # the base model is frozen; only the editor learns
        param.requires_grad_(False)
    torch.manual_seed(hp.seed)  # dropout in SERAC's auxiliary models draws from the global RNG
    network = editor.build(model)
    optimizer = torch.optim.Adam(editor.param_groups())
    generator = torch.Generator().manual_seed(hp.seed)
    train_records, val_records = split_train_val(records, hp.val_fraction)
    val_batches = [make_batch(model, val_records[i:i + hp.batch_size], images, mloc_template)
                   for i in range(0, len(val_records), hp.batch_size)]
    progress = {"step": 0, "best_step": 0, "best_val": math.inf, "history": [], "order": [], "cursor": 0}
    best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    if Path(state).exists():
        best_state = _load_state(state, digest(hp), network, optimizer, generator, progress)
        log(f"resumed from {state} at step {progress['step']}")
    else:
        val, accuracy = validate(editor, model, val_batches, exact_match)
        progress["history"].append({"step": 0, "val": val, "val_acc": accuracy})
        progress["best_val"] = val["total"]
        log(f"step 0 val {val} accuracy {accuracy}")
    stopped = "max_iters"
    tick, window = time.perf_counter(), []
    network.train()
    while progress["step"] < hp.max_iters:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(hp.accumulate_bs):
            batch = make_batch(model, _next_records(train_records, hp.batch_size, generator, progress),
                               images, mloc_template)
            parts = meta_loss(editor, model, batch)
            (parts["total"] / hp.accumulate_bs).backward()
            window.append(parts["total"].item())
        torch.nn.utils.clip_grad_norm_(network.parameters(), hp.grad_clip)
        optimizer.step()
        progress["step"] += 1
        if progress["step"] % hp.val_interval == 0 or progress["step"] == hp.max_iters:
            elapsed = time.perf_counter() - tick  # training only, validation excluded
            val, accuracy = validate(editor, model, val_batches, exact_match)
            progress["history"].append({"step": progress["step"], "val": val, "val_acc": accuracy,
                                        "train_total": sum(window) / len(window),
                                        "steps_per_s": len(window) / hp.accumulate_bs / elapsed})
            log(f"step {progress['step']} val {val} accuracy {accuracy}")
            if val["total"] < progress["best_val"]:
                progress["best_val"], progress["best_step"] = val["total"], progress["step"]
                best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
            _save_state(state, digest(hp), network, optimizer, generator, progress, best_state)
            tick, window = time.perf_counter(), []
            if progress["step"] - progress["best_step"] >= hp.early_stop_patience:
                stopped = "early_stop"
                break
    network.load_state_dict(best_state)
    save_checkpoint(checkpoint, network, editor.hparams)
    return TrainResult(progress["step"], progress["best_step"], progress["best_val"], progress["history"], stopped)


def _next_records(records: list[EditRecord], size: int, generator: torch.Generator, progress: dict) -> list[EditRecord]:
    """The next ``size`` records of a seeded shuffle; a new permutation starts each epoch."""
    chosen = []
    while len(chosen) < size:
        if progress["cursor"] >= len(progress["order"]):
            progress["order"] = torch.randperm(len(records), generator=generator).tolist()
            progress["cursor"] = 0
        chosen.append(records[progress["order"][progress["cursor"]]])
        progress["cursor"] += 1
    return chosen


def save_checkpoint(path: str | Path, network: torch.nn.Module, hparams) -> None:
    """The trained network as safetensors, with the hparams digest in its metadata."""
    from safetensors.torch import save_file

    # clone: tied weights (an LM head sharing the embedding) would otherwise share storage,
    # which safetensors refuses
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in network.state_dict().items()}
    with atomic_path(path) as tmp:
        # One metadata key: safetensors writes several in a per-process random order, and a
        # checkpoint must be byte-identical across runs of the same config (the digest names the method).
        save_file(tensors, str(tmp), metadata={"hparams_digest": digest(hparams)})


def load_checkpoint(path: str | Path, hparams) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint written for exactly these hparams (else a ValueError naming both)."""
    meta, tensors = read_safetensors(path, "pretrain")
    if meta.get("hparams_digest") != digest(hparams):
        raise ValueError(f"{path}: checkpoint was trained with hparams digest {meta.get('hparams_digest')!r}, "
                         f"these hparams have {digest(hparams)!r}; retrain (the pretrain stage) first")
    return tensors


def _save_state(path: str | Path, hp_digest: str, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                generator: torch.Generator, progress: dict, best_state: dict) -> None:
    blob = {"digest": hp_digest, "network": network.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": generator.get_state(), "torch_rng": torch.get_rng_state(), "progress": progress,
            "best": best_state}
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def _load_state(path: str | Path, hp_digest: str, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                generator: torch.Generator, progress: dict) -> dict:
    blob = torch.load(path, weights_only=True, map_location="cpu")
    if blob["digest"] != hp_digest:
        raise ValueError(f"{path}: resume state belongs to hparams digest {blob['digest']!r}, not {hp_digest!r}; "
                         "delete it to train from scratch")
    network.load_state_dict(blob["network"])
    optimizer.load_state_dict(blob["optimizer"])
    generator.set_state(blob["rng"])
    torch.set_rng_state(blob["torch_rng"])
    progress.update(blob["progress"])
    return blob["best"]


def write_train_report(path: str | Path, result: TrainResult, hparams, n_train: int, n_val: int) -> None:
    write_json(path, {"method": hparams.method, "hparams_digest": digest(hparams), "steps": result.step,
                      "best_step": result.best_step, "best_val_total": result.best_val,
                      "stopped": result.stopped, "n_train": n_train, "n_val": n_val,
                      "history": result.history})
