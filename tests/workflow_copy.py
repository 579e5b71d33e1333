"""Shared by the workflow tests: a private copy of the workflow, and the env to run Snakemake in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_PARTS = ("Snakefile", "workflow", "scripts", "config", "envs", "profiles")


def copy_workflow(root: Path) -> Path:
    """Copy what a Snakemake run reads into ``root``, so runs never touch the repository."""
    for part in WORKFLOW_PARTS:
        src = REPO / part
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / part)
    return root


def snakemake_env() -> dict[str, str]:
    """This interpreter's bin first on PATH, so `script:` stages import the same mmke."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def dry_run_config(workdir: Path, configfile: str, *args: str) -> str:
    """``snakemake ARGS -n --configfile CONFIGFILE`` in ``workdir``: the plan's text (targets go
    first, since --configfile takes several values)."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", *args, "-n", "--configfile", configfile],
                          cwd=workdir, env=snakemake_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr
