"""Pretrain a tiny VLM on the synthetic world, so the demo edits a model that knows its facts.

Training items come from an endless stream of fresh pictures of the world's *train* scenes, each
asked one random fact (an attribute in one of its wordings, the caption under one caption prompt,
or how many objects a many-object picture shows), drawn with per-kind weights. The loss is the
cross-entropy of exactly the target tokens the metrics score (the adapter's teacher-forced
template), so "trained" means "scores well under the benchmark's exact match". Accuracy is
measured on held-out scenes, which no training picture shows (:func:`mmke.data.demo.scene_split`),
and on the facts of the demo datasets' eval records, read through the real loaders. What a
2-minute CPU budget buys, and which choices it took, is in the README ("The demo world").
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from mmke import metrics
from mmke.data.demo import ATTRIBUTES, COUNT_QUESTIONS, NUMBERS, Scene, draw_many, draw_scene, scene_facts, scene_split
from mmke.data.images import load_rgb
from mmke.data.records import ImageRoots, lead_space, load_records, locality_question, multimodal_locality_prompt
from mmke.io import atomic_dir
from mmke.models.base import VLMAdapter

LOG_EVERY = 100
FACT_KINDS = frozenset({*ATTRIBUTES, "caption", "count"})  # the kinds of fact a picture states


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Optimisation budget; ``max_seconds`` caps wall time so the demo stays within its minutes."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    # AdamW's decoupled weight decay: keeps the model from learning shapes by heart per train scene.
    weight_decay: float = 0.0
    seed: int = 0
    max_seconds: float | None = None
    # Relative frequency of each fact kind in the stream (attribute, "caption", "count"; absent = 1).
    fact_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    # Parameter names kept at their init, e.g. a fixed sin-cos position table.
    frozen: list[str] = dataclasses.field(default_factory=list)
    eval_batch_size: int = 64
    heldout_images: int = 60  # pictures of held-out scenes for the held-out accuracy
    image_size: int = 64  # rendering size, as the demo datasets draw them


@dataclasses.dataclass(frozen=True)
class FactItem:
    """One question the world answers: prompt + true answer (leading space) on one image."""

    kind: str  # the attribute asked, "caption" or "count" ("vqa" for an E-VQA record's question)
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


def picture_facts(rng: random.Random, scenes: Sequence[Scene], image_size: int, mloc_template: str) -> list[FactItem]:
    """Every fact about a fresh picture of a random scene, plus the counting questions (worded
    as the protocol asks them) about a fresh many-object picture."""
    scene = rng.choice(scenes)
    image = draw_scene(rng, scene, image_size)
    items = [FactItem(kind, prompt, lead_space(answer), image) for kind, prompt, answer in scene_facts(scene)]
    count = rng.randint(1, len(NUMBERS))
    many = draw_many(rng, count, image_size)
    return items + [FactItem("count", locality_question(question, mloc_template), lead_space(NUMBERS[count - 1]), many)
                    for question in COUNT_QUESTIONS]


def world_items(split: str, n_images: int, seed: int, image_size: int, mloc_template: str) -> list[FactItem]:
    """Every fact about ``n_images`` fresh pictures of the split's scenes: a fixed set to measure on."""
    rng = random.Random(f"world:{split}:{seed}")
    scenes = scene_split(split)
    return [item for _ in range(n_images) for item in picture_facts(rng, scenes, image_size, mloc_template)]


def world_stream(split: str, seed: int, image_size: int, mloc_template: str,
                 fact_weights: Mapping[str, float] | None = None) -> Iterator[FactItem]:
    """Endless fresh pictures of the split's scenes, one random fact each, a fact of kind k
    ``fact_weights[k]`` times as likely as one of weight 1 (the default).

    Never showing a picture twice is what makes the model look: on a fixed set of pictures a
    tiny model learns each picture's jittered shades by heart instead of where its object is.
    Weighting matters because colour, background and size are learnt in a few hundred steps
    from the picture's average shade, after which the rare position questions barely move it.
    """
    weights = dict(fact_weights or {})
    if unknown := set(weights) - FACT_KINDS:
        valid = ", ".join(sorted(FACT_KINDS))
        raise ValueError(f"unknown fact kinds {sorted(unknown)} in fact_weights; valid: {valid}")
    rng = random.Random(f"world-stream:{split}:{seed}")
    scenes = scene_split(split)
    while True:
        items = picture_facts(rng, scenes, image_size, mloc_template)
        yield rng.choices(items, weights=[weights.get(item.kind, 1.0) for item in items])[0]


def pretrain(model: VLMAdapter, stream: Iterator[FactItem], config: PretrainConfig) -> dict:
    """AdamW on the target-token cross-entropy of batches from ``stream``; returns steps, loss, seconds."""
    named = dict(model.model.named_parameters())
    if unknown := set(config.frozen) - set(named):
        raise ValueError(f"cannot freeze {sorted(unknown)}: the model has no such parameters")
    parameters = [p for name, p in named.items() if p.requires_grad and name not in config.frozen]
    optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    # Linear warm-down: the last steps settle instead of bouncing between answers.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 - step / config.steps)
    losses: list[float] = []
    start = time.perf_counter()
    # Dropout stays off (eval mode): on an endless stream there is nothing to regularise, and the
    # seeded run is then deterministic given the stream.
    for step in range(config.steps):
        if config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
            break
        loss = _loss(model, list(itertools.islice(stream, config.batch_size)))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % LOG_EVERY == 0:  # progress in the stage's log
            print(f"step {step} loss {losses[-1]:.4f} {time.perf_counter() - start:.1f}s", flush=True)
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


def eval_split_items(datasets: Sequence[Mapping], mloc_template: str) -> list[FactItem]:
    """Fact items of the eval splits of several dataset config entries (the facts the demo edits)."""
    items = []
    for dataset in datasets:
        items += fact_items(dataset["kind"], dataset["eval"], ImageRoots.of_dataset(dataset), mloc_template)
    return items


def save_pretrained(model: VLMAdapter, init_dir: str | Path, out_dir: str | Path) -> Path:
    """``init_dir`` with the trained weights: tokenizer and processor files stay byte-identical."""
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(init_dir, tmp, dirs_exist_ok=True)
        model.model.save_pretrained(tmp)
    return Path(out_dir)
