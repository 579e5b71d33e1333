"""Edit-and-measure: the pre-edit baseline of a model on a dataset, and the per-method loop.

Pre-edit outputs depend only on model x dataset, so :func:`run_baseline` computes them once and
every method's :func:`evaluate` reads them (EasyEdit recomputes them per method run). Each record
is measured on the named items of :data:`MEASURED_ITEMS` (spec §3): the edit prompt, its rephrase
and the rephrased image score the target tokens; the NQ question and the OK-VQA question compare
post-edit top-k predictions with the baseline's. A record with a portability question (VLKEB)
scores it as one more item.

No work is done twice: a record's items (and, for methods whose edits leave the weights alone,
the items of ``batch_size`` records) go through the model in one forward, text-only rows beside
image rows; a record's images are decoded and preprocessed once; and while an edit leaves the
image features alone (:meth:`mmke.methods.base.Editor.keeps_image_features`) each image's features
are computed once, or not at all where the baseline job stored them (:mod:`mmke.image_features`).
Every row is the row it would be alone, so the values are those of separate calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from mmke import metrics
from mmke.data.records import (
    IMAGE_FIELDS, EditRecord, ImageRoots, RecordImages, lead_space, multimodal_locality_prompt,
)
from mmke.image_features import StoredImageFeatures
from mmke.io import atomic_path, read_jsonl, read_safetensors, write_jsonl
# The metric names and the summary live in a torch-free module (table and gather jobs read them).
from mmke.metric_keys import (  # noqa: F401 (re-exported)
    DEFINITION_METRICS, EDIT_METRICS, KNOWS_PRED, LOCALITY_METRICS, PORTABILITY_METRIC, PORTABILITY_METRICS,
    RATES, SUMMARY_METRICS, rates, summarize,
)
from mmke.methods.base import Edit, Editor
from mmke.models.base import Batch, VLMAdapter

TEXT_LOC_K = 1  # T-Locality compares top-1 ids (spec §3)
IMAGE_LOC_K = 10  # M-Locality compares top-10 id lists
BASELINE_STAGE = "baseline"  # the workflow rule that writes a Baseline
ALL_RECORDS = "all"  # n_edits: the whole dataset is one sequential group
#: Records measured in one forward by default, for the baseline and methods that leave the weights
#: unchanged (``evaluation.batch_size``). benchmarks/edit_speed.py on the demo's tiny BLIP-2 and
#: LLaVA (base, IKE, SERAC; CPU ms/edit at 1, 4, 8, 16): base 6.1, 3.1, 2.6, 2.5 and 10.5, 6.1,
#: 5.7, 4.6; IKE and SERAC level off from 4. Memory grows with it (the paper config sets 1).
DEFAULT_BATCH_SIZE = 8


def _always(record: EditRecord) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Item:
    """One teacher-forced question a record is measured on (spec §3), named by its records.jsonl key.

    ``top_k`` None: the target tokens are scored (both accuracy definitions). ``top_k`` k: the
    top-k ids at every position are compared with the unedited model's, kept in the Baseline
    field ``baseline``. ``applies`` leaves the item out for records that lack it.
    """

    name: str
    question: Callable[[EditRecord, Protocol], str]
    answer: Callable[[EditRecord], str]
    image: str | None  # which of the record's images ("image", "image_rephrase", "m_loc"); None: text only
    top_k: int | None = None
    baseline: str | None = None
    applies: Callable[[EditRecord], bool] = _always


#: Reliability, text generality, image generality: scored on the new target.
EDIT_ITEMS = (
    Item("rewrite_acc", lambda record, protocol: record.prompt, lambda record: record.target, "image"),
    Item("rephrase_acc", lambda record, protocol: record.rephrase, lambda record: record.target, "image"),
    Item("image_rephrase_acc", lambda record, protocol: record.prompt, lambda record: record.target,
         "image_rephrase"),
)
#: T-Locality (NQ, text only) and M-Locality (OK-VQA): compared with the unedited model.
LOCALITY_ITEMS = (
    Item("locality_acc", lambda record, protocol: record.loc, lambda record: record.loc_ans, None,
         top_k=TEXT_LOC_K, baseline="loc"),
    Item("multimodal_locality_acc", lambda record, protocol: multimodal_locality_prompt(record, protocol.mloc_template),
         lambda record: record.m_loc_a, "m_loc", top_k=IMAGE_LOC_K, baseline="m_loc"),
)
#: VLKEB's portability: a question whose answer follows from the edit, teacher-forced on the edit
#: image with labels on the answer, for records that have one (the loader keeps one per record).
PORTABILITY_ITEM = Item(PORTABILITY_METRIC, lambda record, protocol: record.portability[0][0],
                        lambda record: record.portability[0][1], "image",
                        applies=lambda record: bool(record.portability))
#: What each record is measured on, in records.jsonl order; one more item (its name, question,
#: answer, image) is one more entry here, measured in the same forward.
MEASURED_ITEMS = EDIT_ITEMS + (PORTABILITY_ITEM,) + LOCALITY_ITEMS
# The names the torch-free readers (tables, gather) know these items by (mmke.metric_keys).
if tuple(item.name for item in EDIT_ITEMS) != EDIT_METRICS or PORTABILITY_ITEM.name != PORTABILITY_METRIC \
        or tuple(item.name for item in LOCALITY_ITEMS) != LOCALITY_METRICS:
    raise ImportError("mmke.evaluate's measured items and mmke.metric_keys' metric names disagree")
#: The baseline's extra item: does the unedited model answer the old answer ``pred`` (exact match)?
KNOWS_PRED_ITEM = Item("knows_pred", lambda record, protocol: record.prompt, lambda record: lead_space(record.pred),
                       "image")


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
    ``sequential`` (``n_edits`` edits accumulate, then all of them are measured; ``"all"``: every
    record of the dataset is one group, the lifelong setting).

    Recorded in metrics.json, so sequential figures are never mistaken for single-edit ones.
    """

    mode: str = "single"
    n_edits: int | str = 1

    def __post_init__(self) -> None:
        if self.mode not in ("single", "sequential"):
            raise ValueError(f"evaluation mode must be 'single' or 'sequential', got {self.mode!r}")
        if self.n_edits != ALL_RECORDS and (isinstance(self.n_edits, bool) or not isinstance(self.n_edits, int)):
            raise ValueError(f"evaluation n_edits must be an integer or {ALL_RECORDS!r}, got {self.n_edits!r}")
        if self.n_edits != ALL_RECORDS and self.n_edits < 1:
            raise ValueError(f"evaluation n_edits must be >= 1, got {self.n_edits}")
        if self.mode == "single" and self.n_edits != 1:
            raise ValueError(f"evaluation mode 'single' edits one record at a time; n_edits is {self.n_edits}")

    def group_size(self, n_records: int) -> int:
        """Records per group for a dataset of ``n_records`` (at least 1)."""
        return max(1, n_records) if self.n_edits == ALL_RECORDS else self.n_edits


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
    #: The features of the eval images by image key, when asked for (``run_baseline``); saved apart
    #: (:func:`mmke.image_features.save_image_features`) and not by :meth:`save`.
    image_features: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

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


