"""Sharded evaluation: contiguous blocks, exact merge, and equality with the unsharded run."""

import json

import pytest

from mmke.data.demo import write_demo_dataset
from mmke.evaluate import DEFINITION_METRICS, KNOWS_PRED, SUMMARY_METRICS
from mmke.io import read_json, read_jsonl, write_json
from mmke.models.tiny import build_tiny_blip2
from mmke.shards import merge_reports, shard_slice
from mmke.stages import baseline_stage, evaluate_stage, gather_stage

METRICS = SUMMARY_METRICS + DEFINITION_METRICS


@pytest.mark.parametrize("n, count", [(10, 3), (6, 6), (7, 1), (5, 2)])
def test_shards_are_contiguous_near_equal_blocks_covering_everything(n, count):
    items = list(range(n))
    blocks = [shard_slice(items, i, count) for i in range(count)]
    assert [x for block in blocks for x in block] == items
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_shards_cut_only_between_sequential_groups():
    items = list(range(10))  # groups of 3: [0 1 2] [3 4 5] [6 7 8] [9]
    blocks = [shard_slice(items, i, 3, group=3) for i in range(3)]
    assert blocks == [[0, 1, 2, 3, 4, 5], [6, 7, 8], [9]]
    with pytest.raises(ValueError, match="5 shards for 10 records in 4 group"):
        shard_slice(items, 0, 5, group=3)


def test_bad_shard_arguments_are_errors():
    with pytest.raises(ValueError, match="3 shards for 2 records"):
        shard_slice([1, 2], 0, 3)
    with pytest.raises(ValueError, match="shard 2 of 2"):
        shard_slice([1, 2], 2, 2)


def report(values, digest="abc", edit_s=1.0):
    rows = [{"id": i, "pre": {}, "post": {k: v for k in METRICS}, "knows_pred": float(i % 2)} for i, v in values]
    return {"method": "m", "model": "x", "dataset": "d", "hparams": {}, "hparams_digest": digest, "protocol": {},
            "n": len(rows), "summary": {},
            "timings": {"apply_s": edit_s, "loop_s": 2 * edit_s, "edits_per_s": 1.0, "apply_edits_per_s": 1.0}}, rows


def test_merge_recomputes_means_from_rows_not_from_shard_means():
    (a, rows_a), (b, rows_b) = report([(0, 0.1), (1, 0.2)]), report([(2, 0.7)])
    merged, rows = merge_reports([a, b], [rows_a, rows_b], ["a", "b"])
    assert [row["id"] for row in rows] == [0, 1, 2]
    assert merged["n"] == 3 and merged["shards"] == 2
    assert merged["summary"]["rewrite_acc"] == (0.1 + 0.2 + 0.7) / 3
    assert merged["summary"][KNOWS_PRED] == 1 / 3  # record 1 of 0, 1, 2 knew its pred
    assert merged["timings"]["apply_s"] == 2.0 and merged["timings"]["loop_s"] == 4.0
    assert merged["timings"]["edits_per_s"] == 3 / 4  # the whole loop
    assert merged["timings"]["apply_edits_per_s"] == 3 / 2  # Editor.apply alone


def test_merge_refuses_shards_of_different_runs_and_overlaps():
    (a, rows_a), (b, rows_b) = report([(0, 0.1)]), report([(1, 0.2)], digest="other")
    with pytest.raises(ValueError, match="b: field 'hparams_digest' differs from a"):
        merge_reports([a, b], [rows_a, rows_b], ["a", "b"])
    with pytest.raises(ValueError, match="overlap"):
        merge_reports([a, a], [rows_a, rows_a], ["a", "a2"])


def test_gathered_shards_equal_the_unsharded_run_exactly(tmp_path):
    """The demo pipeline through the stage functions: 3 shards merged == 1 run, value for value."""
    model = {"family": "blip2", "path": str(build_tiny_blip2(tmp_path / "model", seed=0)), "image_size": 32}
    write_demo_dataset(tmp_path / "data", "evqa", n_train=2, n_eval=7, seed=0, image_size=32)
    dataset = {"kind": "evqa", "eval": str(tmp_path / "data/eval.json"), "image_root": str(tmp_path / "data/images")}
    protocol = {"exact_match": False, "mloc_template": "trainer"}  # token accuracy: fractional values
    base = dict(rows_out=tmp_path / "pre.jsonl", tensors_out=tmp_path / "pre.safetensors")
    baseline_stage(model, dataset, protocol, device="cpu", **base)
    (tmp_path / "base.yaml").write_text("method: base\n")
    common = dict(names={"method": "base", "model": "tiny", "dataset": "d"}, model=model, dataset=dataset,
                  protocol=protocol, hparams_path=tmp_path / "base.yaml", baseline_rows=base["rows_out"],
                  baseline_tensors=base["tensors_out"], device="cpu")
    whole = evaluate_stage(**common, metrics_out=tmp_path / "whole.json", records_out=tmp_path / "whole.jsonl")
    parts = [(tmp_path / f"s{i}.json", tmp_path / f"s{i}.jsonl") for i in range(3)]
    for index, (metrics_out, records_out) in enumerate(parts):
        evaluate_stage(**common, metrics_out=metrics_out, records_out=records_out, shard=(index, 3))
    assert [read_json(m)["n"] for m, _ in parts] == [3, 2, 2]
    gathered = gather_stage([m for m, _ in parts], [r for _, r in parts], tmp_path / "g.json", tmp_path / "g.jsonl")
    assert gathered["n"] == whole["n"] == 7
    assert gathered["summary"] == whole["summary"]  # exact, not approx
    assert set(whole["summary"]) == {*METRICS, KNOWS_PRED}
    assert read_jsonl(tmp_path / "g.jsonl") == read_jsonl(tmp_path / "whole.jsonl")
    assert read_json(tmp_path / "g.json")["summary"] == json.loads((tmp_path / "whole.json").read_text())["summary"]


def test_gather_stage_needs_matching_file_lists(tmp_path):
    write_json(tmp_path / "a.json", {})
    with pytest.raises(ValueError, match="1 shard metrics files but 0 shard records files"):
        gather_stage([tmp_path / "a.json"], [], tmp_path / "o.json", tmp_path / "o.jsonl")
