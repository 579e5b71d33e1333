"""benchmarks/live_tensors.py: the CPU count of live tensor bytes that benchmarks/scale.py sets
beside a GPU's max_memory_allocated."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

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


def test_tensors_from_before_count_only_through_what_they_allocate():
    weight = torch.randn(100, 50, requires_grad=True)  # a model loaded before counting starts
    with live_tensors.LiveTensors() as count:
        transposed = weight.t()  # a view of a storage from before: nothing
        assert count.live == 0
        x = torch.randn(8, 100)  # 3,200 bytes
        loss = (x @ weight).relu().sum()
        peak_before_backward = count.peak
        loss.backward()  # the weight's gradient: 20,000 bytes that outlive the backward
        assert count.live == 3200 + 20000 + loss.untyped_storage().nbytes()
        # the forward's [8, 50] product and its relu (1,600 bytes each) were alive at once
        assert peak_before_backward >= 3200 + 2 * 1600
        assert transposed.shape == (50, 100)


def test_a_module_built_while_open_counts_its_parameters_exactly():
    with live_tensors.LiveTensors() as count:
        layer = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    assert count.live == sum(p.numel() for p in layer.parameters()) * 2
