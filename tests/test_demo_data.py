"""The synthetic demo datasets load cleanly, are deterministic and make sense as edits."""

import json

import pytest

from mmke.data import ImageRoots, load_records, load_rgb
from mmke.data.demo import write_demo_dataset


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


def test_demo_formats_differ_by_kind(tmp_path):
    vqa = json.loads(write_demo_dataset(tmp_path / "v", "evqa", 6, 0)["train"].read_text())
    cap = json.loads(write_demo_dataset(tmp_path / "c", "eic", 6, 0)["train"].read_text())
    assert all(r["src"].endswith("?") for r in vqa)
    assert not any(r["src"].endswith("?") for r in cap)
    for r in cap:  # a counterfactual caption changes exactly one attribute (colour or shape)
        pred, alt = r["pred"].split()[1:], r["alt"].split()[1:]  # [1:]: the article may change
        assert len(pred) == len(alt) and sum(p != a for p, a in zip(pred, alt)) == 1
    for rows in (vqa, cap):
        assert all(r["m_loc"] not in (r["image"], r["image_rephrase"]) for r in rows)


@pytest.mark.parametrize("kind", ["evqa", "eic"])
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
