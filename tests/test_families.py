"""Every registered method on every tiny model family, through the adapter's named scopes.

Each combo makes one edit on a demo record and reverts it: logits on the edited prompt must
change (except for ``base``, which must leave them identical) and after ``revert()`` the model's
logits must be bit-for-bit those before the edit. The generic weight edit at the end exercises
``editable(scope)`` / ``snapshot`` / ``restore`` on every family independently of any method.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mmke.data.demo import write_demo_dataset
from mmke.data.images import load_rgb
from mmke.data.records import ImageRoots, load_records
from mmke.hparams import read_hparams
from mmke.methods.base import BUILTIN_METHOD_MODULES, METHODS, get_method, make_editor
from mmke.models import MODELS, load_model
from mmke.models.base import FAMILY_MODULES
from mmke.models.tiny import TINY_BUILDERS, build_tiny

REPO = Path(__file__).resolve().parents[1]
# (family, tiny builder in TINY_BUILDERS) -> the demo model (config/config.yaml) whose hparams files
# it uses. The tiny Qwen2-VL is not in the demo: it shares tiny-llava's files (same family, scopes).
TINY_MODELS = {
    ("blip2", "blip2"): "tiny-blip2",
    ("minigpt4", "minigpt4"): "tiny-minigpt4",
    ("hf_vlm", "hf_vlm"): "tiny-llava",
    ("hf_vlm", "qwen2vl"): "tiny-llava",
}
# Methods that load what an earlier stage produced: name -> fn(tmp_dir, adapter, dataset, hparams) ->
# the resources passed to Editor.prepare (IKE embeddings, MEND/SERAC checkpoints). A method
# without an entry gets no resources.
def ike_resources(tmp_path: Path, adapter, dataset, hparams) -> dict[str, Path]:
    """IKE's retrieval index of the dataset's training split, as the embed stage writes it."""
    from mmke.stages import embed_stage

    paths = dataset["paths"]
    out = {"embeddings": tmp_path / "embeddings.safetensors", "sentences": tmp_path / "sentences.json"}
    embed_stage({"kind": "evqa", "train": str(paths["train"]), "image_root": str(paths["images"])},
                "all-MiniLM-L6-v2", out["embeddings"], out["sentences"], device="cpu")
    return out


def meta_resources(tmp_path: Path, adapter, dataset, hparams) -> dict[str, Path]:
    """A checkpoint of the meta-trained editor after a couple of steps: enough to edit with.

    ``train`` freezes the base model (it owns its process); the flags are put back because the
    module-scoped adapter is shared with the scope tests.
    """
    from mmke.data.records import RecordImages
    from mmke.train import train

    flags = {name: p.requires_grad for name, p in adapter.model.named_parameters()}
    checkpoint = tmp_path / "editor.safetensors"
    train(make_editor(hparams), adapter, dataset["train_records"], RecordImages(dataset["roots"]), checkpoint,
          tmp_path / "resume.pt", log=lambda _: None)
    for name, p in adapter.model.named_parameters():
        p.requires_grad_(flags[name])
    return {"checkpoint": checkpoint}


METHOD_RESOURCES: dict[str, Callable[..., dict[str, Path]]] = {
    "IKE": ike_resources, "MEND": meta_resources, "SERAC": meta_resources, "KE": meta_resources,
}
# Shorter budgets for the meta-trained editors (the demo files train for 30 steps).
META_BUDGET = {"max_iters": 2, "val_interval": 1, "early_stop_patience": 2}
# Methods whose edit does not change the model by design.
NO_CHANGE = {"base"}


def registered_methods() -> list[str]:
    get_method("base")  # imports every built-in method module
    return sorted(METHODS)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    paths = write_demo_dataset(tmp_path_factory.mktemp("data"), "evqa", n_train=4, n_eval=2, seed=0, image_size=32)
    roots = ImageRoots(paths["images"])
    return {"paths": paths, "roots": roots, "records": load_records("evqa", paths["eval"], roots),
            "train_records": load_records("evqa", paths["train"], roots)}


@pytest.fixture(scope="module")
def aux_models(tmp_path_factory) -> dict[str, str]:
    """SERAC's tiny scope classifier and counterfactual model (same tokenizer as the tiny families)."""
    from mmke.models.tiny_aux import build_tiny_aux

    root = tmp_path_factory.mktemp("aux")
    return {kind: str(build_tiny_aux(kind, root / kind)) for kind in ("classifier", "counterfactual")}


@pytest.fixture(scope="module", params=sorted(TINY_MODELS), ids=lambda combo: combo[1])
def tiny(request, tmp_path_factory):
    """(adapter, demo model name) of one tiny model."""
    family, builder = request.param
    adapter = load_model(family, build_tiny(builder, tmp_path_factory.mktemp(builder) / "m"))
    return adapter, TINY_MODELS[request.param]


@pytest.fixture(scope="module")
def adapter(tiny):
    return tiny[0]


