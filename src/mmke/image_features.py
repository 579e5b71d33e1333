"""Eval images' features, computed by the baseline job and read by every evaluate job of the
same model x dataset (``evaluation.store_image_features``).

The features of an image (the family's vision tower + Q-Former + projection or equivalent) are a
function of the pixels and the frozen upstream weights only. The baseline job computes them for
every eval image anyway, and every method that leaves those weights alone (all but FT-V and
edits scoped to the vision side) would compute them again, once per record, in each of its jobs:
on the paper's BLIP-2 the EVA ViT-g at 364 px on a record's three images is a large share of a
whole edit. Stored once, they are read instead; the values are the baseline's own, so an
unedited model measured in an evaluate job agrees with its baseline bit for bit. On this CPU an
image's features do not depend on the images encoded beside it, so the records equal those of
computing them (tests/test_stored_features.py); a GPU's kernels may differ in the last bits by
batch shape, and then every job reads the same stored values rather than its own slightly
different ones.

The file is keyed by :meth:`mmke.data.records.ImageRoots.key` (the image's root and relative
path), holds tensors in the model's dtype, and names the model settings it was computed with; an
evaluate job refuses a file written for other settings rather than use wrong features.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import torch
from safetensors.torch import save_file

from mmke.data.records import IMAGE_FIELDS, EditRecord, ImageRoots
from mmke.io import atomic_path, broken_safetensors_message

FORMAT = "mmke-image-features/1"
STAGE = "baseline"  # the workflow rule that writes the file


def model_fingerprint(model: Mapping) -> str:
    """The model settings features depend on, as one string (a config ``models:`` entry)."""
    return json.dumps({key: model[key] for key in sorted(model) if key != "hparams"}, sort_keys=True, default=str)


def save_image_features(path: str | os.PathLike, features: Mapping[str, torch.Tensor], model: Mapping) -> None:
    """Write ``features`` (key -> tensor; empty when the model stores none) atomically."""
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in features.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "model": model_fingerprint(model)})


class StoredImageFeatures:
    """Read side of :func:`save_image_features`: tensors are read from disk on request, so a job
    holds only the features of the records it is measuring."""

    def __init__(self, path: str | os.PathLike, model: Mapping | None = None):
        """``model``: the config entry the evaluate job loads; a file written for other settings
        is refused. None: not checked (library use on a file known to match)."""
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt")
        except SafetensorError as err:
            raise ValueError(broken_safetensors_message(path, err, STAGE)) from err
        meta = self._file.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an image-features file of this mmke (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r}); rerun the {STAGE} stage (snakemake --forcerun {STAGE})")
        if model is not None and meta.get("model") != model_fingerprint(model):
            raise ValueError(f"{path}: features of model settings {meta.get('model')}, but this job loads "
                             f"{model_fingerprint(model)}; rerun the {STAGE} stage (snakemake --forcerun {STAGE})")
        self._keys = frozenset(self._file.keys())

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def get(self, key: str | None) -> torch.Tensor | None:
        """The stored features of image ``key``; None when the file has none for it."""
        return self._file.get_tensor(key) if key in self._keys else None

    def covers(self, records: Iterable[EditRecord], roots: ImageRoots) -> bool:
        """Whether every image of ``records`` has stored features: then no image pass is left."""
        return all(roots.key(field, getattr(record, field)) in self._keys
                   for record in records for field in IMAGE_FIELDS)
