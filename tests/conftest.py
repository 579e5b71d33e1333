"""Shared fixtures: one tiny BLIP-2 and one small demo E-VQA set per test session; one tiny model of
each family per test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmke.data.demo import write_demo_dataset
from mmke.data.records import ImageRoots, load_records
from mmke.evaluate import Protocol, run_baseline
from mmke.models import load_model
from mmke.models.tiny import build_tiny_blip2, build_tiny_llava, build_tiny_minigpt4, build_tiny_qwen2vl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_blip2_dir(tmp_path_factory) -> Path:
    return build_tiny_blip2(tmp_path_factory.mktemp("tiny") / "tiny-blip2", seed=0, image_size=32)


@pytest.fixture(scope="session")
def demo_evqa(tmp_path_factory) -> dict[str, Path]:
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "evqa", "evqa", n_train=8, n_eval=4, seed=0)


@pytest.fixture(scope="session")
def roots(demo_evqa) -> ImageRoots:
    return ImageRoots(demo_evqa["images"])


@pytest.fixture(scope="session")
def eval_records(demo_evqa, roots):
    return load_records("evqa", demo_evqa["eval"], roots)


@pytest.fixture
def adapter(tiny_blip2_dir):
    """A fresh model per test: edits of one test never leak into another."""
    return load_model("blip2", tiny_blip2_dir, image_size=32)


@pytest.fixture(scope="session")
def baseline(tiny_blip2_dir, eval_records, roots):
    return run_baseline(load_model("blip2", tiny_blip2_dir, image_size=32), eval_records, roots, Protocol())


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """One tiny model of each family (BLIP-2, MiniGPT-4, LLaVA, Qwen2-VL), per test module."""
    root = tmp_path_factory.mktemp("families")
    return {"blip2": build_tiny_blip2(root / "blip2", image_size=32),
            "minigpt4": build_tiny_minigpt4(root / "minigpt4", image_size=32),
            "llava": build_tiny_llava(root / "llava", image_size=32),
            "qwen2vl": build_tiny_qwen2vl(root / "qwen2vl", image_size=32)}


@pytest.fixture
def family_adapters(family_dirs):
    """A fresh adapter per family (no memo carried over from another test)."""
    return {family: (lambda family=family, path=path: load_model(
                family if family in ("blip2", "minigpt4") else "hf_vlm", path,
                image_size=32 if family in ("blip2", "minigpt4") else None))
            for family, path in family_dirs.items()}
