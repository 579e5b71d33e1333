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

from mmke.data.images import decoded
from mmke.models.base import (
    IGNORE_INDEX,
    Batch,
    Memo,
    VLMAdapter,
    batch_pixels,
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
        # Per-record work done once: each text is tokenized once, each image preprocessed once.
        self._tokens = Memo(4096)
        self._pixels = Memo(self.FEATURE_MEMO_SIZE, by_identity=True)

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
        """BLIP eval processing: RGB, bicubic resize to the configured size, rescale, CLIP mean/std.

        The processor treats each image on its own, so an image object seen recently (the same
        record's image in its edit and its measured items) is processed once and reused.
        """
        def process(missing: list) -> list[torch.Tensor]:
            pictures = [decoded(image) for image in missing]
            pixels = self.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
            height, width = pixels.shape[-2:]
            self.note_resize([picture.size for picture in pictures], [(width, height)] * len(pictures))
            return list(pixels)

        return torch.stack(self._pixels.get_many(images, process))

    def _encode(self, text: str) -> list[int]:
        return self._encode_all([text])[0]

    def _encode_all(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids without special tokens; texts seen recently are not tokenized again."""
        return self._tokens.get_many(texts, lambda new: self.tokenizer(new, add_special_tokens=False)["input_ids"])

    def image_prompt(self) -> tuple[list[int], list[int]]:
        """Token ids placed before and after the query positions of an image item.

        BLIP-2 puts the queries first and nothing around them; MiniGPT-4 wraps them in its
        conversation template.
        """
        return [], []

    def teacher_forced(self, prompts: Sequence[str], targets: Sequence[str],
                       images: Sequence[Image.Image | None] | None) -> Batch:
        """``[before][query positions][after][prompt + target tokens][pad]``, only targets labelled.

        Text is tokenized without special tokens (no BOS) and right-padded, and the prompt length
        is that of the prompt tokenized alone, exactly as EasyEdit computes ``prompts_len``.
        Text-only items (no image, or a None image) have no image part at all.
        """
        check_items(prompts, targets, images)
        encoded = self._encode_all([prompt + self.target_text(target) for prompt, target in zip(prompts, targets)]
                                   + list(prompts))  # one tokenizer call for what is new
        texts, prompt_lengths = encoded[:len(prompts)], [len(ids) for ids in encoded[len(prompts):]]
        pictures = [None] * len(prompts) if images is None else list(images)
        with_image = [image is not None for image in pictures]
        before, after = self.image_prompt() if any(with_image) else ([], [])
        image_head = before + [self.placeholder_id] * self.num_query_tokens + after
        heads = [image_head if has else [] for has in with_image]
        ends = [len(head) + len(ids) for head, ids in zip(heads, texts)]
        width, pad = max(ends), self.tokenizer.pad_token_id
        input_ids = torch.tensor([head + ids + [pad] * (width - end) for head, ids, end in zip(heads, texts, ends)],
                                 dtype=torch.long)
        position = torch.arange(width)
        attention_mask = (position < torch.tensor(ends)[:, None]).long()
        starts = torch.tensor([len(head) + length for head, length in zip(heads, prompt_lengths)])
        labels = input_ids.masked_fill(~attention_mask.bool() | (position < starts[:, None]), IGNORE_INDEX)
        sources = tuple(image for image in pictures if image is not None)
        pixel_values = self.pixel_values(sources) if sources and not self.stored_features_stand_in(sources) else None
        image_rows = None if all(with_image) or not sources else torch.tensor(with_image)
        return Batch(input_ids, attention_mask, labels, pixel_values, image_rows=image_rows,
                     sources=sources).to(self.device)

    def image_features(self, batch: Batch, which: Sequence[int]) -> list[torch.Tensor]:
        """The projected Q-Former outputs ``[num_query_tokens, D]`` of the chosen images."""
        return list(self._project_images(batch_pixels(batch).to(self.device)[list(which)]).unbind(0))

    def _project_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixels, interpolate_pos_encoding=True, return_dict=True).pooler_output

    def logits(self, batch: Batch, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Language-model logits over image prompt + text positions, as EasyEdit/LAVIS compute them.

        The projected Q-Former outputs are written over the query positions of the image rows,
        between the embedded ``image_prompt`` parts, which is what EasyEdit's concatenation gives
        and does not depend on the placeholder id. Each distinct image of the batch is computed
        once (:meth:`batch_image_features`), within ``frozen_image_features`` once per memo.
        """
        batch = batch.to(self.device)
        language_model = self.model.language_model
        if not batch.sources and batch.pixel_values is None:
            inputs = {"input_ids": batch.input_ids}
        else:
            cached = self.batch_image_features(batch)
            image = self._project_images(batch_pixels(batch)) if cached is None else torch.stack(cached)
            embeds = language_model.get_input_embeddings()(batch.input_ids)
            start = len(self.image_prompt()[0])
            rows = (torch.arange(len(embeds), device=self.device) if batch.image_rows is None
                    else torch.nonzero(batch.image_rows.to(self.device)).flatten())
            columns = torch.arange(start, start + self.num_query_tokens, device=self.device)
            inputs = {"inputs_embeds": embeds.index_put((rows[:, None], columns[None, :]), image.to(embeds.dtype))}
        hidden = language_model.base_model(**inputs, attention_mask=batch.attention_mask, use_cache=False)
        return output_logits(language_model, hidden.last_hidden_state, positions)

    def image_stages(self) -> list[tuple[str, str]]:
        return [("vision_model", "vision"), ("qformer", "qformer"), ("language_projection", "vision_proj")]

    def scopes(self) -> dict[str, list[str]]:
        model = self.model
        layers = decoder_layer_prefixes(model, model.language_model)
        scopes = mlp_scopes(model, layers) | layer_scopes(model, layers)
        scopes["llm"] = params_under(model, "language_model.")
        scopes["qformer"] = params_under(model, "qformer.", "query_tokens")
        scopes["vision_proj"] = params_under(model, "language_projection.")
        scopes["vision"] = params_under(model, "vision_model.")
        return scopes
