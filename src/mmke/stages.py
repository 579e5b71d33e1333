"""One function per workflow stage, taking plain paths and config mappings.

The Snakemake scripts and the ``mmke`` CLI both call these, so a stage behaves the same whether
the DAG or a person runs it. Each function reads its inputs, calls the library, and writes its
outputs atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers

import mmke
from mmke.data.records import ImageRoots, RecordImages, Records, load_records
from mmke.evaluate import DEFAULT_BATCH_SIZE, Baseline, Protocol, Schedule, evaluate, run_baseline
from mmke.gpus import claim_gpu
from mmke.hparams import digest, read_hparams
from mmke.image_features import StoredImageFeatures, save_image_features
from mmke.io import broken_model_message, write_json, write_jsonl
# The stages that need no torch live apart, so their jobs start in a fraction of the time.
from mmke.light_stages import download_stage, gather_stage, plot_stage, summary_stage  # noqa: F401 (re-exported)
from mmke.methods.base import make_editor
from mmke.models.base import VLMAdapter, load_model
from mmke.shards import shard_slice
from mmke.facts import FactSource, RecordFacts, WorldFacts, fact_stream
from mmke.world_training import (
    PretrainConfig, accuracy, counterfactual_accuracy, counterfactual_stream, pretrain, pretrain_counterfactual,
    records_heldout, save_pretrained, world_heldout,
)


def resolve_device(name: str = "auto") -> str:
    """``auto``: CPU without CUDA, the only GPU, or a GPU claimed for this job among several."""
    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return "cpu"
    count = torch.cuda.device_count()
    return f"cuda:{claim_gpu(count)}" if count > 1 else "cuda"



def load_eval_split(dataset: Mapping[str, Any]) -> tuple[Records, ImageRoots]:
    """Records and image roots of a dataset's eval split, from its config entry."""
    return load_split(dataset, "eval")


def load_split(dataset: Mapping[str, Any], split: str) -> tuple[Records, ImageRoots]:
    """Records and image roots of a dataset's ``train`` or ``eval`` split, from its config entry.

    A dataset's ``hop`` (VLKEB's portability questions) applies to its eval split only: VLKEB
    loads its train split without one.
    """
    roots = ImageRoots.of_dataset(dataset)
    hop = dataset.get("hop") if split == "eval" else None
    records = load_records(dataset["kind"], dataset[split], roots, size=dataset.get("size"), hop=hop)
    if not records:
        raise ValueError(f"{dataset[split]}: no record left after the skip rules")
    return records, roots


def load_configured_model(model: Mapping[str, Any], device: str = "auto",
                          protocol: Mapping[str, Any] | None = None) -> VLMAdapter:
    """The adapter of a config ``models:`` entry (family, path, optional image_size/dtype/quantize).

    ``protocol.target_join`` may choose the family's target convention. A corrupt or truncated
    weights file is an error naming that file and the rule that writes it. With ``quantize``, the
    model is quantised on the CPU (:mod:`mmke.models.quantize`) before it moves to ``device``, so
    the device never holds its full-precision weights.
    """
    from safetensors import SafetensorError

    dtype = getattr(torch, model.get("dtype", "float32"))
    target_join = (protocol or {}).get("target_join", {}).get(model["family"])
    quantize = model.get("quantize")
    try:
        adapter = load_model(model["family"], model["path"], device="cpu" if quantize else resolve_device(device),
                             dtype=dtype, image_size=model.get("image_size"), target_join=target_join)
    except SafetensorError as err:
        raise ValueError(broken_model_message(model["path"], err)) from err
    if quantize:
        from mmke.models.quantize import quantize_language_model

        quantize_language_model(adapter, quantize["weights"], quantize.get("keep", ()))
        adapter.to(resolve_device(device))
    return adapter


def recorded_protocol(protocol: Mapping[str, Any], adapter: VLMAdapter) -> dict[str, Any]:
    """The protocol as metrics.json records it: the config's, with the target convention in force."""
    return dataclasses.asdict(Protocol(**protocol)) | {"target_join": {adapter.family: adapter.target_join}}


