"""Stage: write a synthetic E-VQA/E-IC dataset (train/eval JSON + images)."""

from pathlib import Path

from mmke.data.demo import write_demo_dataset
from mmke.io import redirect_output

with redirect_output(snakemake.log[0]):
    write_demo_dataset(Path(snakemake.output.train).parent, snakemake.params.kind, **snakemake.params.demo)
