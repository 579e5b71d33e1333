"""E-VQA / E-IC / VLKEB JSON files -> :class:`EditRecord` lists, with the benchmarks' skip rules (spec §1).

Everything wrong with a dataset file is reported as a :class:`DataError` naming the file, the
record index and the field, at load time: a bad record found hours into an evaluation job costs
the whole job, found here it costs a second.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .images import UndecodedImage, join_under_resolved, load_rgb

FIELDS = ("src", "pred", "alt", "rephrase", "image", "image_rephrase",
          "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a")
IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")
MLOC_TEMPLATES = {"trainer": "Question: {q} Short answer:", "raw": "{q}"}
#: VLKEB's portability question types (``port_new[i].port_type``); ``hop: N`` selects ``HOPS[N - 1]``.
HOPS = ("1-hop", "2-hop", "3-hop", "4-hop")
#: Skipped ids named in the log line; metrics.json keeps all of them.
LOGGED_SKIPPED_IDS = 20
LOG = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input; message always names file, record index and field."""

    def __init__(self, file: str | os.PathLike, index: int | None, field: str | None, message: str):
        self.file, self.index, self.field, self.message = file, index, field, message
        where = [f"record {index}"] if index is not None else []
        where += [f"field '{field}'"] if field is not None else []
        super().__init__(": ".join([str(file), *([", ".join(where)] if where else []), message]))

    def __reduce__(self):
        # Exceptions pickle as cls(*args); keep the four constructor arguments instead.
        return type(self), (self.file, self.index, self.field, self.message)


@dataclass(frozen=True)
class EditRecord:
    """One edit request; targets already carry the leading space the label mask expects."""

    id: int  # index of the record in the source JSON array (before skipping)
    prompt: str
    pred: str
    target: str
    rephrase: str
    image: str  # relative to ImageRoots.image
    image_rephrase: str  # relative to ImageRoots.rephrase
    loc: str
    loc_ans: str
    m_loc: str  # relative to ImageRoots.image
    m_loc_q: str  # raw question; see multimodal_locality_prompt
    m_loc_a: str
    #: (question, answer with the scoring space) pairs that follow from the edit (VLKEB's
    #: portability), asked on the edit image; empty for E-VQA / E-IC and unselected hops.
    portability: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ImageRoots:
    """Where relative image paths point; rephrased images may live in a separate folder."""

    image: Path
    rephrase: Path | None = None  # None -> same as image

    def __post_init__(self) -> None:
        object.__setattr__(self, "image", Path(self.image))
        if self.rephrase is not None:
            object.__setattr__(self, "rephrase", Path(self.rephrase))

    @classmethod
    def of_dataset(cls, dataset: Mapping[str, Any]) -> ImageRoots:
        """The roots of a config ``datasets:`` entry (``image_root``, optional ``rephrase_image_root``)."""
        rephrase = dataset.get("rephrase_image_root")
        return cls(Path(dataset["image_root"]), Path(rephrase) if rephrase else None)

    def resolve(self, field: str, rel: str) -> Path:
        """Absolute path of image field ``field``'s value ``rel``, refusing escapes from its root.

        Each distinct path is checked once per roots object (one job): loading the records checks
        them all, and the edit loop, which meets a record's images again at every step, only
        looks them up. A refused path is not remembered, so it is refused every time.
        """
        if field not in IMAGE_FIELDS:
            raise ValueError(f"unknown image field {field!r}; expected one of {', '.join(IMAGE_FIELDS)}")
        role = int(field == "image_rephrase")  # image and m_loc live under the image root
        path = self._checked.get((role, rel))
        if path is None:
            path = self._checked[role, rel] = join_under_resolved(self._resolved[role], rel)
        return path

    @functools.cached_property
    def _resolved(self) -> tuple[Path, Path]:
        """The image and rephrase roots, resolved on first use: once per loader, not per image."""
        return self.image.resolve(), (self.rephrase or self.image).resolve()

    @functools.cached_property
    def _checked(self) -> dict[tuple[int, str], Path]:
        """(root, relative path) -> the path :meth:`resolve` checked and returned."""
        return {}

    def key(self, field: str, rel: str) -> str:
        """A name for image field ``field``'s file ``rel`` that does not depend on where the roots
        live (the baseline job that stores an image's features and the jobs that read them may
        run on different machines): the root's role and the relative path. A name only: the
        file is read through :meth:`resolve`, which refuses escapes."""
        if field not in IMAGE_FIELDS:
            raise ValueError(f"unknown image field {field!r}; expected one of {', '.join(IMAGE_FIELDS)}")
        return f"rephrase/{rel}" if field == "image_rephrase" and self.rephrase is not None else f"image/{rel}"


