"""The questions pretraining teaches and the IKE-style contexts put before them."""

from __future__ import annotations

import itertools
import random

import pytest

from mmke.data.demo import ATTRIBUTES, CAPTION_PROMPT, FACTS, VQA_QUESTIONS, all_scenes, caption, scene_split
from mmke.data.records import ImageRoots, RecordImages, load_records
from mmke.facts import (
    ATTRIBUTE_TOPICS, FACT_KINDS, ContextConfig, RecordFacts, WorldFacts, caption_topic,
    counterfactual_item, fact_stream, in_context,
)
from mmke.methods.ike import InContextEdit, demonstration

TEMPLATE = "trainer"


def test_world_questions_state_the_scene_and_its_topic():
    rng = random.Random(0)
    source = WorldFacts("train", 32, TEMPLATE)
    train = set(scene_split("train"))
    for _ in range(50):
        question = source.question(rng)
        assert question.kind in FACT_KINDS
        if question.kind in ATTRIBUTES:
            assert question.answer in ATTRIBUTES[question.kind]
            assert question.topic is ATTRIBUTE_TOPICS[question.kind] and question.topic.asks(question.text)
            assert question.image.size == (32, 32)
        elif question.kind == "fact":
            assert (question.text, question.answer) in FACTS and question.image is None and question.topic is None
        elif question.kind == "count":
            assert question.text.startswith("Question: How many") and question.topic is None
    scene = next(iter(train))
    topic = caption_topic(scene)
    # every value is the caption with exactly one attribute changed
    assert caption(scene) not in topic.values
    assert len(topic.values) == sum(len(values) - 1 for values in ATTRIBUTES.values())
    one_off = {caption(other) for other in all_scenes()
               if sum(getattr(other, a) != getattr(scene, a) for a in ATTRIBUTES) == 1}
    assert set(topic.values) == one_off


def test_relevant_new_fact_overrides_the_picture_in_ikes_exact_format():
    rng = random.Random(1)
    source = WorldFacts("train", 32, TEMPLATE)
    question = source.ask(rng, "colour", VQA_QUESTIONS["colour"][1][0])
    item = in_context(rng, source, question, ContextConfig(max_demos=0), relevant=True, n_demos=0)
    new = item.answer.strip()
    assert item.kind == "colour:edit" and new in ATTRIBUTES["colour"] and new != question.answer
    p = VQA_QUESTIONS["colour"][0]
    # the IKE editor asks exactly this after its context: the query sentence, then the new fact
    ike = InContextEdit.retrieved(_record(p, new), [demonstration(_record(p, new), p, new)])
    assert item.prompt == ike.prompt(question.text)
    assert item.image is question.image


def test_unrelated_new_fact_keeps_the_truth():
    rng = random.Random(2)
    source = WorldFacts("train", 32, TEMPLATE)
    config = ContextConfig(max_demos=2, same_topic=1.0)
    for kind in ("shape", "count", "fact"):
        text = VQA_QUESTIONS["shape"][0] if kind == "shape" else "How many shapes are in the picture?"
        question = source.ask(rng, kind, text)
        item = in_context(rng, source, question, config, relevant=False, n_demos=2)
        assert item.kind == f"{kind}:other" and item.answer == " " + question.answer
        last_fact = item.prompt.rsplit("New Fact: ", 1)[1]
        assert question.text not in last_fact.split("\n")[0]  # the fact is about something else
        assert item.prompt.endswith(f"Prompt: {question.text}")
        assert item.prompt.count("New Fact: ") == 4  # 2 demonstrations, IKE's copy, the fact
    # a question no edit changes is given an unrelated fact even when a relevant one is asked for
    count = source.ask(rng, "count", "How many shapes are in the picture?")
    assert in_context(rng, source, count, config, relevant=True).kind == "count:other"


def test_stream_is_seeded_and_mixes_contexts_by_share():
    source = WorldFacts("train", 32, TEMPLATE)
    first = [(i.prompt, i.answer) for i in itertools.islice(fact_stream([source], 3, ContextConfig(share=0.5)), 200)]
    again = [(i.prompt, i.answer) for i in itertools.islice(fact_stream([source], 3, ContextConfig(share=0.5)), 200)]
    assert first == again
    share = sum("New Fact: " in prompt for prompt, _ in first) / len(first)
    assert 0.4 < share < 0.6
    none = itertools.islice(fact_stream([source], 3, ContextConfig(share=0.0)), 100)
    assert not any("New Fact" in item.prompt for item in none)


