"""Edit metrics with the exact semantics of EasyEdit's multimodal evaluation (spec §3).

Adapters return logits over the full sequence, unshifted: ``logits[:, t]`` predicts the token at
``t + 1``. The shift happens here, once, so every method and model is scored by the same code.
Accuracies read only the argmax ids (``predicted``, ``[B, T]``), so a caller may compute the output
layer at the scored positions alone and leave the rest unset. Locality works on the *full* logits
(all positions, image queries included), because that is what EasyEdit compares; a mask only drops
right padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmke.metric_keys import DEFINITIONS, definition_keys, mean_metrics  # noqa: F401 (re-exported)

IGNORE_INDEX = -100


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair each prediction with the label it predicts: ``logits[:, :-1]`` with ``labels[:, 1:]``
    (``logits`` may also be argmax ids ``[B, T]``)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} are not aligned")
    return logits[:, :-1], labels[:, 1:]


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` mask of the positions whose prediction an accuracy reads (those before a label)."""
    return torch.nn.functional.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1))


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens (labels != -100; EasyEdit's masked ``nll``):
    the loss every edit and meta-training step minimises."""
    pred, gold = shift(logits, labels)
    return torch.nn.functional.cross_entropy(pred.flatten(0, 1), gold.flatten(), ignore_index=IGNORE_INDEX)


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of target tokens predicted correctly, pooled over every token of the batch."""
    pred, gold = shift(logits.argmax(dim=-1), labels)
    mask = gold != IGNORE_INDEX
    if not mask.any():
        raise ValueError("no target token in the batch (every label is -100)")
    return (pred[mask] == gold[mask]).float().mean().item()


def per_item_accuracy(logits: torch.Tensor, labels: torch.Tensor, exact_match: bool) -> torch.Tensor:
    """Accuracy of each item: token accuracy, or 1/0 exact match of every target token."""
    return accuracy_of_ids(logits.argmax(dim=-1), labels, exact_match)


def accuracy_of_ids(predicted: torch.Tensor, labels: torch.Tensor, exact_match: bool) -> torch.Tensor:
    """:func:`per_item_accuracy` from the argmax ids ``[B, T]``; only :func:`scored_positions` are read."""
    return both_accuracies(predicted, labels)["em" if exact_match else "token"]


def both_accuracies(predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per item, exact match (``em``) and token accuracy (``token``) from the argmax ids ``[B, T]``."""
    pred, gold = shift(predicted, labels)
    mask = gold != IGNORE_INDEX
    counts = mask.sum(dim=1)
    if (counts == 0).any():
        raise ValueError(f"items {torch.nonzero(counts == 0).flatten().tolist()} have no target token")
    correct = ((pred == gold) & mask).sum(dim=1)
    return {"em": (correct == counts).float(), "token": correct.float() / counts.float()}


def row_scores(metrics: Sequence[str], predicted: torch.Tensor, labels: torch.Tensor,
               exact_match: bool) -> list[dict[str, float]]:
    """Row ``i`` scored as ``metrics[i]`` from its argmax ids, under both definitions and the headline one.

    The headline key (``rewrite_acc``) holds the definition ``exact_match`` picks, so every reader
    of the headline (tables, training reports, floors) sees the protocol's choice, while the
    ``_em`` and ``_token`` keys always carry both. The values of every row leave the tensors in
    one conversion: a measurement scores many rows, and each ``.item()`` is a call of its own.
    """
    if len(metrics) != labels.shape[0]:
        raise ValueError(f"{len(metrics)} metric names for {labels.shape[0]} items")
    scores = both_accuracies(predicted, labels)
    headline = DEFINITIONS.index("em" if exact_match else "token")
    rows = torch.stack([scores[definition] for definition in DEFINITIONS], dim=1).tolist()
    return [{metric: values[headline], **dict(zip(definition_keys(metric), values))}
            for metric, values in zip(metrics, rows)]


def top_k_predictions(logits: torch.Tensor, attention_mask: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Per item, the top-k token ids ``[T_i, k]`` at every non-padding position."""
    top = top_k_ids(logits, k)
    return [top[i][attention_mask[i].bool()] for i in range(top.shape[0])]


def top_k_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k token ids along the last dimension, best first."""
    return torch.topk(logits.float(), k=k, dim=-1).indices


def locality_agreement(pre: torch.Tensor, post: torch.Tensor) -> float:
    """Fraction of (position, rank) slots where post-edit and pre-edit top-k ids agree.

    Sequences of different length (e.g. IKE prepends demonstrations) are right-aligned, as in
    EasyEdit: the shorter one's positions are compared with the longer one's last positions.
    """
    if pre.dim() != 2 or post.dim() != 2 or pre.shape[1] != post.shape[1]:
        raise ValueError(f"top-k tensors must be [T, k] with the same k, got {tuple(pre.shape)} and {tuple(post.shape)}")
    length = min(pre.shape[0], post.shape[0])
    if length == 0:
        raise ValueError("empty locality sequence")
    return (pre[-length:] == post[-length:]).float().mean().item()
