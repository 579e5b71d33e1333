"""E-VQA / E-IC / VLKEB loading: field mapping, the skip rules, and errors that point at the data."""

import json
import re
from dataclasses import fields

import pytest
from PIL import Image

import mmke.data.records as records_module
from mmke.data import (
    DataError,
    EditRecord,
    ImageRoots,
    load_eic,
    load_evqa,
    load_records,
    load_vlkeb,
    multimodal_locality_prompt,
)

STRING_FIELDS = ("src", "pred", "alt", "rephrase", "image", "image_rephrase",
                 "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a")
IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")


def row(i: int, **changes) -> dict:
    """A valid record whose every value is distinct, so a mix-up of fields shows."""
    base = {
        "src": f"question {i}?", "pred": f"pred{i}", "alt": f"alt{i}", "rephrase": f"rephrased {i}?",
        "image": f"img/{i}.png", "image_rephrase": f"reph/{i}.png", "loc": f"nq {i}?",
        "loc_ans": f"nq answer {i}", "m_loc": f"okvqa/{i}.png", "m_loc_q": f"okvqa {i}?",
        "m_loc_a": f"okvqa answer {i}",
    }
    return base | changes


def write_dataset(root, rows, name="data.json"):
    """Write ``rows`` as JSON and a small PNG for every image path that stays inside ``root``."""
    for r in rows:
        if not isinstance(r, dict):
            continue
        for field in IMAGE_FIELDS:
            rel = r.get(field)
            if isinstance(rel, str) and rel and not rel.startswith("/") and ".." not in rel:
                path = root / rel
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", (4, 4), (len(rel) * 9 % 255, 0, 0)).save(path)
    path = root / name
    path.write_text(json.dumps(rows))
    return path


def assert_names(err: DataError, path, index, field):
    message = str(err)
    assert path.name in message
    assert f"record {index}" in message
    assert f"field '{field}'" in message
    assert (err.index, err.field) == (index, field)


@pytest.mark.parametrize("loader", [load_evqa, load_eic])
def test_fields_map_onto_edit_record(tmp_path, loader):
    rows = [row(0), row(1)]
    path = write_dataset(tmp_path, rows)
    records = loader(path, ImageRoots(tmp_path))
    assert [r.id for r in records] == [0, 1]
    for r, src in zip(records, rows):
        assert (r.prompt, r.pred, r.rephrase) == (src["src"], src["pred"], src["rephrase"])
        assert (r.image, r.image_rephrase, r.m_loc) == (src["image"], src["image_rephrase"], src["m_loc"])
        assert (r.loc, r.m_loc_q) == (src["loc"], src["m_loc_q"])
        assert (r.target, r.loc_ans, r.m_loc_a) == (" " + src["alt"], " " + src["loc_ans"], " " + src["m_loc_a"])
    assert {f.name for f in fields(EditRecord)} == {"id", "prompt", "target", "portability", *STRING_FIELDS} - {"src", "alt"}
    assert all(r.portability == () for r in records)  # MMEdit's kinds have no portability questions


@pytest.mark.parametrize(("source", "record"), [("alt", "target"), ("loc_ans", "loc_ans"), ("m_loc_a", "m_loc_a")])
def test_answers_get_exactly_one_leading_space(tmp_path, source, record):
    path = write_dataset(tmp_path, [row(0, **{source: "x"}), row(1, **{source: " x"}), row(2, **{source: "  x"})])
    assert [getattr(r, record) for r in load_evqa(path, ImageRoots(tmp_path))] == [" x", " x", "  x"]


@pytest.mark.parametrize("field", STRING_FIELDS)
def test_evqa_skips_record_with_any_empty_field(tmp_path, field):
    path = write_dataset(tmp_path, [row(0), row(1, **{field: ""}), row(2)])
    assert [r.id for r in load_evqa(path, ImageRoots(tmp_path))] == [0, 2]


@pytest.mark.parametrize("field", sorted(set(STRING_FIELDS) - set(IMAGE_FIELDS) - {"alt"}))
def test_eic_keeps_empty_text_fields_and_skips_only_empty_alt(tmp_path, field):
    path = write_dataset(tmp_path, [row(0, alt=""), row(1, **{field: ""}), row(2)])
    records = load_eic(path, ImageRoots(tmp_path))
    assert [r.id for r in records] == [1, 2]
    mapped = {"src": "prompt"}.get(field, field)
    assert getattr(records[0], mapped) in ("", " ")  # answers still get their leading space


