"""Summary tables are built from metric JSONs alone, in config method order."""

import json

import pandas as pd
import pytest

from mmke.evaluate import DEFINITION_METRICS, SUMMARY_METRICS
from mmke.io import write_json
from mmke.tables import collect, plot_dataset, read_summary, to_latex, to_long, to_markdown, write_csv, write_summary

METRICS = SUMMARY_METRICS + DEFINITION_METRICS


def summary(value, pre=1.0, **values):
    """Every summary value ``value`` (token accuracies a quarter higher), ``pre`` and overrides."""
    base = {k: value for k in METRICS} | {k: min(1.0, value + 0.25) for k in METRICS if k.endswith("_token")}
    return base | {"pre": pre} | values


def metrics_json(method, value, dataset="evqa", model="m", pre=1.0, exact_match=True, **extra):
    return {"method": method, "model": model, "dataset": dataset, "n": 4, "summary": summary(value, pre),
            "protocol": {"exact_match": exact_match, "mloc_template": "trainer"}, **extra}


def metrics_file(path, method, value, dataset="evqa", **kwargs):
    write_json(path, metrics_json(method, value, dataset, **kwargs))
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
    assert csv_lines[0] == "method,model,dataset,n," + ",".join(METRICS) + ",pre"
    assert len(csv_lines) == 3
    md = (tmp_path / "s.md").read_text()
    assert "## evqa" in md and "## eic" in md
    header, _, evqa_row = md.split("## evqa")[1].strip().splitlines()[:3]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "model", "method", "n", "Rel. EM / Acc", "T-Gen. EM / Acc", "M-Gen.", "T-Loc.", "M-Loc.", "pre"]
    # percentages with two decimals; Rel. and T-Gen. as exact match / token accuracy, as the paper's v5
    assert [c.strip() for c in evqa_row.strip("|").split("|")] == [
        "m", "base", "4", "12.35 / 37.35", "12.35 / 37.35", "12.35", "12.35", "12.35", "100.00"]
    assert "Rel., T-Gen.: exact match / token accuracy; M-Gen.: exact match (protocol.exact_match)" in md
    assert "Note:" not in md  # every base model knows its facts


