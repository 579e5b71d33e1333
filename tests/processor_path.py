"""Shared by the hf_vlm tests: batches straight from the processor's own call, the uncached path
that :meth:`mmke.models.hf_vlm.HFVLMAdapter.teacher_forced` assembles from remembered parts."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from mmke.models.base import IGNORE_INDEX, Batch
from mmke.models.hf_vlm import HFVLMAdapter


def processor_batch(model: HFVLMAdapter, prompts: Sequence[str], targets: Sequence[str],
                    images: Sequence[Image.Image | None] | None) -> Batch:
    """One processor call on chat prompts + targets and the prepared images of the whole batch;
    labels on what follows the processed prompt-only text (a second call without the targets)."""
    pictures = [None] * len(prompts) if images is None else list(images)
    chats = [model.chat_prompt(prompt, picture is not None) for prompt, picture in zip(prompts, pictures)]
    texts = [chat + model.target_text(target) for chat, target in zip(chats, targets)]
    sources = tuple(picture for picture in pictures if picture is not None)
    shown = model.prepare_images(sources) or None
    full = dict(model.processor(text=texts, images=shown, padding=True, return_tensors="pt"))
    prompt_lengths = model.processor(text=chats, images=shown, padding=True, return_tensors="pt")["attention_mask"].sum(1)
    input_ids, attention_mask = full.pop("input_ids"), full.pop("attention_mask")
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    for row, length in enumerate(prompt_lengths.tolist()):
        labels[row, :length] = IGNORE_INDEX
    return Batch(input_ids, attention_mask, labels, full.pop("pixel_values", None), full, sources=sources)


class UncachedHFVLM(HFVLMAdapter):
    """hf_vlm with every batch from :func:`processor_batch`: nothing remembered between calls."""

    def teacher_forced(self, prompts, targets, images) -> Batch:
        return processor_batch(self, prompts, targets, images).to(self.device)
