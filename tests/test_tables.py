"""Summary tables are built from metric JSONs alone, in config method order."""

import pytest

from mmke.io import write_json
from mmke.tables import collect, write_summary

METRICS = ("rewrite_acc", "rephrase_acc", "image_rephrase_acc", "locality_acc", "multimodal_locality_acc")


def metrics_file(path, method, value, dataset="evqa"):
    write_json(path, {"method": method, "model": "m", "dataset": dataset, "n": 4,
                      "summary": {k: value for k in METRICS}})
    return path


def test_rows_follow_method_order_and_keep_values(tmp_path):
    paths = [metrics_file(tmp_path / f"{name}.json", name, value)
             for name, value in (("IKE", 0.5), ("base", 0.25), ("FT-L", 1.0))]
    frame = collect(paths, method_order=["base", "FT-L", "IKE"])
    assert frame["method"].tolist() == ["base", "FT-L", "IKE"]
    assert frame["rewrite_acc"].tolist() == [0.25, 1.0, 0.5]


def test_csv_and_markdown(tmp_path):
    paths = [metrics_file(tmp_path / "a.json", "base", 0.123456), metrics_file(tmp_path / "b.json", "base", 1.0, "eic")]
    write_summary(paths, tmp_path / "s.csv", tmp_path / "s.md", ["base"])
    csv_lines = (tmp_path / "s.csv").read_text().splitlines()
    assert csv_lines[0] == "method,model,dataset,n," + ",".join(METRICS)
    assert len(csv_lines) == 3
    md = (tmp_path / "s.md").read_text()
    assert "## evqa" in md and "## eic" in md
    assert "12.35" in md and "100.00" in md  # percentages, two decimals
    assert "Rel." in md and "M-Loc." in md


def test_malformed_metrics_file_is_named(tmp_path):
    path = tmp_path / "bad.json"
    write_json(path, {"method": "base"})
    with pytest.raises(ValueError, match=r"bad\.json: metrics JSON lacks"):
        collect([path])


def test_single_and_sequential_metrics_are_not_stacked(tmp_path):
    single = metrics_file(tmp_path / "a.json", "base", 0.5)  # written before schedules were recorded
    explicit = tmp_path / "c.json"
    write_json(explicit, {"method": "IKE", "model": "m", "dataset": "evqa", "n": 4,
                          "summary": {k: 0.5 for k in METRICS}, "evaluation": {"mode": "single", "n_edits": 1}})
    sequential = tmp_path / "b.json"
    write_json(sequential, {"method": "FT-L", "model": "m", "dataset": "evqa", "n": 4,
                            "summary": {k: 0.5 for k in METRICS}, "evaluation": {"mode": "sequential", "n_edits": 4}})
    assert len(collect([single, explicit])) == 2
    with pytest.raises(ValueError, match=r"different evaluation schedules.*b\.json"):
        collect([single, sequential])
