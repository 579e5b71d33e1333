"""What the meta-learned editors (MEND, KE, SERAC) share: training hparams and checkpoint loading,
plus the weight-delta mechanics of MEND and KE.

A meta editor owns a ``network`` built against the loaded model (its shapes depend on the
edited layers). At evaluation ``prepare`` reads the pretrain stage's checkpoint and the network
is built lazily on the first ``apply``, because the evaluate stage prepares the editor before it
loads the model. MEND and KE both turn the gradient of the edit loss into a weight change
``delta`` per edited matrix; training evaluates the model at ``W - delta`` functionally (so the
loss reaches the network), editing writes ``W - delta`` in place after a snapshot.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import torch

from mmke.data.records import EditRecord
from mmke.hparams import HParams
from mmke.methods.base import Edit, Editor
from mmke.models.base import Batch, VLMAdapter
from mmke.metrics import target_nll
from mmke.train import TrainBatch, edit_item, load_checkpoint


#: An edit loss's gradient by edited weight name, as the factors ``(x, delta)`` of ``grad W = delta^T x``
#: (:func:`edit_loss_factors`).
GradientFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class MetaHParams(HParams):
    """Meta-training schedule and loss weights (spec §4), common to MEND, SERAC and KE."""

    lr: float = 1e-5
    cedit: float = 0.1
    iedit: float = 0.1
    cloc: float = 1.0
    grad_clip: float = 100.0
    accumulate_bs: int = 2
    batch_size: int = 1
    max_iters: int = 30000
    val_interval: int = 5000
    early_stop_patience: int = 20000
    val_fraction: float = 0.1  # tail of the training split held out for validation
    seed: int = 42

    def __post_init__(self) -> None:
        for name in ("accumulate_bs", "batch_size", "max_iters", "val_interval", "early_stop_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"hparams field '{name}' must be >= 1, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"hparams field 'val_fraction' must be in (0, 1), got {self.val_fraction}")


class MetaEditor(Editor, abc.ABC):
    """An editor with a trained network: built against a model, loaded from a checkpoint."""

    hparams_class = MetaHParams

    def __init__(self, hparams: MetaHParams):
        super().__init__(hparams)
        self.network: torch.nn.Module | None = None
        self._checkpoint: tuple[Path, dict[str, torch.Tensor]] | None = None

    def prepare(self, resources: Mapping[str, Path]) -> None:
        """Read the pretrain stage's ``checkpoint`` (refused if trained with other hparams)."""
        if "checkpoint" not in resources:
            raise ValueError(f"{self.name} needs a trained checkpoint (resource 'checkpoint'); "
                             f"got resources {sorted(resources)}")
        path = Path(resources["checkpoint"])
        self._checkpoint = (path, load_checkpoint(path, self.hparams))
        self.network = None

    def build(self, model: VLMAdapter) -> torch.nn.Module:
        """A fresh (untrained) network for ``model``, on its device; also what training starts from."""
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(self.hparams.seed)
            self.network = self.make_network(model).to(model.device)
        return self.network

    def ready(self, model: VLMAdapter) -> torch.nn.Module:
        """The trained network for ``model``: built on first use and filled from the checkpoint."""
        if self.network is None:
            if self._checkpoint is None:
                raise RuntimeError(f"{self.name}: call prepare() with a checkpoint (or train) before editing")
            path, tensors = self._checkpoint
            network = self.build(model)
            try:
                network.load_state_dict(tensors)
            except RuntimeError as err:
                raise ValueError(f"{path}: checkpoint does not fit this model's edited layers: {err}") from err
            network.eval()
        return self.network

    @abc.abstractmethod
    def make_network(self, model: VLMAdapter) -> torch.nn.Module:
        """The method's trainable modules for ``model`` (shapes follow its edited parameters)."""

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.network.parameters() if p.requires_grad], "lr": self.hparams.lr}]

    def auxiliary_loss(self, model: VLMAdapter, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Method-specific loss terms by name, as added to the total (called with the edit live)."""
        return {}

    def auxiliary_accuracies(self, batch: TrainBatch) -> dict[str, list[float]]:
        """Method-specific training-time accuracies by name, one value per record of ``batch``."""
        return {}

    @abc.abstractmethod
    def training_edit(self, model: VLMAdapter, batch: TrainBatch) -> contextlib.AbstractContextManager:
        """Context in which ``model.logits`` is the edited model's, differentiable in the network."""


class WeightDeltaEditor(MetaEditor, abc.ABC):
    """MEND and KE: the network maps the edit loss's gradient to a change of the edited weights."""

    def edited_parameters(self, model: VLMAdapter) -> dict[str, torch.nn.Parameter]:
        return model.editable(self.hparams.scope)

    @abc.abstractmethod
    def deltas(self, model: VLMAdapter, records: Sequence[EditRecord],
               gradients: GradientFactors) -> Iterator[tuple[str, torch.Tensor | RowwiseDelta]]:
        """(edited parameter name, weight change) pairs of the edit of ``records``; the edited
        weight is ``W - delta``.

        ``gradients`` is the edit loss's gradient, factored as :func:`edit_loss_factors` gives it;
        each entry is popped when its change is made, so a caller may write each change as it
        comes: at most one full-size change (a 45M-entry float32 matrix on a 7B model) is alive at
        a time. Without grad a change may come as a :class:`RowwiseDelta`.
        """

    def training_edit(self, model: VLMAdapter, batch: TrainBatch) -> contextlib.AbstractContextManager:
        params = self.edited_parameters(model)
        gradients = edit_loss_factors(model, batch.edit.batch, self.network.names)[0]
        return swapped_parameters(model.model, {
            name: delta.subtracted_from(params[name].detach()) if isinstance(delta, RowwiseDelta)
            else params[name].detach() - delta for name, delta in self.deltas(model, batch.records, gradients)})

    def apply(self, model: VLMAdapter, records: Sequence[EditRecord]) -> Edit:
        """Snapshot the edited weights, then write ``W - delta`` in place (one step, no training)."""
        return self._write(model, records, self._gradients(model, records)[0])

    def single_edits(self, model: VLMAdapter, records: Sequence[EditRecord]) -> Iterator[Edit]:
        """Every record's gradient comes from one forward and backward over all of their edit
        items, each row's of its own loss: the unedited model's, which the caller restores
        between the edits (checked). The rows are padded to one length, so a gradient may differ
        from the one-record batch's by the rounding of its forward (1e-6 relative on the tiny
        models); ``evaluation.batch_size: 1`` takes one record's at a time."""
        previous: Edit | None = None
        for record, gradients in zip(records, self._gradients(model, records, per_row=True)):
            if previous is not None and previous.live:
                raise RuntimeError(f"{self.name}: revert each single edit before asking for the next "
                                   "(its gradient is the unedited model's)")
            previous = self._write(model, [record], gradients)
            yield previous

    def _gradients(self, model: VLMAdapter, records: Sequence[EditRecord],
                   per_row: bool = False) -> list[GradientFactors]:
        """The edit loss's gradient on the records' edit items (:func:`edit_loss_factors`)."""
        self.ready(model)
        edit = edit_item(model, records, [self.images(r)["image"] for r in records])
        return edit_loss_factors(model, edit.batch, self.network.names, per_row)

    def _write(self, model: VLMAdapter, records: Sequence[EditRecord], gradients: GradientFactors) -> Edit:
        """Write each change as :meth:`deltas` makes it; a failure part way puts back the changes
        already written."""
        params = self.edited_parameters(model)
        snapshot = model.snapshot(params)
        with model.restored_on_failure(snapshot), torch.no_grad():
            for name, delta in self.deltas(model, records, gradients):
                subtract_in_place(params[name], delta)
        return Edit(model, snapshot)


def subtract_in_place(weight: torch.Tensor, delta: torch.Tensor | RowwiseDelta) -> None:
    """``weight -= delta`` in the weight's dtype: how an edit writes a change of :meth:`WeightDeltaEditor.deltas`."""
    if isinstance(delta, RowwiseDelta):
        delta.subtract_from(weight)
    else:
        weight.sub_(delta.to(weight.dtype))


@dataclasses.dataclass(frozen=True)
class RowwiseDelta:
    """A weight change whose rows are computed each from the same rows of its inputs (KE's gated
    gradient): an edit subtracts it a block of rows at a time, never holding it whole.

    On a CPU each block stays in cache while it is computed, cast and subtracted: on OPT-2.7b's
    2560 x 10240 matrices that is a quarter of the time of the same operations on whole float32
    matrices, which miss the cache at every step. The same operations on the same elements, so
    the same bits. On an accelerator one block is the whole matrix: there launches cost more.
    Write it once: a block may be computed in place in its inputs (KE's float32 gradient).
    """

    rows: int
    block: Callable[[slice], torch.Tensor]  # the change of the given rows

    #: Elements per block on a CPU: 256 KiB of float32, well inside a core's L2 cache.
    CPU_BLOCK_ELEMENTS: ClassVar[int] = 1 << 16

    def subtract_from(self, weight: torch.Tensor) -> None:
        """``weight -= change``, in the weight's dtype (as ``weight.sub_(change.to(weight.dtype))``)."""
        for part in self._parts(weight):
            weight[part].sub_(self.block(part).to(weight.dtype))

    def subtracted_from(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight - change`` as a new tensor, in the dtype the subtraction promotes to: what
        :meth:`WeightDeltaEditor.training_edit` swaps in when called without grad (scoring a network)."""
        return torch.cat([weight[part] - self.block(part) for part in self._parts(weight)])

    def _parts(self, weight: torch.Tensor) -> Iterator[slice]:
        step = max(1, self.CPU_BLOCK_ELEMENTS // max(1, weight[0].numel())) if weight.device.type == "cpu" else self.rows
        return (slice(start, min(start + step, self.rows)) for start in range(0, self.rows, step))


@contextlib.contextmanager
def swapped_parameters(module: torch.nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Let ``module`` compute with plain tensors in place of the named parameters, then put them back.

    The tensors may carry a graph (``W - delta(network)``), so losses of the edited model
    backpropagate into the network. They shadow the parameters as instance attributes, which
    Python finds before ``Module.__getattr__`` looks in ``_parameters``; the Parameter objects
    and their registration order stay untouched.
    """
    owners = []
    try:
        for name, value in values.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            owner.__dict__[leaf] = value
            owners.append((owner, leaf))
        yield
    finally:
        for owner, leaf in owners:
            del owner.__dict__[leaf]


def edit_loss_factors(model: VLMAdapter, batch: Batch, names: Sequence[str],
                      per_row: bool = False) -> list[GradientFactors]:
    """The edit item's target-NLL gradient for each named Linear weight, as constants and as the
    two factors it is the product of: the layer's inputs ``x`` [N, in] and its outputs' gradients
    ``delta`` [N, out] at the real (unpadded) positions, so that ``grad W = delta^T x`` (MEND
    transforms the factors, KE takes the product).

    One loss, the whole batch's, gives one dict: a multi-record edit's or a training step's.
    ``per_row``: each row's own loss (its mean over its target tokens, as a batch of that row
    alone), one dict per row: the gradients of several records' separate edits from one forward
    and backward, since no row's loss depends on another row.
    """
    params = model.named_parameters()  # the adapter's dict, built once (no module-tree walk per edit)
    inputs, outputs = {}, {}
    with torch.enable_grad(), model.trainable_only(params[name] for name in names), contextlib.ExitStack() as stack:
        for name in names:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.model.get_submodule(owner_name)
            if not isinstance(owner, torch.nn.Linear) or leaf != "weight":
                raise ValueError(f"{name}: the edit gradient's factors need a Linear weight, "
                                 f"got {type(owner).__name__}.{leaf}")

            def hook(module, args, output, name=name):
                inputs[name], outputs[name] = args[0].detach(), output

            stack.enter_context(owner.register_forward_hook(hook))
        logits = model.logits(batch)
        if per_row:  # the sum of the rows' own means: a row's gradient is that of its loss alone
            loss = sum(target_nll(logits[row:row + 1], batch.labels[row:row + 1]) for row in range(len(logits)))
        else:
            loss = target_nll(logits, batch.labels)
        grads = torch.autograd.grad(loss, [outputs[name] for name in names])
    real = batch.attention_mask.bool()  # [B, T]
    factors = {name: (inputs[name].reshape(*real.shape, -1), grad.reshape(*real.shape, -1))
               for name, grad in zip(names, grads)}
    if not per_row:
        return [{name: (x[real], delta[real]) for name, (x, delta) in factors.items()}]
    return [{name: (x[row][real[row]], delta[row][real[row]]) for name, (x, delta) in factors.items()}
            for row in range(len(real))]