class Records(list):
    """The records of one split (a list), with the ids the skip rules dropped in ``skipped``.

    A dropped record only lowers the table's ``n``; the stages log and record the ids so that a
    smaller table can be traced to the records it lacks.
    """

    def __init__(self, records: list[EditRecord], skipped: tuple[int, ...] = ()):
        super().__init__(records)
        self.skipped = tuple(skipped)


class RecordImages:
    """Loads the three images of a record from their roots (never outside them).

    With ``memo`` > 0 the images of the last ``memo`` records are kept, so a record's images are
    decoded once however many steps (edit, measurement) read them; the same objects come back,
    which also lets the model adapter reuse their pixels and features, and :meth:`key` name them.
    An image whose :meth:`ImageRoots.key` satisfies ``undecoded`` comes back as an
    :class:`~mmke.data.images.UndecodedImage` (its path checked, its pixels not read).
    """

    def __init__(self, roots: ImageRoots, memo: int = 0, undecoded: Callable[[str], bool] | None = None):
        self.roots = roots
        self.memo = memo
        self.undecoded = undecoded
        self._recent: OrderedDict[int, tuple[EditRecord, dict[str, object]]] = OrderedDict()
        self._keys: dict[int, tuple[object, str]] = {}  # id(image) -> (image, ImageRoots.key) of kept records

    def __call__(self, record: EditRecord) -> dict[str, object]:
        entry = self._recent.get(record.id)
        if entry is not None and entry[0] == record:
            self._recent.move_to_end(record.id)
            return dict(entry[1])
        images = {field: self._read(field, getattr(record, field)) for field in IMAGE_FIELDS}
        if self.memo > 0:
            if entry is not None:  # another record under the same id: its images are dropped
                self._forget(self._recent.pop(record.id)[1])
            self._recent[record.id] = (record, images)
            for field, image in images.items():
                self._keys[id(image)] = (image, self.roots.key(field, getattr(record, field)))
            while len(self._recent) > self.memo:
                self._forget(self._recent.popitem(last=False)[1][1])
        return dict(images)

    def _read(self, field: str, rel: str) -> object:
        path = self.roots.resolve(field, rel)
        if self.undecoded is not None and self.undecoded(key := self.roots.key(field, rel)):
            return UndecodedImage(path, key)
        return load_rgb(path)

    def _forget(self, images: dict[str, object]) -> None:
        for image in images.values():
            self._keys.pop(id(image), None)

    def key(self, image: object) -> str | None:
        """The :meth:`ImageRoots.key` of an image this object returned for a record it still
        keeps (identity, not equality), or of any :class:`UndecodedImage`; None otherwise."""
        if isinstance(image, UndecodedImage):
            return image.key
        entry = self._keys.get(id(image))
        return entry[1] if entry is not None and entry[0] is image else None


def multimodal_locality_prompt(record: EditRecord, template: str = "trainer") -> str:
    """The OK-VQA question as a model sees it; EasyEdit's trainer and IKE paths differ (spec §6)."""
    return locality_question(record.m_loc_q, template)


def locality_question(question: str, template: str = "trainer") -> str:
    """A raw multimodal-locality question wrapped in the protocol's template."""
    if template not in MLOC_TEMPLATES:
        raise ValueError(f"unknown multimodal locality template {template!r}; "
                         f"valid: {', '.join(MLOC_TEMPLATES)}")
    return MLOC_TEMPLATES[template].format(q=question)


