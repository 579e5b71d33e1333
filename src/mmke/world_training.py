"""Pretrain tiny models on the facts of :mod:`mmke.facts`, so the demo edits models that know them.

Two stages use this module:

- :func:`pretrain` trains a tiny VLM (any family, through its adapter) on a stream of questions
  from the synthetic world and/or configured datasets' train splits, a share of them asked after
  an IKE-style context (:class:`mmke.facts.ContextConfig`). The answer loss is the cross-entropy
  of exactly the target tokens the metrics score (the adapter's teacher-forced template), so
  "trained" means "scores well under the benchmark's exact match". ``text_loss`` adds a
  next-token loss on every text token, as a language model is pretrained: it makes the model read
  the demonstrations sooner, and it trains the positions that locality compares.
- :func:`pretrain_counterfactual` trains SERAC's counterfactual language model (a text-only LM
  sharing the base vocabulary, as OPT-125m is for BLIP-2) to answer a query from the edit in its
  context, in SERAC's own input format.

Both are a function of their config, seed and code: the budget is a number of steps, the stream
is seeded, dropout stays off (eval mode) and nothing depends on wall time. What the demo's budget
buys, and which choices it took, is in docs/world.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mmke import metrics
from mmke.facts import (
    ContextConfig, FactItem, FactSource, Question, RecordFacts, WorldFacts, counterfactual_item, in_context, plain,
)
from mmke.io import atomic_dir
from mmke.methods.serac import counterfactual_ids
from mmke.models.base import VLMAdapter

LOG_EVERY = 100


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """One pretraining run: its budget (steps), stream and what it measures."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    # AdamW's decoupled weight decay: keeps the model from learning shapes by heart per train scene.
    weight_decay: float = 0.0
    seed: int = 0
    world: bool = True  # learn the synthetic world's train scenes (besides any configured datasets)
    # Relative frequency of each fact kind in the stream (mmke.facts.FACT_KINDS; absent = 1).
    fact_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    # Parameter names kept at their init, e.g. a fixed sin-cos position table.
    frozen: list[str] = dataclasses.field(default_factory=list)
    context: ContextConfig = ContextConfig()
    text_loss: float = 0.0  # weight of the next-token loss on every text token
    eval_batch_size: int = 64
    heldout_images: int = 60  # pictures of held-out scenes for the world's held-out accuracy
    heldout_fraction: float = 0.1  # tail of a dataset's train split held out to measure on
    image_size: int = 64  # rendering size, as the demo datasets draw them

    @classmethod
    def from_settings(cls, settings: Mapping) -> PretrainConfig:
        """The config of a ``pretrain:`` entry (its ``context`` a mapping); unknown keys are errors."""
        settings = dict(settings)
        fields = {field.name for field in dataclasses.fields(cls)}
        if unknown := set(settings) - fields:
            raise ValueError(f"unknown pretraining settings {sorted(unknown)}; valid: {', '.join(sorted(fields))}")
        if "context" in settings:
            settings["context"] = ContextConfig(**settings["context"])
        return cls(**settings)


def optimise(parameters: Sequence[torch.nn.Parameter], loss_of: Callable[[list], torch.Tensor],
             stream: Iterator, config: PretrainConfig, log: Callable[[str], None] = print) -> dict:
    """AdamW with a linear warm-down over ``config.steps`` batches of ``config.batch_size`` items.

    The warm-down lets the last steps settle instead of bouncing between answers. Returns the
    steps run (always ``config.steps``), the mean loss of the last 20 and the wall seconds.
    """
    optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 - step / config.steps)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(config.steps):
        loss = loss_of(list(itertools.islice(stream, config.batch_size)))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % LOG_EVERY == 0:  # progress in the stage's log
            log(f"step {step} loss {losses[-1]:.4f}")
    tail = losses[-20:]
    return {"steps": len(losses), "final_loss": sum(tail) / len(tail), "train_s": time.perf_counter() - start}


