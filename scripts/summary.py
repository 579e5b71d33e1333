"""Stage: merge every combo's metrics.json into summary.csv and summary.md."""

from mmke.io import redirect_output
from mmke.stages import summary_stage

with redirect_output(snakemake.log[0]):
    summary_stage(snakemake.input, snakemake.output.csv, snakemake.output.md, snakemake.params.method_order)
