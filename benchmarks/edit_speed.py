"""Edit-loop speed per method and model family against the passes each method cannot avoid.

For every method x model of a config (the demo's by default: its world models, checkpoints and
IKE embeddings, so run ``make demo`` or copy its ``resources/`` first), on the first ``--records``
records of one dataset:

* ``ms/edit``: process CPU time of :func:`mmke.evaluate.evaluate` (apply + measure + revert, the
  loop behind metrics.json's ``edits_per_s``), median of ``--repeats`` runs;
* ``limit``: the passes the method needs, each timed alone (CPU time, median of repeats): one
  fused forward of a record's measured items, the image encoder once per distinct image (per step
  too where the method trains upstream of the features), one forward + backward of the edit item
  per training step the method takes, and the time inside its own models (MEND's and KE's editor
  networks, SERAC's classifier and counterfactual model, IKE's sentence encoder);
* ``images``: decoding a record's images and preprocessing them as the family does, once each,
  timed alone: part of the loop, but no model pass, so outside the limit; ``rest`` is what the
  loop spends beyond the limit and the images (Python, tokenization, bookkeeping);
* ``passes``: per edit, counted with forward hooks on the language model's decoder (``forward``),
  its output's gradient hook (``backward``), the vision encoder (``image_encoder``) and the
  method's own models (``side``, outermost calls).

It then prints the model passes per edit beside EasyEdit's protocol, as read from its code
(issue 12). CPU time, so a busy machine does not distort the figures; torch runs ``--threads``.

    PYTHONPATH=src python benchmarks/edit_speed.py [--config config/config.yaml] [--dataset demo-evqa]
        [--records 24] [--repeats 3] [--threads 1] [--batch-size 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import yaml

from mmke.data.records import RecordImages
from mmke.evaluate import (
    DEFAULT_BATCH_SIZE, EDIT_ITEMS, MEASURED_ITEMS, Protocol, Request, evaluate, measured_batch, read_positions,
    run_baseline,
)
from mmke.hparams import read_hparams
from mmke.methods.base import Editor, make_editor
from mmke.methods.meta import MetaEditor
from mmke.models.base import VLMAdapter
from mmke.stages import load_configured_model, load_eval_split
from mmke.train import target_nll

REPO = Path(__file__).resolve().parents[1]
#: Model passes per edit of EasyEdit's protocol, as read from its code (issue 12): (forwards,
#: forward+backward pairs, where). KE has no multimodal path there; it is counted like MEND.
EASYEDIT = {
    "base": (5, 0, "MultimodalEditor: 5 post-edit forwards"),
    "IKE": (10, 0, "MultimodalEditor: 5 pre + 5 post forwards"),
    "SERAC": (10, 0, "MultimodalEditor: 5 pre + 5 post (its wrapper reruns the vision tower)"),
    "MEND": (10, 1, "MultimodalEditor: 5 pre + 5 post + 1 fwd+bwd"),
    "KE": (10, 1, "as MEND"),
    "FT-L": (7, 15, "VLKEB FT: 15 fwd+bwd + 7 forwards"),
    "FT-V": (7, 15, "VLKEB FT: 15 fwd+bwd + 7 forwards"),
}


def cpu_ms(run: Callable[[], object], repeats: int) -> float:
    """Median process CPU milliseconds of ``run``."""
    times = []
    for _ in range(repeats):
        tick = time.process_time()
        run()
        times.append((time.process_time() - tick) * 1000)
    return statistics.median(times)


def common_module(model: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """The innermost module holding every named parameter."""
    parts = [name.split(".") for name in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return model.get_submodule(".".join(common))


def side_modules(editor: Editor) -> list[torch.nn.Module]:
    """What an editor runs beside the edited model: every module of its network (MEND's and KE's
    editor networks, SERAC's classifier and counterfactual LM) and IKE's sentence encoder."""
    network = getattr(editor, "network", None)
    retriever = getattr(editor, "retriever", None)
    return ([] if network is None else list(network.modules())) + (
        [] if retriever is None else [retriever.sentence_model])


@contextlib.contextmanager
def counted(adapter: VLMAdapter, editor: Editor, counts: Counter, side_ms: list[float],
            trained: set[str]) -> Iterator[None]:
    """Count passes with hooks: decoder forwards (and backwards through them), vision encoder calls,
    side-model calls (and their CPU time); collect the parameters that receive a gradient."""
    model = adapter.model
    decoder = model.get_submodule(adapter.scopes()["llm.mlp.last1"][0].split(".layers.")[0])  # holds the layers
    vision = common_module(model, adapter.scopes()["vision"])
    starts: dict[str, float] = {}

    def on_decoder(module, args, output):
        counts["forward"] += 1
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: counts.update(["backward"]))

    depth = [0]  # side modules run inside each other: time and count the outermost calls

    def side_start(module, args):
        if depth[0] == 0:
            starts["side"] = time.process_time()
        depth[0] += 1

    def side_end(module, args, output):
        depth[0] -= 1
        if depth[0] == 0:
            counts["side"] += 1
            side_ms.append((time.process_time() - starts.pop("side")) * 1000)

    handles = [decoder.register_forward_hook(on_decoder),
               vision.register_forward_hook(lambda *_: counts.update(["image_encoder"]))]
    handles += [param.register_hook(lambda grad, name=name: trained.add(name))
                for name, param in model.named_parameters() if param.requires_grad]
    for module in side_modules(editor):
        handles += [module.register_forward_pre_hook(side_start), module.register_forward_hook(side_end)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def limit_ms(adapter: VLMAdapter, editor: Editor, records, images: RecordImages, protocol: Protocol,
             backward_per_edit: float, trained: set[str], side_ms_per_edit: float, repeats: int) -> float:
    """The passes the method needs per edit, each timed alone (mean over the records)."""
    editor.bind_images(images)
    frozen = editor.keeps_image_features(model=adapter)
    total = 0.0
    for record in records:
        imgs = images(record)
        edit = editor.apply(adapter, [record])
        try:
            requests = [Request(record, imgs, MEASURED_ITEMS, edit.prompt, edit)]
            if edit.in_context:
                requests.append(Request(record, imgs, EDIT_ITEMS, edit.pre_prompt, edit))
            batch, owners = measured_batch(adapter, protocol, requests)
            positions = read_positions(batch, owners)
            with adapter.frozen_image_features(), torch.no_grad():
                adapter.logits(batch, positions)  # memoise the features: the forward alone is timed next
                forward = cpu_ms(lambda: adapter.logits(batch, positions), repeats)
            with torch.no_grad():
                distinct = list({id(source): i for i, source in enumerate(batch.sources)}.values())
                encode = cpu_ms(lambda: adapter.image_features(batch, distinct), repeats)
        finally:
            edit.revert()
        total += forward + encode
        if backward_per_edit:
            item = adapter.teacher_forced([record.prompt], [record.target], [imgs["image"]])
            memo = adapter.frozen_image_features() if frozen else contextlib.nullcontext()

            def step() -> None:
                target_nll(adapter.logits(item), item.labels).backward()

            # gradients taken for activations (MEND's layer outputs) or for a memory beside the model
            # (LoRA, GRACE, WISE) reach no model parameter: the parameters the method edits then
            names = trained or set(editor.edited_parameters(adapter))
            with memo, only_trainable(adapter, names):
                step()  # memoised features where the method keeps them
                total += backward_per_edit * cpu_ms(step, repeats)
    return total / len(records) + side_ms_per_edit


def image_load_ms(adapter: VLMAdapter, records, roots, repeats: int) -> float:
    """CPU ms per record to decode its images and preprocess them as the family does, once each:
    work the loop cannot skip either, but no model pass, so it lies outside the limit."""
    def load() -> None:
        images = RecordImages(roots)  # fresh objects: nothing memoised from an earlier call
        for record in records:
            pictures = list(images(record).values())
            type(adapter).teacher_forced(adapter, [""] * len(pictures), ["."] * len(pictures), pictures)

    return cpu_ms(load, repeats) / len(records)


@contextlib.contextmanager
def only_trainable(adapter: VLMAdapter, names: set[str]) -> Iterator[None]:
    """Gradients for the named parameters only (those the method trains), dropped afterwards."""
    params = adapter.named_parameters()
    flags = {name: param.requires_grad for name, param in params.items()}
    try:
        for name, param in params.items():
            param.requires_grad_(name in names)
        yield
    finally:
        for name, param in params.items():
            param.requires_grad_(flags[name])
            param.grad = None


def hparams_path(config: dict, method: str, model: str) -> Path:
    """``<hparams_dir>/<METHOD>/<model>.yaml`` unless ``models.<model>.hparams`` reuses another
    model's file (the workflow's rule, workflow/rules/common.smk)."""
    reuse = config["models"][model].get("hparams") or model
    chosen = reuse.get(method, model) if isinstance(reuse, dict) else reuse
    if chosen.endswith((".yaml", ".yml")):
        return Path(chosen)
    return Path(config.get("hparams_dir", "config/hparams")) / method / f"{chosen}.yaml"


def resources(method: str, model: str, dataset: str, hparams) -> dict[str, Path]:
    """What the demo's stages wrote for this combo (IKE embeddings, meta-network checkpoints)."""
    if method == "IKE" and hparams.retrieves:
        prefix = Path("resources/embeddings") / dataset / hparams.sentence_model
        return {"embeddings": prefix / "embeddings.safetensors", "sentences": prefix / "sentences.json"}
    checkpoint = Path("resources/checkpoints") / method / model / dataset / "editor.safetensors"
    return {"checkpoint": checkpoint} if checkpoint.exists() else {}


