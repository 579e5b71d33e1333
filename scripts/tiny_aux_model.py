"""Stage: build a tiny SERAC auxiliary model (counterfactual LM or scope classifier)."""

from mmke.io import redirect_output
from mmke.models.tiny_aux import build_tiny_aux

with redirect_output(snakemake.log[0]):
    build_tiny_aux(snakemake.wildcards.kind, snakemake.output[0])
