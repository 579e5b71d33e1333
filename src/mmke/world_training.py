"""Pretrain a tiny VLM on the synthetic world, so the demo edits a model that knows its facts.

The model learns from the demo datasets' *train* splits through the real loaders and the
adapter's own teacher-forced template: every record teaches its question (and its rephrase, and
the rephrased image) with the true answer ``pred``, and its counting question with ``m_loc_a``.
The loss is the cross-entropy of exactly the target tokens the metrics score, so "trained" means
"scores well under the benchmark's exact match". Held-out accuracy is measured the same way on
the *eval* splits, whose scenes never occur in a train split (:func:`mmke.data.demo.scene_split`).
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from mmke import metrics
from mmke.data.images import load_rgb
from mmke.data.records import ImageRoots, lead_space, load_records, multimodal_locality_prompt
from mmke.io import atomic_dir
from mmke.models.base import VLMAdapter


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Optimisation budget; ``max_seconds`` caps wall time so the demo stays within its minutes."""

    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    max_seconds: float | None = None
    eval_batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class FactItem:
    """One question the world answers: prompt + true answer (leading space) on one image."""

    kind: str  # "vqa" / "caption" (the record's fact) or "count" (its multimodal-locality picture)
    prompt: str
    answer: str
    image: Image.Image


def fact_items(kind: str, path: str | Path, roots: ImageRoots, mloc_template: str) -> list[FactItem]:
    """The true facts a dataset split states: per record its prompt, rephrase and rephrased image
    with ``pred``, and its counting question (worded as the protocol asks it) with ``m_loc_a``."""
    label = "vqa" if kind == "evqa" else "caption"
    items = []
    for record in load_records(kind, path, roots):
        image = load_rgb(roots.resolve("image", record.image))
        rephrased = load_rgb(roots.resolve("image_rephrase", record.image_rephrase))
        truth = lead_space(record.pred)
        items += [FactItem(label, record.prompt, truth, image), FactItem(label, record.rephrase, truth, image),
                  FactItem(label, record.prompt, truth, rephrased),
                  FactItem("count", multimodal_locality_prompt(record, mloc_template), record.m_loc_a,
                           load_rgb(roots.resolve("m_loc", record.m_loc)))]
    return items


def pretrain(model: VLMAdapter, train: Sequence[FactItem], config: PretrainConfig) -> dict:
    """Adam on the target-token cross-entropy of shuffled batches; returns steps, loss, seconds."""
    if not train:
        raise ValueError("no training items: the train splits are empty")
    generator = random.Random(config.seed)
    parameters = [p for p in model.model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(parameters, lr=config.lr)
    # Linear warm-down: the last steps settle instead of bouncing between answers.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 - step / config.steps)
    order: list[int] = []
    losses: list[float] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # dropout draws from a seeded stream, not the caller's
        torch.manual_seed(config.seed)
        for step in range(config.steps):
            if config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
                break
            if len(order) < config.batch_size:  # epochs of shuffled items
                order += generator.sample(range(len(train)), len(train))
            batch_items = [train[i] for i in order[:config.batch_size]]
            del order[:config.batch_size]
            loss = _loss(model, batch_items)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
    tail = losses[-20:]
    return {"steps": len(losses), "final_loss": sum(tail) / len(tail), "train_s": time.perf_counter() - start}


def _loss(model: VLMAdapter, items: Sequence[FactItem]) -> torch.Tensor:
    batch = model.teacher_forced([i.prompt for i in items], [i.answer for i in items], [i.image for i in items])
    logits, labels = metrics.shift(model.logits(batch), batch.labels)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=metrics.IGNORE_INDEX)


@torch.no_grad()
def accuracy(model: VLMAdapter, items: Sequence[FactItem], batch_size: int = 64) -> dict[str, float]:
    """Exact-match accuracy per item kind and over all items (the benchmark's metric)."""
    if not items:
        raise ValueError("no items to measure")
    scores: dict[str, list[float]] = defaultdict(list)
    for first in range(0, len(items), batch_size):
        chunk = items[first:first + batch_size]
        batch = model.teacher_forced([i.prompt for i in chunk], [i.answer for i in chunk], [i.image for i in chunk])
        correct = metrics.per_item_accuracy(model.logits(batch), batch.labels, exact_match=True)
        for item, value in zip(chunk, correct.tolist()):
            scores[item.kind].append(value)
    result = {kind: sum(values) / len(values) for kind, values in sorted(scores.items())}
    result["all"] = sum(map(sum, scores.values())) / len(items)
    return result


def split_items(datasets: Sequence[Mapping], split: str, mloc_template: str) -> list[FactItem]:
    """Fact items of one split (``train`` or ``eval``) of several dataset config entries."""
    items = []
    for dataset in datasets:
        roots = ImageRoots.of_dataset(dataset)
        items += fact_items(dataset["kind"], dataset[split], roots, mloc_template)
    return items


def save_pretrained(model: VLMAdapter, init_dir: str | Path, out_dir: str | Path) -> Path:
    """``init_dir`` with the trained weights: tokenizer and processor files stay byte-identical."""
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(init_dir, tmp, dirs_exist_ok=True)
        model.model.save_pretrained(tmp)
    return Path(out_dir)
