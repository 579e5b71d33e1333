"""Edits per second of FT-L and IKE on the tiny BLIP-2 (the demo's model and hparams).

Times ``Editor.apply`` (+ revert) only, the figure the evaluate stage reports as ``edits_per_s``:
for FT-L that is ``num_steps`` forward/backward passes, for IKE one query embedding and the top-k
search. Model building, embedding the training set and measuring are excluded.

    PYTHONPATH=src python benchmarks/edit_speed.py [--records 24] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mmke.data.demo import write_demo_dataset
from mmke.data.records import ImageRoots, load_records
from mmke.hparams import read_hparams
from mmke.methods.base import make_editor
from mmke.models import load_model
from mmke.models.tiny import build_tiny_blip2
from mmke.stages import embed_stage

REPO = Path(__file__).resolve().parents[1]


def edits_per_second(editor, adapter, records) -> float:
    editor.apply(adapter, records[:1]).revert()  # warm-up: first-call allocations, lazy imports
    start = time.perf_counter()
    for record in records:
        editor.apply(adapter, [record]).revert()
    return len(records) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_demo_dataset(tmp / "data", "evqa", n_train=24, n_eval=args.records, seed=0)
        roots = ImageRoots(paths["images"])
        records = load_records("evqa", paths["eval"], roots)
        adapter = load_model("blip2", build_tiny_blip2(tmp / "model"), device=args.device, image_size=32)
        embed_stage({"kind": "evqa", "train": paths["train"], "image_root": paths["images"]}, "all-MiniLM-L6-v2",
                    tmp / "e.safetensors", tmp / "s.json", device=args.device)
        print(f"tiny BLIP-2, {len(records)} E-VQA demo records, device {args.device}, {args.threads} thread(s)")
        for method in ("FT-L", "IKE"):
            hparams = read_hparams(REPO / f"config/hparams/{method}/tiny-blip2.yaml")
            editor = make_editor(hparams)
            editor.prepare({"embeddings": tmp / "e.safetensors", "sentences": tmp / "s.json"})
            editor.bind_images(roots)
            detail = {k: v for k, v in vars(hparams).items() if k not in ("method", "model")}
            print(f"{method:5s} {edits_per_second(editor, adapter, records):8.2f} edits/s  {detail}")


if __name__ == "__main__":
    main()
