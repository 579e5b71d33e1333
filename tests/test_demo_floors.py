"""The demo, run as `make demo` runs it, edits with every method: the floors of the README's table.

One run of the unchanged demo configuration (config/config.yaml) in a private copy of the
workflow, then the figures every row must reach. They cover E-VQA and E-IC on the tiny BLIP-2
and E-VQA on the tiny MiniGPT-4 and LLaVA (the demo runs those on E-VQA only). Every training
stage's report must give its steps and its held-out accuracy. This is the slowest test (the whole
demo DAG, several minutes on 2 cores); CI runs it.

The figures are a function of config, seed and code on one machine, but not across machines: the
CPU's kernels and the libraries' versions round differently, and thousands of pretraining steps
carry that into different world models (docs/machines.md). Four machines were seen (an AVX2 one,
the README's; an AVX-512 Intel Xeon; an AVX2 AMD EPYC; an AVX-512 AMD EPYC, whose figures are the
first's, figure for figure). The floor of an edit's figure
lies at least two records (1/24 each) under the first's and the third's figures, whose tables were
kept, and under the second's where it was recorded (its failures of earlier, higher floors; all its
other figures met those floors): MEND's E-IC Rel. 83.3, 79.2, 70.8 and its T-Gen. 79.2, -, 66.7;
GRACE's E-IC Rel. 87.5, 79.2, 75.0; WISE's M-Loc. on MiniGPT-4 84.2, -, 76.2; WISE's sequential
Rel. 95.8, -, 87.5 and T-Loc. 100, 87.5, 100. The captions of E-IC move most: a caption is a whole
sentence to match, where an E-VQA answer is a word or two (every editor's E-VQA Rel. but KE's was
at least 91.7 on the first and the third machine), so their floors are lower.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workflow_copy import copy_workflow, snakemake_env

REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "config/config.yaml").read_text())
COVERED = [("tiny-blip2", "demo-evqa"), ("tiny-blip2", "demo-eic"), ("tiny-minigpt4", "demo-evqa"),
           ("tiny-llava", "demo-evqa")]
EDITORS = ("FT-L", "FT-V", "MEND", "SERAC", "IKE")
#: Rel. and T-Gen. floors by dataset (Rel. for the lifelong editors too; the docstring says why E-IC's are lower)
REL_FLOOR = {"demo-evqa": 0.75, "demo-eic": 0.6}
GEN_FLOOR = {"demo-evqa": 0.6, "demo-eic": 0.5}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = copy_workflow(tmp_path_factory.mktemp("demo"))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--directory", str(root)], cwd=root,
                          env=snakemake_env(), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise AssertionError(f"the demo DAG failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return root


@pytest.fixture(scope="module")
def table(demo) -> dict[tuple[str, str, str], dict[str, float]]:
    rows = csv.DictReader((demo / "results/tables/summary.csv").open())
    # a dataset without portability questions leaves the Port. cells empty
    return {(r["method"], r["model"], r["dataset"]): {k: float(v or "nan") for k, v in r.items()
                                                      if k not in ("method", "model", "dataset", "schedule")}
            for r in rows if r.get("schedule", "single") == "single"}


@pytest.mark.parametrize("model,dataset", COVERED)
def test_base_row_knows_its_facts_and_does_not_know_the_edits(table, model, dataset):
    row = table[("base", model, dataset)]
    assert row["pre"] >= 0.9
    assert max(row["rewrite_acc"], row["rephrase_acc"], row["image_rephrase_acc"]) <= 0.05
    assert row["locality_acc"] == row["multimodal_locality_acc"] == 1.0


@pytest.mark.parametrize("model,dataset", COVERED)
@pytest.mark.parametrize("method", EDITORS)
def test_every_editor_edits(table, method, model, dataset):
    row = table[(method, model, dataset)]
    assert row["rewrite_acc"] >= REL_FLOOR[dataset], row
    assert row["rephrase_acc"] >= GEN_FLOOR[dataset], row


@pytest.mark.parametrize("model,dataset", COVERED)
def test_ke_edits_nearly_half_and_serac_keeps_locality(table, model, dataset):
    assert table[("KE", model, dataset)]["rewrite_acc"] >= 0.45  # E-IC: 54.2, 62.5, 54.2
    assert table[("SERAC", model, dataset)]["locality_acc"] >= 0.95


def test_every_training_report_gives_steps_and_heldout_accuracy(demo):
    for model, spec in DEMO["models"].items():
        report = json.loads((demo / f"resources/world/{model}.pretrain.json").read_text())
        assert report["steps"] == spec["pretrain"]["steps"]  # the budget is steps, never time
        assert report["before"]["world"]["all"] <= 0.1  # the random init knows nothing
        heldout = report["heldout"]["world"]
        plain = [kind for kind in heldout if ":" not in kind and kind != "all"]
        # the weakest fact of a tiny model that also learns contexts: MiniGPT-4's shapes, 0.73
        assert min(heldout[kind] for kind in plain) >= 0.7, heldout
        edits = [kind for kind in heldout if kind.endswith(":edit")]
        assert min(heldout[kind] for kind in edits) >= 0.8, heldout  # a relevant new fact wins
    counterfactual = json.loads((demo / "resources/world/counterfactual.pretrain.json").read_text())
    assert counterfactual["steps"] == DEMO["counterfactual"]["pretrain"]["steps"]
    assert counterfactual["heldout"]["world"]["all"] >= 0.95
    for train in (demo / "resources/checkpoints").rglob("train.json"):
        report = json.loads(train.read_text())
        history = report["history"]
        assert report["steps"] >= 1 and history[0]["step"] == 0
        best = next(h for h in history if h["step"] == report["best_step"])
        # the meta-loss on held-out train records at least halves and has levelled off by the end:
        # the last value within 5% of the starting loss above the best (a ratio to the best alone
        # fails on noise once the best is near zero: MEND on LLaVA, 0.51 -> 0.0099 -> 0.0154)
        start, lowest = history[0]["val"]["total"], best["val"]["total"]
        assert lowest <= 0.5 * start, train
        assert history[-1]["val"]["total"] <= lowest + 0.05 * start, train
        if report["method"] == "SERAC":  # held-out records routed: prompt/rephrase in, loc/m_loc out
            assert best["val_acc"]["scope_in"] >= 0.9 and best["val_acc"]["scope_out"] >= 0.9, train


LIFELONG = ("LoRA", "GRACE", "WISE")


@pytest.mark.parametrize("model,dataset", COVERED)
@pytest.mark.parametrize("method", LIFELONG)
def test_lifelong_editors_edit_one_at_a_time(table, method, model, dataset):
    row = table[(method, model, dataset)]
    assert row["rewrite_acc"] >= REL_FLOOR[dataset], row
    if method == "GRACE":  # unrelated keys lie outside every radius: the unedited outputs
        assert row["locality_acc"] >= 0.95 and row["multimodal_locality_acc"] >= 0.95, row
    if method == "WISE":  # unrelated questions lie under the router's threshold: the main memory
        assert row["locality_acc"] >= 0.95 and row["multimodal_locality_acc"] >= 0.65, row


@pytest.mark.parametrize("method", ["GRACE", "WISE"])
def test_sequential_table_keeps_lifelong_edits_as_they_accumulate(demo, method):
    """All 24 E-VQA edits of the tiny BLIP-2 in one group, measured after the last one."""
    rows = {r["method"]: r for r in csv.DictReader((demo / "results/sequential/tables/summary.csv").open())}
    assert list(rows) == DEMO["evaluation"]["sequential"]["methods"]
    assert all(r["model"] == "tiny-blip2" and r["dataset"] == "demo-evqa" and r["n"] == "24" for r in rows.values())
    row = rows[method]
    assert float(row["rewrite_acc"]) >= 0.75 and float(row["locality_acc"]) >= 0.75, row
    # tuning shared weights 24 times (FT-L's, KE's and MEND's MLP, LoRA's one adapter) loses more
    # of the earlier edits and of the unrelated answers than GRACE's and WISE's memories do
    for editor in ("FT-L", "KE", "MEND", "LoRA"):
        assert float(rows[editor]["rewrite_acc"]) < float(row["rewrite_acc"]), (editor, rows[editor])
        assert float(rows[editor]["locality_acc"]) < float(row["locality_acc"]), (editor, rows[editor])


def test_every_base_model_knows_the_consequences_of_the_colour(demo):
    """The ties, learnt as text, and the 1-hop question about pictures of held-out scenes."""
    for model in DEMO["models"]:
        heldout = json.loads((demo / f"resources/world/{model}.pretrain.json").read_text())["heldout"]["world"]
        assert heldout["tie"] >= 0.9 and heldout["metal"] >= 0.9, (model, heldout)


def test_a_perfect_colour_edit_carries_its_one_hop_consequence_further_than_the_base(table):
    """FT-V changes what the language model sees, so the metal question about the same picture
    follows (83% of the records in the demo); FT-L's last-layer edit reaches the colour question's
    answer position only, and ports nothing (docs/world.md, "Consequences")."""
    base, edited = table[("base", "tiny-blip2", "demo-vlkeb")], table[("FT-V", "tiny-blip2", "demo-vlkeb")]
    assert base["pre"] >= 0.9 and edited["rewrite_acc"] == 1.0  # a known colour, perfectly edited
    assert edited["portability_acc"] >= base["portability_acc"] + 0.5, (base, edited)
