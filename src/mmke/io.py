"""Atomic file output, small JSON helpers, and safetensors reads that name a broken file.

Every stage writes through :func:`atomic_write` so that an interrupted job never leaves a half
file behind: Snakemake would otherwise treat a truncated output as complete on the next run.
The temporary files and folders these writers rename into place are created private (mode 0600 /
0700) by :mod:`tempfile`; they get the mode the process umask gives an ordinary file or folder
before the rename, so outputs on a shared cluster are as readable as anything else the user writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

#: What ``open`` and ``mkdir`` ask for before the umask applies.
FILE_MODE = 0o666
DIR_MODE = 0o777


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is put straight back)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _publish(path: str | os.PathLike, mode: int) -> None:
    """Give a private temporary file or folder the mode an ordinary one would have."""
    os.chmod(path, mode & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for writers that want a filename (e.g. ``safetensors.save_file``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _publish(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to ``path``; rename it over ``path`` only if the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; it becomes ``out_dir`` only on success.

    An interrupted build then leaves no half directory that Snakemake or a loader would take for
    a complete model. An existing ``out_dir`` is replaced.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        _publish(tmp, DIR_MODE)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old)  # renaming onto an empty directory replaces it
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_write(path, encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_safetensors(path: str | os.PathLike, rule: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Metadata and tensors of a ``.safetensors`` file that the workflow rule ``rule`` writes.

    A truncated or corrupt file (a copy cut short, a full disk) makes safetensors raise a bare
    ``SafetensorError: ... header too small`` without the path; here it names the file and what
    rewrites it.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {}), {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as err:
        raise ValueError(broken_safetensors_message(path, err, rule)) from err


def broken_safetensors_message(path: str | os.PathLike, err: BaseException, rule: str | None,
                               output: str | os.PathLike | None = None) -> str:
    """One line: the broken file, safetensors' reason, and what writes it again.

    Snakemake does not rerun a job whose output exists, so the output (``path`` itself, or the
    folder ``output`` holding it) has to go first. ``rule`` None: nothing in the workflow writes
    the file (a model directory placed by hand).
    """
    remedy = (f"delete {'it' if output is None else output} and rerun snakemake: rule {rule} writes it again"
              if rule is not None else "no workflow rule writes it: replace it with a complete copy")
    return f"{path}: corrupt or truncated safetensors file ({err}); {remedy}"


#: The workflow rules that write model folders, by their folder under resources/ (workflow/rules).
MODEL_WRITERS = {"resources/tiny/aux": "tiny_aux_model", "resources/tiny": "tiny_model",
                 "resources/world": "pretrain_base", "resources/models": "convert_model"}


def broken_safetensors_in(directory: str | os.PathLike) -> Path | None:
    """The first ``*.safetensors`` file of ``directory`` whose header does not read, if any."""
    from safetensors import SafetensorError, safe_open

    for candidate in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(candidate), framework="pt"):
                pass
        except SafetensorError:
            return candidate
    return None


def broken_model_message(directory: str | os.PathLike, err: BaseException) -> str:
    """:func:`broken_safetensors_message` for a model folder: which weights file, which rule."""
    broken = broken_safetensors_in(directory) or Path(directory)
    folder = Path(directory).as_posix().rstrip("/")
    rule = next((rule for prefix, rule in MODEL_WRITERS.items()
                 if folder == prefix or folder.startswith(f"{prefix}/")), None)
    return broken_safetensors_message(broken, err, rule, output=directory)


@contextlib.contextmanager
def redirect_output(log_path: str | os.PathLike | None) -> Iterator[None]:
    """Send stdout and stderr (progress bars, warnings, tracebacks) to a stage's log file."""
    if log_path is None:
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            yield
        except BaseException:
            import traceback

            traceback.print_exc(file=log)
            raise
