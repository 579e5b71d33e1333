"""Stage: merge every combo's metrics.json into the summary tables (csv, tidy csv, md, tex)."""

from mmke.io import redirect_output
from mmke.light_stages import summary_stage

with redirect_output(snakemake.log[0]):
    summary_stage(snakemake.input, snakemake.output.csv, snakemake.output.md, snakemake.params.method_order,
                  long_out=snakemake.output.long, tex_out=snakemake.output.tex,
                  model_order=snakemake.params.model_order, dataset_order=snakemake.params.dataset_order)
