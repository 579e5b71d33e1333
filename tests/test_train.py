"""Meta-training of MEND, SERAC and KE on the tiny BLIP-2 and a tiny demo dataset.

Each editor is trained once per module (tens of steps); the tests then check what training must
achieve (lower validation edit loss, a classifier that separates in- from out-of-scope inputs),
that a checkpoint reproduces the same edited logits in a fresh process, and that a killed run
resumes to exactly the network of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from mmke import metrics, train
from mmke.data.demo import write_demo_dataset
from mmke.data.records import ImageRoots, RecordImages, load_records
from mmke.hparams import build_hparams, read_hparams
from mmke.methods.base import get_method, make_editor
from mmke.methods.meta import RowwiseDelta, edit_loss_factors, subtract_in_place
from mmke.models.base import Batch, load_model
from mmke.models.tiny import build_tiny_blip2
from mmke.models.tiny_aux import build_tiny_aux

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    build_tiny_blip2(root / "model")
    build_tiny_aux("classifier", root / "classifier")
    build_tiny_aux("counterfactual", root / "counterfactual")
    write_demo_dataset(root / "data", "evqa", n_train=24, n_eval=4, seed=0)
    return root


@pytest.fixture(scope="module")
def model(world):
    return load_model("blip2", world / "model")


@pytest.fixture(scope="module")
def roots(world):
    return ImageRoots(world / "data/images")


@pytest.fixture(scope="module")
def train_records(world, roots):
    return load_records("evqa", world / "data/train.json", roots)


@pytest.fixture(scope="module")
def eval_records(world, roots):
    return load_records("evqa", world / "data/eval.json", roots)


def hparams_file(world: Path, method: str, **overrides) -> Path:
    """The demo hparams of ``method`` with the auxiliary models of this test world."""
    values = {**read_hparams(REPO / f"config/hparams/{method}/tiny-blip2.yaml").__dict__, **overrides}
    if method == "SERAC":
        values |= {"classifier": str(world / "classifier"), "counterfactual": str(world / "counterfactual")}
    path = world / f"{method}-{abs(hash(json.dumps(overrides, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def trained(world, model, train_records, roots):
    """Each method trained once for 20 steps: its editor, hparams file, checkpoint and result."""
    out = {}
    for method in ("MEND", "SERAC", "KE"):
        # SERAC with its unlikelihood term on, to test it (the demo file keeps it off)
        extra = {"unlikelihood": True} if method == "SERAC" else {}
        path = hparams_file(world, method, max_iters=20, val_interval=10, **extra)
        editor = make_editor(read_hparams(path))
        checkpoint = world / f"{method}.safetensors"
        result = train.train(editor, model, train_records, RecordImages(roots), checkpoint,
                             world / f"{method}.state.pt", log=lambda _: None)
        out[method] = {"editor": editor, "hparams": path, "checkpoint": checkpoint, "result": result}
    return out


@pytest.mark.parametrize("method", ["MEND", "SERAC", "KE"])
def test_validation_edit_loss_drops(trained, method):
    history = trained[method]["result"].history
    assert [h["step"] for h in history] == [0, 10, 20]
    assert history[-1]["val"]["edit"] < history[0]["val"]["edit"]
    assert history[-1]["val"]["total"] < history[0]["val"]["total"]
    assert trained[method]["result"].stopped == "max_iters"


def test_base_model_is_untouched_by_training(trained, world, model):
    fresh = load_model("blip2", world / "model")
    for (name, a), (_, b) in zip(model.model.named_parameters(), fresh.model.named_parameters()):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def serac_60(world, model, train_records, roots):
    """SERAC trained for 60 steps on 24 records: on the demo world, 20 steps do not yet separate
    every held-out rephrase (seen: 3 of 4 records), 60 do; with 12 records a locality question
    still passed as in scope after 100 steps."""
    editor = make_editor(read_hparams(hparams_file(world, "SERAC", max_iters=60, val_interval=20)))
    train.train(editor, model, train_records, RecordImages(roots), world / "SERAC-60.safetensors",
                world / "SERAC-60.state.pt", log=lambda _: None)
    return editor


def test_serac_classifier_routes_held_out_inputs_as_trained(serac_60, eval_records):
    serac = serac_60
    for record in eval_records:
        # in scope: the edit prompt itself and its rephrase; out of scope: both locality questions
        routed = serac.in_scope([record.prompt, record.rephrase, record.loc, f"Question: {record.m_loc_q} Short answer:"],
                                [record.prompt])
        assert routed == [True, True, False, False], record


def test_untrained_serac_classifier_does_not_separate(world, model, eval_records):
    """The routing above is learned: a fresh classifier treats a rephrase like a locality question."""
    serac = make_editor(read_hparams(hparams_file(world, "SERAC")))
    serac.build(model)
    record = eval_records[0]
    routed = serac.in_scope([record.rephrase, record.loc], [record.prompt])
    assert routed[0] == routed[1]


def edited_logits(editor, world: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a rephrase and a locality item on a freshly loaded model, with ``editor``'s edit of
    the first eval record live, and after its revert."""
    model = load_model("blip2", world / "model")
    roots = ImageRoots(world / "data/images")
    record = load_records("evqa", world / "data/eval.json", roots)[0]
    editor.bind_images(roots)
    images = editor.images(record)

    def logits() -> torch.Tensor:
        batch = model.teacher_forced([record.rephrase, record.loc], [record.target, record.loc_ans],
                                     [images["image"], images["m_loc"]])
        with torch.no_grad():
            return model.logits(batch)

    edit = editor.apply(model, [record])
    edited = logits()
    edit.revert()
    return edited, logits()


