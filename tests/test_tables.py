"""Summary tables are built from metric JSONs alone, in config method order."""

import pytest

from mmke.io import write_json
from mmke.tables import collect, plot_dataset, read_summary, to_latex, to_long, write_csv, write_summary

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


def paper_frame(tmp_path):
    """Two models x one dataset; MEND is missing for model b, "my_method" is not a paper method."""
    paths = []
    for model in ("a", "b"):
        for method, value in (("MEND", 0.5), ("base", 0.25), ("FT-L", 0.125), ("my_method", 1.0)):
            if (model, method) == ("b", "MEND"):
                continue
            path = tmp_path / f"{model}-{method}.json"
            write_json(path, {"method": method, "model": model, "dataset": "evqa", "n": 4,
                              "summary": {k: value for k in METRICS}})
            paths.append(path)
    return collect(paths, method_order=["MEND", "base", "FT-L", "my_method"])


def test_long_csv_has_one_row_per_metric(tmp_path):
    long = to_long(paper_frame(tmp_path))
    assert list(long.columns) == ["method", "model", "dataset", "n", "metric", "column", "value"]
    assert len(long) == 7 * 5
    row = long[(long["method"] == "FT-L") & (long["model"] == "b") & (long["metric"] == "locality_acc")]
    assert row["column"].item() == "T-Loc." and row["value"].item() == 0.125


def test_latex_follows_the_paper_layout(tmp_path):
    tex = to_latex(paper_frame(tmp_path), model_order=["b", "a"])
    lines = tex.splitlines()
    assert lines[0] == "\\begin{tabular}{l" + "c" * 10 + "}"
    assert "\\multicolumn{5}{c}{b / evqa} & \\multicolumn{5}{c}{a / evqa}" in tex  # model order from config
    assert "\\cmidrule(lr){2-6} \\cmidrule(lr){7-11}" in tex
    body = [line.split(" & ")[0].removesuffix(" \\\\") for line in lines if line.endswith("\\\\")][2:]
    # paper groups and labels, in paper order, whatever the config's method order
    assert body == ["\\multicolumn{11}{l}{\\textit{Base Methods}}", "Base", "FT (LLM)",
                    "\\multicolumn{11}{l}{\\textit{Model Editing}}", "MEND",
                    "\\multicolumn{11}{l}{\\textit{Other}}", "my\\_method"]
    mend = next(line for line in lines if line.startswith("MEND &"))
    assert mend == "MEND & " + " & ".join(["--"] * 5 + ["50.00"] * 5) + " \\\\"
    assert "12.50" in tex and tex.count("\\midrule") == 3 and "\\bottomrule" in tex


def test_plot_is_a_png_per_dataset(tmp_path):
    plot_dataset(paper_frame(tmp_path), "evqa", tmp_path / "evqa.png")
    assert (tmp_path / "evqa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no results for dataset 'eic'"):
        plot_dataset(paper_frame(tmp_path), "eic", tmp_path / "eic.png")


def test_summary_csv_round_trips_and_bad_csv_is_named(tmp_path):
    frame = paper_frame(tmp_path)
    write_csv(frame, tmp_path / "s.csv")
    assert read_summary(tmp_path / "s.csv")["rewrite_acc"].tolist() == frame["rewrite_acc"].tolist()
    (tmp_path / "bad.csv").write_text("method,model\nx,y\n")
    with pytest.raises(ValueError, match=r"bad\.csv: summary CSV lacks columns \['dataset'"):
        read_summary(tmp_path / "bad.csv")


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