def excluded(config: dict, method: str, model: str, dataset: str) -> bool:
    combo = {"method": method, "model": model, "dataset": dataset}
    return any(all(combo[key] == value for key, value in rule.items()) for rule in config.get("exclude", []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "config/config.yaml")
    parser.add_argument("--dataset", default="demo-evqa")
    parser.add_argument("--records", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--methods", nargs="*", help="default: the config's methods")
    parser.add_argument("--models", nargs="*", help="default: the config's models")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = yaml.safe_load(args.config.read_text())
    protocol = Protocol(**config.get("protocol", {}))
    os.chdir(REPO)  # the config's and hparams files' paths are relative to the repository
    records, roots = load_eval_split(config["datasets"][args.dataset])
    records = records[:args.records]
    figures: dict[str, dict] = {}
    print(f"{len(records)} {args.dataset} records, batch_size {args.batch_size}, {args.threads} thread(s), "
          f"CPU ms per edit (median of {args.repeats})")
    print(f"{'family/method':24s} {'ms/edit':>8s} {'limit':>8s} {'ratio':>6s} {'images':>7s} {'rest':>6s}  "
          "passes/edit (fwd, bwd, image enc, side)")
    for model_name in args.models or list(config["models"]):
        entry = config["models"][model_name]
        adapter = load_configured_model(entry, "cpu", config.get("protocol"))
        baseline = run_baseline(adapter, records, roots, protocol, args.batch_size)
        images_ms = image_load_ms(adapter, records, roots, args.repeats)
        for method in args.methods or config["methods"]:
            if excluded(config, method, model_name, args.dataset):
                continue
            hparams = read_hparams(hparams_path(config, method, model_name))
            editor = make_editor(hparams)
            found = resources(method, model_name, args.dataset, hparams)
            if isinstance(editor, MetaEditor) and "checkpoint" not in found:
                editor.build(adapter)  # no demo checkpoint: an untrained network costs the same passes
            else:
                editor.prepare(found)
            # warm-up: lazy networks built, first-call allocations made
            evaluate(adapter, editor, records[:1], roots, baseline, protocol, batch_size=args.batch_size)
            counts, side, trained = Counter(), [], set()
            with counted(adapter, editor, counts, side, trained):
                evaluate(adapter, editor, records, roots, baseline, protocol, batch_size=args.batch_size)
            loop = cpu_ms(lambda: evaluate(adapter, editor, records, roots, baseline, protocol,
                                           batch_size=args.batch_size), args.repeats) / len(records)
            passes = {key: counts[key] / len(records) for key in ("forward", "backward", "image_encoder", "side")}
            limit = limit_ms(adapter, editor, records, RecordImages(roots, memo=1), protocol, passes["backward"],
                             trained, sum(side) / len(records), args.repeats)
            name = f"{entry['family']}/{method}"
            rest = loop - limit - images_ms
            figures[name] = {"model": model_name, "ms_per_edit": loop, "limit_ms": limit, "ratio": loop / limit,
                             "image_load_ms": images_ms, "rest_ms": rest, "passes": passes}
            print(f"{name:24s} {loop:8.2f} {limit:8.2f} {loop / limit:5.2f}x {images_ms:7.2f} {rest:6.2f}  "
                  f"{passes['forward']:.2f}, {passes['backward']:.2f}, {passes['image_encoder']:.2f}, "
                  f"{passes['side']:.2f}")
    print("\nmodel passes per edit (forward + backward through the language model) beside EasyEdit's protocol")
    print(f"{'family/method':24s} {'mmke':>6s} {'EasyEdit':>9s} {'share':>6s}  EasyEdit path")
    for name, figure in figures.items():
        forwards, pairs, path = EASYEDIT.get(name.split("/", 1)[1], (None, None, "no counterpart"))
        ours = figure["passes"]["forward"] + figure["passes"]["backward"]
        if forwards is None:
            print(f"{name:24s} {ours:6.2f} {'-':>9s} {'-':>6s}  {path}")
            continue
        theirs = forwards + 2 * pairs
        figure["easyedit_passes"] = theirs
        print(f"{name:24s} {ours:6.2f} {theirs:9d} {ours / theirs:6.2f}  {path}")
    if args.json:
        args.json.write_text(json.dumps({"methods": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
