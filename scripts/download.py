"""Stage: fetch one dataset/checkpoint download of the config, verified against the checksum manifest.

The manifest is read from the config here rather than passed as a param: a params change would
rerun (and so re-download) every job when one checksum is pinned.
"""

from mmke.io import redirect_output
from mmke.light_stages import download_stage

with redirect_output(snakemake.log[0]):
    download_stage(snakemake.params.name, snakemake.params.entry, snakemake.config.get("checksums", {}),
                   retries=snakemake.config.get("download_retries", 3))
