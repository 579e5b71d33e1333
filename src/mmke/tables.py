"""Metric JSONs -> one DataFrame -> summary CSV/Markdown, a tidy long CSV, the paper's LaTeX table, plots.

Only the evaluate stage's ``metrics.json`` files are read: tables never touch model outputs, so
re-tabulating is instant and cannot disagree with what was measured.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from mmke.io import atomic_path, atomic_write, read_json
from mmke.metric_keys import (
    DEFINITION_METRICS, EDIT_METRICS, KNOWS_PRED, PORTABILITY_METRIC, PORTABILITY_METRICS, SUMMARY_METRICS,
    definition_keys,
)

#: Paper column names (MMEdit Table 2) for each summary metric.
PAPER_COLUMNS = {
    "rewrite_acc": "Rel.",
    "rephrase_acc": "T-Gen.",
    "image_rephrase_acc": "M-Gen.",
    "locality_acc": "T-Loc.",
    "multimodal_locality_acc": "M-Loc.",
}
#: Shown as "EM / Acc" (exact match / token accuracy) in the tables, as the paper's v5 does.
BOTH_DEFINITIONS = ("rewrite_acc", "rephrase_acc")
#: Names of the per-definition columns of the tidy CSV ("Rel. EM", "Rel. Acc", ...).
DEFINITION_COLUMNS = {
    key: f"{PAPER_COLUMNS[metric]} {label}"
    for metric in EDIT_METRICS for key, label in zip(definition_keys(metric), ("EM", "Acc"))
}
#: Every value column of the summary, in CSV order.
VALUE_COLUMNS = (*SUMMARY_METRICS, *DEFINITION_METRICS, KNOWS_PRED)
#: Columns of datasets that have them only (VLKEB's portability): in the CSVs if any row has a
#: value (empty in the others), in the Markdown/LaTeX tables and plots where a dataset has one.
OPTIONAL_COLUMNS = PORTABILITY_METRICS
PORTABILITY_COLUMN = "Port."
#: Below this share of records whose unedited model answers ``pred``, a table says that its base
#: model does not know the facts being edited (Rel./Gen. then measure new facts, not changed ones).
KNOWN_FACTS_FLOOR = 0.9
KEYS = ("method", "model", "dataset")
#: The schedule of metrics JSONs written before the evaluation schedule was recorded.
SINGLE_EDIT = {"mode": "single", "n_edits": 1}

#: Row groups and row labels of the MMEdit paper's main table; methods not listed go to "Other".
METHOD_GROUPS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("Base Methods", (("base", "Base"), ("FT-L", "FT (LLM)"), ("FT-V", "FT (Vision)"))),
    ("Model Editing", (("KE", "Knowledge Editor"), ("IKE", "In-Context Editing"), ("SERAC", "SERAC"),
                       ("MEND", "MEND"))),
)
OTHER_GROUP = "Other"


def collect(paths: Iterable[str | Path], method_order: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per method x model x dataset with n and every summary value.

    ``frame.attrs["exact_match"]`` is the headline definition of the rows (all must share it).
    """
    rows = []
    schedules: dict[str, list[str]] = {}
    headlines: dict[bool, list[str]] = {}
    for path in paths:
        data = read_json(path)
        missing = [k for k in (*KEYS, "n", "summary", "protocol") if k not in data]
        missing += [f"summary.{k}" for k in VALUE_COLUMNS if k not in data.get("summary", {})]
        if missing:
            raise ValueError(f"{path}: metrics JSON lacks {missing} (written by an older mmke? "
                             "rerun its evaluate job: snakemake --forcerun evaluate)")
        schedule = json.dumps(data.get("evaluation", SINGLE_EDIT), sort_keys=True)
        schedules.setdefault(schedule, []).append(str(path))
        headlines.setdefault(bool(data["protocol"].get("exact_match", True)), []).append(str(path))
        rows.append({**{k: data[k] for k in KEYS}, "n": data["n"], **{m: data["summary"][m] for m in VALUE_COLUMNS},
                     **{m: data["summary"].get(m, float("nan")) for m in OPTIONAL_COLUMNS}})
    if len(schedules) > 1:
        # single-edit and sequential figures measure different things; one table must not mix them
        raise ValueError(f"metrics JSONs come from different evaluation schedules: {schedules}")
    if len(headlines) > 1:
        raise ValueError(f"metrics JSONs have different headline definitions (protocol.exact_match): {headlines}")
    frame = pd.DataFrame(rows, columns=[*KEYS, "n", *VALUE_COLUMNS, *OPTIONAL_COLUMNS])
    frame = frame.drop(columns=[c for c in OPTIONAL_COLUMNS if frame[c].isna().all()])  # no dataset has them
    order = list(method_order or []) + sorted(set(frame["method"]) - set(method_order or []))
    frame["method"] = pd.Categorical(frame["method"], categories=order, ordered=True)
    frame = frame.sort_values(["dataset", "model", "method"]).reset_index(drop=True)
    frame["method"] = frame["method"].astype(str)
    frame.attrs["exact_match"] = next(iter(headlines), True)
    frame.attrs["evaluation"] = json.loads(next(iter(schedules), json.dumps(SINGLE_EDIT)))
    return frame


