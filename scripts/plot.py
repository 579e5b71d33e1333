"""Stage: one plot per dataset comparing the methods (from the summary CSV)."""

from mmke.io import redirect_output
from mmke.light_stages import plot_stage

with redirect_output(snakemake.log[0]):
    plot_stage(snakemake.input[0], snakemake.wildcards.dataset, snakemake.output[0], snakemake.params.model_order)