EDITED_LOGITS_FROM_CHECKPOINT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from mmke.hparams import read_hparams
    from mmke.methods.base import make_editor
    from test_train import edited_logits
    world, hparams, checkpoint, out = sys.argv[1:]
    editor = make_editor(read_hparams(hparams))
    editor.prepare({"checkpoint": checkpoint})
    torch.save(edited_logits(editor, Path(world))[0], out)
""")


@pytest.mark.parametrize("method", ["MEND", "SERAC", "KE"])
def test_checkpoint_reproduces_edited_logits_in_a_fresh_process(trained, world, tmp_path, method):
    out = tmp_path / "logits.pt"
    entry = trained[method]
    env = subprocess_env()
    env["PYTHONPATH"] += os.pathsep + str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", EDITED_LOGITS_FROM_CHECKPOINT, str(world), str(entry["hparams"]),
                    str(entry["checkpoint"]), str(out)], check=True, env=env, timeout=300)
    theirs = torch.load(out, weights_only=True)
    # the network trained in this process gives the same edited logits, and the edit shows in them
    entry["editor"].network.eval()
    ours, unedited = edited_logits(entry["editor"], world)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(unedited, theirs, atol=1e-3)


@pytest.mark.parametrize("method", ["MEND", "SERAC", "KE"])
def test_edit_changes_outputs_and_revert_restores_them(trained, world, eval_records, method):
    model = load_model("blip2", world / "model")
    editor = make_editor(read_hparams(trained[method]["hparams"]))
    editor.prepare({"checkpoint": trained[method]["checkpoint"]})
    editor.bind_images(ImageRoots(world / "data/images"))
    record = eval_records[0]
    image = editor.images(record)["image"]
    batch = model.teacher_forced([record.prompt], [record.target], [image])
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    with torch.no_grad():
        pre = model.logits(batch)
    edit = editor.apply(model, [record])
    with torch.no_grad():
        post = model.logits(model.teacher_forced([record.prompt], [record.target], [image]))
    assert not torch.allclose(pre, post)
    edit.revert()
    with torch.no_grad():
        assert torch.equal(model.logits(model.teacher_forced([record.prompt], [record.target], [image])), pre)
    for name, value in model.model.named_parameters():
        assert torch.equal(value, before[name]), name


def test_checkpoint_of_other_hparams_is_refused(trained, world):
    other = hparams_file(world, "MEND", max_iters=21, val_interval=10)
    editor = make_editor(read_hparams(other))
    with pytest.raises(ValueError, match=r"MEND\.safetensors: checkpoint was trained with hparams digest"):
        editor.prepare({"checkpoint": trained["MEND"]["checkpoint"]})


def test_editing_without_checkpoint_is_an_error(world, model, eval_records):
    editor = make_editor(read_hparams(hparams_file(world, "MEND")))
    with pytest.raises(ValueError, match="needs a trained checkpoint"):
        editor.prepare({})
    editor.bind_images(ImageRoots(world / "data/images"))
    with pytest.raises(RuntimeError, match="call prepare"):
        editor.apply(model, eval_records[:1])


def test_unknown_scope_names_the_valid_ones(world, model):
    editor = make_editor(read_hparams(hparams_file(world, "MEND", scope="llm.mlp.last3")))
    with pytest.raises(KeyError, match="unknown scope 'llm.mlp.last3'.*llm.mlp.last2"):
        editor.build(model)


@pytest.mark.parametrize("method", ["MEND", "KE"])
def test_weight_delta_editors_edit_a_bfloat16_model(world, eval_records, method):
    """The networks compute in float32 while the model is bf16 (benchmarks/scale.py's paper sizes)."""
    model = load_model("blip2", world / "model", dtype=torch.bfloat16)
    editor = make_editor(read_hparams(hparams_file(world, method)))
    editor.build(model).eval()
    editor.bind_images(ImageRoots(world / "data/images"))
    before = {name: p.detach().clone() for name, p in model.editable(editor.hparams.scope).items()}
    edit = editor.apply(model, eval_records[:1])
    after = model.editable(editor.hparams.scope)
    assert all(after[name].dtype == torch.bfloat16 for name in before)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    edit.revert()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_bad_schedule_is_rejected():
    with pytest.raises(ValueError, match="'val_interval' must be >= 1"):
        build_hparams(get_method("MEND").hparams_class, {"method": "MEND", "val_interval": 0})


def test_split_holds_out_the_tail(train_records):
    assert len(train_records) == 24
    train_part, val_part = train.split_train_val(train_records, 0.2)  # ceil(4.8) = 5 held out
    assert val_part == train_records[-5:] and train_part == train_records[:-5]
    assert train.split_train_val(train_records[:12], 0.2)[1] == train_records[9:12]  # ceil(2.4) = 3
    with pytest.raises(ValueError, match="at least 2 training records"):
        train.split_train_val(train_records[:1], 0.2)


RUN_TRAINING = textwrap.dedent("""
    import sys
    from mmke import train
    from mmke.data.records import ImageRoots, RecordImages, load_records
    from mmke.hparams import read_hparams
    from mmke.methods.base import make_editor
    from mmke.models.base import load_model
    world, hparams, checkpoint, state = sys.argv[1:]
    model = load_model("blip2", f"{world}/model")
    roots = ImageRoots(f"{world}/data/images")
    records = load_records("evqa", f"{world}/data/train.json", roots)
    train.train(make_editor(read_hparams(hparams)), model, records, RecordImages(roots), checkpoint, state)
""")


def test_killed_training_resumes_to_the_uninterrupted_result(world, model, train_records, roots, tmp_path):
    hparams = hparams_file(world, "MEND", max_iters=40, val_interval=5)
    state, checkpoint = tmp_path / "state.pt", tmp_path / "killed.safetensors"
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-c", RUN_TRAINING, str(world), str(hparams), str(checkpoint), str(state)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # killed mid-way, not finished
    assert not checkpoint.exists()
    killed_at = torch.load(state, weights_only=True)["progress"]["step"]
    assert 5 <= killed_at < 40

    messages = []
    resumed = train.train(make_editor(read_hparams(hparams)), model, train_records, RecordImages(roots),
                          checkpoint, state, log=messages.append)
    assert messages[0] == f"resumed from {state} at step {killed_at}"
    straight = train.train(make_editor(read_hparams(hparams)), model, train_records, RecordImages(roots),
                           tmp_path / "straight.safetensors", tmp_path / "straight.pt", log=lambda _: None)
    assert resumed.step == straight.step == 40
    assert [(h["val"], h["val_acc"]) for h in resumed.history] == [(h["val"], h["val_acc"]) for h in straight.history]
    from safetensors.torch import load_file

    ours, theirs = load_file(checkpoint), load_file(tmp_path / "straight.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_resume_state_of_other_hparams_is_refused(world, model, train_records, roots, tmp_path):
    state = tmp_path / "state.pt"
    first = hparams_file(world, "MEND", max_iters=2, val_interval=1)
    train.train(make_editor(read_hparams(first)), model, train_records, RecordImages(roots),
                tmp_path / "a.safetensors", state, log=lambda _: None)
    second = hparams_file(world, "MEND", max_iters=3, val_interval=1)
    with pytest.raises(ValueError, match="resume state belongs to hparams digest"):
        train.train(make_editor(read_hparams(second)), model, train_records, RecordImages(roots),
                    tmp_path / "b.safetensors", state, log=lambda _: None)


def test_early_stopping_keeps_the_best_network(world, model, train_records, roots, tmp_path):
    """With a learning rate that diverges, validation stops improving and training stops early."""
    hparams = hparams_file(world, "KE", max_iters=30, val_interval=2, early_stop_patience=4, lr=5.0)
    result = train.train(make_editor(read_hparams(hparams)), model, train_records, RecordImages(roots),
                         tmp_path / "ke.safetensors", tmp_path / "ke.pt", log=lambda _: None)
    best = min(h["val"]["total"] for h in result.history)
    assert result.best_val == best
    assert result.stopped == "early_stop" and result.step == result.best_step + 4 < 30


def test_serac_leaves_out_of_scope_outputs_exactly_unedited(trained, world, model, eval_records):
    serac = trained["SERAC"]["editor"]
    serac.network.eval()
    serac.bind_images(ImageRoots(world / "data/images"))
    record = eval_records[0]
    m_loc_image = serac.images(record)["m_loc"]

    def locality_logits() -> torch.Tensor:
        with torch.no_grad():
            return model.logits(model.teacher_forced([f"Question: {record.m_loc_q} Short answer:"], [record.m_loc_a],
                                                     [m_loc_image]))

    pre = locality_logits()
    edit = serac.apply(model, [record])
    try:
        assert torch.equal(locality_logits(), pre)
    finally:
        edit.revert()
    assert "logits" not in vars(model) and "teacher_forced" not in vars(model)  # the router is gone


def test_serac_refuses_a_counterfactual_model_with_another_vocabulary(world, model, tmp_path, eval_records):
    build_tiny_aux("counterfactual", tmp_path / "cf512", vocab_size=512)
    editor = make_editor(read_hparams(hparams_file(world, "SERAC")))
    editor = make_editor(dataclasses.replace(editor.hparams, counterfactual=str(tmp_path / "cf512")))
    editor.build(model)
    editor.bind_images(ImageRoots(world / "data/images"))
    with pytest.raises(ValueError, match="counterfactual model has 512 output tokens, the edited model 1024"):
        editor.apply(model, eval_records[:1])


@pytest.mark.parametrize("model_name", ["blip2-opt-2.7b", "minigpt4-vicuna-7b"])
def test_paper_hparams_carry_the_spec_values(model_name):
    mend = read_hparams(REPO / f"config/hparams/MEND/{model_name}.yaml")
    assert (mend.lr, mend.edit_lr, mend.lr_lr, mend.cedit, mend.iedit, mend.cloc) == (1e-6, 1e-4, 1e-4, 0.1, 0.1, 1.0)
    assert (mend.rank, mend.n_hidden, mend.init, mend.norm, mend.combine, mend.mlp_class, mend.shared) == (
        1920, 1, "id", True, True, "IDMLP", True)
    assert (mend.grad_clip, mend.accumulate_bs, mend.max_iters, mend.val_interval, mend.early_stop_patience,
            mend.seed) == (100.0, 2, 30000, 5000, 20000, 42)
    assert mend.scope == "llm.mlp.last3"
    serac = read_hparams(REPO / f"config/hparams/SERAC/{model_name}.yaml")
    assert (serac.lr, serac.edit_lr, serac.cedit, serac.iedit, serac.cloc) == (1e-5, 1e-2, 0.1, 0.1, 1.0)
    assert (serac.max_iters, serac.val_interval, serac.early_stop_patience, serac.seed) == (50000, 2000, 10000, 0)
    assert (serac.grad_clip, serac.accumulate_bs) == (100.0, 1)  # EasyEdit's SERAC blip2.yaml
    assert read_hparams(REPO / f"config/hparams/KE/{model_name}.yaml").scope == "llm.mlp.last3"
    # EasyEdit's file says True, but its multimodal trainer never passes the flag to the loss
    assert serac.unlikelihood is False


def test_unlikelihood_of_a_hand_built_case():
    """-log(1 - p) of each target token, averaged: p = 0.5 and p = 0.9 give (0.693 + 2.303) / 2."""
    probs = torch.tensor([[[0.5, 0.25, 0.125, 0.125], [0.05, 0.9, 0.025, 0.025], [0.25] * 4]])
    labels = torch.tensor([[-100, 0, 1]])  # logits[:, t] predicts labels[:, t + 1]
    value = train.target_unlikelihood(probs.log(), labels)
    assert value.item() == pytest.approx((-math.log(0.5) - math.log(0.1)) / 2, rel=1e-5)
    certain = torch.tensor([[[0.0, -1e4], [0.0, 0.0]]])  # p(label 0) = 1: finite thanks to eps
    assert math.isfinite(train.target_unlikelihood(certain, torch.tensor([[-100, 0]])).item())


def test_serac_unlikelihood_scores_the_old_answer_on_both_generality_items(world, model, train_records, roots):
    """cedit * UL(rephrase + edit image -> pred) + iedit * UL(prompt + rephrased image -> pred)."""
    serac = make_editor(read_hparams(hparams_file(world, "SERAC", cedit=0.3, iedit=0.7, unlikelihood=True)))
    serac.build(model)
    serac.network.eval()
    record, images = train_records[0], RecordImages(roots)(train_records[0])
    batch = train.make_batch(model, [record], RecordImages(roots))
    with torch.no_grad(), serac.training_edit(model, batch):
        term = serac.auxiliary_loss(model, batch)["unlikelihood"]

        def alone(prompt: str, image) -> float:
            item = model.teacher_forced([prompt], [" " + record.pred], [image])
            return train.target_unlikelihood(model.logits(item), item.labels).item()

        expected = 0.3 * alone(record.rephrase, images["image"]) + 0.7 * alone(record.prompt, images["image_rephrase"])
    assert term.item() == pytest.approx(expected, rel=1e-4)
    assert term.item() > 0


def test_serac_unlikelihood_flag_changes_training(trained, world, model, train_records, roots, tmp_path):
    with_term = trained["SERAC"]
    hp = read_hparams(with_term["hparams"])
    assert hp.unlikelihood  # the fixture turns it on
    path = hparams_file(world, "SERAC", max_iters=20, val_interval=10, unlikelihood=False)
    without = train.train(make_editor(read_hparams(path)), model, train_records, RecordImages(roots),
                          tmp_path / "serac.safetensors", tmp_path / "serac.pt", log=lambda _: None)
    first = with_term["result"].history[0]["val"]
    assert "unlikelihood" not in without.history[0]["val"] and first["unlikelihood"] > 0
    assert first["total"] == pytest.approx(hp.cedit * first["edit"] + hp.iedit * first["image_edit"]
                                           + hp.cloc * (first["loc"] + first["m_loc"]) + first["scope"]
                                           + first["unlikelihood"], rel=1e-5)
    from safetensors.torch import load_file

    ours, theirs = load_file(with_term["checkpoint"]), load_file(tmp_path / "serac.safetensors")
    assert any(not torch.equal(ours[key], theirs[key]) for key in ours)


def hand_item(labels: list[list[int]], mask: list[list[int]]) -> train.Item:
    labels_t, mask_t = torch.tensor(labels), torch.tensor(mask)
    return train.Item(Batch(input_ids=torch.zeros_like(labels_t), attention_mask=mask_t, labels=labels_t,
                            pixel_values=None), [], [])


def test_training_accuracies_of_a_constructed_case():
    """Two records, vocabulary 12; every expected value is worked out by hand."""
    vocab = 12

    def peaks(rows: list[list[int]]) -> torch.Tensor:  # logits whose argmax is the given id per position
        return torch.nn.functional.one_hot(torch.tensor(rows), vocab).float() * 5

    target = hand_item([[-100, 2, 3], [-100, 2, 3]], [[1, 1, 1], [1, 1, 1]])
    loc = hand_item([[-100, 1, 1], [-100, 1, -100]], [[1, 1, 1], [1, 1, 0]])
    m_loc = hand_item([[-100, 1, 1], [-100, 1, 1]], [[1, 1, 1], [1, 1, 1]])
    batch = train.TrainBatch(records=[None, None], edit=target, rephrase=target, image_rephrase=target,
                             loc=loc, m_loc=m_loc, images=[{}, {}])
    ranked = torch.arange(vocab, dtype=torch.float).repeat(2, 3, 1)  # top-10 = ids 11..2 at every position
    swapped = ranked.clone()
    swapped[1, 0, [11, 10]] = swapped[1, 0, [10, 11]]  # record 1, position 0: ranks 1 and 2 trade places
    out = train.EditedOutputs(
        pre={"loc": peaks([[4, 5, 6], [4, 5, 6]]), "m_loc": ranked},
        post={"edit": peaks([[2, 3, 0], [2, 4, 0]]),  # record 0 right, record 1 half right
              "rephrase": peaks([[2, 3, 0], [2, 3, 0]]),  # both right
              "image_rephrase": peaks([[0, 3, 0], [0, 0, 0]]),  # half right, all wrong
              "loc": peaks([[4, 5, 0], [4, 0, 9]]),  # 2 of 3 agree; 1 of 2 real positions agree
              "m_loc": swapped},
        aux={})
    exact = train.training_accuracies(batch, out, exact_match=True)
    assert exact == [
        {"inner": 1.0, "edit": 1.0, "image_rephrase": 0.0, "loc": pytest.approx(2 / 3), "image_loc": 1.0},
        {"inner": 0.0, "edit": 1.0, "image_rephrase": 0.0, "loc": 0.5, "image_loc": pytest.approx(28 / 30)},
    ]
    tokens = train.training_accuracies(batch, out, exact_match=False)
    assert [row["inner"] for row in tokens] == [1.0, 0.5] and [row["image_rephrase"] for row in tokens] == [0.5, 0.0]


def test_recorded_validation_accuracies_are_the_metric_functions_values(trained, model, train_records, roots):
    """The accuracies recorded for the kept network, recomputed record by record from the metrics."""
    entry = trained["MEND"]
    result, editor, hp = entry["result"], entry["editor"], read_hparams(entry["hparams"])
    recorded = next(h["val_acc"] for h in result.history if h["step"] == result.best_step)
    _, val_records = train.split_train_val(train_records, hp.val_fraction)
    editor.network.eval()
    rows = []
    for record in val_records:
        batch = train.make_batch(model, [record], RecordImages(roots))
        with torch.no_grad():
            pre = {"loc": model.logits(batch.loc.batch), "image_loc": model.logits(batch.m_loc.batch)}
            with editor.training_edit(model, batch):
                scores = {name: metrics.per_item_accuracy(model.logits(item.batch), item.batch.labels, True).item()
                          for name, item in (("inner", batch.edit), ("edit", batch.rephrase),
                                             ("image_rephrase", batch.image_rephrase))}
                for name, item, k in (("loc", batch.loc, 1), ("image_loc", batch.m_loc, 10)):
                    (post_top,), (pre_top,) = (metrics.top_k_predictions(x, item.batch.attention_mask, k)
                                               for x in (model.logits(item.batch), pre[name]))
                    scores[name] = metrics.locality_agreement(pre_top, post_top)
        rows.append(scores)
    assert set(recorded) == {"inner", "edit", "image_rephrase", "loc", "image_loc"}
    assert recorded == pytest.approx(metrics.mean_metrics(rows, list(recorded)), abs=1e-6)


def test_training_raises_the_validation_rewrite_accuracy(trained):
    """MEND learns to edit: on held-out records the edit prompt gives the new target after training."""
    history = trained["MEND"]["result"].history
    assert history[0]["val_acc"]["inner"] == 0.0  # the random tiny model knows none of the new targets
    assert history[-1]["val_acc"]["inner"] > history[0]["val_acc"]["inner"]


@pytest.mark.parametrize("join,written", [("space", " red"), ("raw", "red")])
def test_serac_writes_the_edit_in_the_edited_models_target_form(monkeypatch, join, written):
    """The counterfactual model reads the edit's target in the form it must answer in: the edited
    model's target convention (what its pretraining teaches with both forms)."""
    import types

    from mmke.methods import serac

    seen = []
    monkeypatch.setattr(serac, "counterfactual_ids",
                        lambda tok, edit, prompt, answer: seen.append((edit, answer)) or ([1, 2, 3], 2))
    class LM:  # a 5-token vocabulary stand-in for both language models
        def get_output_embeddings(self):
            return torch.nn.Linear(2, 5)

        def __call__(self, **_):
            return types.SimpleNamespace(logits=torch.zeros(1, 3, 5))

    model = types.SimpleNamespace(tokenizer=types.SimpleNamespace(pad_token_id=0), device="cpu", model=LM(), logits=None,
                                  target_text=lambda t: t if join == "space" else t.removeprefix(" "))
    network = types.SimpleNamespace(counterfactual=LM())
    router = serac.Router(network, model, [("What colour is the shape?", " red")], soft=False)
    router.counterfactual_logits([(router.edits[0], "What is the colour of the object shown?", " red")])
    assert seen == [(("What colour is the shape?", written), written)]


@pytest.mark.parametrize("method", ["MEND", "KE"])
def test_weight_deltas_are_written_as_they_come_from_the_unedited_models_gradients(world, eval_records, method,
                                                                                  monkeypatch):
    """apply() writes W - delta per weight before the next delta exists (at most one full-size
    change alive at a time; KE's a row at a time here), and every delta is the one computed on
    the unedited model, bit for bit that of training's graph."""
    monkeypatch.setattr(RowwiseDelta, "CPU_BLOCK_ELEMENTS", 1)
    model = load_model("blip2", world / "model")
    editor = make_editor(read_hparams(hparams_file(world, method)))
    editor.build(model).eval()
    editor.bind_images(ImageRoots(world / "data/images"))
    params = model.editable(editor.hparams.scope)
    before = {name: p.detach().clone() for name, p in params.items()}
    item = train.edit_item(model, eval_records[:1], [editor.images(eval_records[0])["image"]])

    def gradients():  # the edit loss's, taken anew for each call (deltas pops them)
        return edit_loss_factors(model, item.batch, editor.network.names)[0]

    with torch.no_grad():
        expected, yielded = {name: before[name].clone() for name in params}, []
        for name, delta in editor.deltas(model, eval_records[:1], gradients()):
            subtract_in_place(expected[name], delta)  # as apply() writes it
            yielded.append(name)
    assert yielded == list(params) and len(yielded) > 1
    # with grad (training's graph) the deltas are computed out of place: the same values
    assert all(torch.equal(expected[name], before[name] - delta.detach())
               for name, delta in editor.deltas(model, eval_records[:1], gradients()))
    written_when_yielded = []
    deltas = editor.deltas

    def spy(model, records, gradients):
        for name, delta in deltas(model, records, gradients):
            written_when_yielded.append([not torch.equal(params[n], before[n]) for n in params])
            yield name, delta

    editor.deltas = spy
    edit = editor.apply(model, eval_records[:1])
    n = len(params)
    assert written_when_yielded == [[True] * k + [False] * (n - k) for k in range(n)]
    assert all(torch.equal(params[name], expected[name]) for name in params)
    edit.revert()
    assert all(torch.equal(params[name], before[name]) for name in params)


def test_ke_delta_is_the_gated_gradient_without_building_the_gates(monkeypatch):
    from mmke.methods.ke import KEHParams, KENetwork

    torch.manual_seed(0)
    hp = build_hparams(KEHParams, {"method": "KE", "lstm_hidden": 8})
    network = KENetwork(4, {"w": torch.Size([6, 5])}, hp)
    for head in network.heads:  # leave the identity-like init, so that every term counts
        torch.nn.init.normal_(head.weight)
        torch.nn.init.normal_(head.bias)
    condition, grad = torch.randn(16), torch.randn(6, 5)
    a_out, a_in, b_out, b_in, s = network.heads[0](condition).split([6, 5, 6, 5, 1])
    written_out = hp.max_scale * s.sigmoid() * (grad * (a_out.softmax(-1)[:, None] * a_in[None, :])
                                                + b_out.softmax(-1)[:, None] * b_in[None, :])
    delta = network.delta(0, condition, grad)
    torch.testing.assert_close(delta, written_out, rtol=1e-6, atol=1e-7)
    assert delta.dtype == torch.float32
    assert network.delta(0, condition, grad.bfloat16()).dtype == torch.float32  # a bf16 model's gradient
    delta.sum().backward()  # training reaches the heads through it
    assert network.heads[0].weight.grad is not None and network.heads[0].weight.grad.abs().sum() > 0
    # an edit writes the change a block of rows at a time, each in place: the same bits
    for dtype in (torch.float32, torch.bfloat16):
        whole = torch.zeros(6, 5, dtype=dtype).sub_(network.delta(0, condition, grad.to(dtype)).detach().to(dtype))
        for block_elements in (1, 10, 1 << 16):  # a row per block, two rows (5 wide), every row
            monkeypatch.setattr(RowwiseDelta, "CPU_BLOCK_ELEMENTS", block_elements)
            weight = torch.zeros(6, 5, dtype=dtype)
            with torch.no_grad():
                network.delta(0, condition, grad.to(dtype, copy=True)).subtract_from(weight)
                # training_edit without grad: W - delta as a new tensor, float32 as the sum promotes
                written_out = network.delta(0, condition, grad.to(dtype, copy=True)).subtracted_from(weight)
            assert torch.equal(weight, whole)
            assert written_out.dtype == torch.float32
            assert torch.equal(written_out, weight - network.delta(0, condition, grad.to(dtype)).detach())