@dataclasses.dataclass
class Request:
    """Items of one record asked with one prompt transform, under ``edit`` (None: no edit)."""

    record: EditRecord
    images: dict
    items: Sequence[Item]
    prompt: Callable[[str], str]
    edit: Edit | None = None
    #: Per top-k item (by name), how many of its row's last real positions are read; all where
    #: absent. Locality compares right-aligned with the baseline's predictions, so positions
    #: before the baseline's length (an in-context edit's demonstrations) are never compared.
    top_k_tail: Mapping[str, int] = dataclasses.field(default_factory=dict)


@torch.no_grad()
def measure(model: VLMAdapter, protocol: Protocol, requests: Sequence[Request],
            own_rows: bool = False, max_tokens: int | None = None) -> list[dict[str, object]]:
    """Every item of every request in one teacher-forced forward; per request, by item name, the
    item's scores (``{name: ..., name_em: ..., name_token: ...}``) or its top-k ids ``[T, k]``.

    With ``own_rows`` each request's edit is told which rows are its own (edits of several records
    live at once). Rows do not see each other, so the values are those of one call per item. The
    output layer runs only where a value is read: before each scored label, and at every real
    position of a top-k row. With IKE's long contexts and a 32k-150k vocabulary, the full
    ``[B, T, V]`` float32 logits would be most of the memory a measurement takes.

    ``max_tokens``: at most this many token positions (rows x padded width) per forward; the
    requests are then measured in consecutive parts (one request's rows always share one).
    """
    batch, owners = measured_batch(model, protocol, requests)
    # with own_rows every live edit is told its rows, also in a part that holds none of them
    edits = list({id(request.edit): request.edit for request in requests if request.edit is not None}.values())
    if max_tokens is None or len(requests) == 1 or batch.input_ids.numel() <= max_tokens:
        return _measure_batch(model, requests, batch, owners, edits if own_rows else [], protocol)
    results: list[dict[str, object]] = [{} for _ in requests]
    for part in token_parts(batch, owners, len(requests), max_tokens):
        part_requests = [requests[index] for index in part]
        part_results = _measure_batch(model, part_requests, *measured_batch(model, protocol, part_requests),
                                      edits if own_rows else [], protocol)
        for index, result in zip(part, part_results):
            results[index] = result
    return results