def load_evqa(path: str | os.PathLike, roots: ImageRoots, size: int | None = None,
              check_images: bool = True) -> Records:
    """E-VQA: drop a record whose ``alt`` or any other string field is empty."""
    return _load(path, roots, size, check_images, keep=lambda row: all(row[f] for f in FIELDS),
                 rule="E-VQA skip rule: an empty field")


def load_eic(path: str | os.PathLike, roots: ImageRoots, size: int | None = None,
             check_images: bool = True) -> Records:
    """E-IC: drop only records with an empty ``alt``."""
    return _load(path, roots, size, check_images, keep=lambda row: bool(row["alt"]),
                 rule="E-IC skip rule: an empty alt")


def load_vlkeb(path: str | os.PathLike, roots: ImageRoots, size: int | None = None,
               check_images: bool = True, hop: int | None = None) -> Records:
    """VLKEB (its ``CaptionDataset``): MMEdit's fields plus ``port_new``, a list of
    ``{"port_type": "1-hop".."4-hop", "Q&A": {"Question": ..., "Answer": ...}}``.

    Like E-IC, a record with an empty ``alt`` is dropped. ``hop=N`` asks the first question of
    type ``N-hop`` of each record as its portability item and drops records that have none, as
    VLKEB's loader does; without ``hop`` (VLKEB's train split) ``port_new`` is checked and unused.
    Questions are used as written, as VLKEB joins ``question + " " + answer``.
    """
    if hop is not None and hop not in range(1, len(HOPS) + 1):
        raise ValueError(f"hop must be one of 1..{len(HOPS)}, got {hop!r}")
    wanted = None if hop is None else HOPS[hop - 1]

    def portability(path: str | os.PathLike, index: int, row: dict) -> tuple[tuple[str, str], ...] | None:
        questions = _port_questions(path, index, row)
        if wanted is None:
            return ()
        chosen = [(q, lead_space(a)) for port_type, q, a in questions if port_type == wanted][:1]
        return tuple(chosen) or None  # None: no question of the selected hop, skip the record

    rule = "VLKEB skip rule: an empty alt" + ("" if wanted is None else f" or no {wanted} portability question")
    return _load(path, roots, size, check_images, keep=lambda row: bool(row["alt"]), rule=rule,
                 portability=portability)


LOADERS: dict[str, Callable[..., Records]] = {"evqa": load_evqa, "eic": load_eic, "vlkeb": load_vlkeb}
#: Dataset kinds whose eval split carries portability questions, selected by the ``hop`` setting.
HOP_KINDS = ("vlkeb",)


def load_records(kind: str, path: str | os.PathLike, roots: ImageRoots, size: int | None = None,
                 check_images: bool = True, hop: int | None = None) -> Records:
    """Dispatch on the dataset kind named in config; ``hop`` only for :data:`HOP_KINDS`."""
    if kind not in LOADERS:
        raise ValueError(f"unknown dataset kind {kind!r}; valid: {', '.join(LOADERS)}")
    if hop is None:
        return LOADERS[kind](path, roots, size=size, check_images=check_images)
    if kind not in HOP_KINDS:
        raise ValueError(f"dataset kind {kind!r} has no portability questions; 'hop' is a setting of "
                         f"{', '.join(HOP_KINDS)} only")
    return LOADERS[kind](path, roots, size=size, check_images=check_images, hop=hop)


#: A kind's portability reader: a record's items, or None to skip the record.
PortabilityOf = Callable[[str | os.PathLike, int, dict], tuple[tuple[str, str], ...] | None]


