"""Questions a model can be taught and edited on, and the contexts editing methods put before them.

A pretrained VLM comes to editing knowing its facts and able to read text in front of a question.
The tiny demo models must be taught both (:mod:`mmke.world_training`), from one of two *fact
sources*:

- :class:`WorldFacts`: fresh pictures of the synthetic world's scenes (:mod:`mmke.data.demo`),
  each attribute asked in each wording, the caption under each caption prompt, counting on a
  many-object picture, the invented text facts that text locality asks, and the consequences of
  an object's colour: the text facts that tie colours to metals and metals to mines, and the
  1-hop / 2-hop questions about a picture whose answers follow from them (VLKEB's portability);
- :class:`RecordFacts`: the records of an E-VQA/E-IC split, each asking its edit prompt, rephrase
  and rephrased image (answer ``pred``), its multimodal-locality question (``m_loc_a``) and its
  text-locality question (``loc_ans``).

A :class:`Topic` is what an edit changes: the wording an edit states (IKE's ``p``), the other
wordings of the same question, and the answers an edit may give. :func:`in_context` wraps a
question in IKE's exact format (spec §4, built by the IKE editor's own functions): demonstration
sentences, IKE's copy of the new fact, then ``New Fact: {p} {t}\\nPrompt: {x}``. If the new fact
edits what ``x`` asks, in any wording, the answer is ``t`` whatever the picture shows; if it is
about something else, the answer stays the truth. SERAC's counterfactual model reads an edit the
same way in its own format (:func:`counterfactual_item`).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from PIL import Image

from mmke.data.demo import (
    ATTRIBUTES, CAPTION_PROMPT, CAPTION_REPHRASES, COUNT_QUESTIONS, FACTS, HOP_QUESTIONS, NUMBERS, TIES, VQA_QUESTIONS,
    Scene, caption, consequence, draw_many, draw_scene, scene_split,
)
from mmke.data.records import EditRecord, RecordImages, lead_space, locality_question, multimodal_locality_prompt
from mmke.methods.ike import demonstration_text, edited_question

WORLD_KINDS = (*ATTRIBUTES, "caption", "count", "fact", *HOP_QUESTIONS, "tie")
#: Text-only kinds of the world: one stream entry each, drawn among their facts.
TEXT_KINDS = {"fact": FACTS, "tie": TIES}
RECORD_KINDS = ("rewrite", "rephrase", "image_rephrase", "m_loc", "loc")
FACT_KINDS = frozenset({*WORLD_KINDS, *RECORD_KINDS})


@dataclasses.dataclass(frozen=True)
class Topic:
    """A fact an edit can change: its edit wording, its other wordings and the answers it may take."""

    prompt: str
    rephrasings: tuple[str, ...]
    values: tuple[str, ...]  # raw answers (no scoring space); an edit draws one other than the truth

    def asks(self, question: str) -> bool:
        return question == self.prompt or question in self.rephrasings


@dataclasses.dataclass(frozen=True)
class Question:
    """A question with its true (raw) answer; ``topic`` is None for facts no edit changes.

    ``depends_on`` is the topic whose edit changes the answer indirectly (the colour, for the
    consequences of an object's colour): a context never states it as an *unrelated* new fact.
    """

    kind: str
    text: str
    answer: str
    image: Image.Image | None
    topic: Topic | None = None
    depends_on: Topic | None = None


@dataclasses.dataclass(frozen=True)
class FactItem:
    """What a model is trained or measured on: prompt (with any context) + answer (scoring space)."""

    kind: str
    prompt: str
    answer: str
    image: Image.Image | None


@dataclasses.dataclass(frozen=True)
class ContextConfig:
    """How often and how questions are asked after an IKE-style context (docs/world.md).

    ``share`` of the items get a context; of those, ``relevant`` state a new fact about the item's
    own question (answer: the new target), the rest a new fact about something else (answer: the
    truth). Each context has 0..``max_demos`` demonstrations before IKE's copy of the new fact
    (IKE's ``k``: a model only reads contexts of lengths it was trained on), and each of them is
    about the item's own question with probability ``same_topic``, as IKE's retrieval finds them:
    so the model must take the *last* new fact, not any answer it sees.
    """

    share: float = 0.0
    relevant: float = 0.5
    max_demos: int = 2
    same_topic: float = 0.5
    after: int = 0  # training steps of plain questions before the first context: first learn to see
    until: int | None = None  # training step after which questions are plain again (None: never)

    def __post_init__(self) -> None:
        for name in ("share", "relevant", "same_topic"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"context.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("max_demos", "after"):
            if getattr(self, name) < 0:
                raise ValueError(f"context.{name} must be >= 0, got {getattr(self, name)}")


class FactSource(Protocol):
    """Where questions, edit topics and text facts come from."""

    def question(self, rng: random.Random) -> Question: ...
    def topic(self, rng: random.Random) -> Topic: ...
    def text_fact(self, rng: random.Random) -> tuple[str, str]: ...


def _weights(kinds: Sequence[str], fact_weights: Mapping[str, float] | None) -> list[float]:
    weights = dict(fact_weights or {})
    if unknown := set(weights) - FACT_KINDS:
        raise ValueError(f"unknown fact kinds {sorted(unknown)} in fact_weights; valid: {', '.join(sorted(FACT_KINDS))}")
    return [weights.get(kind, 1.0) for kind in kinds]


#: The world's questions, one entry per wording; each is drawn with its kind's weight.
WORLD_ENTRIES: tuple[tuple[str, str], ...] = (
    *((attribute, text) for attribute, (question, others) in VQA_QUESTIONS.items() for text in (question, *others)),
    *(("caption", text) for text in (CAPTION_PROMPT, *CAPTION_REPHRASES)),
    *(("count", text) for text in COUNT_QUESTIONS),
    *HOP_QUESTIONS.items(),
    ("fact", ""),  # one entry for all invented text facts: they are few and text-only
    ("tie", ""),  # likewise the facts that tie colours to metals and metals to mines
)
ATTRIBUTE_TOPICS = {attribute: Topic(question, others, ATTRIBUTES[attribute])
                    for attribute, (question, others) in VQA_QUESTIONS.items()}


def caption_topic(scene: Scene) -> Topic:
    """A scene's caption edits: every caption with exactly one attribute changed (E-IC's ``alt``)."""
    values = tuple(caption(dataclasses.replace(scene, **{attribute: value}))
                   for attribute, options in ATTRIBUTES.items() for value in options if value != getattr(scene, attribute))
    return Topic(CAPTION_PROMPT, CAPTION_REPHRASES, values)


class WorldFacts:
    """Fresh pictures of one split's scenes (never the same picture twice), asked by weight."""

    def __init__(self, split: str, image_size: int, mloc_template: str,
                 fact_weights: Mapping[str, float] | None = None):
        self.scenes = scene_split(split)
        self.image_size = image_size
        self.mloc_template = mloc_template
        self.weights = _weights([kind for kind, _ in WORLD_ENTRIES], fact_weights)
        # what a model of this world is asked at all (and so measured on): the kinds of weight > 0
        self.asked = {kind for (kind, _), weight in zip(WORLD_ENTRIES, self.weights) if weight > 0}

    def question(self, rng: random.Random) -> Question:
        kind, text = rng.choices(WORLD_ENTRIES, weights=self.weights)[0]
        return self.ask(rng, kind, text)

    def ask(self, rng: random.Random, kind: str, text: str, scene: Scene | None = None) -> Question:
        """Question ``text`` of ``kind`` about a fresh picture (of ``scene``, or a random one)."""
        if kind in TEXT_KINDS:
            question, answer = rng.choice(TEXT_KINDS[kind])
            return Question(kind, question, answer, None)
        if kind == "count":
            count = rng.randint(1, len(NUMBERS))
            return Question(kind, locality_question(text, self.mloc_template), NUMBERS[count - 1],
                            draw_many(rng, count, self.image_size))
        scene = scene or rng.choice(self.scenes)
        return about(kind, text, scene, draw_scene(rng, scene, self.image_size))

    def topic(self, rng: random.Random) -> Topic:
        """An edit topic as the demo datasets draw them: an attribute, or a scene's caption."""
        if rng.random() < 1 / (len(ATTRIBUTES) + 1):
            return caption_topic(rng.choice(self.scenes))
        return ATTRIBUTE_TOPICS[rng.choice(tuple(ATTRIBUTES))]

    def text_fact(self, rng: random.Random) -> tuple[str, str]:
        return rng.choice(FACTS)

    def text_questions(self) -> list[Question]:
        """The invented text facts (text locality's questions) and the ties, each once, if asked."""
        return [Question(kind, question, answer, None)
                for kind, facts in TEXT_KINDS.items() if kind in self.asked for question, answer in facts]

    def every_question(self, rng: random.Random) -> list[Question]:
        """Every question asked (weight > 0) about one fresh picture of a random scene, and counting
        on a fresh many-object picture."""
        scene = rng.choice(self.scenes)
        image = draw_scene(rng, scene, self.image_size)
        questions = [about(kind, text, scene, image) for kind, text in WORLD_ENTRIES
                     if kind not in ("count", *TEXT_KINDS) and kind in self.asked]
        count = rng.randint(1, len(NUMBERS))
        many = draw_many(rng, count, self.image_size)
        return questions + [Question("count", locality_question(text, self.mloc_template), NUMBERS[count - 1], many)
                            for kind, text in WORLD_ENTRIES if kind == "count" and kind in self.asked]


def about(kind: str, text: str, scene: Scene, image: Image.Image) -> Question:
    """Question ``text`` of ``kind`` about a picture of ``scene``: an attribute, the caption, or a
    consequence of the colour (answered through the ties; a colour edit changes it)."""
    if kind == "caption":
        return Question(kind, text, caption(scene), image, caption_topic(scene))
    if kind in HOP_QUESTIONS:
        return Question(kind, text, consequence(kind, scene.colour), image, depends_on=ATTRIBUTE_TOPICS["colour"])
    return Question(kind, text, getattr(scene, kind), image, ATTRIBUTE_TOPICS[kind])


class RecordFacts:
    """The facts an E-VQA/E-IC split states, drawn by kind weight (records uniformly)."""

    def __init__(self, records: Sequence[EditRecord], images: RecordImages, mloc_template: str,
                 fact_weights: Mapping[str, float] | None = None):
        if not records:
            raise ValueError("no records to learn facts from")
        self.records = list(records)
        self.images = images
        self.mloc_template = mloc_template
        self.weights = _weights(RECORD_KINDS, fact_weights)

    def question(self, rng: random.Random) -> Question:
        kind = rng.choices(RECORD_KINDS, weights=self.weights)[0]
        return self.ask(rng.choice(self.records), kind)

    def ask(self, record: EditRecord, kind: str) -> Question:
        if kind == "loc":
            return Question(kind, record.loc, _raw(record.loc_ans), None)
        images = self.images(record)
        if kind == "m_loc":
            return Question(kind, multimodal_locality_prompt(record, self.mloc_template), _raw(record.m_loc_a),
                            images["m_loc"])
        text = record.rephrase if kind == "rephrase" else record.prompt
        image = images["image_rephrase" if kind == "image_rephrase" else "image"]
        return Question(kind, text, record.pred, image, self.record_topic(record))

    @staticmethod
    def record_topic(record: EditRecord) -> Topic:
        return Topic(record.prompt, (record.rephrase,), (_raw(record.target),))

    def topic(self, rng: random.Random) -> Topic:
        return self.record_topic(rng.choice(self.records))

    def text_fact(self, rng: random.Random) -> tuple[str, str]:
        record = rng.choice(self.records)
        return record.loc, _raw(record.loc_ans)

    def every_question(self, record: EditRecord) -> list[Question]:
        return [self.ask(record, kind) for kind in RECORD_KINDS]


def demonstration(rng: random.Random, source: FactSource, topic: Topic) -> str:
    """One of IKE's three training sentences (copy, paraphrase, locality) for an edit of ``topic``."""
    value = rng.choice(topic.values)
    form = rng.randrange(3)
    if form == 0 or (form == 1 and not topic.rephrasings):
        return demonstration_text(topic.prompt, value, topic.prompt, value)
    if form == 1:
        return demonstration_text(topic.prompt, value, rng.choice(topic.rephrasings), value)
    return demonstration_text(topic.prompt, value, *source.text_fact(rng))


def new_value(rng: random.Random, topic: Topic, truth: str | None) -> str | None:
    """An answer an edit of ``topic`` may give other than ``truth`` (None if there is none)."""
    others = [value for value in topic.values if value != truth]
    return rng.choice(others) if others else None


def unrelated_topic(rng: random.Random, source: FactSource, question: Question, tries: int = 100) -> Topic | None:
    """An edit topic that does not ask ``question`` (IKE's context for the locality questions);
    None if ``tries`` draws found none (a caption split, say, whose records all share one prompt)."""
    related = {t.prompt for t in (question.topic, question.depends_on) if t is not None}
    for _ in range(tries):
        topic = source.topic(rng)
        if not topic.asks(question.text) and topic.prompt not in related:
            return topic
    return None


def in_context(rng: random.Random, source: FactSource, question: Question, config: ContextConfig,
               relevant: bool, n_demos: int | None = None) -> FactItem:
    """``question`` after IKE's context: demonstrations, IKE's copy of the new fact, the new fact.

    ``relevant``: the new fact edits the question's topic (answer: its new value), else it is
    about another topic (answer: the truth). Where the asked kind cannot be had (a question no edit
    changes; a split whose records all share one prompt), the other kind is asked; where neither
    can, the question is asked plain. ``n_demos`` fixes the number of demonstrations (default:
    0..``config.max_demos`` at random). The item's kind is the question's with ``:edit`` or ``:other``.
    """
    n_demos = rng.randint(0, config.max_demos) if n_demos is None else n_demos
    demos = [demonstration(rng, source, question.topic if question.topic and rng.random() < config.same_topic
                           else source.topic(rng)) for _ in range(n_demos)]
    topic = question.topic if relevant else unrelated_topic(rng, source, question)
    if topic is None:  # nothing unrelated to say (or nothing to edit): the other kind of context
        topic = unrelated_topic(rng, source, question) if relevant else question.topic
    value = None if topic is None else new_value(rng, topic, question.answer if topic is question.topic else None)
    if value is None:
        return plain(question)
    edited = topic is question.topic
    kind = f"{question.kind}:{'edit' if edited else 'other'}"
    context = "".join(demos) + demonstration_text(topic.prompt, value, topic.prompt, value)
    return FactItem(kind, context + edited_question(topic.prompt, value, question.text),
                    lead_space(value if edited else question.answer), question.image)


def plain(question: Question) -> FactItem:
    return FactItem(question.kind, question.text, lead_space(question.answer), question.image)


def fact_stream(sources: Sequence[FactSource], seed: int, context: ContextConfig, plain_items: int = 0,
                context_items: int | None = None) -> Iterator[FactItem]:
    """Endless training items: a random source's random question, in context with probability
    ``context.share`` from item ``plain_items`` on, and plain again from item ``context_items``.

    Seeded, so the stream (and the training on it) is a function of the seed alone.
    """
    if not sources:
        raise ValueError("no fact source to train on")
    rng = random.Random(f"fact-stream:{seed}")
    for index in itertools.count():
        source = rng.choice(sources)
        question = source.question(rng)
        in_window = plain_items <= index and (context_items is None or index < context_items)
        if in_window and rng.random() < context.share:
            yield in_context(rng, source, question, context, relevant=rng.random() < context.relevant)
        else:
            yield plain(question)


def counterfactual_item(rng: random.Random, source: FactSource) -> tuple[tuple[str, str], FactItem]:
    """A training example for SERAC's counterfactual model: ``(edit prompt, target)`` and a query.

    In-scope queries (the edit's question in any wording) answer the edit's target; the text
    facts, asked after an unrelated edit, keep their answers, as a pretrained LM knows its facts.
    Half of the examples write the edit's target and the answer raw, half with the leading space:
    the router writes both as the edited model's family does (``VLMAdapter.target_text``), so one
    model serves every family and the edit in its context shows which form to answer in.
    """
    topic = source.topic(rng)
    value = rng.choice(topic.values)
    written = lead_space if rng.random() < 0.5 else str
    edit = (topic.prompt, written(value))
    if rng.random() < 0.25:
        question, answer = source.text_fact(rng)
        return edit, FactItem("fact", question, written(answer), None)
    question = rng.choice((topic.prompt, *topic.rephrasings))
    return edit, FactItem("edit" if question == topic.prompt else "edit_rephrase", question, written(value), None)


def _raw(text: str) -> str:
    return text.removeprefix(" ")
