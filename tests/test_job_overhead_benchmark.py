"""benchmarks/job_overhead.py: each stage script's start-up imports and the cost of checking the DAG."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from test_scale_benchmark import run_benchmark
from workflow_copy import REPO, copy_workflow

pytestmark = pytest.mark.slow  # a fresh interpreter per stage script: about a minute


def test_job_overhead_times_every_script_and_finds_the_venvs_snakemake_off_path(tmp_path):
    (tmp_path / "workflow").mkdir()
    workdir = copy_workflow(tmp_path / "workflow")
    out = tmp_path / "overhead.json"
    # as `.venv/bin/python benchmarks/job_overhead.py` in a shell whose PATH lacks the venv
    beside = Path(sys.executable).parent
    search = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != beside)
    done = run_benchmark("job_overhead.py", "--repeats", "1", "--workdir", str(workdir), "--json", str(out),
                         PATH=search)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["scripts"]) == {script.stem for script in (REPO / "scripts").glob("*.py")}
    # the light stages start without torch and transformers; the model stages need both
    assert figures["scripts"]["summary"]["heavy"] == [] and figures["scripts"]["download"]["heavy"] == []
    assert figures["scripts"]["evaluate"]["heavy"] == ["torch", "transformers"]
    # a fresh copy has every job to run: the dry run is timed, the no-op rerun is not (it would run the DAG)
    assert figures["snakemake -n"]["up_to_date"] is False and figures["snakemake -n"]["cpu_s"] > 0
    assert "snakemake --cores 1" not in figures
    assert not (workdir / "results").exists()
