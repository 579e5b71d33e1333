"""Jobs that only read and write files start without torch or transformers (issue 12, item 8).

Each script runs for real in a fresh interpreter, as Snakemake's ``script:`` runs it, with a
stand-in ``snakemake`` object; the interpreter then reports which heavy packages it loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmke.io import read_json, write_json
from mmke.metric_keys import DEFINITION_METRICS, SUMMARY_METRICS

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "sentence_transformers", "safetensors")

# Runs scripts/<name>.py with a `snakemake` object built from a JSON spec, then prints the heavy
# top-level packages in sys.modules. Named inputs/outputs are attributes; every path is an item.
DRIVER = """
import json, runpy, sys
from types import SimpleNamespace

class Files(list):
    def __init__(self, spec):
        items = list(spec.get("items", []))
        for value in spec.get("named", {}).values():
            items += value if isinstance(value, list) else [value]
        super().__init__(items)
        self.__dict__.update(spec.get("named", {}))

script, spec = sys.argv[1], json.loads(sys.argv[2])
snakemake = SimpleNamespace(input=Files(spec["input"]), output=Files(spec["output"]), log=[spec["log"]],
                            params=SimpleNamespace(**spec.get("params", {})), threads=1,
                            wildcards=SimpleNamespace(**spec.get("wildcards", {})), config={})
runpy.run_path(script, init_globals={"snakemake": snakemake}, run_name="__main__")
heavy = sys.argv[3].split(",")
print(json.dumps(sorted(name for name in heavy if name in sys.modules)))
"""


def run_script(name: str, spec: dict) -> list[str]:
    """Run ``scripts/<name>.py`` in a fresh interpreter; the heavy packages it imported."""
    done = subprocess.run([sys.executable, "-c", DRIVER, str(REPO / "scripts" / f"{name}.py"), json.dumps(spec),
                           ",".join(HEAVY)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def metrics(method: str, dataset: str, value: float) -> dict:
    summary = {key: value for key in SUMMARY_METRICS + DEFINITION_METRICS} | {"pre": 1.0}
    return {"method": method, "model": "m", "dataset": dataset, "n": 2, "summary": summary,
            "protocol": {"exact_match": True, "mloc_template": "trainer"}}


def test_summary_and_plot_jobs_import_neither_torch_nor_transformers(tmp_path):
    inputs = []
    for method, value in (("base", 0.25), ("FT-L", 0.75)):
        inputs.append(str(tmp_path / f"{method}.json"))
        write_json(inputs[-1], metrics(method, "evqa", value))
    tables = {key: str(tmp_path / f"summary.{key}") for key in ("csv", "md", "long", "tex")}
    loaded = run_script("summary", {"input": {"items": inputs}, "output": {"named": tables},
                                    "log": str(tmp_path / "summary.log"),
                                    "params": {"method_order": ["base", "FT-L"], "model_order": ["m"],
                                               "dataset_order": ["evqa"]}})
    assert loaded == []
    assert "0.75" in Path(tables["csv"]).read_text()  # the job ran, not just its imports
    plot = tmp_path / "evqa.png"
    loaded = run_script("plot", {"input": {"items": [tables["csv"]]}, "output": {"items": [str(plot)]},
                                 "log": str(tmp_path / "plot.log"), "params": {"model_order": ["m"]},
                                 "wildcards": {"dataset": "evqa"}})
    assert loaded == []
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_gather_job_imports_neither_torch_nor_transformers(tmp_path):
    shards = {"metrics": [], "records": []}
    for index, value in enumerate((0.0, 1.0)):
        report = metrics("FT-L", "evqa", value) | {"n": 1, "hparams": {}, "hparams_digest": "d", "timings": {}}
        row = {"id": index, "pre": {}, "post": {key: value for key in SUMMARY_METRICS + DEFINITION_METRICS},
               "knows_pred": 1.0}
        shards["metrics"].append(str(tmp_path / f"{index}.json"))
        shards["records"].append(str(tmp_path / f"{index}.jsonl"))
        write_json(shards["metrics"][-1], report)
        Path(shards["records"][-1]).write_text(json.dumps(row) + "\n")
    out = {"metrics": str(tmp_path / "metrics.json"), "records": str(tmp_path / "records.jsonl")}
    loaded = run_script("gather_shards", {"input": {"named": shards}, "output": {"named": out},
                                          "log": str(tmp_path / "gather.log")})
    assert loaded == []
    assert read_json(out["metrics"])["summary"]["rewrite_acc"] == 0.5


@pytest.mark.parametrize("module", ["mmke.light_stages", "mmke.download", "mmke.data.demo", "mmke.tables",
                                    "mmke.shards", "mmke.metric_keys"])
def test_file_only_modules_import_neither_torch_nor_transformers(module):
    """What the download, extract, demo-dataset, summary, plot and gather scripts import."""
    code = f"import sys, {module}; print([m for m in {list(HEAVY)!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
