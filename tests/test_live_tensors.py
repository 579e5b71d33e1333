"""benchmarks/live_tensors.py: the CPU count of live tensor bytes that benchmarks/scale.py sets
beside a GPU's max_memory_allocated."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from transformers import OPTConfig, OPTForCausalLM

from mmke.models.quantize import tensor_bytes

SPEC = importlib.util.spec_from_file_location(
    "live_tensors", Path(__file__).resolve().parents[1] / "benchmarks" / "live_tensors.py")
live_tensors = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(live_tensors)


def test_counts_each_allocation_until_it_is_freed_and_keeps_the_peak():
    with live_tensors.LiveTensors() as count:
        a = torch.empty(1000)  # 4,000 bytes
        b = a * 2  # a new 4,000
        view, part = b.view(10, 100), b[:5]  # views of b: nothing new
        b.add_(1)  # in place: nothing new
        assert (count.live, count.peak) == (8000, 8000)
        del a, view, part
        assert (count.live, count.peak) == (4000, 8000)  # b's storage lives on, a's is gone
        count.reset_peak()
        c = torch.zeros(250, dtype=torch.float64)  # 2,000
        assert (count.live, count.peak) == (6000, 6000)
        del b, c
        assert count.live == 0
    outside = torch.empty(1000)  # closed: nothing counted
    assert count.live == 0 and outside.numel() == 1000


def test_a_tensor_from_before_opening_counts_from_its_first_use():
    weight = torch.ones(100, 50)  # 20,000 bytes
    with live_tensors.LiveTensors() as count:
        assert count.live == 0
        transposed = weight.t()  # its first use: its storage counts, once, whatever the views
        weight.requires_grad_(True)
        assert count.live == 20000
        x = torch.randn(8, 100)  # 3,200 bytes
        loss = (x @ weight).relu().sum()
        # the forward's [8, 50] product and its relu (1,600 bytes each) were alive at once
        assert count.peak >= 20000 + 3200 + 2 * 1600
        loss.backward()  # the weight's gradient: 20,000 bytes more, which outlive the backward
        assert count.live == 20000 + 3200 + 20000 + loss.untyped_storage().nbytes()
        assert transposed.shape == (50, 100)


def test_a_model_loaded_from_safetensors_counts_once_a_forward_uses_it(tmp_path):
    # on a CPU from_pretrained leaves the weights in the file's memory map, where a GPU run copies
    # them to the device: they count as the forward reads them
    config = OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                       word_embed_proj_dim=32)
    OPTForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    with live_tensors.LiveTensors() as count:
        model = OPTForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
        assert count.live == sum(p.numel() for p in model.parameters()) * 2


def test_a_module_built_while_open_counts_its_parameters_exactly():
    with live_tensors.LiveTensors() as count:
        layer = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    assert count.live == sum(p.numel() for p in layer.parameters()) * 2


def test_weights_moved_to_the_meta_device_no_longer_count():
    """Meta tensors hold no data: a module moved there frees its weights, as a GPU would count it."""
    with live_tensors.LiveTensors() as count:
        layer = torch.nn.Linear(64, 32)
        layer(torch.ones(1, 64))
        weights = sum(p.numel() for p in layer.parameters()) * 4
        assert count.live == weights  # the input and output, unreferenced, are gone
        layer.to("meta")
        assert count.live == 0
        assert layer(torch.ones(1, 64, device="meta")).shape == (1, 32)
        assert count.live == 0


def test_an_int8_weight_counts_its_int8_values_and_scales_not_a_full_precision_stand_in():
    """torchao's int8 weights (models.<name>.quantize) are tensor subclasses whose own storage is a
    stand-in of the float32 size: the count must take the parts that hold the data."""
    layer = torch.nn.Linear(256, 128, bias=False)
    quantize_(layer, Int8WeightOnlyConfig(set_inductor_config=False))
    held = tensor_bytes(layer.weight)
    assert layer.weight.qdata.dtype == torch.int8 and 128 * 256 < held < 128 * 256 * 1.1
    with live_tensors.LiveTensors() as count:
        alias = layer.weight.detach()  # the subclass itself passes the dispatcher
        with torch.no_grad():
            layer(torch.ones(1, 256))
        assert count.live == held
    del alias