def test_skipped_ids_are_kept_and_logged(tmp_path, caplog):
    path = write_dataset(tmp_path, [row(0), row(1, alt=""), row(2, loc=""), row(3)])
    with caplog.at_level("WARNING", logger="mmke.data.records"):
        evqa = load_evqa(path, ImageRoots(tmp_path))
        eic = load_eic(path, ImageRoots(tmp_path))
    assert [r.id for r in evqa] == [0, 3] and evqa.skipped == (1, 2)
    assert [r.id for r in eic] == [0, 2, 3] and eic.skipped == (1,)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: 2 of 4 records skipped (E-VQA skip rule: an empty field): ids 1, 2",
        f"{path}: 1 of 4 records skipped (E-IC skip rule: an empty alt): ids 1",
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmke.data.records"):
        assert load_evqa(write_dataset(tmp_path, [row(0)], "ok.json"), ImageRoots(tmp_path)).skipped == ()
    assert caplog.records == []  # nothing skipped, nothing said


def test_a_long_skip_list_is_cut_in_the_log_only(tmp_path, caplog):
    path = write_dataset(tmp_path, [row(i, alt="") for i in range(25)] + [row(25)])
    with caplog.at_level("WARNING", logger="mmke.data.records"):
        records = load_evqa(path, ImageRoots(tmp_path))
    assert records.skipped == tuple(range(25))
    assert caplog.records[0].getMessage().endswith("ids " + ", ".join(map(str, range(20))) + ", ...")


def test_size_is_applied_before_skipping(tmp_path):
    path = write_dataset(tmp_path, [row(0), row(1, alt=""), row(2), row(3), row(4)])
    assert [r.id for r in load_evqa(path, ImageRoots(tmp_path), size=3)] == [0, 2]
    assert [r.id for r in load_eic(path, ImageRoots(tmp_path), size=0)] == []
    assert [r.id for r in load_eic(path, ImageRoots(tmp_path), size=99)] == [0, 2, 3, 4]


def test_size_applies_before_validation_of_later_records(tmp_path):
    path = write_dataset(tmp_path, [row(0), row(1), "not a record"])
    assert len(load_evqa(path, ImageRoots(tmp_path), size=2)) == 2


def test_load_records_dispatches_on_kind(tmp_path):
    path = write_dataset(tmp_path, [row(0), row(1, loc="")])
    assert [r.id for r in load_records("evqa", path, ImageRoots(tmp_path))] == [0]
    assert [r.id for r in load_records("eic", path, ImageRoots(tmp_path))] == [0, 1]
    with pytest.raises(ValueError, match="evqa"):
        load_records("okvqa", path, ImageRoots(tmp_path))


def test_multimodal_locality_prompt_templates(tmp_path):
    record = load_evqa(write_dataset(tmp_path, [row(7, m_loc_q="How many {dogs}?")]), ImageRoots(tmp_path))[0]
    assert multimodal_locality_prompt(record) == "Question: How many {dogs}? Short answer:"
    assert multimodal_locality_prompt(record, "trainer") == "Question: How many {dogs}? Short answer:"
    assert multimodal_locality_prompt(record, "raw") == "How many {dogs}?"
    with pytest.raises(ValueError, match="trainer, raw"):
        multimodal_locality_prompt(record, "ike")


def test_image_rephrase_resolves_against_rephrase_root(tmp_path):
    data, rephrase = tmp_path / "data", tmp_path / "rephrase"
    data.mkdir()
    path = write_dataset(data, [row(0)])
    (rephrase / "reph").mkdir(parents=True)
    (data / "reph" / "0.png").rename(rephrase / "reph" / "0.png")
    roots = ImageRoots(data, rephrase)
    assert roots.resolve("image_rephrase", "reph/0.png") == rephrase.resolve() / "reph" / "0.png"
    assert roots.resolve("image", "img/0.png") == roots.resolve("m_loc", "img/0.png") == data.resolve() / "img" / "0.png"
    assert len(load_evqa(path, roots)) == 1
    # without a separate rephrase root the image is looked for (and missing) under the data root
    with pytest.raises(DataError) as err:
        load_evqa(path, ImageRoots(data))
    assert_names(err.value, path, 0, "image_rephrase")


