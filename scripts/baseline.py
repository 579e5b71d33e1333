"""Stage: pre-edit outputs of one model on one dataset."""

import torch

from mmke.io import redirect_output
from mmke.stages import baseline_stage

with redirect_output(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    baseline_stage(
        snakemake.params.model,
        snakemake.params.dataset,
        snakemake.params.protocol,
        rows_out=snakemake.output.rows,
        tensors_out=snakemake.output.tensors,
        features_out=snakemake.output.image_features,
        store_image_features=snakemake.params.store_image_features,
        batch_size=snakemake.params.batch_size,
        batch_tokens=snakemake.params.batch_tokens,
        device=snakemake.params.device,
    )
