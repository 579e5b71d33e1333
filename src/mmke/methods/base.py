"""The Editor interface every editing method implements, and the method registry.

An editor turns records into an :class:`Edit`: while the edit is live the model behaves edited,
and ``Edit.revert()`` puts it back exactly. Weight-editing methods snapshot only the parameters
they touch through the adapter; prompt-editing methods (IKE) rewrite the text the model sees, so
an edit also owns the prompt transform the evaluation loop applies.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image

from mmke.data.records import EditRecord, ImageRoots, RecordImages
from mmke.hparams import HParams
from mmke.models.base import VLMAdapter

#: Modules that register the built-in methods; importing one adds its editor to METHODS.
BUILTIN_METHOD_MODULES = (
    "mmke.methods.noedit", "mmke.methods.ft", "mmke.methods.ike",
    "mmke.methods.mend", "mmke.methods.serac", "mmke.methods.ke",
    "mmke.methods.lora", "mmke.methods.grace", "mmke.methods.wise",
)

METHODS: dict[str, type["Editor"]] = {}


class Edit:
    """A live edit. The default is a weight edit restored from an adapter snapshot."""

    #: True for prompt edits (IKE): the weights stay as they are and the edit is a context put in
    #: front of every question. Such an edit has its own pre-edit context (``pre_prompt``), and
    #: several of them cannot accumulate in one model (no sequential mode).
    in_context: ClassVar[bool] = False

    def __init__(self, model: VLMAdapter | None = None, snapshot: Mapping | None = None):
        self._model = model
        self._snapshot = snapshot

    def prompt(self, text: str) -> str:
        """The text the edited model is asked instead of ``text`` (identity for weight edits)."""
        return text

    def pre_prompt(self, text: str) -> str:
        """The text pre-edit scores are taken on, for in-context edits (identity otherwise)."""
        return text

    def measure_rows(self, rows: Sequence[int] | None) -> None:
        """Only ``rows`` of the batches scored next belong to this edit; None: every row.

        The evaluation loop says so when the edits of several records are live at once and
        measured in one batch (methods whose edits leave the weights unchanged). Weight edits and
        prompt edits need nothing here: the weights are shared, the prompt is in the row's text.
        """

    @property
    def live(self) -> bool:
        """Whether the model still holds this weight edit (no :meth:`revert` yet)."""
        return self._snapshot is not None

    def revert(self) -> None:
        if self._model is not None and self._snapshot:
            self._model.restore(dict(self._snapshot))
        self._snapshot = None


class Editor(abc.ABC):
    """One editing method. Reads hyperparameters only from its typed hparams object."""

    name: ClassVar[str]
    hparams_class: ClassVar[type[HParams]] = HParams
    #: True for methods whose edits leave the model's weights as they are (the unedited model, a
    #: prompt, a model beside the frozen one): the edits of several records can then be live at once,
    #: each measured on its own rows of one batch (:meth:`apply_each`, :meth:`Edit.measure_rows`).
    weights_unchanged: ClassVar[bool] = False

    def __init__(self, hparams: HParams):
        if not isinstance(hparams, self.hparams_class):
            raise TypeError(f"{self.name} needs {self.hparams_class.__name__}, got {type(hparams).__name__}")
        self.hparams = hparams
        self._images: RecordImages | None = None

    def bind_images(self, roots: ImageRoots | RecordImages) -> None:
        """Say where the records' images live; the evaluation loop calls this before any edit.

        Records carry image paths relative to their dataset's roots, and an editor that trains on
        the edit item (FT, MEND) needs the pixels. The loop passes its own loader, so a record's
        images are decoded once for the edit and the measurement.
        """
        self._images = roots if isinstance(roots, RecordImages) else RecordImages(roots)

    def images(self, record: EditRecord) -> dict[str, Image.Image]:
        """The record's ``image``, ``image_rephrase`` and ``m_loc`` images."""
        if self._images is None:
            raise RuntimeError(f"{self.name}: call bind_images(roots) before editing")
        return self._images(record)

    def prepare(self, resources: Mapping[str, Path]) -> None:
        """Load what an earlier stage produced (embeddings, meta-network checkpoint)."""

    @abc.abstractmethod
    def apply(self, model: VLMAdapter, records: Sequence[EditRecord]) -> Edit:
        """Edit ``model`` so it gives each record's target; return the handle that undoes it."""

    def single_edits(self, model: VLMAdapter, records: Sequence[EditRecord]) -> Iterator[Edit]:
        """``apply(model, [record])`` for each record in turn, as the single-edit protocol asks for
        them: the caller reverts each edit before it takes the next, so every edit starts from the
        unedited model. A method may take what all of them need from that model at once (MEND's
        and KE's edit gradients: one forward and backward for all the records)."""
        for record in records:
            yield self.apply(model, [record])

    def apply_each(self, model: VLMAdapter, records: Sequence[EditRecord]) -> list[Edit]:
        """One independent edit per record, all live at once: only for :attr:`weights_unchanged`
        methods. Each edit is what ``apply(model, [record])`` gives; a method may share work
        across the records (IKE embeds all queries in one call)."""
        if not self.weights_unchanged:
            raise TypeError(f"{self.name} changes the weights: its edits of several records cannot be live at once")
        return [self.apply(model, [record]) for record in records]

    def session(self, model: VLMAdapter) -> contextlib.AbstractContextManager:
        """Open around a run of edits on ``model`` (the evaluation loop's): what every edit would
        set up and take down again may stay in place between them (LoRA's injected adapters), as
        long as each revert leaves the model computing as before the edit. On exit the model is
        as it was (same module tree, same tensors). Nothing by default."""
        return contextlib.nullcontext()

    def edited_parameters(self, model: VLMAdapter) -> dict[str, torch.nn.Parameter]:
        """The parameters of ``model`` that this method's edits write, or whose layers they wrap
        or hook; none for :attr:`weights_unchanged` methods. Found through
        :meth:`VLMAdapter.editable`, so a scope the model cannot have written (released, or
        stored in int8) is an error here, before any edit."""
        if self.weights_unchanged:
            return {}
        raise NotImplementedError(f"{self.name} changes weights but does not name them (edited_parameters)")

    def keeps_image_features(self, model: VLMAdapter) -> bool:
        """Whether the model's image features stay those of the unedited model under this method's
        edits, so the evaluation loop may compute them once per image
        (:meth:`VLMAdapter.frozen_image_features`): whether all it edits lies downstream of them
        (:meth:`VLMAdapter.downstream_of_features`)."""
        return model.downstream_of_features(self.edited_parameters(model))


def register_method(cls: type[Editor]) -> type[Editor]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Editor]:
    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(module)
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}") from None


def make_editor(hparams: HParams) -> Editor:
    return get_method(hparams.method)(hparams)