def test_roots_check_each_path_once_and_refuse_an_escape_every_time(tmp_path, monkeypatch):
    """Loading checks every image path; the edit loop's later lookups walk no file system."""
    path = write_dataset(tmp_path, [row(0), row(1, m_loc="img/0.png")])  # m_loc shares record 0's image
    roots = ImageRoots(tmp_path)
    load_evqa(path, roots, check_images=False)
    walks = []
    real = records_module.join_under_resolved
    monkeypatch.setattr(records_module, "join_under_resolved", lambda base, rel: walks.append(rel) or real(base, rel))
    expected = tmp_path.resolve() / "img" / "0.png"
    assert roots.resolve("image", "img/0.png") == roots.resolve("m_loc", "img/0.png") == expected
    assert roots.resolve("image_rephrase", "reph/1.png") == tmp_path.resolve() / "reph" / "1.png"
    assert walks == []  # all checked while loading
    assert roots.resolve("image", "img/new.png") == tmp_path.resolve() / "img" / "new.png"
    assert roots.resolve("image", "img/new.png") == tmp_path.resolve() / "img" / "new.png"
    assert walks == ["img/new.png"]
    for _ in range(2):
        with pytest.raises(ValueError, match="escapes image root"):
            roots.resolve("image", "../outside.png")
    assert walks == ["img/new.png", "../outside.png", "../outside.png"]
    with pytest.raises(ValueError, match="unknown image field 'picture'"):
        roots.resolve("picture", "img/0.png")


def test_check_images_false_skips_file_checks_but_not_escapes(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([row(0)]))  # no image files at all
    assert len(load_evqa(path, ImageRoots(tmp_path), check_images=False)) == 1
    path.write_text(json.dumps([row(0, m_loc="../x.png")]))
    with pytest.raises(DataError) as err:
        load_evqa(path, ImageRoots(tmp_path / "sub"), check_images=False)
    assert_names(err.value, path, 0, "m_loc")


# --- malformed input: one test per case, each error names file, record and field ---------------

def test_missing_field(tmp_path):
    bad = row(1)
    del bad["loc_ans"]
    path = write_dataset(tmp_path, [row(0), bad])
    with pytest.raises(DataError, match="missing") as err:
        load_evqa(path, ImageRoots(tmp_path))
    assert_names(err.value, path, 1, "loc_ans")


def test_missing_field_in_a_record_that_would_be_skipped_is_still_an_error(tmp_path):
    bad = row(1, alt="")
    del bad["pred"]
    path = write_dataset(tmp_path, [row(0), bad])
    with pytest.raises(DataError) as err:
        load_eic(path, ImageRoots(tmp_path))
    assert_names(err.value, path, 1, "pred")


@pytest.mark.parametrize("value", [3, None, ["a"]])
def test_field_of_wrong_type(tmp_path, value):
    path = write_dataset(tmp_path, [row(0), row(1), row(2, rephrase=value)])
    with pytest.raises(DataError, match="expected a string") as err:
        load_eic(path, ImageRoots(tmp_path))
    assert_names(err.value, path, 2, "rephrase")


def test_empty_alt_is_skipped_not_an_error(tmp_path):
    path = write_dataset(tmp_path, [row(0, alt=""), row(1)])
    assert [r.id for r in load_evqa(path, ImageRoots(tmp_path))] == [1]
    assert [r.id for r in load_eic(path, ImageRoots(tmp_path))] == [1]


def test_missing_image(tmp_path):
    path = write_dataset(tmp_path, [row(0), row(1)])
    (tmp_path / "okvqa" / "1.png").unlink()
    with pytest.raises(DataError, match="not found") as err:
        load_evqa(path, ImageRoots(tmp_path))
    assert_names(err.value, path, 1, "m_loc")


