"""Meta-training speed and peak memory of MEND, SERAC and KE on the tiny BLIP-2 (CPU by default).

Builds the tiny model, SERAC's tiny auxiliary models and a demo E-VQA training set (24 records)
in a temporary folder, then trains each method in its own process with its demo hparams
(config/hparams/<METHOD>/tiny-blip2.yaml) for ``--steps`` optimiser steps and prints:
optimiser steps per second (one step = ``accumulate_bs`` meta-batches; validation excluded),
the process's peak resident set size (``ru_maxrss``: model + editor + training, per method
because each runs in a fresh process) and, on CUDA, peak allocated GPU memory.

    PYTHONPATH=src python benchmarks/train_speed.py --steps 30 --threads 1
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
METHODS = ("MEND", "SERAC", "KE")


def build(root: Path) -> None:
    from mmke.data.demo import write_demo_dataset
    from mmke.models.tiny import build_tiny_blip2
    from mmke.models.tiny_aux import build_tiny_aux

    build_tiny_blip2(root / "model")
    for kind in ("classifier", "counterfactual"):
        build_tiny_aux(kind, root / kind)
    write_demo_dataset(root / "data", "evqa", n_train=24, n_eval=1, seed=0)


def worker(method: str, root: Path, steps: int, device: str) -> None:
    """Train one method and print its figures as one table row."""
    from mmke import train
    from mmke.data.records import ImageRoots, RecordImages, load_records
    from mmke.hparams import read_hparams
    from mmke.methods.base import make_editor
    from mmke.models.base import load_model

    roots = ImageRoots(root / "data/images")
    records = load_records("evqa", root / "data/train.json", roots)
    model = load_model("blip2", root / "model", device=device)
    overrides = {"max_iters": steps, "val_interval": steps}
    if method == "SERAC":
        overrides |= {"classifier": str(root / "classifier"), "counterfactual": str(root / "counterfactual")}
    hparams = read_hparams(REPO / f"config/hparams/{method}/tiny-blip2.yaml", overrides)
    tick = time.perf_counter()
    result = train.train(make_editor(hparams), model, records, RecordImages(roots), root / f"{method}.safetensors",
                         root / f"{method}.pt", log=lambda _: None)
    wall = time.perf_counter() - tick
    steps_per_s = result.history[-1]["steps_per_s"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")
    print(f"{method:6} {steps_per_s:8.2f} {steps_per_s * hparams.accumulate_bs:15.2f} {rss:11.0f} {cuda:14.1f}"
          f"   wall {wall:.1f}s incl. 2 validations", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.root, args.steps, args.device)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        print(f"device {args.device}, threads {args.threads}, {args.steps} steps, torch {torch.__version__}")
        print(f"{'method':6} {'steps/s':>8} {'meta-batches/s':>15} {'maxrss MiB':>11} {'cuda peak MiB':>14}")
        for method in args.methods:
            subprocess.run([sys.executable, __file__, "--worker", method, "--root", tmp, "--steps", str(args.steps),
                            "--threads", str(args.threads), "--device", args.device], check=True)


if __name__ == "__main__":
    main()
