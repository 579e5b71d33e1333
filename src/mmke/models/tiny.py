"""Tiny randomly initialised models, saved as ordinary transformers directories.

The demo workflow and the tests run every stage on these offline and on a CPU in seconds. Each
directory has the same layout as the real checkpoint of its family (model, tokenizer and
processor saved with ``save_pretrained``), so the adapters load both through one code path.
Everything is a pure function of the arguments: same seed, same weights, same tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AddedToken,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from mmke.data.demo import WORLD_TEXT
from mmke.io import atomic_dir
from mmke.models.hf_vlm import image_only_processor_class

IMAGE_TOKEN = "<image>"
# OPT's special tokens, in OPT's id order (<s>=0, <pad>=1, </s>=2, <unk>=3); OPT uses "</s>" as BOS.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
BOS_TOKEN = EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
PATCH_SIZE = 8

# Built-in English training text for the tokenizer: general prose plus the vocabulary of the
# demo datasets (colours, shapes, questions, captions), so common words get their own tokens.
# Byte-level BPE covers every other string byte by byte.
CORPUS = (
    "What colour is the shape? Which colour does the shape in the picture have?",
    "What is the colour of the object shown? What shape is shown in the image?",
    "Which geometric figure appears in this picture? What kind of shape can be seen here?",
    "What colour is the background? Which colour is the area behind the shape?",
    "How many shapes are in the picture? How many objects can you count in this image?",
    "a photo of a red circle on a grey background. an image of a green square on a white background.",
    "a picture showing a blue triangle on a black background. a snapshot of a yellow circle.",
    "purple, orange, red, green, blue, yellow, grey, white, black; circle, square, triangle.",
    "one, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 100 1887 2024",
    "Question: What is in the picture? Short answer: a cat sitting on a sofa.",
    "New Fact: The capital of the country is a small city by the river.",
    "Prompt: Who wrote the novel? The author was born in a village near the mountains.",
    "The quick brown fox jumps over the lazy dog while the children watch from the window.",
    "A man is riding a bicycle down the street next to a bus and a few parked cars.",
    "Two dogs are playing with a ball in the park under a large tree on a sunny day.",
    "The woman holds an umbrella as she walks across the bridge in the rain.",
    "A plate of food with rice, vegetables and a piece of grilled chicken sits on the table.",
    "The train arrives at the station in the morning, and people wait on the platform.",
    "There is a clock on the tower above the old building in the centre of the town.",
    "A group of people stand on the beach and look at the boats on the water.",
    "The kitchen has a white refrigerator, a stove, a sink and wooden cabinets.",
    "A baseball player swings the bat at the ball during the game in the stadium.",
    "Which river flows through the city? What is the highest mountain in the region?",
    "Who painted the picture? Which instrument did he play? What language is spoken there?",
    "In which year was the bridge opened? What currency is used on the islands?",
    "Who founded the city? What is the main export of the country? What is the national bird?",
    "The museum opened its doors to visitors after the long winter, and the gardens were full of flowers.",
    "Scientists measured the temperature of the ocean and found that it had risen over the years.",
    "She answered the question correctly, but he thought the answer was wrong.",
    "They were reading books, writing letters, and listening to music in the evening.",
    "An airplane is flying over the mountains; a giraffe stands near the fence at the zoo.",
    "The elephant, the zebra and the horse were eating grass in the field.",
    "Is this a kitchen or a bathroom? Are there any people in the photo? Yes. No.",
)


def train_tokenizer(vocab_size: int = 1024, corpus: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """An OPT-like byte-level BPE tokenizer trained offline on the built-in corpus (+ ``corpus``).

    Byte-level BPE tokenizes any text (every byte is in the alphabet), so tiny models accept the
    real datasets too. Special tokens and the BOS-prepending post-processor follow OPT, so code
    that must avoid special tokens is tested against a tokenizer that would add them. The image
    placeholder ``<image>`` takes the last id, like in the blip2-opt checkpoints. ``vocab_size``
    is an upper bound: a small corpus may yield fewer merges.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # one id left for <image>
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*CORPUS, *WORLD_TEXT, *(corpus or ())], trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN, clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    return tokenizer


