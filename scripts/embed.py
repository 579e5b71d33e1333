"""Stage: embed a training set's IKE sentences with a sentence model."""

import torch

from mmke.io import redirect_output
from mmke.stages import embed_stage

with redirect_output(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    embed_stage(
        snakemake.params.dataset,
        snakemake.params.sentence_model,
        tensors_out=snakemake.output.embeddings,
        sentences_out=snakemake.output.sentences,
        queries_out=snakemake.output.queries,
        query_sentences_out=snakemake.output.query_sentences,
        device=snakemake.params.device,
    )
