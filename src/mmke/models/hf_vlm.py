"""Any chat vision-language model of transformers: ``AutoModelForImageTextToText`` + ``AutoProcessor``.

LLaVA-1.5, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL directories load unchanged. Unlike BLIP-2,
the image tokens live inside ``input_ids``: the processor expands each image placeholder of the
chat template into as many tokens as the vision tower produces, and the model scatters the image
features into them. So a teacher-forced item is the chat template's user turn (image + prompt)
with the generation prompt, followed by the target, and the processor's own output (with the
special tokens it adds, which is how these models were trained) is what the model sees: tensor
for tensor, though assembled from parts done once per text and per image (the image processor's
output, the tokens), with the processor's own placeholder expansion, since the edit loop meets a
record's items several times. Labels count only the target tokens (spec section 2): everything up
to the length of the processed prompt-only text, and padding, is -100.

Targets follow the assistant header raw, with no leading space (``...<|im_start|>assistant\n`` +
``red``): EasyEdit's editor path for these models, and the ``raw`` target convention of
:data:`mmke.models.base.TARGET_JOINS` (``protocol.target_join`` may pick ``space``, its
MultimodalTrainer's form). Qwen2-VL and Qwen2.5-VL images are first resized as the model card's
``qwen_vl_utils.fetch_image`` does (:func:`smart_resize`), as EasyEdit does before the processor.

Qwen2-VL's and Qwen2.5-VL's processors are loaded without their video processor: the adapter
feeds images only, and transformers builds every video processor on torchvision, so
``AutoProcessor`` cannot load such a directory where torchvision is missing (it is here: there is
no CPU build of it that leaves torch alone). See :func:`load_processor`.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Sequence
from typing import ClassVar

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedConfig, ProcessorMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

from mmke.data.images import UndecodedImage, decoded
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


# qwen_vl_utils 0.0.10 (the version EasyEdit pins; vision_process.py): every image is resized so
# that both sides are multiples of 28 and the area lies within [4, 16384] x 28 x 28 pixels, before
# the HF processor (which then resizes within its own, narrower pixel bounds).
QWEN_IMAGE_FACTOR = 28
QWEN_MIN_PIXELS = 4 * 28 * 28
QWEN_MAX_PIXELS = 16384 * 28 * 28
QWEN_MAX_RATIO = 200
#: Model types whose published preprocessing is qwen_vl_utils' fetch_image.
QWEN_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def smart_resize(height: int, width: int, factor: int = QWEN_IMAGE_FACTOR, min_pixels: int = QWEN_MIN_PIXELS,
                 max_pixels: int = QWEN_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of qwen_vl_utils' smart resize: sides to the nearest multiple of ``factor``,
    then scaled down (floor) or up (ceil) to bring the area within ``[min_pixels, max_pixels]``.

    Python's ``round`` (halves to even) as in qwen_vl_utils, so 42 -> 56 but 70 -> 56.
    """
    if max(height, width) / min(height, width) > QWEN_MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {QWEN_MAX_RATIO}, "
                         f"got {max(height, width) / min(height, width)} ({width}x{height} px)")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def fetch_image(image: Image.Image) -> Image.Image:
    """An RGB image resized as ``qwen_vl_utils.fetch_image`` does (default pixel bounds).

    Pillow's default filter for RGB images is bicubic, which fetch_image's ``image.resize`` uses.
    """
    height, width = smart_resize(image.height, image.width)
    return image.resize((width, height), Image.Resampling.BICUBIC)


