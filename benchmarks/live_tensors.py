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


class LiveTensors(TorchDispatchMode):
    """While open, counts every tensor storage an operator allocates until it is freed.

    ``live``: bytes allocated while open and not freed yet; ``peak``: the most ``live`` has been
    since opening or the last :meth:`reset_peak`. Storages that existed before opening (a model
    loaded earlier) are not counted, nor are views and in-place results: an operator's output
    counts only where its schema says it is no alias of an input, so ``weight.t()`` adds nothing.
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
        outputs = result if isinstance(result, tuple) else (result,)
        for returned, output in zip(func._schema.returns, outputs):
            if returned.alias_info is None:  # a fresh allocation, not a view or an in-place result
                for tensor in tree_flatten(output)[0]:
                    if isinstance(tensor, torch.Tensor):
                        self._count(tensor.untyped_storage())
        return result

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)  # torch keeps one Python object per storage while the storage lives
        if key in self._storages:
            return
        size = storage.nbytes()
        self._storages[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))
        self.live += size
        self.peak = max(self.peak, self.live)

    def _free(self, key: int, size: int) -> None:
        del self._storages[key]
        self.live -= size