def test_corrupt_image(tmp_path):
    path = write_dataset(tmp_path, [row(0), row(1)])
    (tmp_path / "img" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot read image") as err:
        load_evqa(path, ImageRoots(tmp_path))
    assert_names(err.value, path, 1, "image")


def test_image_path_escaping_root_with_dotdot(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "secret.png")  # exists, so only the escape is wrong
    path = write_dataset(root, [row(0), row(1, image="../secret.png")])
    with pytest.raises(DataError, match="escapes image root") as err:
        load_evqa(path, ImageRoots(root))
    assert_names(err.value, path, 1, "image")


def test_image_path_absolute(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "abs.png")
    path = write_dataset(tmp_path, [row(0, image_rephrase=str(tmp_path / "abs.png"))])
    with pytest.raises(DataError, match="escapes image root") as err:
        load_evqa(path, ImageRoots(tmp_path))
    assert_names(err.value, path, 0, "image_rephrase")


def test_image_symlink_pointing_outside_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (2, 2)).save(outside / "x.png")
    (root / "shared").symlink_to(outside)
    path = write_dataset(root, [row(0), row(1), row(2, m_loc="shared/x.png")])
    with pytest.raises(DataError, match="escapes image root") as err:
        load_eic(path, ImageRoots(root))
    assert_names(err.value, path, 2, "m_loc")


def test_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"src": "a",\n  "pred": }]')
    with pytest.raises(DataError, match=r"invalid JSON: .*\(line 2 column \d+\)") as err:
        load_evqa(path, ImageRoots(tmp_path))
    assert "broken.json" in str(err.value)
    assert (err.value.index, err.value.field) == (None, None)


def test_top_level_not_a_list(tmp_path):
    path = tmp_path / "object.json"
    path.write_text(json.dumps({"records": [row(0)]}))
    with pytest.raises(DataError, match="JSON array, got object") as err:
        load_eic(path, ImageRoots(tmp_path))
    assert "object.json" in str(err.value)


def test_record_not_an_object(tmp_path):
    path = write_dataset(tmp_path, [row(0), ["src", "pred"]])
    with pytest.raises(DataError, match="expected a JSON object, got array") as err:
        load_evqa(path, ImageRoots(tmp_path))
    assert path.name in str(err.value) and "record 1" in str(err.value)
    assert err.value.index == 1


