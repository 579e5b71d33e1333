"""IKE: in-context knowledge editing with retrieved demonstrations (spec §4), or EasyEdit's ``k: 0``.

Nothing in the model changes. ``mode: retrieve`` (the MMEdit files): an edit retrieves the ``k``
training facts nearest to the new fact (sentence embeddings from the embed stage, L2-normalised,
dot product, best first), appends the new fact itself as the last demonstration, and puts them in
front of every question: ``demonstrations + "New Fact: {p} {t}\\nPrompt: {x}"``. Pre-edit scores
use the same demonstrations followed by the bare question.

``mode: fact_prefix`` with ``k: 0`` (EasyEdit's Qwen2-VL and LLaVA-OneVision files, spec §7): no
retrieval and no embeddings; every question becomes ``prefix_template`` (by default
``"New Fact: {prompt} {target}\\nPrompt: {prompt}\\n\\n"``) + the bare question, and the pre-edit
scores are the bare question's, i.e. the baseline's. EasyEdit reports this path in token accuracy:
the ``*_token`` values of records.jsonl and metrics.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmke.data.records import EditRecord
from mmke.embed import encode, load_embeddings, load_sentence_model
from mmke.hparams import HParams
from mmke.methods.base import Edit, Editor, register_method
from mmke.models.base import VLMAdapter


#: EasyEdit's IKEMultimodalHyperParams.template: the prefix of its ``k: 0`` path.
FACT_PREFIX = "New Fact: {prompt} {target}\nPrompt: {prompt}\n\n"
MODES = ("retrieve", "fact_prefix")


@dataclasses.dataclass(frozen=True)
class IKEHParams(HParams):
    k: int = 32
    sentence_model: str = "all-MiniLM-L6-v2"
    mode: str = "retrieve"  # or "fact_prefix": EasyEdit's k: 0 (see the module docstring)
    prefix_template: str = FACT_PREFIX  # fact_prefix only; formatted with the record's prompt and target

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"field 'mode' must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "retrieve" and self.k < 1:
            raise ValueError(f"field 'k' is {self.k}: mode 'retrieve' needs k >= 1; EasyEdit's k: 0 "
                             "(no retrieval, the new fact before each question) is mode: fact_prefix")
        if self.mode == "fact_prefix" and self.k != 0:
            raise ValueError(f"field 'k' is {self.k}: mode 'fact_prefix' retrieves nothing, set k: 0")

    @property
    def retrieves(self) -> bool:
        """Whether edits need the embed stage's index (and the sentence model)."""
        return self.mode == "retrieve"


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
    """Nearest training sentences to a query by normalised dot product, best first.

    A query's vector comes from ``queries`` (the embed stage's, by sentence) where it is there;
    the others are embedded by the sentence model, which ``load_model`` loads on first need. An
    IKE job over the eval split the embed stage saw thus never imports sentence-transformers (2.7
    CPU s), and a query's vector does not depend on which queries are measured beside it.
    """

    def __init__(self, load_model: Callable[[], Any], embeddings: torch.Tensor, sentences: Sequence[str],
                 queries: Mapping[str, torch.Tensor] | None = None):
        if embeddings.dim() != 2 or embeddings.shape[0] != len(sentences) or not sentences:
            raise ValueError(f"need one embedding row per sentence, got {tuple(embeddings.shape)} "
                             f"for {len(sentences)} sentences")
        self.embeddings = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        self.sentences = list(sentences)
        self.queries = dict(queries or {})
        self.sentence_model = None  # loaded by the first query the embed stage did not embed
        self._load_model = load_model

    def nearest(self, queries: Sequence[str], k: int) -> list[list[str]]:
        """The ``k`` nearest sentences of each query; queries not embedded yet are embedded in one call."""
        vectors = torch.nn.functional.normalize(self.query_vectors(queries), dim=-1)
        top = torch.topk(vectors @ self.embeddings.T, k=min(k, len(self.sentences)), dim=-1, sorted=True).indices
        return [[self.sentences[i] for i in row] for row in top.tolist()]

    def query_vectors(self, queries: Sequence[str]) -> torch.Tensor:
        """``[len(queries), D]``, unnormalised: the stored vectors, the sentence model's for the rest."""
        missing = [query for query in dict.fromkeys(queries) if query not in self.queries]
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            if self.sentence_model is None:
                self.sentence_model = self._load_model()
            fresh = dict(zip(missing, encode(self.sentence_model, missing)))
        return torch.stack([self.queries[query] if query in self.queries else fresh[query] for query in queries])


