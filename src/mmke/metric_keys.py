"""The figures a ``metrics.json`` holds, and how per-record values become them: plain Python.

The table, plot and gather jobs only read and average JSON. Keeping the names and the mean here,
apart from the torch code that computes the values (:mod:`mmke.metrics`, :mod:`mmke.evaluate`,
which re-export them), lets those jobs start without importing torch or transformers (seconds of
fixed cost per job; ``benchmarks/job_overhead.py``, ``tests/test_imports.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

EDIT_METRICS = ("rewrite_acc", "rephrase_acc", "image_rephrase_acc")
LOCALITY_METRICS = ("locality_acc", "multimodal_locality_acc")
SUMMARY_METRICS = EDIT_METRICS + LOCALITY_METRICS
#: The two accuracy definitions of an edit item (spec §3), as suffixes of the metric names: the
#: MMEdit paper's v5 reports both, EasyEdit's trainer and editor paths score token accuracy.
DEFINITIONS = ("em", "token")
#: Summary key of the share of records whose unedited model answers ``pred`` (exact match).
KNOWS_PRED = "pre"


def definition_keys(metric: str) -> tuple[str, ...]:
    """``rewrite_acc`` -> ``("rewrite_acc_em", "rewrite_acc_token")``: where each definition is kept."""
    return tuple(f"{metric}_{definition}" for definition in DEFINITIONS)


#: Exact match and token accuracy of each edit metric, kept beside the headline (spec §3).
DEFINITION_METRICS = tuple(key for metric in EDIT_METRICS for key in definition_keys(metric))
#: VLKEB's portability, headline and both definitions: summarized over the records that have a
#: portability question, and absent where none has.
PORTABILITY_METRIC = "portability_acc"
PORTABILITY_METRICS = (PORTABILITY_METRIC, *definition_keys(PORTABILITY_METRIC))
#: metrics.json's rates and the seconds each divides the record count by (also after a sharded gather).
RATES = {"edits_per_s": "loop_s", "apply_edits_per_s": "apply_s"}


def mean_metrics(rows: Iterable[Mapping[str, float]], keys: Sequence[str]) -> dict[str, float]:
    """Dataset figure = mean of per-record values, per metric."""
    rows = list(rows)
    if not rows:
        raise ValueError("no records to average")
    return {key: sum(float(row[key]) for row in rows) / len(rows) for key in keys}


def summarize(rows: Sequence[dict]) -> dict[str, float]:
    """metrics.json's ``summary``: means of the post-edit values, and ``pre`` (see :data:`KNOWS_PRED`);
    portability over the records that have it, and only if any has.

    The sharded gather recomputes it from the concatenated rows with this same function.
    """
    summary = mean_metrics((row["post"] for row in rows), SUMMARY_METRICS + DEFINITION_METRICS)
    summary[KNOWS_PRED] = mean_metrics(rows, ["knows_pred"])["knows_pred"]
    ported = [row["post"] for row in rows if PORTABILITY_METRIC in row["post"]]
    if ported:
        summary |= mean_metrics(ported, PORTABILITY_METRICS)
    return summary


def rates(count: int, seconds: Mapping[str, float]) -> dict[str, float]:
    """``edits_per_s`` (whole loop) and ``apply_edits_per_s`` (``Editor.apply`` only) of ``count`` records."""
    return {rate: count / seconds[key] if seconds[key] > 0 else float("inf") for rate, key in RATES.items()}
