"""Bytes of live tensors on a CPU, counted as torch allocates and frees them: the counterpart of
``torch.cuda.memory_allocated`` / ``max_memory_allocated`` where no GPU is at hand.

A process' resident set size mixes the tensors with the interpreter, the libraries, the
allocator's cached pages and memory-mapped files; a GPU's allocated figure counts tensor storage
only. Counting the same storages on a CPU gives, for the same code path, what the GPU run would
allocate, short of the kernels' own workspaces (cuBLAS, attention kernels) and the caching
allocator's rounding. benchmarks/scale.py uses it to set the paper models' memory beside
EasyEdit's GPU figures (issue 97) on a machine without a GPU.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mmke.models.quantize import tensor_parts


class LiveTensors(TorchDispatchMode):
    """While open, counts every tensor storage an operator reads or writes, from then until it is freed.

    ``live``: the bytes of those storages still alive; ``peak``: the most ``live`` has been since
    opening or the last :meth:`reset_peak`. A storage counts once, whatever views of it an
    operator sees. Counting what operators read too takes in the tensors made without one: a
    model loaded from safetensors on a CPU lies in the file's memory map until a forward uses it,
    where a GPU run copies it to the device. Opened before anything is built, it therefore counts
    what a GPU would hold; a tensor from before opening counts from its first use.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, weakref.ref] = {}  # id -> weak reference whose callback uncounts it

    def reset_peak(self) -> None:
        """Start a new peak at what is live now (``torch.cuda.reset_peak_memory_stats``)."""
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in tree_flatten((args, kwargs, result))[0]:
            if isinstance(value, torch.Tensor):
                for part in tensor_parts(value):  # a quantised weight's int8 values and scales
                    self._count(part.untyped_storage())
        return result

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)  # torch keeps one Python object per storage while the storage lives
        if key in self._storages or storage.device.type == "meta":  # a meta storage holds no data
            return
        size = storage.nbytes()
        self._storages[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))
        self.live += size
        self.peak = max(self.peak, self.live)

    def _free(self, key: int, size: int) -> None:
        del self._storages[key]
        self.live -= size
