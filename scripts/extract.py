"""Stage: unpack a downloaded archive once into its folder."""

from mmke.download import extract_archive
from mmke.io import redirect_output

with redirect_output(snakemake.log[0]):
    extract_archive(snakemake.input[0], snakemake.output[0])