def percent(value: float) -> str:
    """A fraction as the paper prints it: a percentage with two decimals."""
    return f"{100 * value:.2f}"


def shown_columns(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Header -> cell per row of the value columns of the Markdown and LaTeX tables.

    Rel. and T-Gen. show "EM / Acc" as the paper's v5; M-Gen. and the plots the headline. Port.
    (the headline) only if some row has it; "--" in the rows that do not.
    """
    columns = {}
    for metric, name in PAPER_COLUMNS.items():
        if metric in BOTH_DEFINITIONS:
            em, token = definition_keys(metric)
            columns[f"{name} EM / Acc"] = [f"{percent(a)} / {percent(b)}" for a, b in zip(frame[em], frame[token])]
        else:
            columns[name] = [percent(v) for v in frame[metric]]
    if has_portability(frame):
        columns[PORTABILITY_COLUMN] = ["--" if pd.isna(v) else percent(v) for v in frame[PORTABILITY_METRIC]]
    columns["pre"] = [percent(v) for v in frame[KNOWS_PRED]]
    return columns


def has_portability(frame: pd.DataFrame) -> bool:
    """Whether any row has portability questions (a VLKEB dataset)."""
    return PORTABILITY_METRIC in frame and bool(frame[PORTABILITY_METRIC].notna().any())


def table_legend(frame: pd.DataFrame) -> str:
    """What the columns hold, under each table."""
    headline = "exact match" if frame.attrs.get("exact_match", True) else "token accuracy"
    shown = "M-Gen., Port." if has_portability(frame) else "M-Gen."
    legend = (f"Rel., T-Gen.: exact match / token accuracy; {shown}: {headline} (protocol.exact_match). "
              + ("Port.: portability, the answer that follows from the edit (VLKEB). " if has_portability(frame) else "")
              + "pre: records whose unedited model answers `pred` (exact match).")
    schedule = frame.attrs.get("evaluation", SINGLE_EDIT)
    if schedule["mode"] == "sequential":
        group = "all n records" if schedule["n_edits"] == "all" else f"groups of {schedule['n_edits']} records"
        legend += (f" Sequential editing: the edits of {group} accumulate in one model and every record "
                   "is measured after the group's last edit.")
    return legend


def unknown_facts_notes(frame: pd.DataFrame) -> list[str]:
    """One sentence per model x dataset whose base model answers ``pred`` on < 90% of records."""
    notes = []
    pairs = frame.groupby(["model", "dataset"], sort=False)[KNOWS_PRED].min()
    for (model, dataset), pre in pairs.items():
        if pre < KNOWN_FACTS_FLOOR:
            notes.append(f"Note: unedited, {model} answers `pred` on only {percent(pre)}% of {dataset}'s records "
                         f"(pre < {100 * KNOWN_FACTS_FLOOR:g}): its rows do not show edits of facts it knew.")
    return notes


def to_markdown(frame: pd.DataFrame) -> str:
    """Percentages with two decimals, as in the paper, one table per dataset, with its notes."""
    parts = []
    for dataset, group in frame.groupby("dataset", sort=False):
        shown = pd.DataFrame({"model": group["model"], "method": group["method"], "n": group["n"],
                              **shown_columns(group)})
        # pre-formatted cells: no re-parsing ("100.00" would print as "100")
        table = shown.to_markdown(index=False, disable_numparse=True,
                                  colalign=["left", "left"] + ["right"] * (len(shown.columns) - 2))
        notes = "".join(f"\n{note}\n" for note in unknown_facts_notes(group))
        parts.append(f"## {dataset}\n\n{table}\n\n{table_legend(group)}\n{notes}")
    return "\n".join(parts)


def to_long(frame: pd.DataFrame) -> pd.DataFrame:
    """Tidy form: one row per method x model x dataset x value (a fraction): headline metrics,
    each definition of the edit metrics, ``pre``, and portability where a dataset has it."""
    optional = [column for column in OPTIONAL_COLUMNS if column in frame]
    long = frame.melt(id_vars=[*KEYS, "n"], value_vars=[*VALUE_COLUMNS, *optional], var_name="metric",
                      value_name="value")
    long = long[long["value"].notna() | ~long["metric"].isin(OPTIONAL_COLUMNS)].reset_index(drop=True)
    names = {**PAPER_COLUMNS, **DEFINITION_COLUMNS, KNOWS_PRED: "pre", PORTABILITY_METRIC: PORTABILITY_COLUMN,
             **{key: f"{PORTABILITY_COLUMN} {label}" for key, label in zip(PORTABILITY_METRICS[1:], ("EM", "Acc"))}}
    long.insert(long.columns.get_loc("metric") + 1, "column", long["metric"].map(names))
    return long


def method_rows(methods: Iterable[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The paper's row groups restricted to ``methods`` (in group order), then any others."""
    present = list(dict.fromkeys(methods))
    groups = []
    for group, members in METHOD_GROUPS:
        rows = [(key, label) for key, label in members if key in present]
        if rows:
            groups.append((group, rows))
    known = {key for _, members in METHOD_GROUPS for key, _ in members}
    others = [(key, key) for key in present if key not in known]
    if others:
        groups.append((OTHER_GROUP, others))
    return groups


def to_latex(frame: pd.DataFrame, model_order: Sequence[str] | None = None,
             dataset_order: Sequence[str] | None = None) -> str:
    """The paper's layout: rows = methods in their groups, column groups = model x dataset.

    Values are percentages with two decimals ("EM / Acc" for Rel. and T-Gen.); a combo that was
    not run shows "--". booktabs rules and ``\\cmidrule`` under each group header, as in the
    paper; the legend and any unknown-facts notes follow as full-width rows.
    """
    models = _ordered(frame["model"], model_order)
    datasets = _ordered(frame["dataset"], dataset_order)
    groups = [(model, dataset) for model in models for dataset in datasets
              if ((frame["model"] == model) & (frame["dataset"] == dataset)).any()]
    shown = shown_columns(frame)
    position = {key: i for i, key in enumerate(frame[list(KEYS)].itertuples(index=False, name=None))}
    headers = list(shown)
    width = len(headers)
    full = 1 + width * len(groups)
    lines = [
        "\\begin{tabular}{l" + "c" * width * len(groups) + "}",
        "\\toprule",
        " & " + " & ".join(f"\\multicolumn{{{width}}}{{c}}{{{_tex(m)} / {_tex(d)}}}" for m, d in groups) + " \\\\",
        " ".join(f"\\cmidrule(lr){{{2 + i * width}-{1 + (i + 1) * width}}}" for i in range(len(groups))),
        "Method & " + " & ".join([_tex(h) for h in headers] * len(groups)) + " \\\\",
    ]
    for group, rows in method_rows(frame["method"]):
        lines += ["\\midrule", f"\\multicolumn{{{full}}}{{l}}{{\\textit{{{_tex(group)}}}}} \\\\"]
        for key, label in rows:
            values = [shown[h][position[(key, m, d)]] if (key, m, d) in position else "--"
                      for m, d in groups for h in headers]
            lines.append(f"{_tex(label)} & " + " & ".join(values) + " \\\\")
    lines.append("\\bottomrule")
    for text in [table_legend(frame), *unknown_facts_notes(frame)]:
        lines.append(f"\\multicolumn{{{full}}}{{l}}{{\\footnotesize {_tex(text.replace('`', ''))}}} \\\\")
    lines += ["\\end{tabular}", ""]
    return "\n".join(lines)


def plot_dataset(frame: pd.DataFrame, dataset: str, out: str | Path,
                 model_order: Sequence[str] | None = None) -> None:
    """Grouped bars per headline metric comparing methods, one panel per model, for one dataset;
    each panel's title gives the model's ``pre`` and says when it does not know its facts."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    subset = frame[frame["dataset"] == dataset]
    if subset.empty:
        raise ValueError(f"no results for dataset {dataset!r} to plot")
    models = _ordered(subset["model"], model_order)
    methods = [key for _, rows in method_rows(subset["method"]) for key, _ in rows]
    fig, axes = plt.subplots(1, len(models), figsize=(1.5 + 4.5 * len(models), 3.6), squeeze=False, sharey=True)
    bar = 0.8 / len(methods)
    shown = {**PAPER_COLUMNS, **({PORTABILITY_METRIC: PORTABILITY_COLUMN} if has_portability(subset) else {})}
    positions = range(len(shown))
    for ax, model in zip(axes[0], models):
        rows = subset[subset["model"] == model].set_index("method")
        for i, method in enumerate(methods):
            if method in rows.index:
                heights = [100 * rows.loc[method, metric] for metric in shown]  # NaN: no bar
                offsets = [x + (i - (len(methods) - 1) / 2) * bar for x in positions]
                ax.bar(offsets, heights, bar, label=method, color=f"C{i}")  # same colour in every panel
        ax.set_xticks(positions, list(shown.values()))
        pre = rows[KNOWS_PRED].min()  # a baseline figure: the same for every method of the panel
        known = "" if pre >= KNOWN_FACTS_FLOOR else f" < {100 * KNOWN_FACTS_FLOOR:g}: facts not known"
        ax.set_title(f"{model} / {dataset}\npre {percent(pre)}%{known}")
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("%")
    legend = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    axes[0][-1].legend(legend.values(), legend.keys(), fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=Path(out).suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)


def write_summary(paths: Iterable[str | Path], csv_path: str | Path, md_path: str | Path,
                  method_order: Sequence[str] | None = None, long_path: str | Path | None = None,
                  tex_path: str | Path | None = None, model_order: Sequence[str] | None = None,
                  dataset_order: Sequence[str] | None = None) -> pd.DataFrame:
    frame = collect(paths, method_order)
    write_csv(frame, csv_path)
    with atomic_write(md_path, encoding="utf-8") as handle:
        handle.write(to_markdown(frame))
    if long_path is not None:
        write_csv(to_long(frame), long_path)
    if tex_path is not None:
        with atomic_write(tex_path, encoding="utf-8") as handle:
            handle.write(to_latex(frame, model_order, dataset_order))
    return frame


def write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_write(path, encoding="utf-8", newline="") as handle:
        frame.to_csv(handle, index=False, float_format="%.6f")


def read_summary(path: str | Path) -> pd.DataFrame:
    """The summary CSV back as a frame (for plots), with a clear error when columns are missing."""
    frame = pd.read_csv(path)
    missing = [c for c in (*KEYS, *VALUE_COLUMNS) if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: summary CSV lacks columns {missing}")
    return frame


def _ordered(values: Iterable[str], order: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in (order or []) if v in present] + [v for v in present if v not in (order or [])]


_TEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}"}


def _tex(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(char, char) for char in str(text))
