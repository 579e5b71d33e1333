"""A demo run killed with SIGKILL at several points, rerun as `make demo` does, ends in the table an
uninterrupted run writes.

`make demo` = `python -m mmke.unlock .` (remove a dead run's lock, refuse while a run is alive)
then `snakemake`, whose default workflow profile (profiles/default) sets rerun-incomplete. The
DAG here is the demo's, cut down (one dataset of 3 records, the random tiny BLIP-2, three
methods) so that two whole runs stay affordable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from workflow_copy import copy_workflow, snakemake_env

from mmke.unlock import is_locked, live_runs, unlock_stale

#: Where the interrupted run is killed, in the order a one-core run reaches them: while the demo
#: data is being written, while the baseline job runs, and as the first evaluate job finishes.
KILL_WHEN = ("resources/demo/demo-evqa/train.json", "logs/baseline/tiny-blip2/demo-evqa.log",
             "results/eval/base/tiny-blip2/demo-evqa/metrics.json")
COMPARED = [f"results/tables/summary{suffix}" for suffix in (".csv", ".md", ".tex", "_long.csv")] + [
    f"results/eval/{method}/tiny-blip2/demo-evqa/records.jsonl" for method in ("base", "FT-L", "IKE")]


def small_demo(root: Path) -> Path:
    root.mkdir()
    copy_workflow(root)
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    dataset = config["datasets"]["demo-evqa"]
    dataset["demo"].update(n_train=4, n_eval=3)
    config["datasets"] = {"demo-evqa": dataset}
    model = {key: value for key, value in config["models"]["tiny-blip2"].items() if key != "pretrain"}
    config["models"] = {"tiny-blip2": {**model, "path": "resources/tiny/tiny-blip2"}}
    config["methods"] = ["base", "FT-L", "IKE"]
    config.pop("exclude", None)
    (root / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def start(root: Path) -> subprocess.Popen:
    """Snakemake in its own process group, so that one SIGKILL takes it and its jobs, as a killed terminal would."""
    return subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1"], cwd=root, env=snakemake_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(root: Path) -> None:
    proc = start(root)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]


def kill_when_exists(proc: subprocess.Popen, root: Path, name: str, timeout: float = 600) -> None:
    """SIGKILL the run's process group once ``root / name`` exists, and wait until none of the
    run's processes is left: a job dies a moment after Snakemake itself, later on a busy machine."""
    deadline = time.monotonic() + timeout
    while not (root / name).exists():
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended (rc {proc.returncode}) before {name} appeared: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not appear within {timeout} s")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while left := live_runs(root):
        if time.monotonic() > deadline:
            raise AssertionError(f"the killed run's processes {left} still run 60 s after SIGKILL")
        time.sleep(0.02)


@pytest.mark.slow
def test_killed_runs_rerun_to_the_uninterrupted_table(tmp_path):
    whole = small_demo(tmp_path / "whole")
    finish(whole)

    root = small_demo(tmp_path / "killed")
    for index, name in enumerate(KILL_WHEN):
        proc = start(root)
        if index == 0:  # while it runs, its lock is not stale: nothing may remove it
            while not is_locked(root):
                time.sleep(0.02)
            assert live_runs(root)
            with pytest.raises(RuntimeError, match="is locked by a Snakemake run that is still alive"):
                unlock_stale(root)
        kill_when_exists(proc, root, name)
        assert is_locked(root)  # the lock outlives the run
        if index == 1:  # killed mid-job (the baseline runs for seconds after its log appears; the demo
            # data job may end in the ms between its train.json and the kill): Snakemake would stop on
            # these markers without rerun-incomplete
            assert any((root / ".snakemake/incomplete").iterdir())
        assert "removed the lock of a Snakemake run that was killed" in unlock_stale(root)
        assert not is_locked(root)
    finish(root)

    for name in COMPARED:
        assert (root / name).read_bytes() == (whole / name).read_bytes(), name
