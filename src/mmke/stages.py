"""One function per workflow stage, taking plain paths and config mappings.

The Snakemake scripts and the ``mmke`` CLI both call these, so a stage behaves the same whether
the DAG or a person runs it. Each function reads its inputs, calls the library, and writes its
outputs atomically.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

import mmke
from mmke.data.records import EditRecord, ImageRoots, load_records
from mmke.evaluate import Baseline, Protocol, evaluate, run_baseline
from mmke.hparams import digest, read_hparams
from mmke.io import write_json, write_jsonl
from mmke.methods.base import make_editor
from mmke.models.base import VLMAdapter, load_model
from mmke.world_training import (
    PretrainConfig, accuracy, eval_split_items, pretrain, save_pretrained, world_items, world_stream,
)


def resolve_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_eval_split(dataset: Mapping[str, Any]) -> tuple[list[EditRecord], ImageRoots]:
    """Records and image roots of a dataset's eval split, from its config entry."""
    roots = ImageRoots.of_dataset(dataset)
    records = load_records(dataset["kind"], dataset["eval"], roots, size=dataset.get("size"))
    if not records:
        raise ValueError(f"{dataset['eval']}: no record left after the skip rules")
    return records, roots


def load_configured_model(model: Mapping[str, Any], device: str = "auto") -> VLMAdapter:
    """The adapter of a config ``models:`` entry (family, path, optional image_size/dtype)."""
    dtype = getattr(torch, model.get("dtype", "float32"))
    return load_model(model["family"], model["path"], device=resolve_device(device), dtype=dtype,
                      image_size=model.get("image_size"))


def baseline_stage(model: Mapping, dataset: Mapping, protocol: Mapping, rows_out: str | Path,
                   tensors_out: str | Path, device: str = "auto") -> Baseline:
    records, roots = load_eval_split(dataset)
    adapter = load_configured_model(model, device)
    baseline = run_baseline(adapter, records, roots, Protocol(**protocol))
    baseline.save(rows_out, tensors_out)
    return baseline


def evaluate_stage(*, names: Mapping[str, str], model: Mapping, dataset: Mapping, protocol: Mapping,
                   hparams_path: str | Path, baseline_rows: str | Path, baseline_tensors: str | Path,
                   metrics_out: str | Path, records_out: str | Path, resources: Mapping[str, Path] | None = None,
                   device: str = "auto") -> dict:
    """Edit + measure one method x model x dataset; ``names`` holds the three config keys."""
    start = time.perf_counter()
    hparams = read_hparams(hparams_path)
    if hparams.method != names["method"]:
        raise ValueError(f"{hparams_path}: field 'method' is {hparams.method!r}, expected {names['method']!r}")
    editor = make_editor(hparams)
    editor.prepare(resources or {})
    records, roots = load_eval_split(dataset)
    adapter = load_configured_model(model, device)
    load_s = time.perf_counter() - start
    result = evaluate(adapter, editor, records, roots, Baseline.load(baseline_rows, baseline_tensors),
                      Protocol(**protocol))
    write_jsonl(records_out, result.rows)
    report = {
        **{key: names[key] for key in ("method", "model", "dataset")},
        "n": len(result.rows),
        "summary": result.summary,
        "hparams": dataclasses.asdict(hparams),
        "hparams_digest": digest(hparams),
        "protocol": dict(protocol),
        "versions": {"mmke": mmke.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "timings": {"load_s": load_s, **result.timings},
        "device": str(adapter.device),
    }
    write_json(metrics_out, report)
    return report


def summary_stage(metric_paths: Sequence[str | Path], csv_out: str | Path, md_out: str | Path,
                  method_order: Sequence[str] | None = None) -> None:
    from mmke.tables import write_summary

    write_summary(metric_paths, csv_out, md_out, method_order)


def pretrain_stage(*, model: Mapping, init_dir: str | Path, datasets: Sequence[Mapping], protocol: Mapping,
                   settings: Mapping, out_dir: str | Path, report_out: str | Path, device: str = "auto") -> dict:
    """Train ``init_dir`` on the world's train scenes; save it at ``out_dir`` with a report.

    The report holds exact-match accuracy on held-out scenes and on the ``datasets``' eval
    records, before and after training, the steps actually run and the wall time, so the demo's
    claim that its base model knows the world is a recorded number.
    """
    config = PretrainConfig(**settings)
    adapter = load_configured_model({**model, "path": init_dir}, device)
    template = Protocol(**protocol).mloc_template
    stream = world_stream("train", config.seed, config.image_size, template)
    measured = {"heldout": world_items("eval", config.heldout_images, config.seed, config.image_size, template),
                "eval_split": eval_split_items(datasets, template)}

    def measure() -> dict[str, dict[str, float]]:
        return {f"{name}_accuracy": accuracy(adapter, items, config.eval_batch_size) for name, items in measured.items()}

    before = measure()
    run = pretrain(adapter, stream, config)
    report = {**measure(), "before": before, "n_train_items": run["steps"] * config.batch_size,
              **{f"n_{name}_items": len(items) for name, items in measured.items()},
              "settings": dataclasses.asdict(config), **run, "device": str(adapter.device)}
    save_pretrained(adapter, init_dir, out_dir)
    write_json(report_out, report)
    return report
