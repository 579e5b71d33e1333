"""Metric JSONs -> one tidy DataFrame -> summary CSV and Markdown.

Only the evaluate stage's ``metrics.json`` files are read: tables never touch model outputs, so
re-tabulating is instant and cannot disagree with what was measured.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from mmke.evaluate import SUMMARY_METRICS
from mmke.io import atomic_write, read_json

#: Paper column names (MMEdit Table 2) for each summary metric.
PAPER_COLUMNS = {
    "rewrite_acc": "Rel.",
    "rephrase_acc": "T-Gen.",
    "image_rephrase_acc": "M-Gen.",
    "locality_acc": "T-Loc.",
    "multimodal_locality_acc": "M-Loc.",
}
KEYS = ("method", "model", "dataset")
#: The schedule of metrics JSONs written before the evaluation schedule was recorded.
SINGLE_EDIT = {"mode": "single", "n_edits": 1}


def collect(paths: Iterable[str | Path], method_order: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per method x model x dataset with n and the five summary metrics."""
    rows = []
    schedules: dict[str, list[str]] = {}
    for path in paths:
        data = read_json(path)
        missing = [k for k in (*KEYS, "n", "summary") if k not in data]
        if missing:
            raise ValueError(f"{path}: metrics JSON lacks {missing}")
        schedule = json.dumps(data.get("evaluation", SINGLE_EDIT), sort_keys=True)
        schedules.setdefault(schedule, []).append(str(path))
        rows.append({**{k: data[k] for k in KEYS}, "n": data["n"], **{m: data["summary"][m] for m in SUMMARY_METRICS}})
    if len(schedules) > 1:
        # single-edit and sequential figures measure different things; one table must not mix them
        raise ValueError(f"metrics JSONs come from different evaluation schedules: {schedules}")
    frame = pd.DataFrame(rows, columns=[*KEYS, "n", *SUMMARY_METRICS])
    order = list(method_order or []) + sorted(set(frame["method"]) - set(method_order or []))
    frame["method"] = pd.Categorical(frame["method"], categories=order, ordered=True)
    frame = frame.sort_values(["dataset", "model", "method"]).reset_index(drop=True)
    frame["method"] = frame["method"].astype(str)
    return frame


def to_markdown(frame: pd.DataFrame) -> str:
    """Percentages with two decimals, as in the paper, one table per dataset."""
    parts = []
    for dataset, group in frame.groupby("dataset", sort=False):
        shown = group[["model", "method", "n", *SUMMARY_METRICS]].rename(columns=PAPER_COLUMNS)
        shown[list(PAPER_COLUMNS.values())] *= 100
        # floatfmt, not pre-formatted strings: tabulate re-parses "100.00" as a number -> "100".
        parts.append(f"## {dataset}\n\n{shown.to_markdown(index=False, floatfmt='.2f')}\n")
    return "\n".join(parts)


def write_summary(paths: Iterable[str | Path], csv_path: str | Path, md_path: str | Path,
                  method_order: Sequence[str] | None = None) -> pd.DataFrame:
    frame = collect(paths, method_order)
    with atomic_write(csv_path, encoding="utf-8", newline="") as handle:
        frame.to_csv(handle, index=False, float_format="%.6f")
    with atomic_write(md_path, encoding="utf-8") as handle:
        handle.write(to_markdown(frame))
    return frame
