"""Stage: edit + measure one method x model x dataset combo."""

import torch

from mmke.io import redirect_output
from mmke.stages import evaluate_stage

with redirect_output(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    evaluate_stage(
        names=dict(snakemake.wildcards),
        model=snakemake.params.model,
        dataset=snakemake.params.dataset,
        protocol=snakemake.params.protocol,
        hparams_path=snakemake.input.hparams,
        baseline_rows=snakemake.input.baseline_rows,
        baseline_tensors=snakemake.input.baseline_tensors,
        image_features=snakemake.input.image_features,
        metrics_out=snakemake.output.metrics,
        records_out=snakemake.output.records,
        resources={name: snakemake.input[name] for name in snakemake.params.resources},
        evaluation=snakemake.params.evaluation,
        device=snakemake.params.device,
        shard=snakemake.params.shard,
    )