def test_fact_weights_are_validated_and_followed():
    only = dict.fromkeys(FACT_KINDS, 0.0) | {"position": 1.0}
    items = list(itertools.islice(fact_stream([WorldFacts("train", 32, TEMPLATE, only)], 0, ContextConfig()), 30))
    assert {item.kind for item in items} == {"position"}
    with pytest.raises(ValueError, match=r"unknown fact kinds \['colur'\]"):
        WorldFacts("train", 32, TEMPLATE, {"colur": 2.0})
    with pytest.raises(ValueError, match=r"context.share must be in \[0, 1\], got 1.5"):
        ContextConfig(share=1.5)


def test_record_facts_ask_every_field_of_a_record(demo_evqa, roots):
    records = load_records("evqa", demo_evqa["train"], roots)
    source = RecordFacts(records, RecordImages(roots), TEMPLATE)
    record = records[0]
    questions = {q.kind: q for q in source.every_question(record)}
    assert (questions["rewrite"].text, questions["rewrite"].answer) == (record.prompt, record.pred)
    assert (questions["rephrase"].text, questions["rephrase"].answer) == (record.rephrase, record.pred)
    assert questions["image_rephrase"].image.size == questions["rewrite"].image.size
    assert questions["m_loc"].text == f"Question: {record.m_loc_q} Short answer:"
    assert (questions["loc"].text, questions["loc"].image) == (record.loc, None)
    edited = in_context(random.Random(0), source, questions["rephrase"], ContextConfig(), relevant=True, n_demos=0)
    assert edited.answer == record.target and edited.prompt.endswith(f"Prompt: {record.rephrase}")


def test_a_split_with_one_prompt_falls_back_to_the_edit(tmp_path):
    """E-IC records all share one caption prompt: nothing unrelated can be said before a caption."""
    from mmke.data.demo import write_demo_dataset

    paths = write_demo_dataset(tmp_path, "eic", n_train=4, n_eval=1)
    roots = ImageRoots(paths["images"])
    source = RecordFacts(load_records("eic", paths["train"], roots), RecordImages(roots), TEMPLATE)
    question = source.ask(source.records[0], "rewrite")
    assert question.text == CAPTION_PROMPT
    assert in_context(random.Random(0), source, question, ContextConfig(), relevant=False).kind == "rewrite:edit"


def test_counterfactual_examples_answer_from_the_edit():
    rng = random.Random(0)
    source = WorldFacts("train", 32, TEMPLATE)
    spaced = []
    for _ in range(80):
        (prompt, target), item = counterfactual_item(rng, source)
        spaced.append(item.answer.startswith(" "))
        assert target.startswith(" ") == item.answer.startswith(" ")  # the edit shows the answer's form
        if item.kind == "fact":
            assert (item.prompt, item.answer.strip()) in FACTS
        else:
            assert item.answer == target
            assert item.kind == ("edit" if item.prompt == prompt else "edit_rephrase")
    assert 0.3 < sum(spaced) / len(spaced) < 0.7  # both target conventions


def _record(prompt: str, target: str):
    from mmke.data.records import EditRecord

    return EditRecord(id=0, prompt=prompt, pred="", target=" " + target, rephrase="", image="", image_rephrase="",
                      loc="", loc_ans="", m_loc="", m_loc_q="", m_loc_a="")


def test_kinds_never_asked_are_not_measured():
    source = WorldFacts("eval", 32, TEMPLATE, {"caption": 0, "fact": 0, "metal": 0, "mine": 0, "tie": 0})
    kinds = {question.kind for question in source.every_question(random.Random(0))}
    assert kinds == {*ATTRIBUTES, "count"}
    assert source.text_questions() == []
    assert {q.kind for q in WorldFacts("eval", 32, TEMPLATE).every_question(random.Random(0))} == {
        *ATTRIBUTES, "caption", "count", "metal", "mine"}
    assert {q.kind for q in WorldFacts("eval", 32, TEMPLATE).text_questions()} == {"fact", "tie"}
