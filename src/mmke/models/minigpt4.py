"""MiniGPT-4 = BLIP-2's EVA ViT-g + Q-Former + one linear projection + a Llama (Vicuna) LM.

That is exactly the module tree of transformers' ``Blip2ForConditionalGeneration`` with a Llama
``text_config`` (``language_projection`` is MiniGPT-4's ``llama_proj``), so a MiniGPT-4 directory
is an ordinary BLIP-2 directory and loads through the BLIP-2 adapter; only the text template
differs. :mod:`mmke.models.convert` builds such a directory from the published ``.pth`` files.

Template, as EasyEdit's MiniGPT-4 wrapper builds it (``easyeditor/trainer/blip2_models/
mini_gpt4.py``): an image item is ``[BOS]["###Human: <Img>"][32 query outputs]["</Img> "]
[prompt + target]``, every part tokenized without special tokens; text-only items (NQ locality)
are ``[prompt + target]`` with no BOS. Only target tokens are labelled (spec section 2).
"""

from __future__ import annotations

from typing import ClassVar

from mmke.models.base import register_model
from mmke.models.blip2 import Blip2Adapter


@register_model("minigpt4")
class MiniGPT4Adapter(Blip2Adapter):
    """BLIP-2 module tree with a Llama LM and MiniGPT-4's conversation wrap around the image."""

    # MiniGPT-4's VQA prompt, split at the image as its prompt_wrap does.
    IMAGE_PROMPT: ClassVar[str] = "###Human: <Img><ImageHere></Img> "
    IMAGE_SLOT: ClassVar[str] = "<ImageHere>"

    def image_prompt(self) -> tuple[list[int], list[int]]:
        """``[BOS] + "###Human: <Img>"`` before the queries and ``"</Img> "`` after them."""
        before, after = self.IMAGE_PROMPT.split(self.IMAGE_SLOT)
        return [self.tokenizer.bos_token_id, *self._encode(before)], self._encode(after)