def baseline_stage(model: Mapping, dataset: Mapping, protocol: Mapping, rows_out: str | Path,
                   tensors_out: str | Path, device: str = "auto", batch_size: int | None = None,
                   features_out: str | Path | None = None, store_image_features: bool = False,
                   batch_tokens: int | None = None) -> Baseline:
    """Pre-edit outputs; ``batch_size`` (``evaluation.batch_size``, None: the default) records per
    forward, of at most ``batch_tokens`` token positions (``evaluation.batch_tokens``, None: no cap).

    ``features_out``: the eval images' features (:mod:`mmke.image_features`), or an empty file of
    the same format unless ``store_image_features``, so that the workflow's outputs stay fixed.
    """
    records, roots = load_eval_split(dataset)
    adapter = load_configured_model(model, device, protocol)
    baseline = run_baseline(adapter, records, roots, Protocol(**protocol), batch_size or DEFAULT_BATCH_SIZE,
                            keep_image_features=store_image_features, batch_tokens=batch_tokens)
    baseline.save(rows_out, tensors_out)
    if features_out is not None:
        save_image_features(features_out, baseline.image_features, model)
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

    hparams = read_hparams(hparams_path, expect_method=method)
    editor = make_editor(hparams)
    state_path = Path(state_dir) / f"resume-{digest(hparams)}.pt"
    records, roots = load_split(dataset, "train")
    adapter = load_configured_model(model, device, protocol)
    result = train(editor, adapter, records, RecordImages(roots), checkpoint_out, state_path,
                   mloc_template=protocol.get("mloc_template", "trainer"),
                   exact_match=protocol.get("exact_match", True))
    n_train, n_val = (len(part) for part in split_train_val(records, hparams.val_fraction))
    write_train_report(report_out, result, hparams, n_train, n_val)
    state_path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # other digests' resume files keep a non-empty folder
        state_path.parent.rmdir()
    return dataclasses.asdict(result)


