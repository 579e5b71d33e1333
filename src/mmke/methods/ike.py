"""IKE: in-context knowledge editing with retrieved demonstrations (spec §4).

Nothing in the model changes. An edit retrieves the ``k`` training facts nearest to the new fact
(sentence embeddings from the embed stage, L2-normalised, dot product, best first), appends the
new fact itself as the last demonstration, and puts them in front of every question:
``demonstrations + "New Fact: {p} {t}\\nPrompt: {x}"``. Pre-edit scores use the same demonstrations
followed by the bare question.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import torch

from mmke.data.records import EditRecord
from mmke.embed import encode, load_embeddings, load_sentence_model
from mmke.hparams import HParams
from mmke.methods.base import Edit, Editor, register_method
from mmke.models.base import VLMAdapter


@dataclasses.dataclass(frozen=True)
class IKEHParams(HParams):
    k: int = 32
    sentence_model: str = "all-MiniLM-L6-v2"


def fact_line(prompt: str, target: str) -> str:
    """``New Fact: {p} {t}\\n``: how IKE states an edit (raw target, no scoring space)."""
    return f"New Fact: {prompt} {target}\n"


def demonstration_text(prompt: str, target: str, question: str, answer: str) -> str:
    """One demonstration: the fact, then a question answered under it, then a blank line."""
    return f"{fact_line(prompt, target)}Prompt: {question} {answer}\n\n"


def edited_question(prompt: str, target: str, question: str) -> str:
    """What IKE asks after its demonstrations: the fact, then the question to answer under it."""
    return f"{fact_line(prompt, target)}Prompt: {question}"


def demonstration(record: EditRecord, question: str, answer: str) -> str:
    """A demonstration of the record's edit (records carry the target with its scoring space)."""
    return demonstration_text(record.prompt, _raw(record.target), question, answer)


def training_sentences(records: Sequence[EditRecord]) -> list[str]:
    """The retrieval corpus: three sentences per training record (copy, paraphrase, locality)."""
    sentences = []
    for record in records:
        target = _raw(record.target)
        sentences += [demonstration(record, record.prompt, target),
                      demonstration(record, record.rephrase, target),
                      demonstration(record, record.loc, _raw(record.loc_ans))]
    return sentences


def query_sentence(record: EditRecord) -> str:
    return demonstration(record, record.prompt, _raw(record.target))


class Retriever:
    """Nearest training sentences to a query by normalised dot product, best first."""

    def __init__(self, sentence_model, embeddings: torch.Tensor, sentences: Sequence[str]):
        if embeddings.dim() != 2 or embeddings.shape[0] != len(sentences) or not sentences:
            raise ValueError(f"need one embedding row per sentence, got {tuple(embeddings.shape)} "
                             f"for {len(sentences)} sentences")
        self.sentence_model = sentence_model
        self.embeddings = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        self.sentences = list(sentences)

    def nearest(self, query: str, k: int) -> list[str]:
        vector = torch.nn.functional.normalize(encode(self.sentence_model, [query]), dim=-1)
        scores = (vector @ self.embeddings.T)[0]
        top = torch.topk(scores, k=min(k, len(self.sentences)), sorted=True).indices
        return [self.sentences[i] for i in top.tolist()]


class InContextEdit(Edit):
    """The edit is a context: demonstrations (ending with the new fact) before each question."""

    in_context: ClassVar[bool] = True

    def __init__(self, record: EditRecord, demonstrations: Sequence[str]):
        super().__init__()
        self.context = "".join(demonstrations)
        self.edit = (record.prompt, _raw(record.target))

    def prompt(self, text: str) -> str:
        return self.context + edited_question(*self.edit, text)

    def pre_prompt(self, text: str) -> str:
        return f"{self.context}{text}"


@register_method
class IKE(Editor):
    name = "IKE"
    hparams_class = IKEHParams
    hparams: IKEHParams
    retriever: Retriever | None = None

    def prepare(self, resources: Mapping[str, Path]) -> None:
        """Load the embed stage's ``embeddings`` + ``sentences`` and the sentence model, once."""
        missing = {"embeddings", "sentences"} - set(resources)
        if missing:
            raise ValueError(f"IKE needs the embed stage outputs {sorted(missing)}")
        embeddings, sentences = load_embeddings(resources["embeddings"], resources["sentences"],
                                                self.hparams.sentence_model)
        self.retriever = Retriever(load_sentence_model(self.hparams.sentence_model), embeddings, sentences)

    def apply(self, model: VLMAdapter, records: Sequence[EditRecord]) -> Edit:
        if self.retriever is None:
            raise RuntimeError("IKE: prepare(resources) must load the embeddings before editing")
        if len(records) != 1:
            raise ValueError(f"IKE edits one record at a time, got {len(records)}")
        (record,) = records
        query = query_sentence(record)
        return InContextEdit(record, [*self.retriever.nearest(query, self.hparams.k), query])


def _raw(text: str) -> str:
    """The answer as written in the dataset: records add one leading space for scoring."""
    return text.removeprefix(" ")
