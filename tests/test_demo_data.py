"""The synthetic demo datasets load cleanly, are deterministic and make sense as edits."""

import json
from dataclasses import fields

import pytest

from mmke.data import ImageRoots, load_records, load_rgb
from mmke.data.demo import (
    ATTRIBUTES, BACKGROUNDS, COLOURS, COUNT_QUESTIONS, HOP_QUESTIONS, METALS, MINES, NUMBERS, SIZES, TIES,
    VQA_QUESTIONS, all_scenes, caption, consequence, scene_split, write_demo_dataset,
)


def tree(root):
    """Relative path -> bytes of every file under ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["evqa", "eic"])
def test_demo_loads_without_skips_at_requested_size(tmp_path, kind):
    paths = write_demo_dataset(tmp_path, kind, n_train=5, n_eval=7, seed=3, image_size=32)
    assert paths == {"train": tmp_path / "train.json", "eval": tmp_path / "eval.json",
                     "images": tmp_path / "images"}
    for split, n in (("train", 5), ("eval", 7)):
        records = load_records(kind, paths[split], ImageRoots(paths["images"]))  # every image decodes
        assert [r.id for r in records] == list(range(n))
        assert len(json.loads(paths[split].read_text())) == n
        for r in records:
            assert r.pred.strip() != r.target.strip()
            assert r.image != r.image_rephrase
            image = paths["images"] / r.image
            rephrased = paths["images"] / r.image_rephrase
            assert image.read_bytes() != rephrased.read_bytes()
            for rel in (r.image, r.image_rephrase, r.m_loc):
                assert load_rgb(paths["images"] / rel).size == (32, 32)
    # E-VQA's stricter skip rule (any empty field) drops nothing either
    assert len(load_records("evqa", paths["eval"], ImageRoots(paths["images"]))) == 7


CAPTIONS = {caption(scene): scene for scene in all_scenes()}


def differing(a, b):
    return [f.name for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def test_demo_formats_differ_by_kind(tmp_path):
    vqa = json.loads(write_demo_dataset(tmp_path / "v", "evqa", 6, 0)["train"].read_text())
    cap = json.loads(write_demo_dataset(tmp_path / "c", "eic", 6, 0)["train"].read_text())
    assert all(r["src"].endswith("?") for r in vqa)
    assert not any(r["src"].endswith("?") for r in cap)
    for r in cap:  # a counterfactual caption describes the same scene with one attribute changed
        assert len(differing(CAPTIONS[r["pred"]], CAPTIONS[r["alt"]])) == 1
    for rows in (vqa, cap):
        assert all(r["m_loc"] not in (r["image"], r["image_rephrase"]) for r in rows)


def test_world_has_a_few_hundred_scenes_and_a_fixed_heldout_part():
    scenes = all_scenes()
    assert len(scenes) == len(set(scenes)) == 3 * 6 * 2 * 3 * 3
    train, heldout = scene_split("train"), scene_split("eval")
    assert set(train) | set(heldout) == set(scenes) and not set(train) & set(heldout)
    assert len(heldout) == round(0.2 * len(scenes))
    assert scene_split("eval") == heldout  # the same for every caller, dataset and seed
    with pytest.raises(ValueError, match="train, eval"):
        scene_split("test")


def test_eval_scenes_never_occur_in_a_train_split(tmp_path):
    paths = write_demo_dataset(tmp_path, "eic", n_train=60, n_eval=30, seed=4)
    train = {CAPTIONS[r["pred"]] for r in json.loads(paths["train"].read_text())}
    heldout = {CAPTIONS[r["pred"]] for r in json.loads(paths["eval"].read_text())}
    assert train <= set(scene_split("train")) and heldout <= set(scene_split("eval"))
    assert len(train) > 40  # many distinct scenes, not one repeated


def test_vqa_records_ask_one_attribute_with_truth_and_counterfactual(tmp_path):
    rows = json.loads(write_demo_dataset(tmp_path, "evqa", n_train=80, n_eval=0, seed=2)["train"].read_text())
    asked = set()
    for r in rows:
        (attribute,) = [a for a, (question, rephrasings) in VQA_QUESTIONS.items()
                        if r["src"] == question and r["rephrase"] in rephrasings]
        asked.add(attribute)
        assert r["pred"] in ATTRIBUTES[attribute] and r["alt"] in ATTRIBUTES[attribute]
        assert r["pred"] != r["alt"]
        assert r["m_loc_a"] in NUMBERS and r["m_loc_q"] in COUNT_QUESTIONS
    assert asked == set(ATTRIBUTES)


def test_rendering_follows_the_scene(tmp_path):
    """Pixels carry the facts: the object's colour and the background are where they should be."""
    paths = write_demo_dataset(tmp_path, "eic", n_train=20, n_eval=0, seed=5, image_size=64)
    for r in json.loads(paths["train"].read_text()):
        scene = CAPTIONS[r["pred"]]
        for rel in (r["image"], r["image_rephrase"]):
            pixels = load_rgb(paths["images"] / rel).load()
            corner = pixels[0, 63] if scene.position == "right" else pixels[63, 63]
            assert max(abs(a - b) for a, b in zip(corner, BACKGROUNDS[scene.background])) <= 12
            colours = {pixels[x, y] for x in range(64) for y in range(64)}
            assert any(max(abs(a - b) for a, b in zip(c, COLOURS[scene.colour])) <= 15 for c in colours)
            # the object's box: as wide as its size says, hugging its side (or centred)
            columns = [x for x in range(64) if any(pixels[x, y] != corner for y in range(64))]
            left, right = min(columns) / 64, (max(columns) + 1) / 64
            low, high = SIZES[scene.size]
            assert low - 0.04 <= right - left <= high + 0.04, (rel, scene)
            assert {"left": left <= 0.12, "right": right >= 0.86,
                    "middle": abs((left + right) / 2 - 0.5) <= 0.08}[scene.position], (rel, scene, left, right)


