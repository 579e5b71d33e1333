"""Dataset records, image access and the synthetic demo datasets."""

from .images import load_rgb, safe_join
from .records import (
    DataError,
    EditRecord,
    ImageRoots,
    load_eic,
    load_evqa,
    load_records,
    load_vlkeb,
    multimodal_locality_prompt,
)

__all__ = [
    "DataError",
    "EditRecord",
    "ImageRoots",
    "load_eic",
    "load_evqa",
    "load_records",
    "load_vlkeb",
    "load_rgb",
    "multimodal_locality_prompt",
    "safe_join",
]