def test_missing_file(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(DataError, match="file not found") as err:
        load_evqa(path, ImageRoots(tmp_path))
    assert str(path) in str(err.value)


def test_data_error_message_format_and_attributes():
    err = DataError("d.json", 4, "alt", "missing")
    assert str(err) == "d.json: record 4, field 'alt': missing"
    assert (err.file, err.index, err.field) == ("d.json", 4, "alt")
    assert str(DataError("d.json", None, None, "invalid JSON")) == "d.json: invalid JSON"
    assert str(DataError("d.json", 2, None, "bad")) == "d.json: record 2: bad"
    assert isinstance(err, ValueError)


# --- VLKEB: MMEdit's fields plus port_new; hop selects one question type --------------------------

def port(port_type: str, question: str, answer: str) -> dict:
    return {"port_type": port_type, "Q&A": {"Question": question, "Answer": answer}}


def vlkeb_rows() -> list[dict]:
    """A hand-written VLKEB file: records with 1- to 4-hop questions, one without port_new, one
    with an empty alt, one with only a 2-hop question and one with two 1-hop questions."""
    return [
        row(0, port_new=[port("1-hop", "Which city is it in?", "Paris"), port("2-hop", "Which river?", "Seine")]),
        row(1),  # no port_new: dropped whenever a hop is asked for
        row(2, alt="", port_new=[port("1-hop", "q?", "a")]),  # empty alt: dropped, as in E-IC
        row(3, port_new=[port("2-hop", "Who built it?", "Eiffel")]),
        row(4, port_new=[port("1-hop", "First?", "one"), port("1-hop", "Second?", "two")]),
        row(5, port_new=[port("4-hop", "Far?", " far"), port("3-hop", "Three?", "3")]),
    ]


def test_vlkeb_hop_selects_one_question_type_and_skips_records_without_it(tmp_path, caplog):
    path = write_dataset(tmp_path, vlkeb_rows())
    with caplog.at_level("WARNING", logger="mmke.data.records"):
        one = load_vlkeb(path, ImageRoots(tmp_path), hop=1)
    assert [r.id for r in one] == [0, 4] and one.skipped == (1, 2, 3, 5)
    # the question as written, the answer with the scoring space; only the first of a type
    assert one[0].portability == (("Which city is it in?", " Paris"),)
    assert one[1].portability == (("First?", " one"),)
    assert caplog.records[0].getMessage() == (f"{path}: 4 of 6 records skipped (VLKEB skip rule: an empty alt "
                                              "or no 1-hop portability question): ids 1, 2, 3, 5")
    two = load_vlkeb(path, ImageRoots(tmp_path), hop=2)
    assert [(r.id, r.portability) for r in two] == [(0, (("Which river?", " Seine"),)),
                                                    (3, (("Who built it?", " Eiffel"),))]
    assert [(r.id, r.portability) for r in load_vlkeb(path, ImageRoots(tmp_path), hop=4)] == [(5, (("Far?", " far"),))]


def test_vlkeb_without_hop_keeps_records_without_port_new_and_asks_no_portability(tmp_path):
    records = load_vlkeb(write_dataset(tmp_path, vlkeb_rows()), ImageRoots(tmp_path))
    assert [r.id for r in records] == [0, 1, 3, 4, 5] and records.skipped == (2,)
    assert {r.portability for r in records} == {()}
    assert (records[0].prompt, records[0].target, records[0].m_loc_q) == ("question 0?", " alt0", "okvqa 0?")


def test_vlkeb_hop_through_load_records_and_only_for_vlkeb(tmp_path):
    path = write_dataset(tmp_path, vlkeb_rows())
    assert [r.id for r in load_records("vlkeb", path, ImageRoots(tmp_path), hop=2)] == [0, 3]
    assert [r.id for r in load_records("vlkeb", path, ImageRoots(tmp_path), size=4, hop=2)] == [0, 3]
    assert [r.id for r in load_records("vlkeb", path, ImageRoots(tmp_path), size=3, hop=2)] == [0]
    with pytest.raises(ValueError, match="kind 'evqa' has no portability questions"):
        load_records("evqa", path, ImageRoots(tmp_path), hop=1)
    with pytest.raises(ValueError, match=r"hop must be one of 1\.\.4, got 5"):
        load_vlkeb(path, ImageRoots(tmp_path), hop=5)


@pytest.mark.parametrize(("port_new", "field", "message"), [
    ({"port_type": "1-hop"}, "port_new", "expected an array, got object"),
    (["1-hop"], "port_new[0]", "expected a JSON object, got string"),
    ([{"Q&A": {"Question": "q", "Answer": "a"}}], "port_new[0].port_type", "expected one of 1-hop, 2-hop, 3-hop, 4-hop, got null"),
    ([port("5-hop", "q", "a")], "port_new[0].port_type", 'got "5-hop"'),
    ([port("1-hop", "q", "a"), {"port_type": "2-hop"}], "port_new[1].Q&A", "missing"),
    ([{"port_type": "2-hop", "Q&A": ["q", "a"]}], "port_new[0].Q&A", "expected a JSON object, got array"),
    ([{"port_type": "2-hop", "Q&A": {"Question": "q"}}], "port_new[0].Q&A.Answer", "missing"),
    ([port("3-hop", "q", 7)], "port_new[0].Q&A.Answer", "expected a non-empty string, got 7"),
    ([port("3-hop", " ", "a")], "port_new[0].Q&A.Question", 'expected a non-empty string, got " "'),
])
def test_vlkeb_malformed_port_new_names_file_record_and_field(tmp_path, port_new, field, message):
    # checked with or without a hop, and on records the skip rules would drop (a broken file)
    path = write_dataset(tmp_path, [row(0), row(1, alt="", port_new=port_new)])
    for hop in (None, 4):
        with pytest.raises(DataError, match=re.escape(message)) as err:
            load_vlkeb(path, ImageRoots(tmp_path), hop=hop)
        assert_names(err.value, path, 1, field)


def test_vlkeb_checks_mmedit_fields_like_the_other_kinds(tmp_path):
    bad = row(1, port_new=[port("1-hop", "q", "a")])
    del bad["m_loc_a"]
    path = write_dataset(tmp_path, [row(0), bad])
    with pytest.raises(DataError, match="missing") as err:
        load_vlkeb(path, ImageRoots(tmp_path), hop=1)
    assert_names(err.value, path, 1, "m_loc_a")
    path = write_dataset(tmp_path, [row(0, image="../x.png", port_new=[port("1-hop", "q", "a")])], "escape.json")
    with pytest.raises(DataError, match="escapes image root") as err:
        load_vlkeb(path, ImageRoots(tmp_path), hop=1)
    assert_names(err.value, path, 0, "image")