def trainable(model: torch.nn.Module, frozen: Iterable[str]) -> list[torch.nn.Parameter]:
    """The parameters to optimise: all but the ``frozen`` names (each must exist)."""
    named = dict(model.named_parameters())
    if unknown := set(frozen) - set(named):
        raise ValueError(f"cannot freeze {sorted(unknown)}: the model has no such parameters")
    return [p for name, p in named.items() if p.requires_grad and name not in set(frozen)]


def pretrain(model: VLMAdapter, stream: Iterator[FactItem], config: PretrainConfig,
             log: Callable[[str], None] = print) -> dict:
    """Train ``model`` on ``stream`` (answer loss + ``config.text_loss`` x next-token loss)."""
    return optimise(trainable(model.model, config.frozen), lambda items: item_loss(model, items, config.text_loss),
                    stream, config, log)


def _batches(items: Sequence[FactItem], chunks: int = 1) -> list[list[FactItem]]:
    """Items with a picture and text-only items apart (each family takes them in separate batches),
    each split into ``chunks`` runs of similar prompt length so that short items are not padded to
    the longest context."""
    batches = []
    for group in ([i for i in items if i.image is not None], [i for i in items if i.image is None]):
        group = sorted(group, key=lambda item: len(item.prompt))
        size = math.ceil(len(group) / chunks) if group else 1
        batches += [group[first:first + size] for first in range(0, len(group), size)]
    return batches


def _teacher_forced(model: VLMAdapter, items: Sequence[FactItem]):
    images = None if items[0].image is None else [item.image for item in items]
    return model.teacher_forced([item.prompt for item in items], [item.answer for item in items], images)