def _measure_batch(model: VLMAdapter, requests: Sequence[Request], batch: Batch, owners: Sequence[tuple[int, Item]],
                   edits: Sequence[Edit], protocol: Protocol) -> list[dict[str, object]]:
    """:func:`measure` on one built batch; ``edits`` are told which of its rows are theirs."""
    positions = read_positions(batch, owners, requests)
    for edit in edits:
        edit.measure_rows([row for row, (index, _) in enumerate(owners) if requests[index].edit is edit])
    try:
        logits = model.logits(batch, positions)  # [N, V]: the positions' rows, row-major
    finally:
        for edit in edits:
            edit.measure_rows(None)
    predicted = torch.full_like(batch.labels, -1)
    predicted[positions] = logits.argmax(dim=-1)
    results: list[dict[str, object]] = [{} for _ in requests]
    scored = [row for row, (_, item) in enumerate(owners) if item.top_k is None]
    if scored:  # every request's scored rows at once
        names = [owners[row][1].name for row in scored]
        for row, scores in zip(scored, metrics.row_scores(names, predicted[scored], batch.labels[scored],
                                                          protocol.exact_match)):
            results[owners[row][0]] |= scores
    bounds = [0, *positions.sum(dim=1).cumsum(0).tolist()]  # row r's logits: bounds[r]:bounds[r + 1]
    for row, (index, item) in enumerate(owners):
        if item.top_k is not None:
            results[index][item.name] = metrics.top_k_ids(logits[bounds[row]:bounds[row + 1]], item.top_k).cpu()
    return results


def token_parts(batch: Batch, owners: Sequence[tuple[int, Item]], n_requests: int,
                max_tokens: int) -> list[list[int]]:
    """Request indices in parts whose rows, right-padded to their longest, fill at most
    ``max_tokens`` positions (a request larger than that alone). The requests are taken from the
    shortest longest row up, so that each part pads its rows to a width close to theirs. Rows
    never see each other, so a part's values are those of the whole batch; on a CPU a batch that
    outgrows the caches slows every elementwise op, which long rows (IKE's demonstrations) feel first."""
    rows, width = [0] * n_requests, [0] * n_requests
    for length, (index, _) in zip(batch.attention_mask.sum(dim=1).tolist(), owners):
        rows[index] += 1
        width[index] = max(width[index], length)
    parts: list[list[int]] = [[]]
    count = 0
    for index in sorted(range(n_requests), key=width.__getitem__):  # stable: ties keep their order
        if count and (count + rows[index]) * width[index] > max_tokens:
            parts.append([])
            count = 0
        parts[-1].append(index)
        count += rows[index]
    return parts


