"""One function per workflow stage, taking plain paths and config mappings.

The Snakemake scripts and the ``mmke`` CLI both call these, so a stage behaves the same whether
the DAG or a person runs it. Each function reads its inputs, calls the library, and writes its
outputs atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

import mmke
from mmke.data.records import EditRecord, ImageRoots, RecordImages, load_records
from mmke.evaluate import Baseline, Protocol, evaluate, run_baseline
from mmke.hparams import digest, read_hparams
from mmke.io import write_json, write_jsonl
from mmke.methods.base import make_editor
from mmke.models.base import VLMAdapter, load_model


def resolve_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_eval_split(dataset: Mapping[str, Any]) -> tuple[list[EditRecord], ImageRoots]:
    """Records and image roots of a dataset's eval split, from its config entry."""
    return load_split(dataset, "eval")


def load_split(dataset: Mapping[str, Any], split: str) -> tuple[list[EditRecord], ImageRoots]:
    """Records and image roots of a dataset's ``train`` or ``eval`` split, from its config entry."""
    roots = ImageRoots(Path(dataset["image_root"]), _optional_path(dataset.get("rephrase_image_root")))
    records = load_records(dataset["kind"], dataset[split], roots, size=dataset.get("size"))
    if not records:
        raise ValueError(f"{dataset[split]}: no record left after the skip rules")
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


def pretrain_stage(*, method: str, model: Mapping, dataset: Mapping, protocol: Mapping, hparams_path: str | Path,
                   checkpoint_out: str | Path, report_out: str | Path, state_dir: str | Path,
                   device: str = "auto") -> dict:
    """Meta-train one method's network on a dataset's train split, resumable from ``state_dir``.

    The resume file is named by the hparams digest, so a rerun after an interruption continues
    and a rerun with changed hparams starts afresh. It is deleted once the checkpoint and report
    are written, so a finished job leaves only its declared outputs.
    """
    from mmke.train import split_train_val, train, write_train_report

    hparams = read_hparams(hparams_path)
    if hparams.method != method:
        raise ValueError(f"{hparams_path}: field 'method' is {hparams.method!r}, expected {method!r}")
    editor = make_editor(hparams)
    state_path = Path(state_dir) / f"resume-{digest(hparams)}.pt"
    records, roots = load_split(dataset, "train")
    adapter = load_configured_model(model, device)
    result = train(editor, adapter, records, RecordImages(roots), checkpoint_out, state_path,
                   mloc_template=protocol.get("mloc_template", "trainer"))
    n_train, n_val = (len(part) for part in split_train_val(records, hparams.val_fraction))
    write_train_report(report_out, result, hparams, n_train, n_val)
    state_path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # other digests' resume files keep a non-empty folder
        state_path.parent.rmdir()
    return dataclasses.asdict(result)


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


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None
