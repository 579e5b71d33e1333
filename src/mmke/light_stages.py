"""The workflow stages that need neither torch nor transformers: gather, tables, plots, downloads.

They only move, merge and draw files, yet importing :mod:`mmke.stages` costs seconds of torch and
transformers start-up per job. Their scripts import this module instead, and a test
(``tests/test_imports.py``) checks in a fresh interpreter that it, and every module it imports,
leaves torch and transformers unloaded. :mod:`mmke.stages` re-exports these functions, so the
CLI and library callers find every stage in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmke.io import read_json, read_jsonl, write_json, write_jsonl
from mmke.shards import merge_reports


def gather_stage(shard_metrics: Sequence[str | Path], shard_records: Sequence[str | Path],
                 metrics_out: str | Path, records_out: str | Path) -> dict:
    """Merge the shards of one combo into the ``metrics.json`` / ``records.jsonl`` of an unsharded run."""
    if len(shard_metrics) != len(shard_records):
        raise ValueError(f"{len(shard_metrics)} shard metrics files but {len(shard_records)} shard records files")
    report, rows = merge_reports([read_json(p) for p in shard_metrics], [read_jsonl(p) for p in shard_records],
                                 [str(p) for p in shard_metrics])
    write_jsonl(records_out, rows)
    write_json(metrics_out, report)
    return report


def summary_stage(metric_paths: Sequence[str | Path], csv_out: str | Path, md_out: str | Path,
                  method_order: Sequence[str] | None = None, long_out: str | Path | None = None,
                  tex_out: str | Path | None = None, model_order: Sequence[str] | None = None,
                  dataset_order: Sequence[str] | None = None) -> None:
    from mmke.tables import write_summary

    write_summary(metric_paths, csv_out, md_out, method_order, long_path=long_out, tex_path=tex_out,
                  model_order=model_order, dataset_order=dataset_order)


def plot_stage(summary_csv: str | Path, dataset: str, out: str | Path, model_order: Sequence[str] | None = None) -> None:
    """One figure per dataset comparing methods, drawn from the summary CSV alone."""
    from mmke.tables import plot_dataset, read_summary

    plot_dataset(read_summary(summary_csv), dataset, out, model_order)


def download_stage(name: str, entry: Mapping[str, Any], checksums: Mapping[str, str | None],
                   retries: int = 3) -> list[Path]:
    """Fetch one ``downloads:`` entry of the config (see :mod:`mmke.download`)."""
    from mmke.download import Download, fetch

    return fetch(Download.from_config(name, entry), checksums, retries=retries)
