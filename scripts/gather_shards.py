"""Stage: merge the shard results of one combo into its metrics.json and records.jsonl."""

from mmke.io import redirect_output
from mmke.light_stages import gather_stage

with redirect_output(snakemake.log[0]):
    gather_stage(snakemake.input.metrics, snakemake.input.records, snakemake.output.metrics, snakemake.output.records)
