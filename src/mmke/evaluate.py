"""Edit-and-measure: the pre-edit baseline of a model on a dataset, and the per-method loop.

Pre-edit outputs depend only on model x dataset, so :func:`run_baseline` computes them once and
every method's :func:`evaluate` reads them (EasyEdit recomputes them per method run). Each record
is measured on five items (spec §3): the edit prompt, its rephrase and the rephrased image score
the target tokens; the NQ question and the OK-VQA question compare post-edit top-k predictions
with the baseline's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mmke import metrics
from mmke.data.records import EditRecord, ImageRoots, RecordImages, multimodal_locality_prompt
from mmke.io import atomic_path, read_jsonl, write_jsonl
from mmke.methods.base import Edit, Editor
from mmke.models.base import VLMAdapter

EDIT_METRICS = ("rewrite_acc", "rephrase_acc", "image_rephrase_acc")
LOCALITY_METRICS = ("locality_acc", "multimodal_locality_acc")
SUMMARY_METRICS = EDIT_METRICS + LOCALITY_METRICS
TEXT_LOC_K = 1  # T-Locality compares top-1 ids (spec §3)
IMAGE_LOC_K = 10  # M-Locality compares top-10 id lists


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Evaluation choices that must be equal across methods for a table to be comparable."""

    exact_match: bool = True
    mloc_template: str = "trainer"


@dataclasses.dataclass
class Baseline:
    """Pre-edit accuracies and locality predictions of one model on one dataset."""

    protocol: Protocol
    accuracy: dict[int, dict[str, float]]
    loc: dict[int, torch.Tensor]
    m_loc: dict[int, torch.Tensor]

    def save(self, rows_path: str | Path, tensors_path: str | Path) -> None:
        write_jsonl(rows_path, ({"id": i, **acc} for i, acc in sorted(self.accuracy.items())))
        tensors = {f"loc.{i}": t.contiguous() for i, t in self.loc.items()}
        tensors |= {f"m_loc.{i}": t.contiguous() for i, t in self.m_loc.items()}
        meta = {"protocol": json.dumps(dataclasses.asdict(self.protocol), sort_keys=True)}
        with atomic_path(tensors_path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, rows_path: str | Path, tensors_path: str | Path) -> "Baseline":
        from safetensors import safe_open

        with safe_open(str(tensors_path), framework="pt") as handle:
            protocol = Protocol(**json.loads(handle.metadata()["protocol"]))
        tensors = load_file(str(tensors_path))
        accuracy = {int(row.pop("id")): row for row in read_jsonl(rows_path)}
        split = {"loc": {}, "m_loc": {}}
        for key, value in tensors.items():
            kind, index = key.rsplit(".", 1)
            split[kind][int(index)] = value
        return cls(protocol, accuracy, split["loc"], split["m_loc"])


@dataclasses.dataclass
class EvalResult:
    rows: list[dict]
    summary: dict[str, float]
    timings: dict[str, float]


def run_baseline(
    model: VLMAdapter, records: Sequence[EditRecord], roots: ImageRoots, protocol: Protocol
) -> Baseline:
    """Pre-edit accuracies and locality predictions, computed once per model x dataset."""
    images = RecordImages(roots)
    baseline = Baseline(protocol, {}, {}, {})
    for record in tqdm(records, desc="baseline", unit="record"):
        imgs = images(record)
        baseline.accuracy[record.id] = _edit_accuracies(model, record, imgs, protocol, _identity)
        baseline.loc[record.id], baseline.m_loc[record.id] = _locality_predictions(
            model, record, imgs, protocol, _identity
        )
    return baseline


def evaluate(
    model: VLMAdapter,
    editor: Editor,
    records: Sequence[EditRecord],
    roots: ImageRoots,
    baseline: Baseline,
    protocol: Protocol,
) -> EvalResult:
    """Single-edit protocol of the benchmark: edit one record, measure, revert, next."""
    if baseline.protocol != protocol:
        raise ValueError(f"baseline was computed with {baseline.protocol}, evaluation uses {protocol}")
    images = RecordImages(roots)
    editor.bind_images(roots)
    rows: list[dict] = []
    edit_seconds = 0.0
    start = time.perf_counter()
    for record in tqdm(records, desc=editor.name, unit="edit"):
        if record.id not in baseline.accuracy:
            raise KeyError(f"record {record.id} has no baseline entry (baseline of another dataset?)")
        imgs = images(record)
        tick = time.perf_counter()
        edit = editor.apply(model, [record])
        edit_seconds += time.perf_counter() - tick
        try:
            post = _measure_post(model, record, imgs, protocol, edit, baseline)
        finally:
            edit.revert()
        rows.append({"id": record.id, "pre": baseline.accuracy[record.id], "post": post})
    total = time.perf_counter() - start
    summary = metrics.mean_metrics((row["post"] for row in rows), SUMMARY_METRICS)
    timings = {
        "total_s": total,
        "edit_s": edit_seconds,
        "edits_per_s": len(rows) / edit_seconds if edit_seconds > 0 else float("inf"),
    }
    return EvalResult(rows, summary, timings)


def _measure_post(
    model: VLMAdapter, record: EditRecord, imgs: dict, protocol: Protocol, edit: Edit, baseline: Baseline
) -> dict[str, float]:
    post = _edit_accuracies(model, record, imgs, protocol, edit.prompt)
    loc, m_loc = _locality_predictions(model, record, imgs, protocol, edit.prompt)
    post["locality_acc"] = metrics.locality_agreement(baseline.loc[record.id], loc)
    post["multimodal_locality_acc"] = metrics.locality_agreement(baseline.m_loc[record.id], m_loc)
    return post


@torch.no_grad()
def _edit_accuracies(
    model: VLMAdapter, record: EditRecord, imgs: dict, protocol: Protocol, prompt: Callable[[str], str]
) -> dict[str, float]:
    """Reliability, text generality and image generality in one batch of three items."""
    batch = model.teacher_forced(
        [prompt(record.prompt), prompt(record.rephrase), prompt(record.prompt)],
        [record.target] * 3,
        [imgs["image"], imgs["image"], imgs["image_rephrase"]],
    )
    scores = metrics.per_item_accuracy(model.logits(batch), batch.labels, protocol.exact_match)
    return dict(zip(EDIT_METRICS, scores.tolist()))


@torch.no_grad()
def _locality_predictions(
    model: VLMAdapter, record: EditRecord, imgs: dict, protocol: Protocol, prompt: Callable[[str], str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 ids of the NQ item and top-10 ids of the OK-VQA item, at every position."""
    text = model.teacher_forced([prompt(record.loc)], [record.loc_ans], None)
    (loc,) = metrics.top_k_predictions(model.logits(text), text.attention_mask, TEXT_LOC_K)
    question = prompt(multimodal_locality_prompt(record, protocol.mloc_template))
    vision = model.teacher_forced([question], [record.m_loc_a], [imgs["m_loc"]])
    (m_loc,) = metrics.top_k_predictions(model.logits(vision), vision.attention_mask, IMAGE_LOC_K)
    return loc.cpu(), m_loc.cpu()


def _identity(text: str) -> str:
    return text