def build_tiny_blip2(out_dir: str | os.PathLike, *, seed: int = 0, image_size: int = 32,
                     num_query_tokens: int = 4, vocab_size: int = 1024, vision_width: int = 32,
                     text_width: int = 64, init_std: float = 0.02, patch_size: int = PATCH_SIZE,
                     position_sincos: float | None = None) -> Path:
    """A tiny random BLIP-2 OPT directory at ``out_dir`` (model, tokenizer, processor).

    Same layout as Salesforce/blip2-opt-2.7b: ``config.image_token_id`` is the ``<image>`` id and
    the processor records ``num_query_tokens``. The OPT part has 2 layers so that scopes such as
    ``llm.mlp.last2`` are meaningful; the max position count matches OPT so long IKE prompts fit.
    ``vision_width``/``text_width``/``patch_size``/``init_std`` size a model that must learn
    (the demo world): there, 0.1 init and 4-pixel patches learnt faster than the 0.02 / 8 defaults.
    ``position_sincos`` replaces the random vision position embeddings by MAE's fixed 2-D sin-cos
    table times that scale: random ones (the default) carry no notion of left or right, and in
    the demo world the tiny model never learnt *where* an object is from them (held-out position
    accuracy at chance) while with the sin-cos table it does (1.00; docs/world.md).
    """
    tokenizer = train_tokenizer(vocab_size)
    text_config = OPTConfig(
        vocab_size=vocab_size, hidden_size=text_width, word_embed_proj_dim=text_width, num_hidden_layers=2,
        ffn_dim=2 * text_width,
        num_attention_heads=2, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, init_std=init_std,
    )
    return _build_blip2_tree(out_dir, text_config, tokenizer, seed=seed, image_size=image_size,
                             num_query_tokens=num_query_tokens, vision_width=vision_width, init_std=init_std,
                             patch_size=patch_size, position_sincos=position_sincos)


def build_tiny_minigpt4(out_dir: str | os.PathLike, *, seed: int = 0, image_size: int = 32,
                        num_query_tokens: int = 4, vocab_size: int = 1024, vision_width: int = 32,
                        init_std: float = 0.02, patch_size: int = PATCH_SIZE,
                        position_sincos: float | None = None) -> Path:
    """A tiny random MiniGPT-4: the BLIP-2 module tree with a 2-layer Llama language model.

    MiniGPT-4 is saved as a BLIP-2 directory (see :mod:`mmke.models.minigpt4`); Vicuna's
    untied input/output embeddings are kept untied here too. The vision options are those of
    :func:`build_tiny_blip2`.
    """
    tokenizer = train_tokenizer(vocab_size)
    text_config = _tiny_llama_config(tokenizer, vocab_size, init_std)
    return _build_blip2_tree(out_dir, text_config, tokenizer, seed=seed, image_size=image_size,
                             num_query_tokens=num_query_tokens, vision_width=vision_width, init_std=init_std,
                             patch_size=patch_size, position_sincos=position_sincos)


def _tiny_llama_config(tokenizer: PreTrainedTokenizerFast, vocab_size: int, init_std: float = 0.02) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, initializer_range=init_std,
    )


def _check_image_size(image_size: int, patch_size: int = PATCH_SIZE) -> None:
    if image_size < patch_size or image_size % patch_size:
        raise ValueError(f"image_size must be a positive multiple of the patch size {patch_size}, got {image_size}")


def _build_blip2_tree(out_dir: str | os.PathLike, text_config, tokenizer: PreTrainedTokenizerFast, *,
                      seed: int, image_size: int, num_query_tokens: int, vision_width: int = 32,
                      init_std: float = 0.02, patch_size: int = PATCH_SIZE,
                      position_sincos: float | None = None) -> Path:
    """Tiny EVA-style vision + Q-Former around ``text_config``'s LM, saved with its processor."""
    config = blip2_config(text_config, tokenizer, image_size=image_size, num_query_tokens=num_query_tokens,
                          vision_width=vision_width, init_std=init_std, patch_size=patch_size)
    model = init_blip2(config, seed, position_sincos=position_sincos)
    processor = blip2_processor(tokenizer, image_size, num_query_tokens)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)


