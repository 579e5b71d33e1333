"""KE, KnowledgeEditor (De Cao et al., 2021): a hypernetwork conditioned on the edit's text.

A bidirectional LSTM reads the edit (prompt + new target) through the base model's own, frozen
token embeddings; from its summary each edited weight ``W`` [out, in] gets rank-1 gates
``A = softmax(a_out) a_in^T`` and ``B = softmax(b_out) b_in^T`` and a scale ``s``, and the edit is
``W - max_scale * sigmoid(s) * (grad W * A + B)``, where ``grad W`` is the gradient of the edit
prompt's target NLL. As in MEND, the network only sees the gradient as a constant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from mmke.data.records import EditRecord
from mmke.methods.base import register_method
from mmke.methods.meta import GradientFactors, MetaHParams, RowwiseDelta, WeightDeltaEditor
from mmke.models.base import VLMAdapter


@dataclasses.dataclass(frozen=True)
class KEHParams(MetaHParams):
    scope: str = "llm.mlp.last3"
    lstm_hidden: int = 128  # per direction
    max_scale: float = 1.0  # the largest factor of the gated gradient


class KENetwork(nn.Module):
    def __init__(self, embed_width: int, shapes: dict[str, torch.Size], hp: KEHParams):
        super().__init__()
        self.names = list(shapes)
        self.shapes = list(shapes.values())
        self.lstm = nn.LSTM(embed_width, hp.lstm_hidden, batch_first=True, bidirectional=True)
        self.max_scale = hp.max_scale
        # one linear head per weight: a_out, a_in, b_out, b_in, s
        self.heads = nn.ModuleList(nn.Linear(2 * hp.lstm_hidden, 2 * (out + inp) + 1) for out, inp in self.shapes)
        # Start at a plain gradient step without bias term (as MEND starts at the identity): zero
        # weights give a uniform a_out and, with a_in's bias at 1, gate = 1/out at every entry;
        # all-zero heads would start at no edit at all, which training may never leave.
        for head, (out, inp) in zip(self.heads, self.shapes):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            with torch.no_grad():
                head.bias[out : out + inp] = 1.0

    def condition(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of the BiLSTM states over the real tokens of each edit text, averaged over edits."""
        states, _ = self.lstm(embeds)
        mask = mask.unsqueeze(-1).to(states.dtype)
        return ((states * mask).sum(1) / mask.sum(1)).mean(0)

    def delta(self, index: int, condition: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | RowwiseDelta:
        """``max_scale * sigmoid(s) * (grad * A + B)`` with the rank-1 ``A = softmax(a_out) a_in^T``
        and ``B = softmax(b_out) b_in^T`` applied as row and column scalings and one rank-1 update:
        neither is built as a full matrix (on a 7B model each would be another 45M floats).

        Without grad (an edit, not training) it is a :class:`RowwiseDelta`: each block of rows is
        written into one float32 copy of those rows of ``grad`` (``grad`` itself if it is float32)
        by the same operations in the same order, so the same values bit for bit.
        """
        out, inp = self.shapes[index]
        a_out, a_in, b_out, b_in, scale = self.heads[index](condition).split([out, inp, out, inp, 1])
        step = self.max_scale * scale.sigmoid()
        rows, bias_rows = step * a_out.softmax(-1), step * b_out.softmax(-1)
        if torch.is_grad_enabled():  # training backpropagates through every intermediate
            return torch.addr(grad * rows[:, None] * a_in[None, :], bias_rows, b_in)
        return RowwiseDelta(out, lambda part: grad[part].to(rows.dtype).mul_(rows[part, None]).mul_(a_in[None, :])
                            .addr_(bias_rows[part], b_in))


@register_method
class KE(WeightDeltaEditor):
    name = "KE"
    hparams_class = KEHParams

    def make_network(self, model: VLMAdapter) -> KENetwork:
        shapes = {name: p.shape for name, p in self.edited_parameters(model).items()}
        return KENetwork(model.model.get_input_embeddings().embedding_dim, shapes, self.hparams)

    def deltas(self, model: VLMAdapter, records: Sequence[EditRecord],
               gradients: GradientFactors) -> Iterator[tuple[str, torch.Tensor | RowwiseDelta]]:
        network = self.network
        texts = [record.prompt + record.target for record in records]
        tokens = model.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
        with torch.no_grad():
            embeds = model.model.get_input_embeddings()(tokens["input_ids"]).float()
        condition = network.condition(embeds, tokens["attention_mask"])
        for index, name in enumerate(network.names):
            x, delta = gradients.pop(name)
            yield name, network.delta(index, condition, delta.T @ x)  # grad W, as autograd's weight gradient