@pytest.mark.parametrize("kind", ["evqa", "eic", "vlkeb"])
def test_demo_is_deterministic(tmp_path, kind):
    first = write_demo_dataset(tmp_path / "a", kind, n_train=4, n_eval=4, seed=1)
    write_demo_dataset(tmp_path / "b", kind, n_train=4, n_eval=4, seed=1)
    write_demo_dataset(tmp_path / "c", kind, n_train=4, n_eval=4, seed=2)
    a, b, c = tree(tmp_path / "a"), tree(tmp_path / "b"), tree(tmp_path / "c")
    assert len(a) == 2 + 2 * 4 * 3  # two JSON files, three images per record
    assert a == b
    assert a.keys() == c.keys()
    assert a["train.json"] != c["train.json"]
    assert a["images/train/00000.png"] != c["images/train/00000.png"]
    assert first["train"].read_bytes() != first["eval"].read_bytes()


def test_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="evqa, eic"):
        write_demo_dataset(tmp_path, "okvqa")
    with pytest.raises(ValueError, match="n_train=-1"):
        write_demo_dataset(tmp_path, "evqa", n_train=-1)
    with pytest.raises(ValueError, match="image_size"):
        write_demo_dataset(tmp_path, "evqa", image_size=4)


def test_vlkeb_demo_edits_colours_whose_consequences_follow_the_new_colour(tmp_path):
    paths = write_demo_dataset(tmp_path, "vlkeb", n_train=3, n_eval=8, seed=2, image_size=32)
    rows = json.loads(paths["eval"].read_text())
    roots = ImageRoots(paths["images"])
    for hop, kind in ((1, "metal"), (2, "mine")):
        records = load_records("vlkeb", paths["eval"], roots, hop=hop)
        assert [r.id for r in records] == list(range(8))  # every record has both hops
        for r, row in zip(records, rows):
            assert r.prompt == VQA_QUESTIONS["colour"][0] and r.pred in COLOURS and r.target.strip() in COLOURS
            (question, answer), = r.portability
            assert question == HOP_QUESTIONS[kind]
            # the answer follows the new colour through the ties, and differs from the truth's
            assert answer == " " + consequence(kind, r.target.strip()) != " " + consequence(kind, r.pred)
            assert [p["port_type"] for p in row["port_new"]] == ["1-hop", "2-hop"]
    assert dict(TIES)["What are red things made of?"] == METALS["red"]
    assert dict(TIES)[f"Where is {METALS['red']} mined?"] == MINES[METALS["red"]] == consequence("mine", "red")
    assert len(set(METALS.values())) == len(COLOURS) and len(set(MINES.values())) == len(MINES)  # one-to-one
