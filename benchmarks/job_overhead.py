"""Fixed cost per workflow job: CPU seconds to start each stage script, and a no-op Snakemake rerun.

Every figure is the CPU time (user + system) of a fresh child process, the median of
``--repeats`` runs, so a busy machine inflates it little:

* ``python``: the bare interpreter (``python -c pass``), the floor of every job;
* per script of ``scripts/``: importing the modules the script imports, in a fresh interpreter,
  minus the bare interpreter, and whether torch / transformers came with them;
* ``+ tables, plots``: what the summary and plot jobs import when they run (pandas, matplotlib);
* ``+ model classes``: what loading a model adds (transformers imports its model and processor
  classes lazily: the modeling framework, BLIP-2 and the ``hf_vlm`` auto classes);
* ``snakemake -n`` and a no-op ``snakemake --cores 1`` in ``--workdir``: with every output up to
  date this is the whole cost of a rerun (the wall time is printed too).

    PYTHONPATH=src python benchmarks/job_overhead.py [--workdir .] [--repeats 3]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")
MODEL_CLASSES = ("mmke.models.blip2", "mmke.models.hf_vlm")


def child_cost(command: list[str], cwd: Path | None = None) -> tuple[float, float, str]:
    """CPU seconds (user + system) and wall seconds of one child process, and its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, done.stdout


def median_cost(command: list[str], repeats: int, cwd: Path | None = None) -> tuple[float, float, str]:
    runs = [child_cost(command, cwd) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[-1][2]


def script_imports(path: Path) -> list[str]:
    """The modules a stage script imports at its top level, in order."""
    names = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return list(dict.fromkeys(names))


def import_probe(modules: list[str]) -> list[str]:
    """A ``python -c`` command importing ``modules`` and printing which heavy packages came along."""
    code = "".join(f"import {m}\n" for m in modules)
    code += f"import sys, json\nprint(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    return [sys.executable, "-c", code]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO, help="where to time the no-op Snakemake rerun")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    floor, _, _ = median_cost([sys.executable, "-c", "pass"], args.repeats)
    print(f"CPU seconds per job start (median of {args.repeats}; fresh interpreter each)")
    print(f"  {'python -c pass':34s} {floor:6.2f}")
    figures: dict = {"python_s": floor, "scripts": {}}
    for script in sorted((REPO / "scripts").glob("*.py")):
        modules = script_imports(script)
        cpu, _, out = median_cost(import_probe(modules), args.repeats)
        heavy = json.loads(out.strip().splitlines()[-1])
        figures["scripts"][script.stem] = {"import_s": cpu - floor, "imports": modules, "heavy": heavy}
        print(f"  {script.name:34s} {cpu - floor:6.2f}  {'+'.join(heavy) or 'no torch, no transformers'}")
    tables = ["mmke.light_stages", "mmke.tables", "matplotlib.pyplot"]
    cpu, _, out = median_cost(import_probe(tables), args.repeats)
    figures["tables_s"] = cpu - floor
    heavy = json.loads(out.strip().splitlines()[-1])
    print(f"  {'+ tables, plots (summary/plot run)':34s} {cpu - floor:6.2f}  "
          f"{'+'.join(heavy) or 'no torch, no transformers'}: pandas, matplotlib")
    staged = ["mmke.stages"]
    base, _, _ = median_cost(import_probe(staged), args.repeats)
    with_models, _, _ = median_cost(import_probe(staged + list(MODEL_CLASSES)), args.repeats)
    figures["model_classes_s"] = with_models - base
    print(f"  {'+ model classes (load_model)':34s} {with_models - base:6.2f}  {', '.join(MODEL_CLASSES)}")
    snakemake = snakemake_command()
    if snakemake is None:
        print("snakemake not found beside this interpreter or on PATH: no rerun figures")
    else:
        figures.update(rerun_costs(snakemake, args.workdir, args.repeats))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def snakemake_command() -> str | None:
    """The Snakemake installed with the interpreter running this (a venv's, whether or not the venv
    is on PATH, as with ``.venv/bin/python benchmarks/job_overhead.py``), else PATH's."""
    beside = Path(sys.executable).with_name("snakemake")
    return str(beside) if beside.is_file() else shutil.which("snakemake")


def rerun_costs(snakemake: str, workdir: Path, repeats: int) -> dict:
    """``snakemake -n`` in ``workdir`` and, when every output is up to date, a no-op ``--cores 1`` run."""
    figures: dict = {}
    cpu, wall, out = median_cost([snakemake, "-n"], repeats, cwd=workdir)
    up_to_date = "Nothing to be done" in out
    print(f"Snakemake in {workdir} ({'every output up to date' if up_to_date else 'jobs to run: not a no-op'})")
    figures["snakemake -n"] = {"cpu_s": cpu, "wall_s": wall, "up_to_date": up_to_date}
    print(f"  {'snakemake -n':34s} {cpu:6.2f} CPU s  {wall:6.2f} s wall")
    if up_to_date:  # only then does a real run do nothing but check
        cpu, wall, _ = median_cost([snakemake, "--cores", "1"], repeats, cwd=workdir)
        figures["snakemake --cores 1"] = {"cpu_s": cpu, "wall_s": wall}
        print(f"  {'snakemake --cores 1 (no-op rerun)':34s} {cpu:6.2f} CPU s  {wall:6.2f} s wall")
    return figures


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO / "src"))
    main()
