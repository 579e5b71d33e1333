"""BLIP-2 OPT on transformers' ``Blip2ForConditionalGeneration``, with EasyEdit's text template.

The same code loads a tiny directory from :mod:`mmke.models.tiny` and a real
``Salesforce/blip2-opt-2.7b`` directory: model, tokenizer and image processor all come from the
directory, offline. Sequences are ``[num_query_tokens projected Q-Former outputs][prompt + target]``
as in EasyEdit/LAVIS (spec section 2).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Blip2ForConditionalGeneration

from mmke.models.base import (
    IGNORE_INDEX,
    Batch,
    VLMAdapter,
    check_items,
    decoder_layer_prefixes,
    layer_scopes,
    mlp_scopes,
    output_logits,
    params_under,
    register_model,
)


@register_model("blip2")
class Blip2Adapter(VLMAdapter):
    """BLIP-2 with a decoder-only (OPT) language model; also the base of MiniGPT-4."""

    def __init__(self, model: Blip2ForConditionalGeneration, tokenizer, image_processor,
                 device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device
        self.num_query_tokens: int = model.config.num_query_tokens
        # Query positions never reach the embedding table in `logits` (the projected Q-Former
        # outputs replace them), so any id serves; the model's own image token keeps the batch
        # valid for `model(...)` too. Checkpoints saved before image_token_index existed lack it.
        image_token = model.config.image_token_id
        self.placeholder_id: int = tokenizer.pad_token_id if image_token is None else image_token

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, image_size: int | None = None) -> Blip2Adapter:
        """Load a BLIP-2 directory offline; ``image_size`` overrides the processor's resize size.

        EasyEdit evaluates at 364 although blip2-opt-2.7b was trained at 224, so the size comes
        from config; the vision encoder interpolates its position embeddings to match, as LAVIS
        does when it builds EVA ViT-g for another resolution.
        """
        model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
        if not model.config.use_decoder_only_language_model:
            raise ValueError(f"{path}: the blip2 adapter needs a decoder-only language model (OPT), "
                             f"got {model.config.text_config.model_type}")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.pad_token is None:  # Llama/Vicuna tokenizers have none; EasyEdit pads with EOS
            tokenizer.pad_token = tokenizer.eos_token
        resize = {} if image_size is None else {"size": {"height": image_size, "width": image_size}}
        # The PIL backend resizes exactly like the torchvision transforms EasyEdit applies to PIL
        # images, and gives the same pixels whether or not torchvision is installed.
        image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True, **resize)
        device = torch.device(device)
        model.to(device).eval()
        return cls(model, tokenizer, image_processor, device)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """BLIP eval processing: RGB, bicubic resize to the configured size, rescale, CLIP mean/std."""
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        height, width = pixels.shape[-2:]
        self.note_resize([image.size for image in images], [(width, height)] * len(images))
        return pixels

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def image_prompt(self) -> tuple[list[int], list[int]]:
        """Token ids placed before and after the query positions of an image item.

        BLIP-2 puts the queries first and nothing around them; MiniGPT-4 wraps them in its
        conversation template.
        """
        return [], []

    def teacher_forced(self, prompts: Sequence[str], targets: Sequence[str],
                       images: Sequence[Image.Image] | None) -> Batch:
        """``[before][query positions][after][prompt + target tokens][pad]``, only targets labelled.

        Text is tokenized without special tokens (no BOS) and right-padded, and the prompt length
        is that of the prompt tokenized alone, exactly as EasyEdit computes ``prompts_len``.
        Text-only items have no image part at all.
        """
        check_items(prompts, targets, images)
        encoded = self.tokenizer([prompt + self.target_text(target) for prompt, target in zip(prompts, targets)]
                                 + list(prompts), add_special_tokens=False)["input_ids"]  # one call: the batch's cost
        texts, prompt_lengths = encoded[:len(prompts)], [len(ids) for ids in encoded[len(prompts):]]
        before, after = self.image_prompt() if images is not None else ([], [])
        query = 0 if images is None else self.num_query_tokens
        head = before + [self.placeholder_id] * query + after
        shape = (len(texts), len(head) + max(len(ids) for ids in texts))
        input_ids = torch.full(shape, self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for row, (ids, prompt_length) in enumerate(zip(texts, prompt_lengths)):
            end = len(head) + len(ids)
            input_ids[row, :end] = torch.tensor(head + ids, dtype=torch.long)
            attention_mask[row, :end] = 1
            start = len(head) + prompt_length
            labels[row, start:end] = input_ids[row, start:end]
        pixel_values = None if images is None else self.pixel_values(images)
        return Batch(input_ids, attention_mask, labels, pixel_values).to(self.device)

    def logits(self, batch: Batch, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Language-model logits over image prompt + text positions, as EasyEdit/LAVIS compute them.

        The projected Q-Former outputs are spliced between the embedded ``image_prompt`` parts
        rather than scattered into placeholder positions, which is what EasyEdit does and does not
        depend on the placeholder id.
        """
        batch = batch.to(self.device)
        language_model = self.model.language_model
        if batch.pixel_values is None:
            inputs = {"input_ids": batch.input_ids}
        else:
            image = self.model.get_image_features(batch.pixel_values, interpolate_pos_encoding=True, return_dict=True)
            embeds = language_model.get_input_embeddings()(batch.input_ids)
            start = len(self.image_prompt()[0])
            end = start + self.num_query_tokens
            inputs = {"inputs_embeds": torch.cat([embeds[:, :start], image.pooler_output.to(embeds.dtype),
                                                  embeds[:, end:]], dim=1)}
        hidden = language_model.base_model(**inputs, attention_mask=batch.attention_mask, use_cache=False)
        return output_logits(language_model, hidden.last_hidden_state, positions)

    def scopes(self) -> dict[str, list[str]]:
        model = self.model
        layers = decoder_layer_prefixes(model, model.language_model)
        scopes = mlp_scopes(model, layers) | layer_scopes(model, layers)
        scopes["llm"] = params_under(model, "language_model.")
        scopes["qformer"] = params_under(model, "qformer.", "query_tokens")
        scopes["vision_proj"] = params_under(model, "language_projection.")
        scopes["vision"] = params_under(model, "vision_model.")
        return scopes
