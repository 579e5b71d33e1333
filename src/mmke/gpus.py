"""Give each concurrent job on a multi-GPU workstation its own GPU.

Snakemake's ``gpu`` resource (``--resources gpu=N``) caps how many GPU jobs run at once, but
does not say *which* GPU a job should use, so every job would pick ``cuda:0``. A job therefore
claims a free GPU index with an exclusive, non-blocking file lock held until the process exits;
the operating system releases the lock when a job dies, so no stale claim survives a crash. On a
SLURM node the scheduler already restricts the job to its GPUs, and with one visible GPU nothing
is claimed.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path
from typing import IO

#: Locks held by this process (kept referenced: closing the file would release the GPU).
_HELD: list[IO] = []


def default_lock_dir() -> Path:
    return Path(os.environ.get("MMKE_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / f"mmke-gpu-locks-{os.getuid()}")


def claim_gpu(count: int, lock_dir: str | os.PathLike | None = None, poll_s: float = 5.0,
              timeout_s: float | None = None) -> int:
    """Index of a GPU no other process holds, among ``count``; waits while all are taken."""
    if count < 1:
        raise ValueError(f"claim_gpu needs at least one GPU, got count={count}")
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    while True:
        for index in range(count):
            handle = open(lock_dir / f"gpu{index}.lock", "w")  # noqa: SIM115 - kept open while held
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _HELD.append(handle)
            return index
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"all {count} GPUs stay claimed by other jobs (locks in {lock_dir})")
        time.sleep(poll_s)


def release_all() -> None:
    """Drop this process's claims (for tests and long-lived processes; exit releases them anyway)."""
    while _HELD:
        _HELD.pop().close()