def item_loss(model: VLMAdapter, items: Sequence[FactItem], text_loss: float = 0.0, chunks: int = 2) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens, plus ``text_loss`` x that of every text token.

    The output layer runs only where a loss is taken (see ``VLMAdapter.logits``).
    """
    answer_nll, text_nll = [], []
    for chunk in _batches(items, chunks):
        batch = _teacher_forced(model, chunk)
        answer = batch.labels[:, 1:] != metrics.IGNORE_INDEX  # position t predicts token t + 1
        gold = model.text_labels(batch)[:, 1:] if text_loss else batch.labels[:, 1:]
        text = gold != metrics.IGNORE_INDEX
        positions = F.pad(text, (0, 1))  # the last position predicts nothing
        nll = F.cross_entropy(model.logits(batch, positions), gold[text], reduction="none")
        answer_nll.append(nll[answer[text]])
        text_nll.append(nll)
    loss = torch.cat(answer_nll).mean()
    return loss + text_loss * torch.cat(text_nll).mean() if text_loss else loss


@torch.no_grad()
def accuracy(model: VLMAdapter, items: Sequence[FactItem], batch_size: int = 64) -> dict[str, float]:
    """Exact-match accuracy per item kind and over all items (the benchmark's metric)."""
    if not items:
        raise ValueError("no items to measure")
    scores: dict[str, list[float]] = defaultdict(list)
    for group in _batches(items, math.ceil(len(items) / batch_size)):
        batch = _teacher_forced(model, group)
        correct = metrics.per_item_accuracy(model.logits(batch), batch.labels, exact_match=True)
        for item, value in zip(group, correct.tolist()):
            scores[item.kind].append(value)
    result = {kind: sum(values) / len(values) for kind, values in sorted(scores.items())}
    result["all"] = sum(map(sum, scores.values())) / len(items)
    return result


def measurement_items(source: FactSource, question_sets: Iterable[list[Question]], seed: int,
                      context: ContextConfig) -> list[FactItem]:
    """Each question plain and, if the model learns to read contexts, after a relevant and after an
    unrelated new fact with IKE's full ``max_demos`` demonstrations."""
    rng = random.Random(f"measure:{seed}")
    items = []
    for questions in question_sets:
        items += [plain(question) for question in questions]
        if context.share:
            items += [in_context(rng, source, question, context, relevant, context.max_demos)
                      for question in questions for relevant in (True, False)]
    return items


def world_heldout(source: WorldFacts, config: PretrainConfig) -> list[FactItem]:
    """Every question about ``config.heldout_images`` fresh pictures of ``source``'s (held-out) scenes."""
    rng = random.Random(f"world-heldout:{config.seed}")
    pictures = [source.every_question(rng) for _ in range(config.heldout_images)]
    return measurement_items(source, [*pictures, source.text_questions()], config.seed, config.context)


def records_heldout(source: RecordFacts, config: PretrainConfig) -> list[FactItem]:
    """Every question of the records of ``source`` (a split's held-out tail)."""
    return measurement_items(source, [source.every_question(record) for record in source.records],
                             config.seed, config.context)


def save_pretrained(model: torch.nn.Module, init_dir: str | Path, out_dir: str | Path) -> Path:
    """``init_dir`` with the trained weights: tokenizer and processor files stay byte-identical."""
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(init_dir, tmp, dirs_exist_ok=True)
        model.save_pretrained(tmp)
    return Path(out_dir)


# SERAC's counterfactual model ---------------------------------------------------------------


def counterfactual_stream(sources: Sequence[FactSource], seed: int) -> Iterator[tuple[tuple[str, str], FactItem]]:
    """Endless (edit, query) pairs for the counterfactual model (:func:`mmke.facts.counterfactual_item`)."""
    rng = random.Random(f"counterfactual-stream:{seed}")
    while True:
        yield counterfactual_item(rng, rng.choice(sources))


def counterfactual_batch(tokenizer, examples: Sequence[tuple[tuple[str, str], FactItem]],
                         device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded ``edit prompt + target </s> query prompt + answer`` rows, labels on the answer only.

    The row is exactly what SERAC's router feeds the model (:func:`mmke.methods.serac.counterfactual_ids`).
    """
    rows, starts = zip(*(counterfactual_ids(tokenizer, edit, item.prompt, item.answer) for edit, item in examples))
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), metrics.IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, start) in enumerate(zip(rows, starts)):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, start:len(ids)] = input_ids[row, start:len(ids)]
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


def counterfactual_loss(lm: torch.nn.Module, tokenizer, examples: Sequence) -> torch.Tensor:
    batch = counterfactual_batch(tokenizer, examples, lm.device)
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    pred, gold = metrics.shift(logits.float(), batch["labels"])
    return F.cross_entropy(pred.flatten(0, 1), gold.flatten(), ignore_index=metrics.IGNORE_INDEX)


@torch.no_grad()
def counterfactual_accuracy(lm: torch.nn.Module, tokenizer, examples: Sequence,
                            batch_size: int = 64) -> dict[str, float]:
    """Exact match of the counterfactual model's answers per example kind and overall."""
    scores: dict[str, list[float]] = defaultdict(list)
    for first in range(0, len(examples), batch_size):
        chunk = examples[first:first + batch_size]
        batch = counterfactual_batch(tokenizer, chunk, lm.device)
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        correct = metrics.per_item_accuracy(logits.float(), batch["labels"], exact_match=True)
        for (_, item), value in zip(chunk, correct.tolist()):
            scores[item.kind].append(value)
    result = {kind: sum(values) / len(values) for kind, values in sorted(scores.items())}
    result["all"] = sum(map(sum, scores.values())) / len(examples)
    return result


def pretrain_counterfactual(lm: torch.nn.Module, tokenizer, stream: Iterator, config: PretrainConfig,
                            log: Callable[[str], None] = print) -> dict:
    """Train SERAC's counterfactual LM on (edit, query) pairs from ``stream``."""
    lm.eval()  # dropout off: the seeded run is deterministic
    return optimise(trainable(lm, config.frozen), lambda examples: counterfactual_loss(lm, tokenizer, examples),
                    stream, config, log)
