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
from safetensors.torch import save_file
from tqdm import tqdm

from mmke import metrics
from mmke.data.records import EditRecord, ImageRoots, RecordImages, lead_space, multimodal_locality_prompt
from mmke.io import atomic_path, read_jsonl, read_safetensors, write_jsonl
# The metric names and the summary live in a torch-free module (table and gather jobs read them).
from mmke.metric_keys import (  # noqa: F401 (re-exported)
    DEFINITION_METRICS, EDIT_METRICS, KNOWS_PRED, LOCALITY_METRICS, SUMMARY_METRICS, summarize,
)
from mmke.methods.base import Edit, Editor
from mmke.models.base import VLMAdapter

TEXT_LOC_K = 1  # T-Locality compares top-1 ids (spec §3)
IMAGE_LOC_K = 10  # M-Locality compares top-10 id lists
BASELINE_STAGE = "baseline"  # the workflow rule that writes a Baseline


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Evaluation choices that must be equal across methods for a table to be comparable.

    ``exact_match`` picks the headline definition only: both are always computed and kept.
    ``target_join`` maps a model family to the target convention that replaces the family's
    default (:data:`mmke.models.base.TARGET_JOINS`); the adapter applies it, so it is given to
    :func:`mmke.models.base.load_model`, and the baseline records the one it was built with.
    """

    exact_match: bool = True
    mloc_template: str = "trainer"
    target_join: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How edits meet the model: ``single`` (revert after each record, the benchmark) or
    ``sequential`` (``n_edits`` edits accumulate, then all of them are measured).

    Recorded in metrics.json, so sequential figures are never mistaken for single-edit ones.
    """

    mode: str = "single"
    n_edits: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("single", "sequential"):
            raise ValueError(f"evaluation mode must be 'single' or 'sequential', got {self.mode!r}")
        if self.n_edits < 1:
            raise ValueError(f"evaluation n_edits must be >= 1, got {self.n_edits}")
        if self.mode == "single" and self.n_edits != 1:
            raise ValueError(f"evaluation mode 'single' edits one record at a time; n_edits is {self.n_edits}")


@dataclasses.dataclass
class Baseline:
    """Pre-edit accuracies and locality predictions of one model on one dataset.

    ``knows_pred`` is 1.0 for a record whose unedited model answers its ``pred`` (exact match on
    the edit prompt + edit image): the table's ``pre`` column, which says whether the edits change
    facts the model knew. ``target_join`` is the adapter's target convention the items were built
    with; evaluating under another one would compare different token sequences.
    """

    protocol: Protocol
    accuracy: dict[int, dict[str, float]]
    loc: dict[int, torch.Tensor]
    m_loc: dict[int, torch.Tensor]
    knows_pred: dict[int, float] = dataclasses.field(default_factory=dict)
    target_join: str = "space"

    def save(self, rows_path: str | Path, tensors_path: str | Path) -> None:
        write_jsonl(rows_path, ({"id": i, **acc, "knows_pred": self.knows_pred[i]}
                                for i, acc in sorted(self.accuracy.items())))
        tensors = {f"loc.{i}": t.contiguous() for i, t in self.loc.items()}
        tensors |= {f"m_loc.{i}": t.contiguous() for i, t in self.m_loc.items()}
        meta = {"protocol": json.dumps(dataclasses.asdict(self.protocol), sort_keys=True),
                "target_join": self.target_join}
        with atomic_path(tensors_path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, rows_path: str | Path, tensors_path: str | Path) -> "Baseline":
        meta, tensors = read_safetensors(tensors_path, BASELINE_STAGE)
        if "target_join" not in meta:
            raise ValueError(f"{tensors_path}: written by an older mmke (no target_join); "
                             f"rerun the {BASELINE_STAGE} stage (snakemake --forcerun {BASELINE_STAGE})")
        rows = read_jsonl(rows_path)
        if any("knows_pred" not in row for row in rows):
            raise ValueError(f"{rows_path}: written by an older mmke (no knows_pred); "
                             f"rerun the {BASELINE_STAGE} stage (snakemake --forcerun {BASELINE_STAGE})")
        knows_pred = {int(row["id"]): float(row.pop("knows_pred")) for row in rows}
        accuracy = {int(row.pop("id")): row for row in rows}
        split = {"loc": {}, "m_loc": {}}
        for key, value in tensors.items():
            kind, index = key.rsplit(".", 1)
            split[kind][int(index)] = value
        return cls(Protocol(**json.loads(meta["protocol"])), accuracy, split["loc"], split["m_loc"],
                   knows_pred, meta["target_join"])


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
    baseline = Baseline(protocol, {}, {}, {}, {}, model.target_join)
    for record in tqdm(records, desc="baseline", unit="record"):
        imgs = images(record)
        baseline.accuracy[record.id] = _edit_accuracies(model, record, imgs, protocol, _identity)
        baseline.loc[record.id], baseline.m_loc[record.id] = _locality_predictions(
            model, record, imgs, protocol, _identity
        )
        baseline.knows_pred[record.id] = _knows_pred(model, record, imgs)
    return baseline


