"""Fetch the paper's datasets and checkpoints: retries, a sha256 manifest, atomic placement.

A download entry of the config (``downloads.<name>``) names one source and where it lands:

- ``gdrive: <file id>`` or ``url: <https url>``: one file at ``dest``;
- ``gdrive_folder: <folder id>`` with ``files: [relative paths]``: a Google Drive folder, of which
  the listed files must exist (they are what the workflow declares as outputs);
- ``hf: <repo id>`` (optional ``revision``): a Hugging Face model directory at ``dest``;
- ``manual: <instructions>``: no public source; fetching fails with the instructions, and a
  person places the file or directory at ``dest`` by hand.

Everything is fetched into a temporary path next to ``dest``, verified against the manifest
(``checksums: {path: sha256}`` in config, keyed by the final path), and only then renamed into
place, so an interrupted or corrupt download never looks like a finished one. A path that already
exists and verifies is not fetched again. The network sits behind :class:`Transport`, so tests
inject a fake one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

SOURCE_KINDS = ("gdrive", "url", "gdrive_folder", "hf", "manual")
DIRECTORY_KINDS = ("gdrive_folder", "hf")
#: Hugging Face repos often hold the same weights for TensorFlow, Flax, ONNX...; mmke loads
#: PyTorch weights only, so these are skipped (for OPT-2.7b that saves ~10 GB).
HF_IGNORE = ("*.h5", "*.msgpack", "*.ot", "*.onnx", "onnx/*", "openvino/*", "coreml/*")


class DownloadError(RuntimeError):
    """A download that failed for good, or a file that failed its checksum."""


@dataclasses.dataclass(frozen=True)
class Download:
    """One entry of ``downloads:`` in the config."""

    name: str
    kind: str
    ref: str
    dest: Path
    files: tuple[str, ...] = ()
    revision: str | None = None
    directory: bool = False

    @classmethod
    def from_config(cls, name: str, entry: Mapping[str, Any]) -> "Download":
        kinds = [kind for kind in SOURCE_KINDS if kind in entry]
        if len(kinds) != 1:
            raise ValueError(f"downloads.{name}: give exactly one source of {', '.join(SOURCE_KINDS)}; got {kinds}")
        if "dest" not in entry:
            raise ValueError(f"downloads.{name}: field 'dest' is missing")
        kind = kinds[0]
        files = tuple(entry.get("files", ()))
        if kind == "gdrive_folder" and not files:
            raise ValueError(f"downloads.{name}: a gdrive_folder needs 'files' (the files the workflow uses)")
        return cls(name, kind, str(entry[kind]), Path(entry["dest"]), files, entry.get("revision"),
                   kind in DIRECTORY_KINDS or bool(entry.get("directory", False)))

    def outputs(self) -> list[Path]:
        """The paths this download produces: a folder's listed files, else ``dest`` itself."""
        return [self.dest / name for name in self.files] if self.files else [self.dest]

    def where(self) -> str:
        """Where a person finds the source in a browser (for the by-hand instructions)."""
        return {
            "gdrive": f"https://drive.google.com/file/d/{self.ref}/view",
            "gdrive_folder": f"https://drive.google.com/drive/folders/{self.ref}",
            "hf": f"https://huggingface.co/{self.ref}",
        }.get(self.kind, self.ref)


class Transport(Protocol):
    """The network: write one source to ``out`` (a file path or an empty directory)."""

    def fetch(self, download: Download, out: Path) -> None: ...


class GdownTransport:
    """gdown for Google Drive files/folders and plain URLs; huggingface_hub for model repos."""

    def fetch(self, download: Download, out: Path) -> None:
        import gdown

        if download.kind == "gdrive":
            result = gdown.download(id=download.ref, output=str(out), quiet=False)
        elif download.kind == "url":
            result = gdown.download(url=download.ref, output=str(out), quiet=False)
        elif download.kind == "gdrive_folder":
            result = gdown.download_folder(id=download.ref, output=str(out), quiet=False)
        elif download.kind == "hf":
            from huggingface_hub import snapshot_download

            result = snapshot_download(download.ref, revision=download.revision, local_dir=str(out),
                                       ignore_patterns=list(HF_IGNORE))
        else:
            raise ValueError(f"downloads.{download.name}: kind {download.kind!r} has no transport")
        if not result:  # gdown returns None instead of raising on some failures
            raise OSError(f"{download.kind} {download.ref}: nothing was downloaded")


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch(download: Download, checksums: Mapping[str, str | None] | None = None,
          transport: Transport | None = None, retries: int = 3, backoff_s: float = 5.0,
          sleep: Callable[[float], None] = time.sleep) -> list[Path]:
    """Make ``download.outputs()`` exist and verify; fetch only what is missing or fails its checksum.

    Transport errors are retried ``retries`` times with exponential backoff; the final error says
    where to get the source by hand and where to put it. Returns the output paths.
    """
    checksums = checksums or {}
    if _existing_outputs_verify(download, checksums):
        print(f"{download.name}: already in place at {download.dest}, not downloading again")
        return download.outputs()
    if download.kind == "manual":
        raise DownloadError(f"{download.name}: no public download. {download.ref.strip()} "
                            f"Place it at {download.dest} (then rerun).")
    transport = transport or GdownTransport()
    with _staging(download.dest, download.directory) as tmp:
        for attempt in range(1, retries + 1):
            try:
                transport.fetch(download, tmp)
                break
            except Exception as err:  # any transport failure (HTTP, quota, DNS) is retried alike
                if attempt == retries:
                    raise DownloadError(
                        f"{download.name}: download of {download.kind} {download.ref} failed after {retries} "
                        f"attempt(s): {err}. Offline? Fetch it by hand from {download.where()} and place it at "
                        f"{download.dest}" + (f" (with {', '.join(download.files)} inside)" if download.files else "")
                    ) from err
                wait = backoff_s * 2 ** (attempt - 1)
                print(f"{download.name}: attempt {attempt} failed ({err}); retrying in {wait:.0f}s")
                _clear(tmp, download.directory)
                sleep(wait)
        root = _content_root(download, tmp)
        _verify_staged(download, root, checksums)
        _place(download, root)
    return download.outputs()


