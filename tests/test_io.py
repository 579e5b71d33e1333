"""Atomic writers honour the umask and leave nothing behind when they fail; broken safetensors
files are named with what rewrites them."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from mmke.io import atomic_dir, atomic_path, atomic_write, broken_model_message, read_safetensors


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_outputs_get_the_mode_the_umask_gives(tmp_path, umask):
    with atomic_write(tmp_path / "a.json") as handle:
        handle.write("{}")
    with atomic_path(tmp_path / "b.safetensors") as tmp:
        save_file({"x": torch.zeros(1)}, str(tmp))
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.safetensors") == 0o666 & ~umask
    assert mode(tmp_path / "model") == 0o777 & ~umask
    assert mode(tmp_path / "model/config.json") == 0o666 & ~umask
    (tmp_path / "plain").mkdir()
    assert mode(tmp_path / "model") == mode(tmp_path / "plain")  # as any folder the user makes
    assert os.umask(umask) == umask  # reading the umask left it as it was


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(target) as handle:
            handle.write("half of the new")
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(tmp_path / "editor.safetensors") as tmp:
            save_file({"x": torch.zeros(1)}, str(tmp))
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.json"]
    with atomic_write(target) as handle:
        handle.write("new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_a_truncated_safetensors_file_is_named_with_the_rule_that_writes_it(tmp_path):
    path = tmp_path / "pre.safetensors"
    save_file({"loc.0": torch.arange(10)}, str(path), metadata={"k": "v"})
    meta, tensors = read_safetensors(path, "baseline")
    assert meta == {"k": "v"} and torch.equal(tensors["loc.0"], torch.arange(10))
    path.write_bytes(path.read_bytes()[:5])
    with pytest.raises(ValueError, match=rf"^{path}: corrupt or truncated safetensors file \(Error while deserializing "
                                         r"header: header too small\); delete it and rerun snakemake: rule baseline "
                                         r"writes it again$"):
        read_safetensors(path, "baseline")


@pytest.mark.parametrize("folder,rule", [("resources/world/tiny-blip2", "pretrain_base"),
                                         ("resources/tiny/tiny-llava", "tiny_model"),
                                         ("resources/tiny/aux/classifier", "tiny_aux_model"),
                                         ("resources/models/blip2-opt", "convert_model")])
def test_a_broken_model_folder_names_its_weights_file_and_rule(tmp_path, monkeypatch, folder, rule):
    monkeypatch.chdir(tmp_path)
    os.makedirs(folder)
    save_file({"w": torch.zeros(4)}, f"{folder}/model-00001.safetensors")
    (tmp_path / folder / "model-00002.safetensors").write_bytes(b"\x00" * 3)
    message = broken_model_message(folder, RuntimeError("header too small"))
    assert message == (f"{folder}/model-00002.safetensors: corrupt or truncated safetensors file (header too small); "
                       f"delete {folder} and rerun snakemake: rule {rule} writes it again")


def test_a_model_placed_by_hand_is_not_promised_a_rule(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert broken_model_message(tmp_path, RuntimeError("x")) == (
        f"{tmp_path}/model.safetensors: corrupt or truncated safetensors file (x); "
        "no workflow rule writes it: replace it with a complete copy")


def cut_short(path) -> None:
    path.write_bytes(path.read_bytes()[:9])


def test_every_stage_output_read_back_names_its_rule(tmp_path, monkeypatch):
    """Editor checkpoint (pretrain), IKE index (embed) and model weights (tiny_model) cut short."""
    from mmke.embed import load_embeddings, save_embeddings
    from mmke.hparams import build_hparams
    from mmke.methods.base import get_method
    from mmke.models.tiny import build_tiny_blip2
    from mmke.stages import load_configured_model
    from mmke.train import load_checkpoint, save_checkpoint

    hparams = build_hparams(get_method("base").hparams_class, {"method": "base"})
    save_checkpoint(tmp_path / "editor.safetensors", torch.nn.Linear(2, 2), hparams)
    cut_short(tmp_path / "editor.safetensors")
    with pytest.raises(ValueError, match=r"editor\.safetensors: corrupt or truncated .*rule pretrain writes it again"):
        load_checkpoint(tmp_path / "editor.safetensors", hparams)
    save_embeddings(tmp_path / "e.safetensors", tmp_path / "s.json", torch.zeros(1, 3), ["a"], "m")
    cut_short(tmp_path / "e.safetensors")
    with pytest.raises(ValueError, match=r"e\.safetensors: corrupt or truncated .*rule embed writes it again"):
        load_embeddings(tmp_path / "e.safetensors", tmp_path / "s.json", "m")
    monkeypatch.chdir(tmp_path)
    build_tiny_blip2("resources/tiny/t", seed=0, image_size=32)
    cut_short(tmp_path / "resources/tiny/t/model.safetensors")
    with pytest.raises(ValueError, match=r"^resources/tiny/t/model\.safetensors: corrupt or truncated safetensors file "
                                         r"\(.*\); delete resources/tiny/t and rerun snakemake: rule tiny_model"):
        load_configured_model({"family": "blip2", "path": "resources/tiny/t"}, device="cpu")
