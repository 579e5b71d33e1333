"""Stage: assemble BLIP-2 / MiniGPT-4 from LAVIS checkpoints into a transformers directory."""

import torch

from mmke.io import redirect_output
from mmke.models.convert import convert_lavis

with redirect_output(snakemake.log[0]):
    convert_lavis(
        snakemake.output[0],
        **dict(snakemake.input.items()),
        vision_config=snakemake.params.vision_config,
        qformer_config=snakemake.params.qformer_config,
        dtype=getattr(torch, snakemake.params.dtype),
    )