def evaluate_stage(*, names: Mapping[str, str], model: Mapping, dataset: Mapping, protocol: Mapping,
                   hparams_path: str | Path, baseline_rows: str | Path, baseline_tensors: str | Path,
                   metrics_out: str | Path, records_out: str | Path, resources: Mapping[str, Path] | None = None,
                   evaluation: Mapping | None = None, device: str = "auto",
                   shard: tuple[int, int] | None = None, image_features: str | Path | None = None) -> dict:
    """Edit + measure one method x model x dataset; ``names`` holds the three config keys.

    ``evaluation`` is the config's single/sequential schedule (default: single edits),
    ``batch_size``, the records measured in one forward, and ``batch_tokens``, the most token
    positions of one (:func:`mmke.evaluate.evaluate`).
    ``shard=(index, count)`` measures only that contiguous block of the eval split (see
    :mod:`mmke.shards`); :func:`gather_stage` merges the blocks into the unsharded result.
    ``image_features``: the baseline job's file of the eval images' features
    (:mod:`mmke.image_features`; empty when the model stores none, and then every image is encoded).
    """
    start = time.perf_counter()
    settings = dict(evaluation or {})
    batch_size = settings.pop("batch_size", None) or DEFAULT_BATCH_SIZE
    batch_tokens = settings.pop("batch_tokens", None)
    schedule = Schedule(**settings)
    hparams = read_hparams(hparams_path, expect_method=names["method"])
    editor = make_editor(hparams)
    editor.prepare(resources or {})
    records, roots = load_eval_split(dataset)
    skipped = list(records.skipped)
    if shard is not None:
        records = shard_slice(records, *shard, group=schedule.group_size(len(records)))
    adapter = load_configured_model(model, "cpu", protocol)  # moved once what the job never runs is gone
    stored = None if image_features is None else StoredImageFeatures(image_features, model)
    released = False
    if stored is not None and editor.keeps_image_features(adapter) and stored.covers(records, roots):
        released = adapter.release_image_modules() > 0  # the store stands in for every image pass
    adapter.to(resolve_device(device))
    load_s = time.perf_counter() - start
    result = evaluate(adapter, editor, records, roots, Baseline.load(baseline_rows, baseline_tensors),
                      Protocol(**protocol), schedule, batch_size, stored_features=stored, batch_tokens=batch_tokens)
    write_jsonl(records_out, result.rows)
    report = {
        **{key: names[key] for key in ("method", "model", "dataset")},
        "n": len(result.rows),
        "summary": result.summary,
        "skipped": {"count": len(skipped), "ids": skipped},  # by the dataset's skip rules (spec §1)
        "hparams": dataclasses.asdict(hparams),
        "hparams_digest": digest(hparams),
        "protocol": recorded_protocol(protocol, adapter),
        "evaluation": dataclasses.asdict(schedule),  # what the values depend on; the batch settings are not
        "batch_size": batch_size,
        "batch_tokens": batch_tokens,
        # the CPU kernels' code path too (AVX2, AVX512, ...): another one rounds differently, so
        # the same config and seed give other figures on another machine (README, under the demo's table)
        "versions": {"mmke": mmke.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version(),
                     "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "timings": {"load_s": load_s, **result.timings},
        "device": str(adapter.device),
        "image_modules_released": released,
        "quantization": adapter.quantization,
    }
    write_json(metrics_out, report)
    return report


def embed_stage(dataset: Mapping, sentence_model: str, tensors_out: str | Path, sentences_out: str | Path,
                queries_out: str | Path | None = None, query_sentences_out: str | Path | None = None,
                device: str = "auto") -> int:
    """IKE's retrieval index: embed the training split's sentences once per dataset x sentence model.

    With ``queries_out`` (the workflow's rule), the retrieval query of every eval record too, so
    that IKE jobs find their queries' vectors here and never load the sentence model. Only the
    text of the records is needed, so images are not decoded here. Returns the training count.
    """
    from mmke.embed import encode, load_sentence_model, save_embeddings
    from mmke.methods.ike import query_sentence, training_sentences

    if (queries_out is None) != (query_sentences_out is None):
        raise ValueError("embed_stage writes the queries' embeddings and sentences together: give both paths or neither")
    roots = ImageRoots.of_dataset(dataset)
    records = load_records(dataset["kind"], dataset["train"], roots, check_images=False)
    if not records:
        raise ValueError(f"{dataset['train']}: no training record left after the skip rules")
    sentences = training_sentences(records)
    model = load_sentence_model(sentence_model, resolve_device(device))
    save_embeddings(tensors_out, sentences_out, encode(model, sentences), sentences, sentence_model)
    if queries_out is not None:
        queries = list(dict.fromkeys(query_sentence(record) for record in
                                     load_records(dataset["kind"], dataset["eval"], roots, check_images=False)))
        if not queries:
            raise ValueError(f"{dataset['eval']}: no eval record left after the skip rules")
        save_embeddings(queries_out, query_sentences_out, encode(model, queries), queries, sentence_model)
    return len(sentences)


def fact_sources(config: PretrainConfig, datasets: Mapping[str, Mapping], mloc_template: str
                 ) -> tuple[list[FactSource], dict[str, FactSource]]:
    """What a pretraining run learns from, and the held-out source of each, by name.

    The world trains on its train scenes and is measured on its held-out scenes; a dataset trains
    on its train split but the last ``heldout_fraction`` of it (at least one record), which it is
    measured on. Eval splits are never read: the model depends only on what it trains on, and
    what it knows of the eval records is the baseline stage's ``pre`` figure.
    """
    train: list[FactSource] = []
    heldout: dict[str, FactSource] = {}
    if config.world:
        train.append(WorldFacts("train", config.image_size, mloc_template, config.fact_weights))
        heldout["world"] = WorldFacts("eval", config.image_size, mloc_template, config.fact_weights)
    for name, dataset in datasets.items():
        records, roots = load_split(dataset, "train")
        if len(records) < 2:
            raise ValueError(f"{dataset['train']}: pretraining needs at least 2 train records (1 held out), "
                             f"got {len(records)}")
        n_heldout = min(len(records) - 1, max(1, math.ceil(len(records) * config.heldout_fraction)))
        images = RecordImages(roots)
        train.append(RecordFacts(records[:-n_heldout], images, mloc_template, config.fact_weights))
        heldout[name] = RecordFacts(records[-n_heldout:], images, mloc_template)
    if not train:
        raise ValueError("pretrain: nothing to learn (world: false and no datasets)")
    return train, heldout


def pretrain_base_stage(*, model: Mapping, init_dir: str | Path, datasets: Mapping[str, Mapping], protocol: Mapping,
                        settings: Mapping, out_dir: str | Path, report_out: str | Path, device: str = "auto") -> dict:
    """Train ``init_dir`` on the world and/or the ``datasets``' train splits; save it at ``out_dir``.

    The report holds exact-match accuracy on held-out facts of each source (plain and, if the
    model learns contexts, after relevant and unrelated new facts), before and after training,
    with the steps run, so the demo's claim that its base model knows its facts is a number.
    """
    config = PretrainConfig.from_settings(settings)
    adapter = load_configured_model({**model, "path": init_dir}, device, protocol)
    sources, heldout = fact_sources(config, datasets, Protocol(**protocol).mloc_template)
    measured = {name: world_heldout(source, config) if isinstance(source, WorldFacts) else records_heldout(source, config)
                for name, source in heldout.items()}

    def measure() -> dict[str, dict[str, float]]:
        return {name: accuracy(adapter, items, config.eval_batch_size) for name, items in measured.items()}

    before = measure()
    window = config.context
    stream = fact_stream(sources, config.seed, window, plain_items=window.after * config.batch_size,
                         context_items=None if window.until is None else window.until * config.batch_size)
    run = pretrain(adapter, stream, config)
    report = {"heldout": measure(), "before": before, "n_train_items": run["steps"] * config.batch_size,
              "n_heldout_items": {name: len(items) for name, items in measured.items()},
              "settings": dataclasses.asdict(config), **run, "device": str(adapter.device)}
    save_pretrained(adapter.model, init_dir, out_dir)
    write_json(report_out, report)
    return report


def pretrain_counterfactual_stage(*, init_dir: str | Path, datasets: Mapping[str, Mapping], protocol: Mapping,
                                  settings: Mapping, out_dir: str | Path, report_out: str | Path,
                                  device: str = "auto", n_heldout: int = 600) -> dict:
    """Train SERAC's counterfactual LM (``init_dir``) to answer from the edit in its context.

    Learns from the same sources as :func:`pretrain_base_stage`; measured on ``n_heldout``
    (edit, query) pairs of the held-out sources, before and after.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = PretrainConfig.from_settings(settings)
    lm = AutoModelForCausalLM.from_pretrained(init_dir, local_files_only=True).to(resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(init_dir, local_files_only=True)
    sources, heldout = fact_sources(config, datasets, Protocol(**protocol).mloc_template)
    measured = {name: list(itertools.islice(counterfactual_stream([source], config.seed), n_heldout))
                for name, source in heldout.items()}

    def measure() -> dict[str, dict[str, float]]:
        return {name: counterfactual_accuracy(lm, tokenizer, examples, config.eval_batch_size)
                for name, examples in measured.items()}

    before = measure()
    run = pretrain_counterfactual(lm, tokenizer, counterfactual_stream(sources, config.seed), config)
    report = {"heldout": measure(), "before": before, "n_train_items": run["steps"] * config.batch_size,
              "settings": dataclasses.asdict(config), **run, "device": str(lm.device)}
    save_pretrained(lm, init_dir, out_dir)
    write_json(report_out, report)
    return report
