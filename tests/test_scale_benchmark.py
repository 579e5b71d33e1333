"""benchmarks/scale.py in its small mode: the paper-size benchmark's code path on tiny shapes."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import OPTConfig, OPTForCausalLM

from mmke.methods.base import METHODS, get_method

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, **environ: str) -> subprocess.CompletedProcess:
    """``benchmarks/<script>`` in a fresh interpreter with this checkout's mmke, one torch thread
    (``environ``: further environment variables, e.g. another ``PATH``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path]), "OMP_NUM_THREADS": "1",
           **environ}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True,
                          env=env, check=False)


def test_scale_benchmark_runs_every_method_with_paper_hparams_on_both_models(tmp_path):
    out = tmp_path / "scale.json"
    done = run_benchmark("scale.py", "--small", "--device", "cpu", "--edits", "1", "--steps", "2",
                         "--models", "blip2-opt-2.7b", "minigpt4-vicuna-7b", "--tensor-memory", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    get_method("base")  # imports the built-in methods
    for model in ("blip2-opt-2.7b", "minigpt4-vicuna-7b"):
        expected = {m for m in METHODS if (REPO / "config" / "hparams" / m / f"{model}.yaml").exists()}
        rows = report["models"][model]["methods"]
        assert set(rows) == expected
        # the tensors live once the model is built: its bf16 weights (and a few bytes of integer buffers)
        weights = report["models"][model]["parameters"] * 2
        assert weights <= report["models"][model]["model_allocated_gib"] * 2**30 < weights * 1.01
        for method, row in rows.items():
            assert "error" not in row, (model, method, row)
            assert row["edits"] == 1 and row["s_per_edit"] > 0 and row["peak_gib"] > 0
            assert row["allocated_gib"] >= report["models"][model]["model_allocated_gib"]
        # FT-style step counts are capped and say so; meta networks are reported untrained
        num_steps = yaml.safe_load((REPO / "config/hparams/FT-L" / f"{model}.yaml").read_text())["num_steps"]
        assert rows["FT-L"]["notes"] == [f"num_steps {num_steps} -> 2"]
        assert rows["MEND"]["notes"] == ["untrained network"]
    assert "s/edit" in done.stdout and "peak GiB" in done.stdout and "allocated" in done.stdout


def test_scale_benchmark_holds_the_language_model_in_int8_but_what_the_methods_name(tmp_path):
    out = tmp_path / "scale.json"
    done = run_benchmark("scale.py", "--small", "--device", "cpu", "--edits", "1", "--steps", "2", "--quantize", "int8",
                         "--models", "minigpt4-vicuna-7b", "--methods", "base", "FT-L", "FT-V", "MEND", "--tensor-memory",
                         "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())["models"]["minigpt4-vicuna-7b"]
    quantized = report["quantized"]
    # FT-V's qformer is no part of the language model, which alone goes int8: nothing to keep there
    assert quantized["weights"] == "int8" and quantized["keep"] == ["llm.mlp.last1", "llm.mlp.last3"]
    assert quantized["layers"] > 0 and quantized["bytes_after"] < 0.6 * quantized["bytes_before"]  # from bf16
    # the live tensors shrink by exactly what quantising saved: the bf16 weights are freed
    saved = (report["model_allocated_gib"] - report["quantized_allocated_gib"]) * 2**30
    assert saved == pytest.approx(quantized["bytes_before"] - quantized["bytes_after"], abs=64)
    for method, row in report["methods"].items():
        assert "error" not in row, (method, row)
        assert row["allocated_gib"] >= report["quantized_allocated_gib"]
    assert "int8: " in done.stdout and "(kept: llm.mlp.last1, llm.mlp.last3)" in done.stdout


def test_scale_benchmark_refuses_an_unknown_method():
    done = run_benchmark("scale.py", "--small", "--methods", "NOPE")
    assert done.returncode == 2 and "unknown method(s) ['NOPE']" in done.stderr


@pytest.mark.parametrize("stored", [False, True])
def test_scale_benchmark_counts_and_times_the_passes_each_method_cannot_avoid(stored, tmp_path):
    out = tmp_path / "scale.json"
    done = run_benchmark("scale.py", "--small", "--device", "cpu", "--edits", "2", "--steps", "3",
                         "--models", "blip2-opt-2.7b", "--methods", "base", "FT-L", "FT-V", "MEND", "--limit",
                         "--json", str(out), *(["--stored-features"] if stored else []))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())["models"]["blip2-opt-2.7b"]
    rows = report["methods"]
    # stored features: FT-V, which recomputes them, runs first; then the image path's weights go
    assert (list(rows)[0], report.get("released_gib", 0) > 0) == (("FT-V", True) if stored else ("base", False))
    # the baseline's features stand in for the image encoder, except for FT-V, which trains the Q-Former;
    # without them both records' images are encoded in one call
    encoder = [rows[m]["passes"]["image_encoder"] for m in ("base", "FT-L", "MEND")]
    assert encoder == ([0, 0, 0] if stored else [0.5, 0.5, 0.5])
    # FT-V trains the Q-Former: its frozen vision tower runs once for the 3 steps, once for the measurement
    assert rows["FT-V"]["passes"]["image_encoder"] == 2
    del rows["FT-V"]
    # per edit: base one shared forward of both records' items; FT-L 3 steps + its measurement; MEND
    # both records' gradients in one pass + its measurement
    assert rows["base"]["passes"]["forward"] == 0.5 and rows["base"]["passes"]["backward"] == 0
    assert rows["FT-L"]["passes"]["forward"] == 4 and rows["FT-L"]["passes"]["backward"] == 3
    # in the decoder's work: FT-L tunes layer 31 of the paper's 32 (kept at test width), so its
    # later steps compute, and backpropagate through, that layer alone
    assert rows["FT-L"]["passes"]["layer_forward"] == 1 + 2 / 32 + 1
    assert rows["FT-L"]["passes"]["layer_backward"] == 3 / 32
    assert rows["FT-L"]["easyedit_passes"] == 7 + 2 * 3  # VLKEB's FT at the same 3 steps
    assert rows["MEND"]["easyedit_passes"] == 12 and "EasyEdit path" in done.stdout
    assert rows["MEND"]["passes"]["forward"] == 1.5 and rows["MEND"]["passes"]["backward"] == 0.5
    assert rows["MEND"]["passes"]["side"] > 0  # its editor network ran
    for row in rows.values():
        assert row["allocated_gib"] is None  # live tensors are counted with --tensor-memory only
        assert row["limit_cpu_s_per_edit"] > 0 and row["ratio"] == row["cpu_s_per_edit"] / row["limit_cpu_s_per_edit"]
    # only FT steps an optimiser (its AdamW): MEND's change comes from its network, base makes none
    assert rows["FT-L"]["optimiser_cpu_s_per_edit"] > 0
    assert rows["base"]["optimiser_cpu_s_per_edit"] == rows["MEND"]["optimiser_cpu_s_per_edit"] == 0
    refused = run_benchmark("scale.py", "--device", "cuda", "--limit")
    assert refused.returncode == 2 and "--limit times passes in process CPU time" in refused.stderr


def test_scale_benchmark_maps_the_weights_from_a_file_and_counts_the_same_bytes(tmp_path):
    # --mmap-weights lets SERAC's second 7B model run beside MiniGPT-4 on a small machine: the
    # edited model's weights lie in a file mapping, and the live-tensor count must not change
    figures = {}
    for mapped in (False, True):
        out = tmp_path / f"scale-{mapped}.json"
        done = run_benchmark("scale.py", "--small", "--device", "cpu", "--edits", "1", "--models", "minigpt4-vicuna-7b",
                             "--methods", "base", "FT-L", "SERAC", "--steps", "2", "--tensor-memory",
                             "--stored-features", "--json", str(out), *(["--mmap-weights"] if mapped else []))
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(out.read_text())["models"]["minigpt4-vicuna-7b"]
        figures[mapped] = (report["model_allocated_gib"], report["released_gib"],
                           {method: row["allocated_gib"] for method, row in report["methods"].items()})
    assert figures[True] == figures[False]
    assert set(figures[True][2]) == {"base", "FT-L", "SERAC"} and figures[True][2]["SERAC"] > figures[True][2]["base"]
    refused = run_benchmark("scale.py", "--device", "cuda", "--mmap-weights")
    assert refused.returncode == 2 and "--mmap-weights maps the weights into CPU memory" in refused.stderr


def test_memory_mapped_weights_hold_the_same_values_in_a_file_mapping(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # scale.py and the neighbours it imports
    scale = importlib.import_module("scale")
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                     num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    scale.memory_mapped(model, tmp_path / "weights.pt")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    # the values live in the file now, unlinked once mapped: every parameter lies inside the
    # process' mapping of it, and no file is left on disk
    ranges = [tuple(int(bound, 16) for bound in line.split()[0].split("-"))
              for line in Path("/proc/self/maps").read_text().splitlines()
              if line.endswith(f"{tmp_path / 'weights.pt'} (deleted)")]
    assert ranges and all(any(low <= p.data_ptr() < high for low, high in ranges) for p in model.parameters())
    assert not (tmp_path / "weights.pt").exists()
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight  # OPT's tied output layer stays tied
