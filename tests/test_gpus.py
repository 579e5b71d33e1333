"""Concurrent jobs claim distinct GPUs through file locks, released when the holder goes away."""

import subprocess
import sys

import pytest

from mmke.gpus import claim_gpu, release_all


def test_claims_are_distinct_and_released(tmp_path):
    try:
        assert [claim_gpu(2, tmp_path), claim_gpu(2, tmp_path)] == [0, 1]
        with pytest.raises(TimeoutError, match="all 2 GPUs stay claimed"):
            claim_gpu(2, tmp_path, poll_s=0.01, timeout_s=0.05)
    finally:
        release_all()
    assert claim_gpu(2, tmp_path) == 0
    release_all()


def test_another_process_skips_a_held_gpu(tmp_path):
    try:
        assert claim_gpu(3, tmp_path) == 0
        code = f"from mmke.gpus import claim_gpu; print(claim_gpu(3, {str(tmp_path)!r}))"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert other.stdout.strip() == "1"
    finally:
        release_all()


def test_zero_gpus_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="count=0"):
        claim_gpu(0, tmp_path)
