"""Image paths and pixels, with failures that say which file is at fault.

Dataset JSON names images by relative path; a path that leaves the image root (absolute, ``..``,
or a symlink pointing elsewhere) would let a dataset file read arbitrary files, so every lookup
goes through :func:`safe_join`.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

# What Pillow raises on bad bytes: OSError (UnidentifiedImageError, truncated data), SyntaxError
# and struct.error from some format plugins, EOFError on short reads, ValueError on bad headers.
_PIL_ERRORS = (OSError, SyntaxError, struct.error, EOFError, ValueError, Image.DecompressionBombError)


def safe_join(root: str | os.PathLike, rel: str) -> Path:
    """Resolved absolute path of ``rel`` under ``root``; ValueError if it would end up outside."""
    return join_under_resolved(Path(root).resolve(), rel)


def join_under_resolved(base: Path, rel: str) -> Path:
    """:func:`safe_join` under a root already resolved (``Path.resolve``): a loader that reads
    many files of one root resolves it once, not once per file."""
    if not rel:
        raise ValueError(f"empty image path under image root {base}")
    if Path(rel).is_absolute():
        raise ValueError(f"absolute path {rel!r} escapes image root {base}")
    # Resolving follows symlinks too, so a link inside the root that points outside is caught here.
    path = Path(os.path.realpath(os.path.join(base, rel)))  # Path.resolve() without its wrapping
    if not path.is_relative_to(base):
        raise ValueError(f"path {rel!r} escapes image root {base} (resolves to {path})")
    return path


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode every pixel now, as RGB, so corruption surfaces here and the file handle is closed."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() loads the data and returns a detached copy
    except _PIL_ERRORS as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


@dataclass(frozen=True, eq=False)
class UndecodedImage:
    """An image file whose pixels are read only if something asks for them (:func:`decoded`).

    The evaluation loop hands these out for images whose features the baseline job stored, to
    methods that keep those features: no pass of such an edit needs the pixels, and decoding and
    preprocessing a record's three images would be most of what a small model's edit loop spends
    beyond its passes. A family whose image tokens follow the image's size (Qwen2-VL,
    LLaVA-OneVision) reads ``size`` from the file's header. Like a decoded image, the object
    itself is its identity (the adapters' memos key on it); ``key`` is its
    :meth:`mmke.data.records.ImageRoots.key`. The path was checked against its root when the
    object was made; the baseline job decoded the file, so corruption surfaced there.
    """

    path: Path
    key: str

    @functools.cached_property
    def size(self) -> tuple[int, int]:
        """(width, height) as the decoded image would have it, from the header alone."""
        try:
            with Image.open(self.path) as image:
                return image.size
        except _PIL_ERRORS as err:
            raise ValueError(f"cannot read image {self.path}: {err}") from err


def decoded(image: Image.Image | UndecodedImage) -> Image.Image:
    """The pixels of ``image``, read now if it is an :class:`UndecodedImage`."""
    return load_rgb(image.path) if isinstance(image, UndecodedImage) else image
