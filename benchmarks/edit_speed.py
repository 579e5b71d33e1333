"""Edit-loop speed per method and model family against the passes each method cannot avoid.

For every method x model of a config (the demo's by default: its world models, checkpoints and
IKE embeddings, so run ``make demo`` or copy its ``resources/`` first), on the first ``--records``
records of one dataset:

* ``ms/edit``: process CPU time of :func:`mmke.evaluate.evaluate` (apply + measure + revert, the
  loop behind metrics.json's ``edits_per_s``);
* ``limit``: the passes the method needs, each timed alone (CPU time). Each of ``--repeats`` runs
  of the loop is timed beside its limit, and the figures are the pair whose ``ratio`` (loop /
  limit) is the median, so that a busy spell of a shared machine weighs on both sides of a ratio
  alike and the ratio is the loop over the limit printed beside it: one
  fused forward of a record's measured items, the image encoder once per distinct image (in the
  first training step too where the method trains upstream of the features, FT-V; later steps
  reuse its frozen vision tower's output; never where the config stores the baseline's features,
  ``evaluation.store_image_features``, and the method keeps them), one
  forward + backward of the edit item per training step the method takes (at least one per edit:
  MEND's and KE's one pass serves ``--batch-size`` edits, timed alone all the same; after the first,
  without the decoder layers below the trained ones, whose outputs the loops keep), and the time
  inside its own models (MEND's and KE's editor networks, SERAC's classifier and counterfactual
  model, IKE's sentence encoder);
* ``images``: decoding a record's images and preprocessing them as the family does, once each,
  timed alone: part of the loop, but no model pass, so outside the limit (where stored features
  stand in for the encoder the loop decodes nothing, and this is the path checks, plus the
  headers' sizes in Qwen2-VL and LLaVA-OneVision);
* ``optim``: the loop's ``torch.optim`` steps (FT's AdamW, LoRA's and WISE's SGD, GRACE's Adam),
  timed in the loop with torch's global step hooks: the weight updates are no pass, so they lie
  outside the limit, but the method cannot skip them either, and on the tiny models torch's
  multi-tensor update takes 0.1-0.6 ms a step; ``rest`` is what the loop spends beyond the limit,
  the images and the updates (Python, tokenization, bookkeeping);
* ``passes``: per edit, counted with forward hooks on the language model's decoder (``forward``),
  its output's gradient hook (``backward``), the vision encoder (``image_encoder``) and the
  method's own models (``side``, outermost calls); and the decoder's work in passes, each layer
  that computes (``layer_forward``) or takes a gradient (``layer_backward``) a ``1 / layers``
  fraction: a step that trains the last layer reruns only that layer.

It then prints the model passes per edit beside EasyEdit's protocol, as read from its code
(issue 12), FT's at the run's number of steps. CPU time, so a busy machine does not distort the
figures; torch runs ``--threads``.

    PYTHONPATH=src python benchmarks/edit_speed.py [--config config/config.yaml] [--dataset demo-evqa]
        [--records 24] [--repeats 3] [--threads 1] [--batch-size 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import yaml

from mmke.evaluate import DEFAULT_BATCH_SIZE, Protocol, evaluate, run_baseline
from mmke.hparams import read_hparams
from mmke.image_features import StoredImageFeatures, save_image_features
from mmke.methods.base import make_editor
from mmke.methods.meta import MetaEditor
from mmke.stages import load_configured_model, load_eval_split
from passes import easyedit_figures, image_load_ms, loop_beside_limit, print_easyedit_passes

REPO = Path(__file__).resolve().parents[1]
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
        return {"embeddings": prefix / "embeddings.safetensors", "sentences": prefix / "sentences.json",
                "queries": prefix / "queries.safetensors", "query_sentences": prefix / "queries.json"}
    checkpoint = Path("resources/checkpoints") / method / model / dataset / "editor.safetensors"
    return {"checkpoint": checkpoint} if checkpoint.exists() else {}


def stores_image_features(config: dict, model: str) -> bool:
    """``evaluation.store_image_features`` for ``model`` (the workflow's rule, workflow/rules/common.smk)."""
    chosen = config.get("evaluation", {}).get("store_image_features", False)
    return chosen if isinstance(chosen, bool) else model in chosen


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
    parser.add_argument("--batch-size", type=int, help="default: the config's evaluation.batch_size")
    parser.add_argument("--batch-tokens", type=int, help="default: the config's evaluation.batch_tokens")
    parser.add_argument("--methods", nargs="*", help="default: the config's methods")
    parser.add_argument("--models", nargs="*", help="default: the config's models")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = yaml.safe_load(args.config.read_text())
    protocol = Protocol(**config.get("protocol", {}))
    settings = config.get("evaluation", {})
    args.batch_size = args.batch_size or settings.get("batch_size") or DEFAULT_BATCH_SIZE
    args.batch_tokens = args.batch_tokens or settings.get("batch_tokens")
    os.chdir(REPO)  # the config's and hparams files' paths are relative to the repository
    records, roots = load_eval_split(config["datasets"][args.dataset])
    records = records[:args.records]
    figures: dict[str, dict] = {}
    print(f"{len(records)} {args.dataset} records, batch_size {args.batch_size}, batch_tokens {args.batch_tokens}, "
          f"{args.threads} thread(s), "
          f"CPU ms per edit (of {args.repeats} loops each timed beside its limit, the pair with the median ratio), "
          f"stored image features: "
          f"{config.get('evaluation', {}).get('store_image_features', False)}")
    features_path = Path(tempfile.mkdtemp()) / "image_features.safetensors"
    print(f"{'family/method':24s} {'ms/edit':>8s} {'limit':>8s} {'ratio':>6s} {'images':>7s} {'optim':>6s} "
          f"{'rest':>6s}  "
          "passes/edit (fwd, bwd, image enc, side)")
    for model_name in args.models or list(config["models"]):
        entry = config["models"][model_name]
        adapter = load_configured_model(entry, "cpu", config.get("protocol"))
        store = stores_image_features(config, model_name)
        baseline = run_baseline(adapter, records, roots, protocol, args.batch_size, keep_image_features=store,
                                batch_tokens=args.batch_tokens)
        stored = None
        if store:  # as the workflow does: the baseline's features, written and read back
            save_image_features(features_path, baseline.image_features, entry)
            stored = StoredImageFeatures(features_path, entry)
        images_ms = {keeps: image_load_ms(adapter, records, roots, args.repeats, stored if keeps else None)
                     for keeps in (False, True)}  # by whether a method keeps the image features
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
            settings = {"batch_size": args.batch_size, "batch_tokens": args.batch_tokens, "stored_features": stored}
            evaluate(adapter, editor, records[:1], roots, baseline, protocol, **settings)  # warm-up: lazy
            # networks built, first-call allocations made
            run, loop, limit, ratio = loop_beside_limit(adapter, editor, records, roots, baseline, protocol,
                                                        args.repeats, **settings)
            name = f"{entry['family']}/{method}"
            images = images_ms[editor.keeps_image_features(adapter)]
            passes, optimiser = run.passes, run.optimiser_ms
            rest = loop - limit - images - optimiser
            figures[name] = {"model": model_name, "ms_per_edit": loop, "limit_ms": limit, "ratio": ratio,
                             "image_load_ms": images, "optimiser_ms": optimiser, "rest_ms": rest, "passes": passes,
                             **easyedit_figures(method, hparams)}
            print(f"{name:24s} {loop:8.2f} {limit:8.2f} {ratio:5.2f}x {images:7.2f} {optimiser:6.2f} "
                  f"{rest:6.2f}  "
                  f"{passes['forward']:.2f}, {passes['backward']:.2f}, {passes['image_encoder']:.2f}, "
                  f"{passes['side']:.2f}")
    print_easyedit_passes(figures)
    if args.json:
        args.json.write_text(json.dumps({"methods": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