def test_a_table_says_when_its_base_model_does_not_know_its_facts(tmp_path):
    paths = [metrics_file(tmp_path / "a.json", "base", 0.0, pre=0.5), metrics_file(tmp_path / "b.json", "FT-L", 1.0, pre=0.5),
             metrics_file(tmp_path / "c.json", "base", 0.0, model="knows", pre=0.95)]
    frame = collect(paths, ["base", "FT-L"])
    note = ("Note: unedited, m answers `pred` on only 50.00% of evqa's records (pre < 90): "
            "its rows do not show edits of facts it knew.")
    md = to_markdown(frame)
    assert md.count("Note:") == 1 and note in md
    tex = to_latex(frame)
    assert "\\footnotesize Note: unedited, m answers pred on only 50.00\\% of evqa's records" in tex
    plot_dataset(frame, "evqa", tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_token_accuracy_headline_is_named_and_not_mixed_with_exact_match(tmp_path):
    token = metrics_file(tmp_path / "a.json", "base", 0.5, exact_match=False)
    assert "M-Gen.: token accuracy (protocol.exact_match)" in to_markdown(collect([token]))
    exact = metrics_file(tmp_path / "b.json", "FT-L", 0.5)
    with pytest.raises(ValueError, match=r"different headline definitions \(protocol.exact_match\)"):
        collect([token, exact])


def test_malformed_metrics_file_is_named(tmp_path):
    path = tmp_path / "bad.json"
    write_json(path, {"method": "base"})
    with pytest.raises(ValueError, match=r"bad\.json: metrics JSON lacks"):
        collect([path])
    old = metrics_json("base", 0.5)
    del old["summary"]["pre"], old["summary"]["rewrite_acc_em"]
    write_json(path, old)
    with pytest.raises(ValueError, match=r"lacks \['summary.rewrite_acc_em', 'summary.pre'\] \(written by an older mmke"):
        collect([path])


def paper_frame(tmp_path):
    """Two models x one dataset; MEND is missing for model b, "my_method" is not a paper method."""
    paths = []
    for model in ("a", "b"):
        for method, value in (("MEND", 0.5), ("base", 0.25), ("FT-L", 0.125), ("my_method", 1.0)):
            if (model, method) == ("b", "MEND"):
                continue
            paths.append(metrics_file(tmp_path / f"{model}-{method}.json", method, value, model=model))
    return collect(paths, method_order=["MEND", "base", "FT-L", "my_method"])


def test_long_csv_has_one_row_per_metric(tmp_path):
    long = to_long(paper_frame(tmp_path))
    assert list(long.columns) == ["method", "model", "dataset", "n", "metric", "column", "value"]
    assert len(long) == 7 * (5 + 6 + 1)  # combos x (headline metrics, both definitions of 3, pre)
    row = long[(long["method"] == "FT-L") & (long["model"] == "b") & (long["metric"] == "locality_acc")]
    assert row["column"].item() == "T-Loc." and row["value"].item() == 0.125
    row = long[(long["method"] == "FT-L") & (long["model"] == "b") & (long["metric"] == "rephrase_acc_token")]
    assert row["column"].item() == "T-Gen. Acc" and row["value"].item() == 0.375
    assert set(long["column"]) >= {"Rel. EM", "Rel. Acc", "M-Gen. EM", "M-Gen. Acc", "pre"}


def test_latex_follows_the_paper_layout(tmp_path):
    tex = to_latex(paper_frame(tmp_path), model_order=["b", "a"])
    lines = tex.splitlines()
    assert lines[0] == "\\begin{tabular}{l" + "c" * 12 + "}"
    assert "\\multicolumn{6}{c}{b / evqa} & \\multicolumn{6}{c}{a / evqa}" in tex  # model order from config
    assert "\\cmidrule(lr){2-7} \\cmidrule(lr){8-13}" in tex
    assert lines[4] == "Method & " + " & ".join(["Rel. EM / Acc", "T-Gen. EM / Acc", "M-Gen.", "T-Loc.", "M-Loc.",
                                                  "pre"] * 2) + " \\\\"
    body = [line.split(" & ")[0].removesuffix(" \\\\") for line in lines if line.endswith("\\\\")][2:]
    # paper groups and labels, in paper order, whatever the config's method order; then the legend
    assert body == ["\\multicolumn{13}{l}{\\textit{Base Methods}}", "Base", "FT (LLM)",
                    "\\multicolumn{13}{l}{\\textit{Model Editing}}", "MEND",
                    "\\multicolumn{13}{l}{\\textit{Other}}", "my\\_method",
                    "\\multicolumn{13}{l}{\\footnotesize Rel., T-Gen.: exact match / token accuracy; M-Gen.: exact "
                    "match (protocol.exact\\_match). pre: records whose unedited model answers pred (exact match).}"]
    mend = next(line for line in lines if line.startswith("MEND &"))
    assert mend == "MEND & " + " & ".join(["--"] * 6 + ["50.00 / 75.00"] * 2 + ["50.00"] * 3 + ["100.00"]) + " \\\\"
    assert "12.50 / 37.50" in tex and tex.count("\\midrule") == 3 and "\\bottomrule" in tex


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
    explicit = metrics_file(tmp_path / "c.json", "IKE", 0.5, evaluation={"mode": "single", "n_edits": 1})
    sequential = metrics_file(tmp_path / "b.json", "FT-L", 0.5, evaluation={"mode": "sequential", "n_edits": 4})
    assert len(collect([single, explicit])) == 2
    with pytest.raises(ValueError, match=r"different evaluation schedules.*b\.json"):
        collect([single, sequential])


def test_a_sequential_table_says_how_its_edits_were_grouped(tmp_path):
    whole = [metrics_file(tmp_path / f"{m}.json", m, 0.5, evaluation={"mode": "sequential", "n_edits": "all"})
             for m in ("GRACE", "WISE")]
    text = to_markdown(collect(whole))
    assert "Sequential editing: the edits of all n records accumulate" in text
    groups = metrics_file(tmp_path / "g.json", "FT-L", 0.5, evaluation={"mode": "sequential", "n_edits": 4})
    assert "the edits of groups of 4 records accumulate" in to_latex(collect([groups]))
    assert "Sequential" not in to_markdown(collect([metrics_file(tmp_path / "s.json", "base", 0.5)]))


def test_portability_is_a_column_only_where_a_dataset_has_it(tmp_path):
    port = {"portability_acc": 0.25, "portability_acc_em": 0.25, "portability_acc_token": 0.5}
    paths = [metrics_file(tmp_path / "a.json", "base", 0.5), metrics_file(tmp_path / "b.json", "FT-L", 0.5),
             metrics_file(tmp_path / "c.json", "base", 0.5, "vlkeb"), metrics_file(tmp_path / "d.json", "FT-L", 1.0, "vlkeb")]
    for path, values in zip(paths[2:], (port, {k: 2 * v for k, v in port.items()})):
        data = json.loads(path.read_text())
        data["summary"] |= values
        write_json(path, data)
    write_summary(paths, tmp_path / "s.csv", tmp_path / "s.md", ["base", "FT-L"], long_path=tmp_path / "l.csv",
                  tex_path=tmp_path / "s.tex")
    csv_lines = (tmp_path / "s.csv").read_text().splitlines()
    assert csv_lines[0].endswith(",pre,portability_acc,portability_acc_em,portability_acc_token")
    assert read_summary(tmp_path / "s.csv").set_index(["dataset", "method"])["portability_acc"].to_dict() == pytest.approx(
        {("evqa", "base"): float("nan"), ("evqa", "FT-L"): float("nan"), ("vlkeb", "base"): 0.25,
         ("vlkeb", "FT-L"): 0.5}, nan_ok=True)
    md = (tmp_path / "s.md").read_text()
    vlkeb, evqa = md.split("## vlkeb")[1], md.split("## evqa")[1].split("## vlkeb")[0]
    assert "Port." not in evqa  # a dataset without portability questions has no such column
    header, _, base_row, ft_row = vlkeb.strip().splitlines()[:4]
    assert [c.strip() for c in header.strip("|").split("|")][-2:] == ["Port.", "pre"]
    assert [c.strip() for c in base_row.strip("|").split("|")][-2:] == ["25.00", "100.00"]
    assert [c.strip() for c in ft_row.strip("|").split("|")][-2:] == ["50.00", "100.00"]
    assert "M-Gen., Port.: exact match (protocol.exact_match). Port.: portability" in vlkeb
    tex = (tmp_path / "s.tex").read_text()
    ft = next(line for line in tex.splitlines() if line.startswith("FT (LLM) &"))
    # per model x dataset group: Rel., T-Gen., M-Gen., T-Loc., M-Loc., Port., pre; "--" where none
    assert ft.removesuffix(" \\\\").split(" & ")[6:8] == ["--", "100.00"]
    assert ft.removesuffix(" \\\\").split(" & ")[13:15] == ["50.00", "100.00"]
    long = pd.read_csv(tmp_path / "l.csv")
    ported = long[long["metric"].str.startswith("portability")]
    assert sorted(zip(ported["dataset"], ported["column"], ported["value"])) == [
        ("vlkeb", "Port.", 0.25), ("vlkeb", "Port.", 0.5), ("vlkeb", "Port. Acc", 0.5), ("vlkeb", "Port. Acc", 1.0),
        ("vlkeb", "Port. EM", 0.25), ("vlkeb", "Port. EM", 0.5)]
    frame = collect(paths, ["base", "FT-L"])
    plot_dataset(frame, "vlkeb", tmp_path / "v.png")
    plot_dataset(frame, "evqa", tmp_path / "e.png")
    assert (tmp_path / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # without any VLKEB dataset the tables are unchanged
    assert "portability" not in ",".join(collect(paths[:2]).columns)
