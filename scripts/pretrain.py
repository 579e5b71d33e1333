"""Stage: meta-train MEND / SERAC / KE on a dataset's train split -> checkpoint + report."""

import torch

from mmke.io import redirect_output
from mmke.stages import pretrain_stage

with redirect_output(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    pretrain_stage(
        method=snakemake.wildcards.method,
        model=snakemake.params.model,
        dataset=snakemake.params.dataset,
        protocol=snakemake.params.protocol,
        hparams_path=snakemake.input.hparams,
        checkpoint_out=snakemake.output.checkpoint,
        report_out=snakemake.output.report,
        state_dir=snakemake.params.state_dir,
        device=snakemake.params.device,
    )
