"""The passes an edit cannot avoid, counted and timed alone: what benchmarks/edit_speed.py (the demo's
tiny models) and benchmarks/scale.py (the paper's sizes) compare the edit loop with.

Everything is process CPU time, so a busy machine does not distort the figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from mmke.data.records import ImageRoots
from mmke.evaluate import Baseline, Protocol, edit_requests, evaluate, loop_images, measured_batch, read_positions
from mmke.hparams import HParams
from mmke.image_features import StoredImageFeatures
from mmke.methods.base import Editor
from mmke.models.base import VLMAdapter
from mmke.metrics import target_nll


#: Model passes per edit of EasyEdit's protocol, as read from its code (issue 12): (forwards,
#: forward+backward pairs, where); None pairs: one per training step, as many as the run takes
#: (VLKEB's hparams take 15), so that both sides train alike. KE has no multimodal path there; it
#: is counted like MEND.
EASYEDIT = {
    "base": (5, 0, "MultimodalEditor: 5 post-edit forwards"),
    "IKE": (10, 0, "MultimodalEditor: 5 pre + 5 post forwards"),
    "SERAC": (10, 0, "MultimodalEditor: 5 pre + 5 post (its wrapper reruns the vision tower)"),
    "MEND": (10, 1, "MultimodalEditor: 5 pre + 5 post + 1 fwd+bwd"),
    "KE": (10, 1, "as MEND"),
    "FT-L": (7, None, "VLKEB FT: a fwd+bwd per step + 7 forwards"),
    "FT-V": (7, None, "VLKEB FT: a fwd+bwd per step + 7 forwards"),
}


def easyedit_passes(method: str, num_steps: int | None) -> int | None:
    """EasyEdit's model passes per edit for ``method`` (:data:`EASYEDIT`; FT's at ``num_steps``,
    the run's), a fwd+bwd counted as 2; None where EasyEdit has no counterpart."""
    forwards, pairs, _ = EASYEDIT.get(method, (None, None, ""))
    if forwards is None:
        return None
    return forwards + 2 * (num_steps if pairs is None else pairs)


def easyedit_figures(method: str, hparams: HParams) -> dict[str, int | None]:
    """The run's ``num_steps`` (None for a method without) and EasyEdit's passes per edit at them."""
    steps = getattr(hparams, "num_steps", None)
    return {"num_steps": steps, "easyedit_passes": easyedit_passes(method, steps)}


def print_easyedit_passes(figures: Mapping[str, dict]) -> None:
    """Print each ``"<family or model>/<method>"`` figure's passes per edit (its ``passes``, counted by
    :func:`counted`), whole and in the decoder's work, beside its ``easyedit_passes``."""
    print("\nmodel passes per edit (forward + backward through the language model) beside EasyEdit's protocol;"
          "\n'layers': the same in the decoder layers' work, each layer 1/layers of a pass (a layer whose kept"
          "\noutput stands in computes nothing; a backward stops at the lowest trained layer)")
    print(f"{'model/method':26s} {'mmke':>6s} {'layers':>6s} {'EasyEdit':>9s} {'share':>6s} {'layers':>6s}  "
          "EasyEdit path")
    for name, figure in figures.items():
        path = EASYEDIT.get(name.split("/", 1)[1], (None, None, "no counterpart"))[2]
        passes, theirs = figure["passes"], figure["easyedit_passes"]
        ours, layers = passes["forward"] + passes["backward"], passes["layer_forward"] + passes["layer_backward"]
        if theirs is None:
            print(f"{name:26s} {ours:6.2f} {layers:6.2f} {'-':>9s} {'-':>6s} {'-':>6s}  {path}")
        else:
            print(f"{name:26s} {ours:6.2f} {layers:6.2f} {theirs:9d} {ours / theirs:6.2f} {layers / theirs:6.2f}  "
                  f"{path}")


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
    encoder = getattr(getattr(editor, "retriever", None), "sentence_model", None)  # None: queries from the embed stage
    return ([] if network is None else list(network.modules())) + ([] if encoder is None else [encoder])


def first_computation(module: torch.nn.Module) -> torch.nn.Module:
    """``module``'s first submodule with weights of its own: it runs when ``module`` computes, not
    when :meth:`VLMAdapter.frozen_layers_below` hands back the module's kept output."""
    return next(sub for sub in module.modules() if next(sub.parameters(recurse=False), None) is not None)


@contextlib.contextmanager
def counted(adapter: VLMAdapter, editor: Editor, counts: Counter, side_ms: list[float],
            trained: set[str], optimiser_ms: list[float]) -> Iterator[None]:
    """Count passes with hooks: decoder forwards (and backwards through them), vision encoder calls,
    side-model calls (and their CPU time); collect the parameters that receive a gradient, and the
    CPU time of every ``torch.optim`` step (the methods' weight updates: no pass, but work the
    method cannot skip either).

    ``layer_forward`` and ``layer_backward`` count the decoder's work in passes too, each layer a
    fraction ``1 / layers``: a layer whose output :meth:`VLMAdapter.frozen_layers_below` hands back
    computes nothing, and a backward stops at the lowest layer with a gradient to take, so a step
    that trains the last layer costs that fraction of a pass, where a whole-pass count says 1."""
    model = adapter.model
    decoder = model.get_submodule(adapter.scopes()["llm.mlp.last1"][0].split(".layers.")[0])  # holds the layers
    layers = list(decoder.get_submodule("layers"))
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

    def step_start(optimiser, args, kwargs):
        starts["step"] = time.process_time()

    def step_end(optimiser, args, kwargs):
        optimiser_ms.append((time.process_time() - starts.pop("step")) * 1000)

    def on_layer(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:  # a gradient reaches into this layer
            hidden.register_hook(lambda grad: counts.update({"layer_backward": 1 / len(layers)}))

    handles = [decoder.register_forward_hook(on_decoder),
               register_optimizer_step_pre_hook(step_start), register_optimizer_step_post_hook(step_end)]
    if next(vision.parameters(), None) is not None:  # a released image path (release_image_modules) never runs
        handles.append(first_computation(vision).register_forward_hook(lambda *_: counts.update(["image_encoder"])))
    for layer in layers:
        handles += [layer.register_forward_hook(on_layer), first_computation(layer).register_forward_hook(
            lambda *_: counts.update({"layer_forward": 1 / len(layers)}))]
    handles += [param.register_hook(lambda grad, name=name: trained.add(name))
                for name, param in model.named_parameters() if param.requires_grad]
    for module in side_modules(editor):
        handles += [module.register_forward_pre_hook(side_start), module.register_forward_hook(side_end)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclasses.dataclass
class Counted:
    """One counted run of the edits (:func:`count_passes`): per edit, the passes, the CPU ms inside
    the method's own models and of its optimiser steps; and the parameters that took a gradient."""

    passes: dict[str, float]
    side_ms: float
    optimiser_ms: float
    trained: set[str]


def count_passes(adapter: VLMAdapter, editor: Editor, records, roots: ImageRoots, baseline: Baseline,
                 protocol: Protocol, **loop) -> Counted:
    """The passes per edit, counted with hooks over one run of the edits (``loop``: the keyword
    settings of :func:`mmke.evaluate.evaluate`)."""
    counts, side, trained, steps = Counter(), [], set(), []
    with counted(adapter, editor, counts, side, trained, steps):
        evaluate(adapter, editor, records, roots, baseline, protocol, **loop)
    passes = {key: counts[key] / len(records)
              for key in ("forward", "backward", "image_encoder", "side", "layer_forward", "layer_backward")}
    return Counted(passes, sum(side) / len(records), sum(steps) / len(records), trained)


def passes_and_limit(adapter: VLMAdapter, editor: Editor, records, roots: ImageRoots, baseline: Baseline,
                     protocol: Protocol, repeats: int, **loop) -> tuple[Counted, float]:
    """The counted run (:func:`count_passes`) and the limit: its passes timed alone
    (:func:`limit_ms`, CPU ms per edit)."""
    run = count_passes(adapter, editor, records, roots, baseline, protocol, **loop)
    return run, limit_ms(adapter, editor, records, roots, baseline, protocol, run, repeats, loop.get("stored_features"))


def loop_beside_limit(adapter: VLMAdapter, editor: Editor, records, roots: ImageRoots, baseline: Baseline,
                      protocol: Protocol, repeats: int, **loop) -> tuple[Counted, float, float, float]:
    """The counted run, then ``repeats`` times the loop (CPU ms per edit) and its limit, one after the
    other: a busy spell of a shared machine slows both members of a pair alike, so the pair with the
    median ratio is steadier than the ratio of two medians taken minutes apart. Returns the run and
    that pair: its loop, its limit and their ratio (the lower of the two middle pairs for an even
    ``repeats``), so that the ratio is the loop over the limit reported beside it."""
    run = count_passes(adapter, editor, records, roots, baseline, protocol, **loop)
    pairs = []
    for _ in range(repeats):
        limit = limit_ms(adapter, editor, records, roots, baseline, protocol, run, 1, loop.get("stored_features"))
        pairs.append((cpu_ms(lambda: evaluate(adapter, editor, records, roots, baseline, protocol, **loop), 1)
                      / len(records), limit))
    ms, limit = sorted(pairs, key=lambda pair: pair[0] / pair[1])[(len(pairs) - 1) // 2]
    return run, ms, limit, ms / limit


def limit_ms(adapter: VLMAdapter, editor: Editor, records, roots: ImageRoots, baseline: Baseline,
             protocol: Protocol, run: Counted, repeats: int,
             stored_features: StoredImageFeatures | None = None) -> float:
    """The passes the method needs per edit (``run``'s, and the time inside its own models), each
    timed alone (the median of ``repeats``, mean over the records).
    ``stored_features``: the baseline's, which stand in for the image encoder where the method
    keeps them, as in the loop (whose model may have released its image path)."""
    frozen = editor.keeps_image_features(model=adapter)
    images, lookup = loop_images(roots, 1, stored_features, frozen)
    stored = lookup if frozen else None
    editor.bind_images(images)

    def features() -> contextlib.AbstractContextManager:
        """As in the loop: each image's features once (or read) where the method keeps them."""
        return adapter.frozen_image_features(stored) if frozen else contextlib.nullcontext()

    total = 0.0
    for record in records:
        imgs = images(record)
        with features():
            edit = editor.apply(adapter, [record])
        try:
            with adapter.frozen_image_features(stored), torch.no_grad():
                requests = edit_requests(record, imgs, edit, baseline)  # what the loop asks
                batch, owners = measured_batch(adapter, protocol, requests)
                positions = read_positions(batch, owners, requests)
                adapter.logits(batch, positions)  # memoise the features: the forward alone is timed next
                forward = cpu_ms(lambda: adapter.logits(batch, positions), repeats)
            with torch.no_grad():
                distinct = list({id(source): i for i, source in enumerate(batch.sources)}.values())
                encode = 0.0 if stored is not None else cpu_ms(lambda: adapter.image_features(batch, distinct), repeats)
        finally:
            edit.revert()
        total += forward + encode
        if run.passes["backward"]:
            # gradients taken for activations (MEND's layer outputs) or for a memory beside the model
            # (LoRA, GRACE, WISE) reach no model parameter: the parameters the method edits then
            names = run.trained or set(editor.edited_parameters(adapter))
            with features(), only_trainable(adapter, names):
                item = adapter.teacher_forced([record.prompt], [record.target], [imgs["image"]])

                def step() -> None:
                    target_nll(adapter.logits(item), item.labels).backward()

                step()  # memoised features where the method keeps them
                first = cpu_ms(step, repeats)
                with adapter.frozen_layers_below(names):  # later steps: as the training loops run them
                    step()
                    later = cpu_ms(step, repeats)
                # MEND's and KE's one backward serves a batch of edits (Editor.single_edits): the
                # limit counts one per edit, timed alone, as it counts each record's forward alone
                steps = max(1.0, run.passes["backward"])
                total += first + (steps - 1) * later
    return total / len(records) + run.side_ms


def image_load_ms(adapter: VLMAdapter, records, roots, repeats: int,
                  stored: StoredImageFeatures | None = None) -> float:
    """CPU ms per record to read its images and preprocess them as the family does, once each:
    work the loop cannot skip either, but no model pass, so it lies outside the limit.

    ``stored``: the features the loop reads (a method that keeps them). Then, as in the loop,
    nothing is decoded: this is the images' path checks (and their headers' sizes where the
    family's image tokens follow them).
    """
    def load() -> None:
        # fresh objects: nothing memoised from an earlier call; undecoded as the loop leaves them
        images, store = loop_images(roots, 0, stored, keeps_features=True)
        for record in records:
            pictures = list(images(record).values())
            with adapter.frozen_image_features(store) if store else contextlib.nullcontext():
                type(adapter).teacher_forced(adapter, [""] * len(pictures), ["."] * len(pictures), pictures)

    return cpu_ms(load, repeats) / len(records)


@contextlib.contextmanager
def only_trainable(adapter: VLMAdapter, names: set[str]) -> Iterator[None]:
    """Gradients for the named parameters only (those the method trains), dropped afterwards."""
    params = adapter.named_parameters()
    try:
        with adapter.trainable_only(params[name] for name in names):
            yield
    finally:
        for name in names:
            params[name].grad = None
