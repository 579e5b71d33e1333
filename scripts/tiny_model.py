"""Stage: build a tiny randomly initialised model of a family as an ordinary HF directory."""

from mmke.io import redirect_output
from mmke.models.tiny import build_tiny

with redirect_output(snakemake.log[0]):
    build_tiny(snakemake.params.family, snakemake.output[0], **snakemake.params.tiny)
