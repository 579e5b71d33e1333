"""Stage: pretrain SERAC's tiny counterfactual LM to answer from the edit in its context."""

import torch

from mmke.io import redirect_output
from mmke.stages import pretrain_counterfactual_stage

with redirect_output(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    pretrain_counterfactual_stage(
        init_dir=snakemake.input.init,
        datasets=snakemake.params.datasets,
        protocol=snakemake.params.protocol,
        settings=snakemake.params.settings,
        out_dir=snakemake.output.model,
        report_out=snakemake.output.report,
        device=snakemake.params.device,
    )