def read_positions(batch: Batch, owners: Sequence[tuple[int, Item]], requests: Sequence[Request]) -> torch.Tensor:
    """``[B, T]`` mask of the positions whose logits a measurement reads: the real positions of a
    top-k row (locality compares them; only the last ``Request.top_k_tail`` where it says), the
    positions before a label elsewhere. Rows are right-padded, so a row's real positions come first."""
    device = batch.labels.device
    top_k_rows = torch.tensor([item.top_k is not None for _, item in owners], device=device)
    read = batch.attention_mask.bool()
    tails = [requests[index].top_k_tail.get(item.name) for index, item in owners]
    if any(tail is not None for tail in tails):
        lengths = batch.attention_mask.sum(dim=1).tolist()
        first = torch.tensor([0 if tail is None else max(0, length - tail) for length, tail in zip(lengths, tails)],
                             device=device)
        read = read & (torch.arange(read.shape[1], device=device) >= first[:, None])
    return torch.where(top_k_rows[:, None], read, metrics.scored_positions(batch.labels))


def measured_batch(model: VLMAdapter, protocol: Protocol,
                   requests: Sequence[Request]) -> tuple[Batch, list[tuple[int, Item]]]:
    """The one teacher-forced batch of every applicable item of every request, and per row the
    index of its request and its item."""
    prompts, targets, images, owners = [], [], [], []
    for index, request in enumerate(requests):
        for item in request.items:
            if item.applies(request.record):
                prompts.append(request.prompt(item.question(request.record, protocol)))
                targets.append(item.answer(request.record))
                images.append(None if item.image is None else request.images[item.image])
                owners.append((index, item))
    return model.teacher_forced(prompts, targets, images), owners


def run_baseline(
    model: VLMAdapter, records: Sequence[EditRecord], roots: ImageRoots, protocol: Protocol,
    batch_size: int = DEFAULT_BATCH_SIZE, keep_image_features: bool = False, batch_tokens: int | None = None,
) -> Baseline:
    """Pre-edit accuracies and locality predictions, computed once per model x dataset.

    ``batch_size`` records are measured in one forward, of at most ``batch_tokens`` token
    positions (:func:`measure`; the values depend on neither). With
    ``keep_image_features`` the features the forwards used are kept too, by image key
    (``Baseline.image_features``, for :mod:`mmke.image_features`).
    """
    _check_batch_size(batch_size)
    images = RecordImages(roots)
    baseline = Baseline(protocol, {}, {}, {}, {}, model.target_join)
    progress = tqdm(total=len(records), desc="baseline", unit="record")
    for chunk in _chunks(records, batch_size):
        requests, keys, pictures = [], [], []
        for record in chunk:
            imgs = images(record)
            requests += [Request(record, imgs, MEASURED_ITEMS, _identity),
                         Request(record, imgs, (KNOWS_PRED_ITEM,), _identity)]
            keys += [roots.key(field, getattr(record, field)) for field in imgs]
            pictures += imgs.values()
        kept: dict[int, torch.Tensor] = {}  # id(image) -> its features, when they are kept
        with model.frozen_image_features(lambda image: kept.get(id(image))):
            features = model.prefetch_image_features(pictures)
            if keep_image_features:  # every image encoded once, also when the chunk's exceed the memo
                features = features or _one_record_at_a_time(model, pictures)
                kept.update(zip(map(id, pictures), features))
                for key, feature in zip(keys, features):
                    baseline.image_features.setdefault(key, feature.to("cpu"))
            results = iter(measure(model, protocol, requests, max_tokens=batch_tokens))
        for record in chunk:
            measured, knows = next(results), next(results)
            for item in LOCALITY_ITEMS:
                getattr(baseline, item.baseline)[record.id] = measured.pop(item.name)
            baseline.accuracy[record.id] = measured
            baseline.knows_pred[record.id] = knows[f"{KNOWS_PRED_ITEM.name}_em"]
        progress.update(len(chunk))
    progress.close()
    return baseline


def _one_record_at_a_time(model: VLMAdapter, pictures: list) -> list[torch.Tensor]:
    """The features of a chunk's images when they are more than the memo holds at once."""
    per_record = len(IMAGE_FIELDS)
    return [feature for i in range(0, len(pictures), per_record)
            for feature in model.prefetch_image_features(pictures[i:i + per_record])]


