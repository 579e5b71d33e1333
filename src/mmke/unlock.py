"""Recover a workflow directory from a killed Snakemake run, but never from a live one.

A Snakemake run that dies by ``kill -9`` (or a power cut) leaves its lock in ``.snakemake/locks``,
and the next run stops on ``LockException ... --unlock``. Unlocking is safe only if no other
Snakemake is still working in that directory: two runs writing the same outputs would corrupt
them, which is what the lock is for. So :func:`unlock_stale` looks for live Snakemake processes
(and their job scripts) in the directory first, and unlocks only when there are none.
``make demo`` calls ``python -m mmke.unlock`` before Snakemake; the partial outputs the killed
run left are then rerun by ``rerun-incomplete`` (``profiles/default/config.yaml``).

Nothing here imports Snakemake: the unlock itself is ``snakemake --unlock``, its documented way.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import psutil

LOCK_DIR = Path(".snakemake/locks")


def is_snakemake(cmdline: list[str]) -> bool:
    """``snakemake ...`` (its entry point, run as ``python .../bin/snakemake``) or ``python -m snakemake``."""
    head = [Path(arg).name for arg in cmdline[:2]]
    module = any(a == "-m" and b == "snakemake" for a, b in zip(cmdline, cmdline[1:]))
    return "snakemake" in head or module


def live_runs(directory: str | os.PathLike) -> list[psutil.Process]:
    """Processes of a Snakemake run in ``directory``: Snakemake itself, or a job it started.

    A Snakemake process is recognised by its command line and working directory (it changes into
    ``--directory``); a job's ``script:`` runs from ``<directory>/.snakemake/scripts``, and a job
    may outlive a Snakemake killed alone, still writing its outputs.
    """
    root = Path(directory).resolve()
    scripts = str(root / ".snakemake" / "scripts")
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid == os.getpid():
            continue
        try:
            cmdline = process.info["cmdline"] or []
            job = any(arg.startswith(scripts) for arg in cmdline)
            if job or (is_snakemake(cmdline) and Path(process.cwd()).resolve() == root):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, FileNotFoundError):
            continue  # gone meanwhile, or another user's: it cannot be writing here as us
    return found


def is_locked(directory: str | os.PathLike) -> bool:
    lock_dir = Path(directory) / LOCK_DIR
    return lock_dir.is_dir() and any(lock_dir.iterdir())


def unlock_stale(directory: str | os.PathLike = ".") -> str | None:
    """Unlock ``directory`` if a dead run left it locked; say so in one line (None: not locked).

    Raises RuntimeError, changing nothing, while a Snakemake run is alive there.
    """
    if not is_locked(directory):
        return None
    running = live_runs(directory)
    if running:
        pids = ", ".join(str(process.pid) for process in running)
        raise RuntimeError(f"{directory} is locked by a Snakemake run that is still alive (pid {pids}); "
                           "wait for it to finish or stop it, then run again")
    subprocess.run([sys.executable, "-m", "snakemake", "--unlock"], cwd=directory, check=True,
                   stdout=subprocess.DEVNULL)
    return f"{directory}: removed the lock of a Snakemake run that was killed (no Snakemake runs here)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", default=".", help="the workflow directory (default: .)")
    args = parser.parse_args(argv)
    try:
        done = unlock_stale(args.directory)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    if done:
        print(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