def concat_padded(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """``values`` (one image's processor output each) concatenated along the first dimension,
    every further dimension zero-padded at its end to the largest: how the image processors batch
    images (LLaVA-OneVision pads each image's tiles to the batch's most; LLaVA-1.5's and Qwen-VL's
    outputs need no padding)."""
    shape = [max(sizes) for sizes in zip(*(value.shape[1:] for value in values))]
    padded = []
    for value in values:
        widths = [pad for dim in reversed(range(1, value.dim())) for pad in (0, shape[dim - 1] - value.shape[dim])]
        padded.append(torch.nn.functional.pad(value, widths) if any(widths) else value)
    return torch.cat(padded)


@register_model("hf_vlm")
class HFVLMAdapter(VLMAdapter):
    """One adapter for the chat-template VLMs of transformers."""

    target_join = "raw"

    # Where the families keep their vision encoder and the projector into the LM
    # (LLaVA: vision_tower / multi_modal_projector; Qwen2-VL: visual / visual.merger).
    VISION_MODULES: ClassVar[tuple[str, ...]] = ("vision_tower", "visual")
    PROJECTOR_MODULES: ClassVar[tuple[str, ...]] = ("multi_modal_projector", "visual.merger")

    def __init__(self, model: torch.nn.Module, processor, device: torch.device):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "right"  # labels and locality alignment assume right padding
        self.device = device
        self.placeholder_id = model.config.image_token_id  # the processor expands images into these
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(f"{type(processor).__name__} has no chat template; hf_vlm builds prompts with it")
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"{type(self.tokenizer).__name__} has no pad token; hf_vlm pads batches with it")
        # Per-record work done once: each chat prompt rendered, each text tokenized, each image
        # prepared and processed once (:meth:`teacher_forced`).
        self._chats = Memo(4096)
        self._tokens = Memo(4096)
        self._images = Memo(self.FEATURE_MEMO_SIZE, by_identity=True)
        # image inputs (LLaVA-OneVision's image_sizes) that the family's feature function takes
        self._feature_args = frozenset(inspect.signature(model.model.get_image_features).parameters)
        self._blanks = Memo(self.FEATURE_MEMO_SIZE)  # by size: see _stand_in

    def _fixed_image_size(self) -> tuple[int, int] | None:
        """(width, height) every image reaches the vision tower at, where the family's tokens do
        not depend on the image: LLaVA-1.5, whose processor center-crops to one size. None where
        the token count follows the image's size (Qwen2-VL, LLaVA-OneVision's tiles)."""
        image_processor = self.processor.image_processor
        crop = getattr(image_processor, "crop_size", None)
        if self.model.config.model_type != "llava" or not getattr(image_processor, "do_center_crop", False) or not crop:
            return None
        return crop["width"], crop["height"]

    def _stand_in(self, image: UndecodedImage) -> Image.Image:
        """A blank image the processor treats as ``image`` in everything but the pixels: the same
        placeholder expansion and the same inputs beside the pixels (Qwen-VL's ``image_grid_thw``,
        LLaVA-OneVision's ``image_sizes``), which follow the image's size alone (one size after
        LLaVA-1.5's center crop). One object per size, so each size is processed once."""
        size = self._fixed_image_size() or image.size
        return self._blanks.get_many([size], lambda sizes: [Image.new("RGB", size) for size in sizes])[0]

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, image_size: int | None = None) -> HFVLMAdapter:
        """Load model and processor offline; resolution is the processor's (tiling/dynamic sizes)."""
        if image_size is not None:
            raise ValueError(f"{path}: hf_vlm models take their resolution from the processor; "
                             f"remove image_size ({image_size}) from the model's config entry")
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
        processor = load_processor(path, model.config)
        device = torch.device(device)
        model.to(device).eval()
        return cls(model, processor, device)

    def chat_prompt(self, prompt: str, with_image: bool) -> str:
        """The user turn (image first, then text) plus the assistant's generation prompt."""
        content = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": prompt})
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def prepare_images(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """The family's published preprocessing before the processor: Qwen-VL's smart resize."""
        if self.model.config.model_type in QWEN_VL_MODEL_TYPES:
            return [fetch_image(image) for image in images]
        return list(images)

    def processed_images(self, images: Sequence[Image.Image], pixels: bool = True
                         ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The image processor's output for ``images`` as one batch (without ``pixel_values``
        unless ``pixels``), and the text each image's placeholder expands into (the processor's
        own ``replace_image_token``).

        Each image object is prepared and processed once and remembered, so a record's images
        cost one pass however often its items meet the model: the processors treat images one by
        one and batch them by concatenation, zero-padding tiled layouts (LLaVA-OneVision) to the
        batch's most tiles, which :func:`concat_padded` repeats.
        """
        def process(missing: list) -> list[tuple[dict[str, torch.Tensor], str]]:
            parts = []
            for image in self.prepare_images([decoded(image) for image in missing]):
                processed = dict(self.processor.image_processor(images=[image], return_tensors="pt"))
                parts.append((processed, self.processor.replace_image_token(processed, image_idx=0)))
            return parts

        parts = self._images.get_many(images, process)
        keys = [key for key in parts[0][0]
                if key not in self.processor.unused_input_names and (pixels or key != "pixel_values")]
        return ({key: concat_padded([processed[key] for processed, _ in parts]) for key in keys},
                [expansion for _, expansion in parts])

    def _tokenized(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the processor's tokenizer call gives them (special tokens included);
        texts seen recently are not tokenized again."""
        return self._tokens.get_many(texts, lambda new: self.tokenizer(new)["input_ids"])

    def _model_image_sizes(self, processed: dict[str, torch.Tensor], count: int) -> list[tuple[int, int]] | None:
        """(width, height) each image reaches the vision tower at, where the processor's output shows it."""
        if "image_grid_thw" in processed:  # Qwen: patches per side x patch size
            patch = self.processor.image_processor.patch_size
            return [(w * patch, h * patch) for _, h, w in processed["image_grid_thw"].tolist()]
        pixels = processed.get("pixel_values")
        if pixels is not None and pixels.dim() == 4:  # [B, C, H, W], LLaVA-1.5
            return [(pixels.shape[-1], pixels.shape[-2])] * count
        return None  # tiled layouts (LLaVA-OneVision): no single size to report

    def teacher_forced(self, prompts: Sequence[str], targets: Sequence[str],
                       images: Sequence[Image.Image | None] | None) -> Batch:
        """Chat prompt + target per item, right-padded; only the target tokens are labelled.

        The processor's output, assembled from parts done once each: the chat template per
        prompt, the image processor per image (:meth:`processed_images`), the tokenizer per text
        with its image placeholders expanded by the processor's ``get_text_with_replacements``.
        A None image makes its item a text-only user turn, so mixed batches hold each row as it
        would be alone. The target's tokens are those it adds to its chat prompt, counted by the
        tokenizer alone: each placeholder expands the same way with or without the target.
        """
        check_items(prompts, targets, images)
        pictures = [None] * len(prompts) if images is None else list(images)
        chats = self._chats.get_many(list(zip(prompts, (image is not None for image in pictures))),
                                     lambda new: [self.chat_prompt(prompt, has) for prompt, has in new])
        texts = [chat + self.target_text(target) for chat, target in zip(chats, targets)]
        sources = tuple(image for image in pictures if image is not None)
        stand_in = bool(sources) and self.stored_features_stand_in(sources)  # no pixels: blanks of their sizes
        processed_sources = [self._stand_in(image) for image in sources] if stand_in else list(sources)
        self.processor.validate_inputs(images=processed_sources or None, text=texts)
        processed, expansions = self.processed_images(processed_sources, pixels=not stand_in) if sources else ({}, [])
        expanded, _ = self.processor.get_text_with_replacements(list(texts), expansions)
        tokens = self._tokenized(expanded + texts + chats)
        count = len(texts)
        full, unexpanded, prompt_only = tokens[:count], tokens[count:2 * count], tokens[2 * count:]
        lengths = torch.tensor([len(ids) for ids in full])
        width = int(lengths.max())
        input_ids = torch.tensor([ids + [self.tokenizer.pad_token_id] * (width - len(ids)) for ids in full])
        position = torch.arange(width)
        attention_mask = (position < lengths[:, None]).long()
        starts = lengths - torch.tensor([len(text) - len(chat) for text, chat in zip(unexpanded, prompt_only)])
        labels = input_ids.masked_fill(~attention_mask.bool() | (position < starts[:, None]), IGNORE_INDEX)
        if sources and not stand_in and (model_sizes := self._model_image_sizes(processed, len(sources))) is not None:
            self.note_resize([image.size for image in sources], model_sizes)
        image_inputs = {key: value for key, value in processed.items() if key != "pixel_values"}
        if self.processor.return_mm_token_type_ids:  # Qwen-VL: which positions hold image tokens
            image_inputs["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(input_ids))
        return Batch(input_ids, attention_mask, labels, processed.get("pixel_values"), image_inputs,
                     sources=sources).to(self.device)

    def image_features(self, batch: Batch, which: Sequence[int]) -> list[torch.Tensor]:
        """The model's own ``get_image_features`` (vision tower + projector) on the chosen images:
        the embeddings its forward scatters into each image's tokens, one tensor per image."""
        which = list(which)
        pixels = batch_pixels(batch).to(self.device)
        kwargs = {}
        if "image_grid_thw" in batch.image_inputs:  # Qwen-VL: every image's patches in one flat tensor
            grid = batch.image_inputs["image_grid_thw"].to(self.device)
            pixels = torch.cat([pixels.split(grid.prod(-1).tolist())[i] for i in which])
            kwargs["image_grid_thw"] = grid[which]
        else:
            pixels = pixels[which]
            kwargs = {key: value.to(self.device)[which] for key, value in batch.image_inputs.items()
                      if key in self._feature_args}
        output = self.model.model.get_image_features(pixel_values=pixels.to(self.model.dtype), **kwargs)
        return list(output.pooler_output)

    def logits(self, batch: Batch, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The model's own forward: it places the image features at the image tokens.

        The features of each distinct image (:meth:`batch_image_features`, from the memo within
        ``frozen_image_features``) reach the forward as its ``mm_encoder_outputs``, in place of
        the pixels.
        """
        batch = batch.to(self.device)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.image_inputs}
        cached = self.batch_image_features(batch)
        if cached is not None:
            inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=cached)}
        elif batch.pixel_values is not None or batch.sources:
            inputs["pixel_values"] = batch_pixels(batch).to(self.model.dtype)
        hidden = self.model.base_model(**inputs, use_cache=False).last_hidden_state
        return output_logits(self.model, hidden, positions)

    def _image_modules(self) -> dict[str, str]:
        """``named_modules`` prefix (dotted) of the vision encoder (scope ``vision``) and of the
        projector into the LM (``vision_proj``): the first of ``VISION_MODULES`` and of
        ``PROJECTOR_MODULES`` the model has, in the order images pass them; absent ones left out."""
        names = [name for name, _ in self.model.named_modules()]
        found = {scope: next((f"{name}." for path in paths for name in names
                              if name == path or name.endswith(f".{path}")), None)
                 for scope, paths in (("vision", self.VISION_MODULES), ("vision_proj", self.PROJECTOR_MODULES))}
        return {scope: prefix for scope, prefix in found.items() if prefix is not None}

    def image_stages(self) -> list[tuple[str, str]]:
        # Qwen2-VL's merger lies inside its vision module: frozen_layers_below keeps no stage that
        # holds a trained one
        return [(prefix.rstrip("."), scope) for scope, prefix in self._image_modules().items()]

    def scopes(self) -> dict[str, list[str]]:
        model = self.model
        layers = decoder_layer_prefixes(model, model)
        scopes = mlp_scopes(model, layers) | layer_scopes(model, layers)
        language_model = layers[0].rsplit(".layers.", 1)[0]
        scopes["llm"] = params_under(model, f"{language_model}.", "lm_head.")
        modules = self._image_modules()
        projector, vision = modules.get("vision_proj"), modules.get("vision")
        if projector is not None:
            scopes["vision_proj"] = params_under(model, projector)
        if vision is not None:
            scopes["vision"] = [name for name in params_under(model, vision)
                                if projector is None or not name.startswith(projector)]
        return scopes


# The constructor arguments of a processor that can be loaded without its video processor and
# lose nothing (Qwen2VLProcessor, Qwen2_5_VLProcessor): those of the image-only subclass below.
IMAGE_ONLY_ARGS = ("image_processor", "tokenizer", "chat_template")


def _init_args(cls: type) -> tuple[str, ...]:
    """Named constructor arguments of ``cls``: what ``from_pretrained`` passes from the saved config."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return tuple(p.name for p in parameters if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)


def _drops_video_losslessly(processor_class: type[ProcessorMixin]) -> bool:
    args = _init_args(processor_class)
    return "video_processor" in args and tuple(arg for arg in args if arg != "video_processor") == IMAGE_ONLY_ARGS


@functools.cache
def image_only_processor_class(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """:func:`without_video_processor` for a processor that ``from_pretrained`` loads losslessly
    that way: one taking exactly :data:`IMAGE_ONLY_ARGS` besides ``video_processor``. Any further
    saved option (LLaVA-OneVision's, say) would silently be dropped, so such a processor is refused.
    """
    if not _drops_video_losslessly(processor_class):
        raise ValueError(f"{processor_class.__name__} takes {', '.join(_init_args(processor_class))}; "
                         f"only a processor taking {', '.join(IMAGE_ONLY_ARGS)} and video_processor can "
                         "be loaded without its video processor")
    return without_video_processor(processor_class)


@functools.cache
def without_video_processor(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """A subclass of ``processor_class`` without its ``video_processor`` (which transformers builds
    on torchvision); other options pass through as keywords, so one built in memory loses nothing.

    ``ProcessorMixin`` takes its sub-processors from the constructor's signature, so a subclass
    whose constructor lacks ``video_processor`` loads and saves only the image processor and the
    tokenizer; the parent constructor still forwards ``video_processor=None`` positionally, and
    ``ProcessorMixin`` pairs positional sub-processors with the (now two) names, so it falls off.
    The subclass keeps the parent's name, so ``save_pretrained`` records the real processor class.
    """
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return type(processor_class.__name__, (processor_class,), {
        "__init__": __init__, "__module__": __name__,
        "__doc__": f"{processor_class.__name__} for images only (no video processor, so no torchvision).",
    })


def load_processor(path: str | os.PathLike, config: PreTrainedConfig) -> ProcessorMixin:
    """The processor of the model directory ``path`` (model config ``config``), PIL backend, offline.

    The processor class is the one transformers maps the model's config to. If it can drop its video
    processor losslessly (Qwen2-VL, Qwen2.5-VL) it is loaded through :func:`image_only_processor_class`,
    always, not only where torchvision is missing, so a directory loads the same everywhere;
    otherwise by ``AutoProcessor`` (LLaVA-OneVision's processor then needs torchvision).
    """
    processor_class = PROCESSOR_MAPPING[type(config)] if type(config) in PROCESSOR_MAPPING else None
    if processor_class is not None and _drops_video_losslessly(processor_class):
        loader = image_only_processor_class(processor_class)
    else:
        loader = AutoProcessor
    return loader.from_pretrained(path, backend="pil", local_files_only=True)