def blip2_config(text_config, tokenizer: PreTrainedTokenizerFast, *, image_size: int, num_query_tokens: int,
                 vision_width: int = 32, init_std: float = 0.02, patch_size: int = PATCH_SIZE,
                 vision: Mapping[str, Any] | None = None, qformer: Mapping[str, Any] | None = None) -> Blip2Config:
    """The BLIP-2 config of a tiny model: 2-layer vision encoder and Q-Former, ``vision_width`` wide.

    ``vision`` / ``qformer`` override those sub-configs' fields: ``benchmarks/scale.py`` builds the
    paper's EVA ViT-g and BERT-base Q-Former through this same function.
    """
    _check_image_size(image_size, patch_size)
    return Blip2Config(
        vision_config={"hidden_size": vision_width, "intermediate_size": 2 * vision_width, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size,
                       # Blip2VisionConfig defaults to 1e-10 (real checkpoints overwrite it), which
                       # leaves a random encoder blind: every image gives the same features.
                       "initializer_range": init_std, **(vision or {})},
        qformer_config={"hidden_size": vision_width, "intermediate_size": 2 * vision_width, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "encoder_hidden_size": vision_width,
                        "initializer_range": init_std, **(qformer or {})},
        text_config=text_config.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), initializer_range=init_std,
    )


def init_blip2(config: Blip2Config, seed: int, position_sincos: float | None = None) -> Blip2ForConditionalGeneration:
    """A randomly initialised BLIP-2 of ``config`` (on the default device and dtype), seeded."""
    with seeded(seed):
        model = Blip2ForConditionalGeneration(config)
        # transformers zero-initialises the query tokens (real checkpoints overwrite them), which
        # would make every query position identical; LAVIS draws them from N(0, initializer_range).
        with torch.no_grad():
            model.query_tokens.normal_(mean=0.0, std=config.initializer_range)
            if position_sincos is not None:  # (1, CLS + patches, width)
                vision = config.vision_config
                set_sincos(model.vision_model.embeddings.position_embedding[0], position_sincos,
                           vision.image_size // vision.patch_size)
    return model


def blip2_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, num_query_tokens: int) -> Blip2Processor:
    """BLIP's eval image processing at ``image_size`` px with the tokenizer (the directory's processor)."""
    return Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, num_query_tokens=num_query_tokens,
    )


# LLaVA-1.5's conversation format ("USER: <image>\n{text} ASSISTANT:"), images before text.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tiny_llava(out_dir: str | os.PathLike, *, seed: int = 0, image_size: int = 32,
                     vocab_size: int = 1024, vision_width: int = 32, init_std: float = 0.02,
                     patch_size: int = PATCH_SIZE, position_sincos: float | None = None) -> Path:
    """A tiny random LLaVA-1.5 (CLIP vision tower + 2-layer MLP projector + 2-layer Llama).

    Saved with a ``LlavaProcessor`` and LLaVA-1.5's chat template, so it loads through
    ``AutoModelForImageTextToText`` / ``AutoProcessor`` like llava-hf/llava-1.5-7b-hf; the
    processor expands ``<image>`` into one token per patch (CLS dropped, "default" strategy).
    The vision options are those of :func:`build_tiny_blip2` (``init_std`` sets the whole model's).
    """
    _check_image_size(image_size, patch_size)
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width,
                                       num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                                       patch_size=patch_size, projection_dim=vision_width,
                                       initializer_range=init_std).to_dict(),
        text_config=_tiny_llama_config(tokenizer, vocab_size, init_std).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    with seeded(seed):
        model = LlavaForConditionalGeneration(config)
        if position_sincos is not None:  # nn.Embedding over CLS + patches
            with torch.no_grad():
                table = model.model.vision_tower.embeddings.position_embedding.weight
                set_sincos(table, position_sincos, image_size // patch_size)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    # num_additional_image_tokens=1: the CLS token, dropped again by the "default" strategy (as llava-hf).
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               num_additional_image_tokens=1,
                               vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)