def verify(path: str | os.PathLike, expected: str | None) -> str:
    """sha256 of ``path``; a mismatch with ``expected`` removes the file and raises.

    ``expected=None`` means "not pinned in the manifest": the digest is printed so it can be.
    """
    actual = sha256_of(path)
    if expected is None:
        print(f"{path}: sha256 {actual} (not pinned in the checksum manifest; add it there to verify future downloads)")
    elif actual != expected.lower():
        Path(path).unlink()
        raise DownloadError(f"{path}: sha256 mismatch: expected {expected}, got {actual}; the file was removed")
    return actual


def extract_archive(archive: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Unpack a zip or tar archive into ``out_dir`` once (atomically; members may not escape it)."""
    archive, out_dir = Path(archive), Path(out_dir)
    if out_dir.is_dir():
        print(f"{out_dir}: already extracted")
        return out_dir
    with _staging(out_dir, directory=True) as tmp:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as handle:
                _refuse_escapes(archive, tmp, handle.namelist())
                handle.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as handle:
                handle.extractall(tmp, filter="data")  # "data" refuses links/paths outside tmp
        else:
            raise DownloadError(f"{archive}: not a zip or tar archive")
        os.replace(tmp, out_dir)
    return out_dir


def _existing_outputs_verify(download: Download, checksums: Mapping[str, str | None]) -> bool:
    """True if every output exists and matches the manifest; a mismatching one is removed."""
    if not all(path.exists() for path in download.outputs()):
        return False
    try:
        for path, key in _checks(download, download.dest):
            verify(path, checksums.get(key))
    except DownloadError as err:
        print(f"{err}; downloading again")
        return False
    return True


def _verify_staged(download: Download, tmp: Path, checksums: Mapping[str, str | None]) -> None:
    missing = [name for name in download.files if not (tmp / name).is_file()]
    if missing:
        found = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        raise DownloadError(f"{download.name}: the download lacks {missing}; it holds {found[:20]}")
    for path, key in _checks(download, tmp):
        try:
            verify(path, checksums.get(key))
        except DownloadError as err:
            raise DownloadError(f"{download.name}: {key}: {str(err).split(': ', 1)[1]}") from err


def _content_root(download: Download, tmp: Path) -> Path:
    """Where a folder's listed files are: ``tmp``, or its only subfolder if gdown nested them there."""
    subdirs = [p for p in tmp.iterdir() if p.is_dir()] if tmp.is_dir() else []
    if download.files and len(subdirs) == 1 and not (tmp / download.files[0]).exists():
        return subdirs[0]
    return tmp


def _checks(download: Download, root: Path) -> list[tuple[Path, str]]:
    """(file under ``root``, its manifest key = final path) for every file the manifest may pin.

    A single file is itself; a folder download its listed files; a model directory all its files.
    """
    if not download.directory:
        return [(root, str(download.dest))]
    files = [root / name for name in download.files] or sorted(p for p in root.rglob("*") if p.is_file())
    return [(path, str(download.dest / path.relative_to(root))) for path in files]


def _place(download: Download, tmp: Path) -> None:
    """Move the verified download into place; a folder's files merge into an existing ``dest``."""
    if not download.directory:
        os.replace(tmp, download.dest)
    elif download.kind == "gdrive_folder" and download.dest.exists():
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            target = download.dest / path.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    else:
        if download.dest.exists():
            shutil.rmtree(download.dest)
        os.replace(tmp, download.dest)


@contextlib.contextmanager
def _staging(dest: Path, directory: bool) -> Iterator[Path]:
    """A temporary sibling of ``dest`` (same filesystem, so the final rename is atomic); removed on exit."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    if not directory:
        tmp.rmdir()
    try:
        yield tmp
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)


def _clear(tmp: Path, directory: bool) -> None:
    """Empty the staging path before a retry, so a partial attempt cannot leak into the next."""
    if directory:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    else:
        tmp.unlink(missing_ok=True)


def _refuse_escapes(archive: Path, root: Path, names: Sequence[str]) -> None:
    base = root.resolve()
    for name in names:
        if not (base / name).resolve().is_relative_to(base):
            raise DownloadError(f"{archive}: member {name!r} would be written outside {root}")
