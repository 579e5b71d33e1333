"""mmke: multimodal knowledge editing (MMEdit semantics) as a library behind a Snakemake workflow."""

__version__ = "0.1.0"
