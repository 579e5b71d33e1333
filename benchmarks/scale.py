"""Peak memory and seconds per edit of every method on the paper's model sizes, with random weights.

The paper's architectures are built from configs (no download) through the tiny-model code path
(:func:`mmke.models.tiny.blip2_config` / :func:`~mmke.models.tiny.init_blip2`, with the paper's
shapes instead of the tiny ones) and wrapped in their family's adapter, so the edit loop, the
methods and the measurement are the ones the workflow runs. Only speed and memory mean anything
here: the weights, MEND/KE networks and SERAC's classifier and counterfactual model are random
and untrained (at the sizes the hparams name).

* BLIP-2 OPT-2.7b: EVA ViT-g (39 layers, 1408 wide, fed 364 px), Q-Former 12 x 768, OPT-2.7b.
* MiniGPT-4: the same vision side with Vicuna-7B (Llama, 32 x 4096).

Every registered method with a ``config/hparams/<METHOD>/<model>.yaml`` runs ``--edits`` single
edits through :func:`mmke.evaluate.evaluate` (apply + the five measured items + revert) after one
shared baseline pass, timed after one untimed edit. Peak memory per method: ``torch.cuda.max_memory_allocated`` on a GPU (reset
before each method; it includes the model; the allocator's peak reservation beside it), the peak
resident set size on a CPU (Linux' ``clear_refs`` reset, else the process' peak so far). The
``allocated`` figure is the peak of live tensor bytes: ``max_memory_allocated`` on a GPU, and on a
CPU with ``--tensor-memory`` the same count made by :class:`live_tensors.LiveTensors` (tensors
only, short of the GPU kernels' workspaces), so that a machine without a GPU can size the
paper's models as a GPU would hold them. The MiniGPT-4 figures are compared with EasyEdit's
(issue 97: IKE 21.5, SERAC 56.8, MEND 27.6 GB), the goal being at most half.

    PYTHONPATH=src python benchmarks/scale.py                       # CPU: BLIP-2 OPT-2.7b, bf16
    PYTHONPATH=src python benchmarks/scale.py --device cuda --edits 5 --json scale.json
    PYTHONPATH=src python benchmarks/scale.py --small --edits 1     # tiny shapes, seconds (the test)
    PYTHONPATH=src python benchmarks/scale.py --models minigpt4-vicuna-7b --tensor-memory   # CPU, GPU-like bytes

``--steps N`` caps FT-style ``num_steps`` (reported with the figures); without it the paper's
hparams run unchanged. ``--stored-features`` keeps the baseline's image features and hands them to
the edits, as the workflow does with ``evaluation.store_image_features`` (config/mmedit.yaml); as in
an evaluate job whose store covers its images, the image path's weights are then released
(:meth:`~mmke.models.base.VLMAdapter.release_image_modules`) for the methods that keep the features,
which run after those that recompute them (FT-V). ``--limit`` (CPU) also times the passes each
method cannot avoid, alone, as benchmarks/edit_speed.py does on the demo's tiny models, and prints
the loop's ratio to them: at the paper's sizes, what the loop adds beyond its model passes; it then
prints the passes per edit, whole and in the decoder layers' work, beside EasyEdit's protocol (as
edit_speed.py does). ``--mmap-weights`` (CPU) maps the edited model's weights from a file, so that
SERAC's counterfactual Vicuna-7B and MiniGPT-4 together, 25 GiB, run on a machine with less memory;
the live-tensor count is the same, the run slower (pages are read back from disk).
``--quantize int8`` holds the language model's decoder-layer weights in int8 but the scopes the
methods' hparams name, as a config entry's ``quantize`` does (:mod:`mmke.models.quantize`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModel, AutoModelForCausalLM, DistilBertConfig, LlamaConfig, OPTConfig

from mmke.data.demo import write_demo_dataset
from mmke.data.records import ImageRoots, load_records
from mmke.evaluate import Protocol, evaluate, run_baseline
from mmke.hparams import HParams, language_model_scopes, read_hparams
from mmke.image_features import StoredImageFeatures, save_image_features
from mmke.methods.base import BUILTIN_METHOD_MODULES, METHODS, make_editor
from mmke.methods.meta import MetaEditor
from mmke.models.base import adapter_class
from mmke.models.convert import EVA_VIT_G
from mmke.models.quantize import WEIGHT_FORMATS, quantize_language_model
from mmke.models.tiny import blip2_config, blip2_processor, init_blip2, train_tokenizer
from mmke.models.tiny_aux import save_seeded
from mmke.stages import embed_stage
from live_tensors import LiveTensors
from passes import easyedit_figures, passes_and_limit, print_easyedit_passes

REPO = Path(__file__).resolve().parents[1]

#: EasyEdit's MiniGPT-4 GPU memory per method, GB (EasyEdit issue 97).
EASYEDIT_MINIGPT4_GB = {"IKE": 21.5, "SERAC": 56.8, "MEND": 27.6}
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class LM:
    """A language model's shape: ``kind`` picks the config class (opt, llama, distilbert)."""

    kind: str
    width: int
    layers: int
    ffn: int
    heads: int
    vocab: int

    def config(self, tokenizer) -> Any:
        ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
        if self.kind == "opt":
            return OPTConfig(vocab_size=self.vocab, hidden_size=self.width, word_embed_proj_dim=self.width,
                             num_hidden_layers=self.layers, ffn_dim=self.ffn, num_attention_heads=self.heads,
                             max_position_embeddings=2048, **ids)
        if self.kind == "llama":
            return LlamaConfig(vocab_size=self.vocab, hidden_size=self.width, intermediate_size=self.ffn,
                               num_hidden_layers=self.layers, num_attention_heads=self.heads,
                               num_key_value_heads=self.heads, max_position_embeddings=2048,
                               tie_word_embeddings=False, rms_norm_eps=1e-6, **ids)
        if self.kind == "distilbert":
            return DistilBertConfig(vocab_size=self.vocab, dim=self.width, n_layers=self.layers,
                                    hidden_dim=self.ffn, n_heads=self.heads, max_position_embeddings=512,
                                    pad_token_id=tokenizer.pad_token_id)
        raise ValueError(f"unknown language model kind {self.kind!r}")

    def small(self) -> LM:
        """The same kind and depth at test width: the paper hparams' layer scopes
        (``llm.layers.18.mlp.out``, ``llm.mlp.last3``) exist in it too."""
        return LM(self.kind, 64, self.layers, 128, 2, SMALL_VOCAB)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A paper model: its family, the vision/Q-Former config fields and its language model."""

    family: str
    lm: LM
    vision: Mapping[str, Any]
    qformer: Mapping[str, Any]
    image_size: int  # what the processor feeds (EasyEdit's 364); the encoder interpolates positions
    num_query_tokens: int = 32


SMALL_VOCAB = 1024
# LAVIS' EVA ViT-g as its checkpoint stores it (224 px, patch 14), and BLIP-2's BERT-base Q-Former.
EVA_VISION = {**EVA_VIT_G, "intermediate_size": 6144, "patch_size": 14, "image_size": 224}
QFORMER = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
           "encoder_hidden_size": EVA_VIT_G["hidden_size"], "cross_attention_frequency": 2}
OPT_2_7B = LM("opt", 2560, 32, 10240, 32, 50272)
VICUNA_7B = LM("llama", 4096, 32, 11008, 32, 32000)
PAPER_MODELS = {
    "blip2-opt-2.7b": Shape("blip2", OPT_2_7B, EVA_VISION, QFORMER, image_size=364),
    "minigpt4-vicuna-7b": Shape("minigpt4", VICUNA_7B, EVA_VISION, QFORMER, image_size=364),
}
#: Auxiliary models an hparams file names by directory (SERAC's classifier and counterfactual),
#: by the directory's last component, with the shape of the published model of that name.
AUX_MODELS = {
    "distilbert-base-cased": (AutoModel, LM("distilbert", 768, 6, 3072, 12, 28996)),
    "opt-125m": (AutoModelForCausalLM, LM("opt", 768, 12, 3072, 12, 50272)),
    "vicuna-7b-v0": (AutoModelForCausalLM, VICUNA_7B),
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters in ``dtype`` (a 2.7B model is never materialised in float32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def memory_mapped(model: torch.nn.Module, path: Path) -> None:
    """Swap ``model``'s weights (CPU) for the same values mapped from a file written to ``path``.

    Their pages are then the kernel's to drop and read back, so a model pair larger than the
    memory left (SERAC's counterfactual Vicuna-7B beside MiniGPT-4) still runs on a small machine,
    slowly; the live-tensor count (:class:`live_tensors.LiveTensors`) sees the same bytes. The
    file is unlinked once mapped: its disk space (15 GB for MiniGPT-4) goes with the mapping, also
    when the run is killed.
    """
    torch.save(model.state_dict(), path)
    model.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
    path.unlink()
    model.tie_weights()


def build_adapter(shape: Shape, device: torch.device, dtype: torch.dtype, small: bool, tokenizer,
                  mmap_path: Path | None = None):
    """The family's adapter around a random model of ``shape`` (tiny shapes with ``small``), its
    weights mapped from ``mmap_path`` where given (:func:`memory_mapped`)."""
    lm = shape.lm.small() if small else shape.lm
    sizes = ({"image_size": 32, "num_query_tokens": 4} if small
             else {"image_size": shape.vision["image_size"], "num_query_tokens": shape.num_query_tokens,
                   "patch_size": shape.vision["patch_size"], "vision_width": shape.vision["hidden_size"],
                   "vision": shape.vision, "qformer": shape.qformer})
    config = blip2_config(lm.config(tokenizer), tokenizer, **sizes)
    with torch.device(device), default_dtype(dtype):
        model = init_blip2(config, seed=0)
    if mmap_path is not None:
        memory_mapped(model, mmap_path)
    processor = blip2_processor(tokenizer, 32 if small else shape.image_size, config.num_query_tokens)
    return adapter_class(shape.family)(model.eval(), tokenizer, processor.image_processor, device)


class Meter:
    """Peak memory of a block: GPU allocations on CUDA, resident set size on a CPU, and with
    ``tensors`` on a CPU also the bytes of live tensors (:class:`live_tensors.LiveTensors`, open
    from :meth:`__enter__` on), the figure a GPU's ``max_memory_allocated`` gives."""

    def __init__(self, device: torch.device, tensors: bool = False):
        self.device = device
        self.exact = True
        self.tensors = LiveTensors() if tensors and device.type == "cpu" else None

    def __enter__(self) -> "Meter":
        if self.tensors is not None:
            self.tensors.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.tensors is not None:
            self.tensors.__exit__(*exc)

    def reset(self) -> None:
        if self.tensors is not None:
            self.tensors.reset_peak()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.exact = False  # ru_maxrss is the process' peak so far: an upper bound

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / GIB
        if self.exact:
            status = Path("/proc/self/status").read_text()
            kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
            return kib * 1024 / GIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB

    def allocated_gib(self, now: bool = False) -> float | None:
        """The peak of live tensor bytes (``now``: those live now): CUDA's own count on a GPU,
        :class:`LiveTensors`' on a CPU (None there unless ``tensors``). Comparable between the two,
        and with EasyEdit's figures."""
        if self.device.type == "cuda":
            allocated = torch.cuda.memory_allocated if now else torch.cuda.max_memory_allocated
            return allocated(self.device) / GIB
        return None if self.tensors is None else (self.tensors.live if now else self.tensors.peak) / GIB

    def reserved_gib(self) -> float | None:
        """On CUDA, the caching allocator's peak reservation (what nvidia-smi shows, less the
        context): the comparable figure for tools that report the card's memory in use."""
        return torch.cuda.max_memory_reserved(self.device) / GIB if self.device.type == "cuda" else None


def paper_aux(hparams, out: Path, device: torch.device, dtype: torch.dtype, small: bool, tokenizer,
              built: dict[str, Path]):
    """``hparams`` with every auxiliary-model directory it names replaced by a random one of that shape.

    The counterfactual shares the edited model's tokenizer, as SERAC requires; the models are
    saved as transformers directories so the method loads them through its own code.
    """
    changes = {}
    for field in dataclasses.fields(hparams):
        value = getattr(hparams, field.name)
        name = Path(value).name if isinstance(value, str) else None
        if name not in AUX_MODELS:
            continue
        if name not in built:
            auto, lm = AUX_MODELS[name]
            lm = lm.small() if small else lm
            config = lm.config(tokenizer)
            print(f"  building {name} ({lm.layers} x {lm.width}, random) for {hparams.method}")
            with torch.device(device), default_dtype(dtype):
                built[name] = save_seeded(out / name, lambda: auto.from_config(config), tokenizer, seed=0)
        changes[field.name] = str(built[name])
    return dataclasses.replace(hparams, **changes)


def registered_methods() -> list[str]:
    """Every method in the registry (built-ins imported first): the paper grid's first, in its order."""
    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(module)
    paper = yaml.safe_load((REPO / "config" / "mmedit.yaml").read_text(encoding="utf-8"))["methods"]
    return [m for m in paper if m in METHODS] + sorted(set(METHODS) - set(paper))


def run_method(method: str, hparams: HParams, adapter, records, roots, data: Mapping[str, Path], baseline,
               resources: Mapping[str, Path], meter: Meter, args, aux: Callable,
               stored: StoredImageFeatures | None = None) -> dict:
    """One method's edits (at its paper ``hparams``) on the loaded model: seconds per edit and peak memory."""
    notes = []
    if args.steps is not None and getattr(hparams, "num_steps", args.steps) > args.steps:
        notes.append(f"num_steps {hparams.num_steps} -> {args.steps}")
        hparams = dataclasses.replace(hparams, num_steps=args.steps)
    hparams = aux(hparams)  # built and saved before the meter starts: only loading them counts
    gc.collect()
    if adapter.device.type == "cuda":
        torch.cuda.empty_cache()
    meter.reset()
    editor = make_editor(hparams)
    sentence_model = getattr(hparams, "sentence_model", None)
    if sentence_model and not resources["embeddings"].exists():  # IKE's index of the train split, its queries
        embed_stage({"kind": "evqa", "train": str(data["train"]), "eval": str(data["eval"]),
                     "image_root": str(roots.image)}, sentence_model, resources["embeddings"], resources["sentences"],
                    resources["queries"], resources["query_sentences"], device=str(adapter.device))
    if isinstance(editor, MetaEditor):
        editor.build(adapter).eval()  # untrained network of the right size: speed and memory only
        notes.append("untrained network")
    else:
        editor.prepare(resources)
    # one edit first, untimed, as edit_speed.py does: its first-call costs (the allocator growing,
    # oneDNN's or cuBLAS' kernel choice per shape) are no cost of an edit in a job of thousands
    evaluate(adapter, editor, records[:1], roots, baseline, Protocol(), stored_features=stored)
    wall, cpu = time.perf_counter(), time.process_time()
    result = evaluate(adapter, editor, records, roots, baseline, Protocol(), stored_features=stored)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    row = {"edits": len(result.rows), "s_per_edit": wall / len(result.rows), "cpu_s_per_edit": cpu / len(result.rows),
           "peak_gib": meter.peak_gib(), "allocated_gib": meter.allocated_gib(), "reserved_gib": meter.reserved_gib(),
           **easyedit_figures(method, hparams), "notes": notes}
    if args.limit:
        row |= limit_figures(adapter, editor, records, roots, baseline, row["cpu_s_per_edit"], stored)
    del editor
    gc.collect()
    if adapter.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def limit_figures(adapter, editor, records, roots, baseline, loop_cpu_s: float,
                  stored: StoredImageFeatures | None = None) -> dict:
    """The passes the edits needed (counted in a second run of the same edits) and the limit they set,
    as benchmarks/edit_speed.py measures them on the tiny models: CPU s per edit, and the loop's ratio;
    and the CPU s per edit of the optimiser steps in that run (no pass, outside the limit)."""
    run, limit_ms = passes_and_limit(adapter, editor, records, roots, baseline, Protocol(), repeats=1,
                                     stored_features=stored)
    limit = limit_ms / 1000
    return {"limit_cpu_s_per_edit": limit, "ratio": loop_cpu_s / limit,
            "optimiser_cpu_s_per_edit": run.optimiser_ms / 1000, "passes": run.passes}


def run_model(model_name: str, args, device: torch.device, dtype: torch.dtype, tmp: Path, meter: Meter,
              data: Mapping[str, Path]) -> dict:
    """Build one paper model, run its baseline, then every method's edits on it."""
    shape = PAPER_MODELS[model_name]
    tokenizer = train_tokenizer(SMALL_VOCAB)
    roots = ImageRoots(data["images"])
    records = load_records("evqa", data["eval"], roots)
    resources = {"embeddings": tmp / "embeddings.safetensors", "sentences": tmp / "sentences.json",
                 "queries": tmp / "queries.safetensors", "query_sentences": tmp / "queries.json"}
    print(f"{model_name}: building ({'small shapes' if args.small else 'paper shapes'}, {dtype}, {device})")
    meter.reset()
    start = time.perf_counter()
    adapter = build_adapter(shape, device, dtype, args.small, tokenizer,
                            tmp / f"{model_name}.weights.pt" if args.mmap_weights else None)
    params = sum(p.numel() for p in adapter.model.parameters())
    report = {"parameters": params, "build_s": time.perf_counter() - start, "model_gib": meter.peak_gib(),
              "model_allocated_gib": meter.allocated_gib(now=True), "methods": {}}
    allocated = "" if report["model_allocated_gib"] is None else f" ({report['model_allocated_gib']:.2f} allocated)"
    print(f"  {params / 1e6:.1f}M parameters, built in {report['build_s']:.1f} s, {report['model_gib']:.2f} GiB"
          f"{allocated}")
    paper = {method: REPO / "config" / "hparams" / method / f"{model_name}.yaml"
             for method in args.methods or registered_methods()}
    for method in [method for method, path in paper.items() if not path.exists()]:
        print(f"  {method}: no config/hparams/{method}/{model_name}.yaml, skipped")
    hparams = {method: read_hparams(path) for method, path in paper.items() if path.exists()}
    if args.quantize:  # as a config entry whose quantize.keep holds every LM scope these methods name
        keep = sorted({scope for hp in hparams.values() for scope in language_model_scopes(hp)})
        report["quantized"] = dataclasses.asdict(quantize_language_model(adapter, args.quantize, keep))
        report["quantized_allocated_gib"] = meter.allocated_gib(now=True)
        allocated = ("" if report["quantized_allocated_gib"] is None
                     else f", {report['quantized_allocated_gib']:.2f} GiB allocated")
        print(f"  {args.quantize}: {report['quantized']['layers']} linear layers, their weights "
              f"{report['quantized']['bytes_before'] / GIB:.2f} -> {report['quantized']['bytes_after'] / GIB:.2f} GiB"
              f"{allocated} (kept: {', '.join(keep) or 'none'})")
    start = time.perf_counter()
    baseline = run_baseline(adapter, records, roots, Protocol(), keep_image_features=args.stored_features)
    report["baseline_s_per_record"] = (time.perf_counter() - start) / len(records)
    print(f"  baseline: {report['baseline_s_per_record']:.2f} s/record")
    stored = None
    if args.stored_features:
        save_image_features(tmp / f"{model_name}.features.safetensors", baseline.image_features, {"model": model_name})
        stored = StoredImageFeatures(tmp / f"{model_name}.features.safetensors")
    built: dict[str, Path] = {}
    aux = functools.partial(paper_aux, out=tmp / "aux" / model_name, device=device, dtype=dtype, small=args.small,
                            tokenizer=tokenizer, built=built)
    methods = list(hparams)
    keeps = {method: stored is not None and make_editor(hparams[method]).keeps_image_features(adapter)
             for method in methods}
    methods.sort(key=keeps.get)  # those that recompute the image features first: then they can go
    for method in methods:
        if keeps[method] and "released_gib" not in report:  # as an evaluate job whose store covers its images
            report["released_gib"] = adapter.release_image_modules() / GIB
            print(f"  image modules released: {report['released_gib']:.2f} GiB (the stored features stand in)")
        print(f"  {method}: {len(records)} edit(s) ...")
        try:
            row = run_method(method, hparams[method], adapter, records, roots, data, baseline, resources, meter, args,
                             aux, stored)
        except Exception as err:  # one method's failure (e.g. out of memory) must not hide the others
            row = {"error": f"{type(err).__name__}: {err}"}
            print(f"  {method}: FAILED {row['error']}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            limit = (f", limit {row['limit_cpu_s_per_edit']:.2f} CPU s ({row['ratio']:.2f}x), optimiser steps "
                     f"{row['optimiser_cpu_s_per_edit']:.2f} CPU s" if args.limit else "")
            allocated = "" if row["allocated_gib"] is None else f" ({row['allocated_gib']:.2f} allocated)"
            print(f"  {method}: {row['s_per_edit']:.2f} s/edit ({row['cpu_s_per_edit']:.2f} CPU s{limit}), "
                  f"peak {row['peak_gib']:.2f} GiB{allocated} {'; '.join(row['notes'])}")
        report["methods"][method] = row
    for directory in built.values():  # a 7B counterfactual is 13 GB of disk
        for file in directory.iterdir():
            file.unlink()
    del adapter
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


def print_table(reports: Mapping[str, dict], device: torch.device) -> None:
    print("\nmodel               method   s/edit  CPU s/edit  limit  peak GiB  allocated  reserved  EasyEdit GB  ratio")
    for model_name, report in reports.items():
        for method, row in report["methods"].items():
            if "error" in row:
                print(f"{model_name:19s} {method:7s}  {row['error']}")
                continue
            anchor = EASYEDIT_MINIGPT4_GB.get(method) if model_name.startswith("minigpt4") else None
            allocated, reserved = ("" if row[key] is None else f"{row[key]:.2f}"
                                   for key in ("allocated_gib", "reserved_gib"))
            compare = (f"{anchor:11.1f}  {row['allocated_gib'] * GIB / 1e9 / anchor:5.2f}"
                       if anchor and allocated else "")
            note = f"  ({'; '.join(row['notes'])})" if row["notes"] else ""
            limit = f"{row['ratio']:5.2f}x" if "ratio" in row else ""
            print(f"{model_name:19s} {method:7s} {row['s_per_edit']:7.2f} {row['cpu_s_per_edit']:11.2f} {limit:>6s} "
                  f"{row['peak_gib']:9.2f}  {allocated:>9s}  {reserved:>8s}  {compare}{note}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--models", nargs="+", choices=sorted(PAPER_MODELS),
                        help="default: both on a GPU, blip2-opt-2.7b on a CPU")
    parser.add_argument("--methods", nargs="+", help="default: every registered method with paper hparams")
    parser.add_argument("--edits", type=int, default=2, help="single edits per method (demo E-VQA records)")
    parser.add_argument("--steps", type=int, help="cap FT-style num_steps (reported as such)")
    parser.add_argument("--small", action="store_true", help="tiny shapes, same code: a smoke test in seconds")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--limit", action="store_true",
                        help="CPU only: also count the passes and time them alone (benchmarks/passes.py), "
                             "printing the loop's ratio to that limit (runs every edit twice more)")
    parser.add_argument("--stored-features", action="store_true",
                        help="the edits read the baseline's image features (evaluation.store_image_features)")
    parser.add_argument("--tensor-memory", action="store_true",
                        help="CPU: also count the bytes of live tensors (benchmarks/live_tensors.py), the figure a "
                             "GPU's max_memory_allocated gives; every operator then passes through a Python hook")
    parser.add_argument("--mmap-weights", action="store_true",
                        help="CPU: map the edited model's weights from a file instead of holding them in memory, "
                             "so that SERAC's second 7B model fits beside MiniGPT-4 (slow: pages are read back from "
                             "disk; the live-tensor count is the same)")
    parser.add_argument("--quantize", choices=WEIGHT_FORMATS,
                        help="hold the language model's decoder-layer weights in this format (mmke.models.quantize), "
                             "all but the scopes the methods' hparams name, as models.<name>.quantize does")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, also through a pipe
    if args.edits < 1:
        parser.error("--edits must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    if args.mmap_weights and device.type != "cpu":
        parser.error("--mmap-weights maps the weights into CPU memory: use it on a CPU")
    if args.limit and device.type != "cpu":
        parser.error("--limit times passes in process CPU time, which means nothing for GPU work: use it on a CPU")
    models = args.models or (sorted(PAPER_MODELS) if device.type == "cuda" else ["blip2-opt-2.7b"])
    unknown = [m for m in args.methods or [] if m not in registered_methods()]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; registered: {registered_methods()}")
    print(f"scale benchmark: {', '.join(models)} on {device} in {args.dtype}, {args.edits} edit(s) per method, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")
    meter = Meter(device, tensors=args.tensor_memory)
    reports = {}
    with tempfile.TemporaryDirectory(prefix="mmke-scale-") as tmp, meter:
        # demo E-VQA records: 12 train records give IKE's k = 32 demonstrations 36 to choose from
        data = write_demo_dataset(Path(tmp) / "data", "evqa", n_train=12, n_eval=args.edits, seed=0)
        for model_name in models:
            reports[model_name] = run_model(model_name, args, device, dtype, Path(tmp), meter, data)
    print_table(reports, device)
    if args.limit:
        print_easyedit_passes({f"{model}/{method}": row for model, report in reports.items()
                               for method, row in report["methods"].items() if "passes" in row})
    result = {"device": str(device), "dtype": args.dtype, "small": args.small, "edits": args.edits,
              "steps": args.steps, "stored_features": args.stored_features, "quantize": args.quantize,
              "memory": "cuda max_memory_allocated" if device.type == "cuda"
              else ("peak RSS (clear_refs)" if meter.exact else "process peak RSS (ru_maxrss)"),
              "allocated": "cuda max_memory_allocated" if device.type == "cuda"
              else ("live tensor bytes (LiveTensors)" if meter.tensors is not None else None),
              "easyedit_minigpt4_gb": EASYEDIT_MINIGPT4_GB, "models": reports}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