class InContextEdit(Edit):
    """The edit is a context put before each question; ``pre_context`` goes before it pre-edit."""

    in_context: ClassVar[bool] = True

    def __init__(self, context: str, pre_context: str = ""):
        super().__init__()
        self.context = context
        self.pre_context = pre_context

    @classmethod
    def retrieved(cls, record: EditRecord, demonstrations: Sequence[str]) -> InContextEdit:
        """Demonstrations (ending with the new fact), then ``New Fact: {p} {t}\\nPrompt: {x}``."""
        demos = "".join(demonstrations)
        return cls(demos + edited_question(record.prompt, _raw(record.target), ""), pre_context=demos)

    @classmethod
    def fact_prefix(cls, record: EditRecord, template: str) -> InContextEdit:
        """EasyEdit's ``k: 0``: the formatted template, then the bare question; nothing pre-edit."""
        return cls(template.format(prompt=record.prompt, target=_raw(record.target)))

    def prompt(self, text: str) -> str:
        return f"{self.context}{text}"

    def pre_prompt(self, text: str) -> str:
        return f"{self.pre_context}{text}"


@register_method
class IKE(Editor):
    name = "IKE"
    hparams_class = IKEHParams
    weights_unchanged = True  # the edit is a context before the question
    hparams: IKEHParams
    retriever: Retriever | None = None

    def prepare(self, resources: Mapping[str, Path]) -> None:
        """Load the embed stage's ``embeddings`` + ``sentences`` (the training facts) and, where
        given, its ``queries`` + ``query_sentences`` (the eval records' retrieval queries); the
        sentence model loads only for a query the stage did not embed (``fact_prefix`` needs none)."""
        if not self.hparams.retrieves:
            return
        missing = {"embeddings", "sentences"} - set(resources)
        if {"queries", "query_sentences"} & set(resources):
            missing |= {"queries", "query_sentences"} - set(resources)
        if missing:
            raise ValueError(f"IKE needs the embed stage outputs {sorted(missing)}")
        name = self.hparams.sentence_model
        embeddings, sentences = load_embeddings(resources["embeddings"], resources["sentences"], name)
        queries: dict[str, torch.Tensor] = {}
        if "queries" in resources:
            vectors, texts = load_embeddings(resources["queries"], resources["query_sentences"], name)
            queries = dict(zip(texts, vectors))
        self.retriever = Retriever(lambda: load_sentence_model(name), embeddings, sentences, queries)

    def apply(self, model: VLMAdapter, records: Sequence[EditRecord]) -> Edit:
        if len(records) != 1:
            raise ValueError(f"IKE edits one record at a time, got {len(records)}")
        return self.apply_each(model, records)[0]

    def apply_each(self, model: VLMAdapter, records: Sequence[EditRecord]) -> list[Edit]:
        """One context per record; the retrieval queries of all records are embedded in one call."""
        if not self.hparams.retrieves:
            return [InContextEdit.fact_prefix(record, self.hparams.prefix_template) for record in records]
        if self.retriever is None:
            raise RuntimeError("IKE: prepare(resources) must load the embeddings before editing")
        queries = [query_sentence(record) for record in records]
        found = self.retriever.nearest(queries, self.hparams.k)
        return [InContextEdit.retrieved(record, [*demos, query]) for record, demos, query in zip(records, found, queries)]


def _raw(text: str) -> str:
    """The answer as written in the dataset: records add one leading space for scoring."""
    return text.removeprefix(" ")