def evaluate(
    model: VLMAdapter,
    editor: Editor,
    records: Sequence[EditRecord],
    roots: ImageRoots,
    baseline: Baseline,
    protocol: Protocol,
    schedule: Schedule = Schedule(),
    batch_size: int = DEFAULT_BATCH_SIZE,
    stored_features: StoredImageFeatures | None = None,
    batch_tokens: int | None = None,
) -> EvalResult:
    """Edit, measure, revert: one record at a time, or ``schedule.n_edits`` records at a time.

    Single mode is the benchmark's protocol. Sequential mode applies the edits of a group one
    after another to the same model and measures every record of the group only after the last
    edit (the final group may be shorter); the edits are reverted newest first, so each snapshot
    puts back exactly what its own edit found.

    ``batch_size`` records are measured in one forward wherever their rows see the same weights:
    in single mode for methods whose edits leave the weights unchanged (their edits of those
    records are live at once, each on its own rows), and within a sequential group. In single
    mode the other methods are handed ``batch_size`` records at a time
    (:meth:`~mmke.methods.base.Editor.single_edits`): MEND and KE take those records' edit
    gradients in one forward and backward. The values do not depend on ``batch_size`` (up to
    the rounding of padded rows, 1e-6 relative, in those gradients), nor on ``batch_tokens``,
    the most token positions of one forward (:func:`measure`). ``stored_features`` (the
    baseline job's, :mod:`mmke.image_features`) stand in for the image encoder while the edits
    leave the features alone. The edits run within the editor's
    :meth:`~mmke.methods.base.Editor.session`, left after the last revert. Timings: ``loop_s``
    covers apply + measure + revert (``edits_per_s`` is records per loop second), ``apply_s``
    only the edits' ``Editor.apply`` (``apply_edits_per_s``).
    """
    if baseline.protocol != protocol:
        raise ValueError(f"baseline was computed with {baseline.protocol}, evaluation uses {protocol}")
    if baseline.target_join != model.target_join:
        raise ValueError(f"baseline was computed with target_join {baseline.target_join!r}, "
                         f"the model joins targets {model.target_join!r} (protocol.target_join)")
    missing = [record.id for record in records if record.id not in baseline.accuracy]
    if missing:
        raise KeyError(f"records {missing} have no baseline entry (baseline of another dataset?)")
    _check_batch_size(batch_size)
    single = schedule.mode == "single"
    together = single and editor.weights_unchanged
    group_size = batch_size if single else schedule.group_size(len(records))
    frozen = editor.keeps_image_features(model)
    images, stored = loop_images(roots, max(group_size, 1), stored_features, frozen)
    editor.bind_images(images)
    rows: list[dict] = []
    seconds = {"loop_s": 0.0, "apply_s": 0.0}
    progress = tqdm(total=len(records), desc=editor.name, unit="edit")
    with _timed(seconds, "loop_s"), editor.session(model):
        for group in _chunks(records, group_size):
            with model.frozen_image_features(stored) if frozen else contextlib.nullcontext():
                model.prefetch_image_features([image for record in group for image in images(record).values()])
                if single and not together:
                    rows += _edit_one_at_a_time(model, editor, group, images, protocol, baseline, batch_tokens,
                                                seconds, progress)
                else:
                    edits: list[Edit] = []
                    try:
                        with _timed(seconds, "apply_s"):
                            if together:
                                edits = editor.apply_each(model, group)
                            else:
                                for record in group:
                                    edits.append(editor.apply(model, [record]))
                                    if edits[-1].in_context:
                                        raise ValueError(f"method {editor.name} edits the prompt, not the weights: its "
                                                         "edits cannot accumulate (use evaluation mode 'single')")
                        pairs = list(zip(group, edits))
                        for chunk in _chunks(pairs, batch_size):
                            rows += _measure(model, chunk, images, protocol, baseline, own_rows=together,
                                             max_tokens=batch_tokens)
                            progress.update(len(chunk))
                    finally:
                        for edit in reversed(edits):
                            edit.revert()
    progress.close()
    timings = {**seconds, **rates(len(rows), seconds)}
    return EvalResult(rows, summarize(rows), timings)