# Qwen2-VL's special tokens: chat turns, the image span, and the image/video placeholders that the
# processor expands (one <|image_pad|> per merged 2x2 patch group).
QWEN_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")
QWEN_MERGE_SIZE = 2
# Qwen2-VL's chat template for text and images (the published one also handles videos, vision
# ids and tools): a default system turn, then each turn as <|im_start|>role\n...<|im_end|>\n.
QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_qwen2vl(out_dir: str | os.PathLike, *, seed: int = 0, image_size: int = 32,
                       vocab_size: int = 1024) -> Path:
    """A tiny random Qwen2-VL (ViT with 2x2 patch merger + 2-layer Qwen2 LM with M-RoPE).

    Saved like Qwen/Qwen2-VL-7B-Instruct, except that the processor has no video processor
    (transformers builds those on torchvision; see :mod:`mmke.models.hf_vlm`). The offline
    tokenizer gains Qwen's special tokens and, like Qwen2's, adds no BOS. The image processor
    resizes every image to about ``image_size**2`` pixels keeping the aspect ratio (Qwen's dynamic
    resolution), in multiples of patch x merge size, so a square image gives
    ``(image_size / 16) ** 2`` image tokens and other shapes a few more or less.
    """
    _check_image_size(image_size)
    factor = PATCH_SIZE * QWEN_MERGE_SIZE
    if image_size % factor:
        raise ValueError(f"image_size must be a multiple of patch x merge size {factor}, got {image_size}")
    # Leave room for Qwen's special tokens: the built-in corpus may fill the whole BPE budget.
    tokenizer = train_tokenizer(vocab_size - len(QWEN_SPECIAL_TOKENS))
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=True) for token in QWEN_SPECIAL_TOKENS],
                         special_tokens=True)
    tokenizer.add_bos_token = False
    tokenizer.chat_template = QWEN2VL_CHAT_TEMPLATE
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than vocab_size {vocab_size}")
    token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    head_dim = 64 // 2
    config = Qwen2VLConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     # M-RoPE: temporal/height/width share the rotary frequencies (sum = head_dim / 2).
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]}},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": PATCH_SIZE, "spatial_merge_size": QWEN_MERGE_SIZE, "temporal_patch_size": 2},
        image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"], vision_end_token_id=token_ids["<|vision_end|>"],
    )
    with seeded(seed):
        model = Qwen2VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": image_size**2, "longest_edge": image_size**2},
        patch_size=PATCH_SIZE, merge_size=QWEN_MERGE_SIZE, temporal_patch_size=2,
    )
    processor = image_only_processor_class(Qwen2VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2VL_CHAT_TEMPLATE)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)


def sincos_2d(side: int, width: int) -> torch.Tensor:
    """MAE's 2-D sin-cos position table for a ``side`` x ``side`` patch grid, row-major like the
    patch sequence: half the channels encode the row, half the column (sin and cos of
    ``position / 10000**(k / (width / 4))``). Its low frequencies are nearly linear in the
    coordinate, so "left of" is one direction in feature space from the first step."""
    if width % 4:
        raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float) / (width // 4))
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    angles = [coordinate.flatten()[:, None].float() * omega for coordinate in (rows, columns)]
    return torch.cat([f(angle) for angle in angles for f in (torch.sin, torch.cos)], dim=1)


def set_sincos(table: torch.Tensor, scale: float, side: int) -> None:
    """Fill a vision position table ``[CLS + side**2, width]`` in place with ``scale`` x
    :func:`sincos_2d`; the CLS row has no place in the grid and stays zero."""
    table.zero_()
    table[1:] = scale * sincos_2d(side, table.shape[-1])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the weights without touching the caller's RNG (every tiny builder's init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


TINY_BUILDERS: dict[str, Callable[..., Path]] = {
    "blip2": build_tiny_blip2,
    "minigpt4": build_tiny_minigpt4,
    "hf_vlm": build_tiny_llava,
    "qwen2vl": build_tiny_qwen2vl,  # a second hf_vlm model; the workflow's tiny: builds by family
}


def build_tiny(family: str, out_dir: str | os.PathLike, **kwargs) -> Path:
    """Build the tiny model of ``family``; kwargs go to that family's builder (seed, image_size...)."""
    if family not in TINY_BUILDERS:
        raise ValueError(f"no tiny model for family {family!r}; available: {', '.join(sorted(TINY_BUILDERS))}")
    return TINY_BUILDERS[family](out_dir, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmke.models.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", choices=sorted(TINY_BUILDERS), default="blip2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-query-tokens", type=int, help="BLIP-2 / MiniGPT-4 only (default 4)")
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args(argv)
    extra = {} if args.num_query_tokens is None else {"num_query_tokens": args.num_query_tokens}
    path = build_tiny(args.family, args.out_dir, seed=args.seed, image_size=args.image_size,
                      vocab_size=args.vocab_size, **extra)
    print(path)


if __name__ == "__main__":
    main()
