"""Stage: pretrain a tiny model on the world and/or datasets' train splits; record held-out accuracy."""

import torch

from mmke.io import redirect_output
from mmke.stages import pretrain_base_stage

with redirect_output(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    pretrain_base_stage(
        model=snakemake.params.model,
        init_dir=snakemake.input.init,
        datasets=snakemake.params.datasets,
        protocol=snakemake.params.protocol,
        settings=snakemake.params.settings,
        out_dir=snakemake.output.model,
        report_out=snakemake.output.report,
        device=snakemake.params.device,
    )