def _edit_one_at_a_time(model: VLMAdapter, editor: Editor, group: Sequence[EditRecord], images: RecordImages,
                        protocol: Protocol, baseline: Baseline, max_tokens: int | None, seconds: dict[str, float],
                        progress: tqdm) -> list[dict]:
    """The single-edit protocol for methods that change the weights: edit a record, measure it,
    revert, next record. The editor is handed the whole group at once
    (:meth:`~mmke.methods.base.Editor.single_edits`), so it may take what every edit needs from
    the unedited model in one batch."""
    rows = []
    with contextlib.closing(editor.single_edits(model, group)) as edits:
        for record in group:
            with _timed(seconds, "apply_s"):
                edit = next(edits)
            try:
                rows += _measure(model, [(record, edit)], images, protocol, baseline, own_rows=False,
                                 max_tokens=max_tokens)
            finally:
                edit.revert()
            progress.update(1)
    return rows


def loop_images(roots: ImageRoots, memo: int, stored_features: StoredImageFeatures | None,
                keeps_features: bool) -> tuple[RecordImages, Callable[[object], torch.Tensor | None] | None]:
    """The edit loop's image loader, and its images' stored features (for
    :meth:`VLMAdapter.frozen_image_features`; None without a store). Where the stored features
    stand in for every image pass (the method keeps them), the images the store knows are left
    undecoded (:meth:`VLMAdapter.stored_features_stand_in`)."""
    stand_in = keeps_features and stored_features is not None
    images = RecordImages(roots, memo=memo, undecoded=stored_features.__contains__ if stand_in else None)
    if stored_features is None:
        return images, None
    return images, lambda image: stored_features.get(images.key(image))


def _measure(model: VLMAdapter, pairs: Sequence[tuple[EditRecord, Edit]], images: RecordImages,
             protocol: Protocol, baseline: Baseline, own_rows: bool, max_tokens: int | None) -> list[dict]:
    """records.jsonl rows: pre- and post-edit values of records under their live edits.

    Pre-edit values come from the baseline, except for in-context edits, whose pre-edit scores
    use the edit's own context (spec §4: IKE's demonstrations followed by the bare question).
    Locality always compares with the baseline's predictions of the unedited, context-free model.
    """
    requests = [request for record, edit in pairs for request in edit_requests(record, images(record), edit, baseline)]
    results = iter(measure(model, protocol, requests, own_rows=own_rows, max_tokens=max_tokens))
    rows = []
    for record, edit in pairs:
        post = next(results)
        pre = next(results) if edit.in_context else baseline.accuracy[record.id]
        for item in LOCALITY_ITEMS:
            post[item.name] = metrics.locality_agreement(getattr(baseline, item.baseline)[record.id], post[item.name])
        rows.append({"id": record.id, "pre": pre, "post": post, "knows_pred": baseline.knows_pred[record.id]})
    return rows


def edit_requests(record: EditRecord, images: dict, edit: Edit, baseline: Baseline) -> list[Request]:
    """What a record is asked under its live edit: every measured item and, for an in-context
    edit, the scored items under its pre-edit context. Only an in-context edit's prompt is longer
    than the baseline's, so only its locality items read just the last positions the baseline's
    predictions cover (:attr:`Request.top_k_tail`); other rows are the baseline's length already."""
    if not edit.in_context:
        return [Request(record, images, MEASURED_ITEMS, edit.prompt, edit)]
    tails = {item.name: len(getattr(baseline, item.baseline)[record.id]) for item in LOCALITY_ITEMS}
    return [Request(record, images, MEASURED_ITEMS, edit.prompt, edit, tails),
            Request(record, images, EDIT_ITEMS + (PORTABILITY_ITEM,), edit.pre_prompt, edit)]


@contextlib.contextmanager
def _timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of the block to ``seconds[key]``."""
    tick = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] += time.perf_counter() - tick


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    return (items[i:i + size] for i in range(0, len(items), size))


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"evaluation batch_size must be >= 1, got {batch_size}")


def _identity(text: str) -> str:
    return text