def evaluate(
    model: VLMAdapter,
    editor: Editor,
    records: Sequence[EditRecord],
    roots: ImageRoots,
    baseline: Baseline,
    protocol: Protocol,
    schedule: Schedule = Schedule(),
) -> EvalResult:
    """Edit, measure, revert: one record at a time, or ``schedule.n_edits`` records at a time.

    Single mode is the benchmark's protocol. Sequential mode applies the edits of a group one
    after another to the same model and measures every record of the group only after the last
    edit (the final group may be shorter); the edits are reverted newest first, so each snapshot
    puts back exactly what its own edit found.
    """
    if baseline.protocol != protocol:
        raise ValueError(f"baseline was computed with {baseline.protocol}, evaluation uses {protocol}")
    if baseline.target_join != model.target_join:
        raise ValueError(f"baseline was computed with target_join {baseline.target_join!r}, "
                         f"the model joins targets {model.target_join!r} (protocol.target_join)")
    missing = [record.id for record in records if record.id not in baseline.accuracy]
    if missing:
        raise KeyError(f"records {missing} have no baseline entry (baseline of another dataset?)")
    images = RecordImages(roots)
    editor.bind_images(roots)
    rows: list[dict] = []
    edit_seconds = 0.0
    start = time.perf_counter()
    size = schedule.n_edits
    progress = tqdm(total=len(records), desc=editor.name, unit="edit")
    for group in (records[i:i + size] for i in range(0, len(records), size)):
        edits: list[Edit] = []
        try:
            for record in group:
                tick = time.perf_counter()
                edits.append(editor.apply(model, [record]))
                edit_seconds += time.perf_counter() - tick
                if schedule.mode == "sequential" and edits[-1].in_context:
                    raise ValueError(f"method {editor.name} edits the prompt, not the weights: "
                                     "its edits cannot accumulate (use evaluation mode 'single')")
            for record, edit in zip(group, edits):
                rows.append(_measure(model, record, images(record), protocol, edit, baseline))
                progress.update()
        finally:
            for edit in reversed(edits):
                edit.revert()
    progress.close()
    total = time.perf_counter() - start
    summary = summarize(rows)
    timings = {
        "total_s": total,
        "edit_s": edit_seconds,
        "edits_per_s": len(rows) / edit_seconds if edit_seconds > 0 else float("inf"),
    }
    return EvalResult(rows, summary, timings)


def _measure(
    model: VLMAdapter, record: EditRecord, imgs: dict, protocol: Protocol, edit: Edit, baseline: Baseline
) -> dict:
    """One records.jsonl row: pre- and post-edit values of a record under a live edit.

    Pre-edit values come from the baseline, except for in-context edits, whose pre-edit scores
    use the edit's own context (spec §4: IKE's demonstrations followed by the bare question).
    Locality always compares with the baseline's predictions of the unedited, context-free model.
    """
    if edit.in_context:
        pre = _edit_accuracies(model, record, imgs, protocol, edit.pre_prompt)
    else:
        pre = baseline.accuracy[record.id]
    post = _edit_accuracies(model, record, imgs, protocol, edit.prompt)
    loc, m_loc = _locality_predictions(model, record, imgs, protocol, edit.prompt)
    post["locality_acc"] = metrics.locality_agreement(baseline.loc[record.id], loc)
    post["multimodal_locality_acc"] = metrics.locality_agreement(baseline.m_loc[record.id], m_loc)
    return {"id": record.id, "pre": pre, "post": post, "knows_pred": baseline.knows_pred[record.id]}


@torch.no_grad()
def _edit_accuracies(
    model: VLMAdapter, record: EditRecord, imgs: dict, protocol: Protocol, prompt: Callable[[str], str]
) -> dict[str, float]:
    """Reliability, text generality and image generality in one batch of three items.

    Each under both accuracy definitions and the protocol's headline (:func:`mmke.metrics.item_scores`).
    """
    batch = model.teacher_forced(
        [prompt(record.prompt), prompt(record.rephrase), prompt(record.prompt)],
        [record.target] * 3,
        [imgs["image"], imgs["image"], imgs["image_rephrase"]],
    )
    return metrics.item_scores(EDIT_METRICS, model.logits(batch), batch.labels, protocol.exact_match)


@torch.no_grad()
def _knows_pred(model: VLMAdapter, record: EditRecord, imgs: dict) -> float:
    """1.0 if the model answers the record's old answer ``pred`` exactly (edit prompt + image)."""
    batch = model.teacher_forced([record.prompt], [lead_space(record.pred)], [imgs["image"]])
    return metrics.per_item_accuracy(model.logits(batch), batch.labels, exact_match=True).item()


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
