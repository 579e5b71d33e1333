"""What the lifelong editors (LoRA, GRACE, WISE) share: a memory that edits accumulate in.

These methods do not overwrite the model's weights. Each keeps its edits in a memory beside the
model (LoRA's adapter matrices, GRACE's codebook, WISE's side memory) that the first edit installs
and later edits extend. In the sequential schedule the evaluation loop applies N edits and then
reverts them newest first; so each :class:`MemoryEdit` remembers the memory's state it found and
puts exactly that back, and the revert that empties the memory removes it again, leaving the model
as loaded (same module tree, same tensors). The evaluation loop needs no special case for them,
beyond opening the editor's session, in which a memory that is costly to install (LoRA's peft
adapters) stays, emptied, for the next edit.

Hooks that must know where a row's prompt ends or which positions are padding (GRACE's key
token, WISE's activation distances) read the batch being scored from a :class:`BatchTap`.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch

from mmke.data.records import EditRecord
from mmke.hparams import HParams
from mmke.methods.base import Edit, Editor
from mmke.models.base import IGNORE_INDEX, Batch, VLMAdapter


class Memory(abc.ABC):
    """The edits of one editor on one model. ``state`` must be a value later edits never mutate."""

    edits: int = 0  # edits the memory holds
    #: Whether, within :meth:`LifelongEditor.session`, the memory stays installed when its edits
    #: are reverted, emptied instead of removed (its empty state computes as the model alone).
    #: Worth it where installing costs more than a few hooks: peft's injection walks the module tree.
    kept_between_edits: ClassVar[bool] = False

    @abc.abstractmethod
    def state(self) -> Any:
        """What :meth:`load` needs to return the memory to this moment."""

    @abc.abstractmethod
    def load(self, state: Any) -> None:
        """Go back to a state taken by :meth:`state`."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Take the memory out of the model: the model is as it was before the first edit."""


