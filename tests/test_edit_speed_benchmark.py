"""benchmarks/edit_speed.py on a tiny model: the loop beside its passes, the images, the optimiser steps and the
rest."""

from __future__ import annotations

import importlib
import json

import pytest
import yaml
from test_scale_benchmark import REPO, run_benchmark


@pytest.mark.parametrize("store", [False, True])
def test_edit_speed_reports_the_loop_beside_the_passes_it_cannot_avoid(store, tmp_path, tiny_blip2_dir, demo_evqa):
    # a dataset name without demo resources: MEND runs an untrained network, which costs the same passes
    config = {"protocol": {"exact_match": True}, "methods": ["base", "FT-L", "MEND"],
              "evaluation": {"store_image_features": store},
              "datasets": {"speed-evqa": {"kind": "evqa", "train": str(demo_evqa["train"]),
                                          "eval": str(demo_evqa["eval"]), "image_root": str(demo_evqa["images"])}},
              "models": {"tiny-blip2": {"family": "blip2", "path": str(tiny_blip2_dir), "image_size": 32}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "speed.json"
    done = run_benchmark("edit_speed.py", "--config", str(tmp_path / "config.yaml"), "--dataset", "speed-evqa",
                         "--records", "2", "--repeats", "1", "--batch-size", "2", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())["methods"]
    assert set(figures) == {"blip2/base", "blip2/FT-L", "blip2/MEND"}
    num_steps = yaml.safe_load((REPO / "config/hparams/FT-L/tiny-blip2.yaml").read_text())["num_steps"]
    # per edit: base shares one forward between the 2 records; FT-L trains num_steps times and
    # measures once; MEND takes both records' gradients in one pass, measures each once, and runs
    # its network. The images of both records are encoded in one call (in every method here);
    # with the baseline's features stored, no method here runs the image encoder
    encoder = 0 if store else 0.5
    assert figures["blip2/base"]["passes"] == {"forward": 0.5, "backward": 0, "image_encoder": encoder, "side": 0,
                                               "layer_forward": 0.5, "layer_backward": 0}
    assert figures["blip2/FT-L"]["passes"]["image_encoder"] == encoder
    assert figures["blip2/FT-L"]["passes"]["forward"] == num_steps + 1
    assert figures["blip2/FT-L"]["passes"]["backward"] == num_steps
    # in the decoder's work: FT-L trains the last of the 2 layers, so after the first step the lower
    # layer's kept output stands in and each step computes, and backpropagates through, half a pass
    assert figures["blip2/FT-L"]["passes"]["layer_forward"] == 1 + (num_steps - 1) / 2 + 1
    assert figures["blip2/FT-L"]["passes"]["layer_backward"] == num_steps / 2
    assert figures["blip2/MEND"]["passes"]["forward"] == 1.5 and figures["blip2/MEND"]["passes"]["backward"] == 0.5
    assert figures["blip2/MEND"]["passes"]["side"] > 0
    for name, figure in figures.items():
        assert figure["ratio"] == pytest.approx(figure["ms_per_edit"] / figure["limit_ms"]), name
        assert figure["image_load_ms"] > 0
        assert figure["rest_ms"] == pytest.approx(figure["ms_per_edit"] - figure["limit_ms"] - figure["image_load_ms"]
                                                  - figure["optimiser_ms"])
    # FT-L's AdamW steps are timed apart from the rest; base and MEND step no optimiser
    assert figures["blip2/FT-L"]["optimiser_ms"] > 0
    assert figures["blip2/base"]["optimiser_ms"] == figures["blip2/MEND"]["optimiser_ms"] == 0
    assert figures["blip2/MEND"]["easyedit_passes"] == 12  # 5 pre + 5 post forwards + 1 fwd+bwd
    assert figures["blip2/FT-L"]["easyedit_passes"] == 7 + 2 * num_steps  # VLKEB's FT at the same steps
    assert "images" in done.stdout and "EasyEdit" in done.stdout


def test_the_figures_are_the_pair_of_loop_and_limit_with_the_median_ratio(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    passes = importlib.import_module("passes")
    run = passes.Counted({"forward": 1.0}, side_ms=0.0, optimiser_ms=0.0, trained=set())
    calls = []  # in the order the benchmark times them: limit, loop, limit, loop, ...

    def timed(repeats: int) -> tuple[float, float, float]:
        # per edit (2 records) the loops are 10, 40, 20, 30 ms beside limits of 10, 10, 40, 20: ratios 1, 4, 0.5, 1.5
        limits, loops = iter([10.0, 10.0, 40.0, 20.0]), iter([20.0, 80.0, 40.0, 60.0])
        monkeypatch.setattr(passes, "limit_ms", lambda *args: calls.append("limit") or next(limits))
        monkeypatch.setattr(passes, "cpu_ms", lambda fn, repeats: calls.append("loop") or next(loops))
        counted, *figures = passes.loop_beside_limit(None, None, ["a", "b"], None, None, None, repeats)
        assert counted is run
        return tuple(figures)

    monkeypatch.setattr(passes, "count_passes", lambda *args, **kwargs: run)
    # of ratios 1, 4, 0.5 the median pair is the first; the medians of loops and limits apart (20, 10) would say 2
    assert timed(3) == (10.0, 10.0, 1.0)
    assert calls == ["limit", "loop"] * 3
    # of ratios 1, 4, 0.5, 1.5 the lower middle pair (1), not the upper (1.5): still a pair timed together
    assert timed(4) == (10.0, 10.0, 1.0)