def _load(path: str | os.PathLike, roots: ImageRoots, size: int | None, check_images: bool,
          keep: Callable[[dict], bool], rule: str, portability: PortabilityOf | None = None) -> Records:
    if size is not None and size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    rows = _read_array(Path(path))
    if size is not None:
        rows = rows[:size]  # before skipping, as EasyEdit slices the annotation list
    checked: set[Path] = set()  # OK-VQA images repeat across records; decode each once
    records, skipped = [], []
    for index, row in enumerate(rows):
        # Structure is checked on every record, skipped or not: a missing field is a broken file.
        if not isinstance(row, dict):
            raise DataError(path, index, None, f"expected a JSON object, got {_json_type(row)}")
        for field in FIELDS:
            if field not in row:
                raise DataError(path, index, field, "missing")
            if not isinstance(row[field], str):
                raise DataError(path, index, field, f"expected a string, got {_json_type(row[field])}")
        ports = () if portability is None else portability(path, index, row)
        if not keep(row) or ports is None:
            skipped.append(index)
            continue
        for field in IMAGE_FIELDS:
            _check_image(path, index, field, roots, row[field], check_images, checked)
        records.append(EditRecord(
            id=index, prompt=row["src"], pred=row["pred"], target=lead_space(row["alt"]),
            rephrase=row["rephrase"], image=row["image"], image_rephrase=row["image_rephrase"],
            loc=row["loc"], loc_ans=lead_space(row["loc_ans"]), m_loc=row["m_loc"],
            m_loc_q=row["m_loc_q"], m_loc_a=lead_space(row["m_loc_a"]), portability=ports,
        ))
    if skipped:
        shown = ", ".join(map(str, skipped[:LOGGED_SKIPPED_IDS])) + (", ..." if len(skipped) > LOGGED_SKIPPED_IDS else "")
        LOG.warning("%s: %d of %d records skipped (%s): ids %s", path, len(skipped), len(rows), rule, shown)
    return Records(records, tuple(skipped))


def _port_questions(path: str | os.PathLike, index: int, row: dict) -> list[tuple[str, str, str]]:
    """``(port_type, question, answer)`` of each entry of a record's ``port_new`` (absent: none)."""
    ports = row.get("port_new", [])
    if not isinstance(ports, list):
        raise DataError(path, index, "port_new", f"expected an array, got {_json_type(ports)}")
    questions = []
    for i, port in enumerate(ports):
        field = f"port_new[{i}]"
        if not isinstance(port, dict):
            raise DataError(path, index, field, f"expected a JSON object, got {_json_type(port)}")
        port_type = port.get("port_type")
        if port_type not in HOPS:
            raise DataError(path, index, f"{field}.port_type",
                            f"expected one of {', '.join(HOPS)}, got {json.dumps(port_type)}")
        qa = port.get("Q&A")
        if not isinstance(qa, dict):
            raise DataError(path, index, f"{field}.Q&A",
                            "missing" if qa is None else f"expected a JSON object, got {_json_type(qa)}")
        for key in ("Question", "Answer"):
            if key not in qa:
                raise DataError(path, index, f"{field}.Q&A.{key}", "missing")
            if not isinstance(qa[key], str) or not qa[key].strip():
                raise DataError(path, index, f"{field}.Q&A.{key}",
                                f"expected a non-empty string, got {json.dumps(qa[key])}")
        questions.append((port_type, qa["Question"], qa["Answer"]))
    return questions


def _read_array(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, None, None, "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(path, None, None, f"cannot read: {err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(path, None, None,
                        f"invalid JSON: {err.msg} (line {err.lineno} column {err.colno})") from None
    if not isinstance(data, list):
        raise DataError(path, None, None, f"top level must be a JSON array, got {_json_type(data)}")
    return data


def _check_image(path: str | os.PathLike, index: int, field: str, roots: ImageRoots, rel: str,
                 decode: bool, checked: set[Path]) -> None:
    """Refuse escapes always (cheap); with ``decode``, also require a decodable file."""
    try:
        image = roots.resolve(field, rel)
    except ValueError as err:
        raise DataError(path, index, field, str(err)) from None
    if not decode or image in checked:
        return
    if not image.is_file():
        raise DataError(path, index, field, f"image file not found: {image}")
    try:
        load_rgb(image)
    except ValueError as err:
        raise DataError(path, index, field, str(err)) from err
    checked.add(image)


def lead_space(text: str) -> str:
    """Targets are scored as prompt + " " + answer tokens (spec §2); keep an existing space."""
    return text if text.startswith(" ") else " " + text


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