class HookedMemory(Memory):
    """A memory consulted by a forward hook on one Linear layer (GRACE's codebook, WISE's side memory).

    ``book`` is everything the edits taught it, a value that is replaced, never mutated, so that it
    is the memory's state as it stands; the hook reads the batch being scored from a :class:`BatchTap`.
    While an edit trains, ``training`` holds the tensor it optimises, which the hook uses instead.
    """

    def __init__(self, model: VLMAdapter, layer: torch.nn.Linear, book: Any):
        self.layer, self.book, self.edits = layer, book, 0
        self.training: torch.Tensor | None = None
        self.tap = BatchTap(model)
        self.handle = layer.register_forward_hook(self.hook)

    def state(self) -> tuple[Any, int]:
        return self.book, self.edits

    def load(self, state: tuple[Any, int]) -> None:
        self.book, self.edits = state

    def remove(self) -> None:
        self.handle.remove()
        self.tap.remove()

    @abc.abstractmethod
    def hook(self, module: torch.nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """The layer's output as the memory makes it (``output`` itself where it has nothing to say)."""


class MemoryEdit(Edit):
    """A live edit of a lifelong editor; ``revert`` puts back the memory it found, and removes
    the memory once it holds no edit (unless a session keeps it, :meth:`LifelongEditor.keeps`)."""

    def __init__(self, editor: "LifelongEditor", memory: Memory, found: Any):
        super().__init__()
        self._editor, self._memory, self._found = editor, memory, found
        self._index = memory.edits  # the memory's edit count while this edit is the newest

    def revert(self) -> None:
        if self._memory is None:
            return
        if self._memory.edits != self._index:
            raise RuntimeError(f"{self._editor.name}: edits must be reverted newest first "
                               f"(this is edit {self._index} of {self._memory.edits})")
        self._memory.load(self._found)
        if self._memory.edits == 0 and not self._editor.keeps(self._memory):
            self._memory.remove()
            self._editor.forget(self._memory)
        self._memory = None


class LifelongEditor(Editor):
    """An editor whose edits accumulate in a :class:`Memory` while they are live."""

    def __init__(self, hparams: HParams):
        super().__init__(hparams)
        self._memories: dict[int, Memory] = {}
        self._sessions: set[int] = set()  # id of each model with an open session

    @abc.abstractmethod
    def scopes(self) -> list[str]:
        """The adapter scopes whose layers the memory wraps or hooks."""

    def edited_parameters(self, model: VLMAdapter) -> dict[str, torch.nn.Parameter]:
        """The model parameters whose layers the memory wraps or hooks (never written)."""
        return {name: param for scope in self.scopes() for name, param in model.editable(scope).items()}

    @abc.abstractmethod
    def install(self, model: VLMAdapter) -> Memory:
        """Put an empty memory into ``model``."""

    @abc.abstractmethod
    def edit(self, memory: Memory, model: VLMAdapter, record: EditRecord) -> None:
        """Add one record's edit to ``memory``; must leave ``memory.edits`` one higher."""

    def apply(self, model: VLMAdapter, records: Sequence[EditRecord]) -> Edit:
        memory = self._memories.get(id(model))
        if memory is None:
            memory = self._memories[id(model)] = self.install(model)
        found = memory.state()
        try:
            for record in records:
                self.edit(memory, model, record)
        except BaseException:
            MemoryEdit(self, memory, found).revert()
            raise
        return MemoryEdit(self, memory, found)

    def forget(self, memory: Memory) -> None:
        self._memories = {key: value for key, value in self._memories.items() if value is not memory}

    @contextlib.contextmanager
    def session(self, model: VLMAdapter) -> Iterator[None]:
        """While open, a memory that is :attr:`Memory.kept_between_edits` is installed by the first
        edit only; reverting every edit empties it. On exit an empty memory is removed (one whose
        edits are still live is removed by reverting them, as outside a session)."""
        self._sessions.add(id(model))
        try:
            yield
        finally:
            self._sessions.discard(id(model))
            memory = self._memories.get(id(model))
            if memory is not None and memory.edits == 0:
                memory.remove()
                self.forget(memory)

    def keeps(self, memory: Memory) -> bool:
        """Whether ``memory`` stays installed when its last edit is reverted (an open session)."""
        return memory.kept_between_edits and any(self._memories.get(key) is memory for key in self._sessions)


class BatchTap:
    """While installed, the batch ``model.logits`` is scoring is ``tap.batch`` (None outside).

    Forward hooks inside the model see tensors, not the batch they came from; wrapping the
    adapter's ``logits`` on the instance gives them its labels and attention mask.
    """

    def __init__(self, model: VLMAdapter):
        self.model = model
        self.batch: Batch | None = None
        self._logits: Callable = model.logits
        self._installed = model.__dict__.get("logits")  # an instance's own logits, put back on removal

        def logits(batch: Batch, *args, **kwargs) -> torch.Tensor:
            outer, self.batch = self.batch, batch
            try:
                return self._logits(batch, *args, **kwargs)
            finally:
                self.batch = outer

        model.logits = logits

    def current(self, who: str) -> Batch:
        if self.batch is None:
            raise RuntimeError(f"{who}: the model was run outside the adapter's logits(batch); "
                               "the edit needs the batch to find each row's tokens")
        return self.batch

    def remove(self) -> None:
        if self._installed is None:
            del self.model.logits  # the class's method again
        else:
            self.model.logits = self._installed


def by_row(batch: Batch, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as [B, T, width]: OPT runs its MLP on the batch flattened to [B * T, width]."""
    return tensor.view(*batch.attention_mask.shape, tensor.shape[-1])


def key_positions(batch: Batch) -> torch.Tensor:
    """Per row, the last prompt token: the position before the first labelled one.

    Its output predicts the answer's first token (EasyEdit's GRACE key token). A row without
    labels uses its last real token (rows are right-padded).
    """
    labelled = batch.labels != IGNORE_INDEX
    first = labelled.int().argmax(dim=1)
    last_real = batch.attention_mask.sum(dim=1) - 1
    return torch.where(labelled.any(dim=1), first - 1, last_real)


def scope_module(model: VLMAdapter, scope: str, who: str) -> tuple[str, torch.nn.Linear]:
    """The one Linear module whose weight is ``scope``'s only parameter (its name without ``.weight``)."""
    names = list(model.editable(scope))
    if len(names) != 1 or not names[0].endswith(".weight"):
        raise ValueError(f"{who}: scope {scope!r} must hold exactly one weight matrix, got {names}")
    path = names[0].removesuffix(".weight")
    module = model.model.get_submodule(path)
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"{who}: scope {scope!r} is {type(module).__name__} {path}, not a Linear layer")
    return path, module


def scope_modules(model: VLMAdapter, scopes: Sequence[str], who: str) -> list[str]:
    """Module paths of every weight matrix of ``scopes`` (each parameter's name without ``.weight``)."""
    paths: list[str] = []
    for scope in scopes:
        for name in model.editable(scope):
            if not name.endswith(".weight"):
                raise ValueError(f"{who}: scope {scope!r} holds {name}, not a weight matrix")
            paths.append(name.removesuffix(".weight"))
    if not paths:
        raise ValueError(f"{who}: scopes {list(scopes)} hold no weight")
    return list(dict.fromkeys(paths))


def unfreeze(model: VLMAdapter, flags: dict[str, bool]) -> None:
    """Put back the ``requires_grad`` flags recorded by name (before peft froze the base model)."""
    for name, p in model.model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])
