"""Scatter a dataset's records into shards and gather the shard results back into one report.

Shards are contiguous blocks in record order, so concatenating the shards' rows reproduces the
unsharded row order, and the merged means are recomputed from those rows with the same
:func:`mmke.metric_keys.summarize` the unsharded run uses: the figures are then bit-identical, not
merely close (a weighted mean of shard means would round differently).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from mmke.metric_keys import RATES, rates, summarize

T = TypeVar("T")

#: Fields that must agree across shards: they describe *what* was measured, so a mismatch means
#: shards of different runs (e.g. an hparams file edited between two shard jobs).
SAME_ACROSS_SHARDS = ("method", "model", "dataset", "hparams", "hparams_digest", "protocol", "evaluation",
                      "skipped")


def shard_slice(items: Sequence[T], index: int, count: int, group: int = 1) -> list[T]:
    """The ``index``-th of ``count`` contiguous, near-equal blocks of ``items`` (0-based).

    Blocks are cut only between whole groups of ``group`` items: sequential evaluation edits
    ``n_edits`` records together, so a shard boundary inside a group would change what is measured.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index} of {count}: need 0 <= shard < shards and shards >= 1")
    if group < 1:
        raise ValueError(f"group size must be >= 1, got {group}")
    groups = -(-len(items) // group)  # the last group may be shorter, as in the unsharded run
    if count > groups:
        raise ValueError(f"{count} shards for {len(items)} records in {groups} group(s) of {group}: "
                         "every shard needs at least one group")
    base, extra = divmod(groups, count)
    start = index * base + min(index, extra)
    return list(items[start * group : (start + base + (index < extra)) * group])


def merge_reports(reports: Sequence[dict], rows: Sequence[Sequence[dict]], sources: Sequence[str]) -> tuple[dict, list[dict]]:
    """One metrics report and row list from the shards' (in shard order).

    ``sources`` name the shard files in errors. Timings are summed (total compute spent), the
    summary and ``n`` are recomputed from the concatenated rows.
    """
    if not reports or len(reports) != len(rows) or len(reports) != len(sources):
        raise ValueError(f"need one report and one row list per shard, got {len(reports)}, {len(rows)}, {len(sources)}")
    first = reports[0]
    for report, source in zip(reports[1:], sources[1:]):
        for key in SAME_ACROSS_SHARDS:
            if report.get(key) != first.get(key):
                raise ValueError(f"{source}: field {key!r} differs from {sources[0]}; shards of different runs?")
    merged_rows = [row for shard_rows in rows for row in shard_rows]
    ids = [row["id"] for row in merged_rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"shards {', '.join(sources)} overlap: a record id occurs twice")
    timings: dict[str, float] = {}
    for report in reports:
        for key, value in report.get("timings", {}).items():
            timings[key] = timings.get(key, 0.0) + value
    if set(RATES.values()) <= set(timings):  # rates are recomputed from the summed seconds
        timings |= rates(len(merged_rows), timings)
    merged = {
        **first,
        "n": len(merged_rows),
        "summary": summarize(merged_rows),
        "timings": timings,
        "shards": len(reports),
    }
    return merged, merged_rows
