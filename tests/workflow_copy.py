"""Shared by the workflow tests: a private copy of the workflow, and the env to run Snakemake in it."""

from __future__ import annotations

import os
import shutil
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