def edit_prompt_logits(adapter, edit, record, dataset) -> torch.Tensor:
    image = load_rgb(dataset["roots"].resolve("image", record.image))
    prompt = record.prompt if edit is None else edit.prompt(record.prompt)
    with torch.no_grad():
        return adapter.logits(adapter.teacher_forced([prompt], [record.target], [image]))


def hparams_path(method: str, demo_model: str) -> Path:
    """The method's hparams for the demo model, else its tiny-blip2 ones (scopes are shared)."""
    own = REPO / "config/hparams" / method / f"{demo_model}.yaml"
    return own if own.exists() else REPO / "config/hparams" / method / "tiny-blip2.yaml"


def test_every_family_has_a_tiny_builder_and_model():
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    assert {family for family, _ in TINY_MODELS} == set(MODELS)
    assert {builder for _, builder in TINY_MODELS} == set(TINY_BUILDERS)
    assert BUILTIN_METHOD_MODULES and "base" in registered_methods()


# Meta-trained methods train a short run per family first (minutes in all): marked slow, run by `make test`.
@pytest.mark.parametrize("method", [
    pytest.param(method, marks=pytest.mark.slow) if METHOD_RESOURCES.get(method) is meta_resources else method
    for method in registered_methods()])
def test_edit_changes_and_revert_restores(method, tiny, dataset, aux_models, tmp_path):
    adapter, demo_model = tiny
    path = hparams_path(method, demo_model)
    assert path.exists(), f"method {method} has no demo hparams file {path}"
    overrides = {"model": demo_model}
    if METHOD_RESOURCES.get(method) is meta_resources:
        overrides |= META_BUDGET | ({key: aux_models[key] for key in aux_models} if method == "SERAC" else {})
    hparams = read_hparams(path, overrides=overrides)
    editor = make_editor(hparams)
    setup = METHOD_RESOURCES.get(method)
    editor.bind_images(dataset["roots"])
    editor.prepare(setup(tmp_path, adapter, dataset, hparams) if setup else {})
    record = dataset["records"][0]
    before = edit_prompt_logits(adapter, None, record, dataset)
    params_before = {name: p.detach().clone() for name, p in adapter.model.named_parameters()}
    edit = editor.apply(adapter, [record])
    try:
        edited = edit_prompt_logits(adapter, edit, record, dataset)
    finally:
        edit.revert()
    changed = edited.shape != before.shape or not torch.equal(edited, before)
    assert changed == (method not in NO_CHANGE)
    assert torch.equal(edit_prompt_logits(adapter, None, record, dataset), before)
    after = dict(adapter.model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in params_before.items())


@pytest.mark.parametrize("scope", ["llm.mlp.last1", "llm.mlp.last2", "vision_proj", "vision", "qformer"])
def test_weight_edit_through_scope_changes_then_restores_bit_for_bit(scope, adapter, dataset):
    if scope == "qformer" and adapter.family == "hf_vlm":
        with pytest.raises(KeyError, match="unknown scope 'qformer' for hf_vlm; valid scopes: llm.mlp.last1"):
            adapter.editable(scope)
        return
    record = dataset["records"][0]
    before = edit_prompt_logits(adapter, None, record, dataset)
    params = adapter.editable(scope)
    assert params and all(p.requires_grad for p in params.values())
    snapshot = adapter.snapshot(params)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p))
    assert not torch.equal(edit_prompt_logits(adapter, None, record, dataset), before)
    adapter.restore(snapshot)
    assert torch.equal(edit_prompt_logits(adapter, None, record, dataset), before)


def test_layer_scopes_name_one_matrix_each_counting_from_either_end(adapter):
    last1 = list(adapter.editable("llm.mlp.last1"))
    assert adapter.editable("llm.layers.-1.mlp.in").keys() == adapter.editable("llm.layers.1.mlp.in").keys()
    assert [*adapter.editable("llm.layers.-1.mlp.in"), *adapter.editable("llm.layers.-1.mlp.out")] == last1
    qv = list(adapter.editable("llm.attn.qv"))
    assert len(qv) == 4 and qv == [n for pair in zip(adapter.editable("llm.attn.q"), adapter.editable("llm.attn.v"))
                                   for n in pair]
    assert all(name.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight")) for name in qv)
    with pytest.raises(KeyError, match="unknown scope 'llm.layers.2.mlp.in'"):
        adapter.editable("llm.layers.2.mlp.in")


def test_mlp_scope_names_the_last_layers_mlp_pair(adapter):
    last1 = adapter.editable("llm.mlp.last1")
    pair = ("fc1.weight", "fc2.weight") if adapter.family == "blip2" else ("mlp.up_proj.weight", "mlp.down_proj.weight")
    assert [name.rsplit(".layers.1.", 1)[1] for name in last1] == list(pair)
    assert set(last1) < set(adapter.editable("llm.mlp.last2")) < set(adapter.editable("llm"))
    assert not set(adapter.editable("llm")) & set(adapter.editable("vision"))
    assert not set(adapter.editable("vision")) & set(adapter.editable("vision_proj"))
