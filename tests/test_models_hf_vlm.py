"""The chat-template adapter on tiny random LLaVA and Qwen2-VL: image tokens in input_ids, target-only labels."""

import json
import shutil

import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
)

from mmke.metrics import IGNORE_INDEX
from mmke.models import MODELS, load_model
from mmke.models.hf_vlm import HFVLMAdapter, concat_padded, fetch_image, image_only_processor_class, smart_resize
from mmke.models.tiny import build_tiny_llava, build_tiny_qwen2vl
from processor_path import processor_batch

PROMPTS = ["What colour is the shape?", "a photo of"]
TARGETS = [" red", " a blue triangle"]
IMAGE_TOKENS = (32 // 8) ** 2  # LLaVA: one per patch; CLS dropped
# Qwen2-VL images first get qwen_vl_utils' smart resize (sides in multiples of 28, at least 3136 px):
# 40x24 -> 84x56, 64x16 -> 112x28 (width x height). The tiny processor then resizes to about 32x32
# pixels in multiples of 16 keeping the aspect ratio, cuts 8x8 patches and merges 2x2 of them per
# token: 84x56 -> 32x16 (2x4 patches), 112x28 -> 64x16 (2x8).
QWEN_GRIDS = [[1, 2, 4], [1, 2, 8]]
QWEN_IMAGE_TOKENS = [2, 4]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava", image_size=32)


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_model("hf_vlm", model_dir)


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (40, 24), (220, 40, 40)), Image.new("RGB", (32, 32), (20, 20, 200))]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny") / "qwen2vl", image_size=32)


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return load_model("hf_vlm", qwen_dir)


@pytest.fixture(scope="module")
def qwen_images():
    return [Image.new("RGB", (40, 24), (220, 40, 40)), Image.new("RGB", (64, 16), (20, 20, 200))]


@pytest.fixture(params=["llava", "qwen2vl"])
def vlm(request, adapter, images, qwen, qwen_images):
    """(adapter, images, image tokens per image) of each tiny chat VLM."""
    if request.param == "llava":
        return adapter, images, [IMAGE_TOKENS, IMAGE_TOKENS]
    return qwen, qwen_images, QWEN_IMAGE_TOKENS


def test_registered_and_prompt_follows_the_chat_template(adapter):
    assert MODELS["hf_vlm"] is HFVLMAdapter
    assert adapter.chat_prompt("Q?", True) == "USER: <image>\nQ? ASSISTANT:"
    assert adapter.chat_prompt("Q?", False) == "USER: Q? ASSISTANT:"


def test_labels_are_exactly_the_raw_target_tokens(vlm):
    """EasyEdit's editor path: the target follows the assistant header with no leading space."""
    model, images, image_tokens = vlm
    assert model.target_join == "raw"
    batch = model.teacher_forced(PROMPTS, TARGETS, images)
    image_id = model.model.config.image_token_id
    assert (batch.input_ids == image_id).sum(dim=1).tolist() == image_tokens
    for row, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        full = model.tokenizer(model.chat_prompt(prompt, False) + target.removeprefix(" "))["input_ids"]
        prompt_only = model.tokenizer(model.chat_prompt(prompt, False))["input_ids"]
        kept = batch.labels[row][batch.labels[row] != -100].tolist()
        assert kept == full[len(prompt_only):]
        assert model.tokenizer.decode(kept) == target.removeprefix(" ")
    assert (batch.labels[batch.attention_mask == 0] == -100).all()
    assert (batch.labels[batch.input_ids == image_id] == -100).all()


@pytest.mark.parametrize("join", ["raw", "space"])
def test_target_tokens_follow_the_target_join(qwen_dir, join):
    """``raw`` labels the tokens of "red" right after ``assistant\n``; ``space`` those of " red"."""
    model = load_model("hf_vlm", qwen_dir, target_join=join)
    batch = model.teacher_forced(["What colour?"], [" red"], None)
    kept = batch.labels[0][batch.labels[0] != -100].tolist()
    text = {"raw": "red", "space": " red"}[join]
    assert kept == model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert model.tokenizer.decode(batch.input_ids[0]).endswith(f"<|im_start|>assistant\n{text}")
    other = {"raw": " red", "space": "red"}[join]
    assert kept != model.tokenizer(other, add_special_tokens=False)["input_ids"]  # different BPE ids


def test_unknown_target_join_is_refused(qwen_dir):
    with pytest.raises(ValueError, match="target_join for family 'hf_vlm' must be one of space, raw, got 'none'"):
        load_model("hf_vlm", qwen_dir, target_join="none")


@torch.no_grad()
def test_logits_equal_the_models_forward_and_depend_on_the_image(vlm):
    model, images, _ = vlm
    batch = model.teacher_forced(PROMPTS, TARGETS, images)
    reference = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            pixel_values=batch.pixel_values, **batch.image_inputs).logits
    torch.testing.assert_close(model.logits(batch), reference.float(), rtol=0, atol=1e-6)
    recoloured = [Image.new("RGB", image.size, (20, 200, 20)) for image in images]  # same sizes, other pixels
    other = model.teacher_forced(PROMPTS, TARGETS, recoloured)
    assert not torch.allclose(model.logits(other), model.logits(batch))


@torch.no_grad()
def test_text_only_batch_has_no_image_tokens(vlm):
    model, images, _ = vlm
    batch = model.teacher_forced(PROMPTS, TARGETS, None)
    assert batch.pixel_values is None
    assert model.model.config.image_token_id not in batch.input_ids.tolist()
    logits = model.logits(batch)
    assert logits.shape[:2] == batch.labels.shape
    model.logits(model.teacher_forced(PROMPTS, TARGETS, images))  # no state (Qwen's rope deltas) carries over
    assert torch.equal(model.logits(batch), logits)


def test_scopes_map_projector_and_vision_tower(adapter):
    scopes = adapter.scopes()
    assert scopes["vision_proj"] == [f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]
    assert all(name.startswith("model.vision_tower.") for name in scopes["vision"])
    assert "lm_head.weight" in scopes["llm"]
    assert "qformer" not in scopes


def test_image_size_is_refused(model_dir):
    with pytest.raises(ValueError, match="take their resolution from the processor; remove image_size"):
        load_model("hf_vlm", model_dir, image_size=64)


def test_processor_without_chat_template_is_refused(adapter):
    processor = AutoProcessor.from_pretrained(adapter.model.name_or_path, backend="pil", local_files_only=True)
    processor.chat_template = None
    with pytest.raises(ValueError, match="LlavaProcessor has no chat template"):
        HFVLMAdapter(adapter.model, processor, adapter.device)


def test_llava_processor_is_loaded_by_auto_processor(adapter):
    assert type(adapter.processor) is LlavaProcessor


def test_qwen2vl_prompt_follows_qwens_chat_template(qwen):
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert qwen.chat_prompt("Q?", True) == (
        f"{system}<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n")
    assert qwen.chat_prompt("Q?", False) == f"{system}<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert qwen.tokenizer("Q?")["input_ids"] == qwen.tokenizer("Q?", add_special_tokens=False)["input_ids"]  # no BOS


def test_qwen2vl_batch_carries_grid_and_token_types(qwen, qwen_images):
    batch = qwen.teacher_forced(PROMPTS, TARGETS, qwen_images)
    assert sorted(batch.image_inputs) == ["image_grid_thw", "mm_token_type_ids"]
    assert batch.image_inputs["image_grid_thw"].tolist() == QWEN_GRIDS
    # one row of 2 (temporal) x 3 x 8 x 8 pixels per patch, all patches of the batch stacked
    assert batch.pixel_values.shape == (sum(t * h * w for t, h, w in QWEN_GRIDS), 2 * 3 * 8 * 8)
    image_id = qwen.model.config.image_token_id
    assert torch.equal(batch.image_inputs["mm_token_type_ids"] == 1, batch.input_ids == image_id)


def test_qwen2vl_loads_without_a_video_processor(qwen, qwen_dir):
    processor = qwen.processor
    assert type(processor).__name__ == "Qwen2VLProcessor" and isinstance(processor, Qwen2VLProcessor)
    assert not hasattr(processor, "video_processor")
    assert json.loads((qwen_dir / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    # AutoProcessor would build Qwen2VLProcessor with a video processor, whose config the directory lacks.
    with pytest.raises(OSError, match="Can't load video processor"):
        AutoProcessor.from_pretrained(qwen_dir, backend="pil", local_files_only=True)


def test_qwen2vl_published_layout_with_video_config_loads_the_same(qwen, qwen_dir, qwen_images, tmp_path):
    """Qwen/Qwen2-VL-7B-Instruct's files: preprocessor_config.json + video_preprocessor_config.json."""
    published = tmp_path / "published"
    shutil.copytree(qwen_dir, published)
    processor_config = json.loads((published / "processor_config.json").read_text())
    image_config = processor_config["image_processor"] | {"processor_class": "Qwen2VLProcessor"}
    (published / "preprocessor_config.json").write_text(json.dumps(image_config))
    video_config = image_config | {"video_processor_type": "Qwen2VLVideoProcessor"}
    (published / "video_preprocessor_config.json").write_text(json.dumps(video_config))
    (published / "processor_config.json").unlink()
    loaded = load_model("hf_vlm", published)
    expected = qwen.teacher_forced(PROMPTS, TARGETS, qwen_images)
    batch = loaded.teacher_forced(PROMPTS, TARGETS, qwen_images)
    assert torch.equal(batch.input_ids, expected.input_ids) and torch.equal(batch.labels, expected.labels)
    assert torch.equal(batch.pixel_values, expected.pixel_values)
    assert torch.equal(batch.image_inputs["image_grid_thw"], expected.image_inputs["image_grid_thw"])


def test_qwen2vl_scopes_map_merger_visual_and_qwen2_mlp(qwen):
    scopes = qwen.scopes()
    assert scopes["vision_proj"] == ["model.visual.merger.ln_q.weight", "model.visual.merger.ln_q.bias"] + [
        f"model.visual.merger.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    vision = [name for name, _ in qwen.model.named_parameters()
              if name.startswith("model.visual.") and not name.startswith("model.visual.merger.")]
    assert scopes["vision"] == vision and "model.visual.patch_embed.proj.weight" in vision
    assert scopes["llm.mlp.last1"] == ["model.language_model.layers.1.mlp.up_proj.weight",
                                       "model.language_model.layers.1.mlp.down_proj.weight"]
    assert scopes["llm.mlp.last2"] == [f"model.language_model.layers.{i}.mlp.{w}_proj.weight"
                                       for i in (0, 1) for w in ("up", "down")]
    assert "lm_head.weight" in scopes["llm"] and not any(name.startswith("model.visual.") for name in scopes["llm"])
    assert "qformer" not in scopes


def test_qwen2vl_image_size_must_be_a_multiple_of_patch_times_merge(tmp_path):
    with pytest.raises(ValueError, match="image_size must be a multiple of patch x merge size 16, got 24"):
        build_tiny_qwen2vl(tmp_path / "q", image_size=24)
    assert not (tmp_path / "q").exists()


def test_only_processors_that_lose_nothing_drop_their_video_processor():
    with pytest.raises(ValueError, match="LlavaOnevisionProcessor takes image_processor, tokenizer, "
                                         "video_processor, num_image_tokens"):
        image_only_processor_class(LlavaOnevisionProcessor)
    assert image_only_processor_class(Qwen2VLProcessor) is image_only_processor_class(Qwen2VLProcessor)
    qwen25 = image_only_processor_class(Qwen2_5_VLProcessor)
    assert qwen25.__name__ == "Qwen2_5_VLProcessor" and qwen25.get_attributes() == ["image_processor", "tokenizer"]


@pytest.mark.parametrize("height,width,expected", [
    (24, 40, (56, 84)),  # rounds to 28x28 = 784 px < 3136: scaled up by sqrt(3136 / 960), sides ceiled
    (16, 64, (28, 112)),  # 28x56 < 3136: scale 1.75, 16 * 1.75 = 28 and 64 * 1.75 = 112 exactly
    (64, 64, (56, 56)),  # the demo's pictures: 64 / 28 = 2.29 -> 2, and 56 * 56 = 3136 is in bounds
    (100, 100, (112, 112)),  # 3.57 -> 4
    (42, 70, (56, 56)),  # 1.5 -> 2 and 2.5 -> 2: Python rounds halves to even, as qwen_vl_utils
    (28, 28, (56, 56)),  # 784 px: doubled to the minimum
    (4000, 5000, (3192, 4004)),  # 4004 x 5012 > 16384 * 784: scale sqrt(4000 * 5000 / 12845056), floored
])
def test_qwen_smart_resize_matches_hand_computed_sizes(height, width, expected):
    assert smart_resize(height, width) == expected


def test_qwen_smart_resize_refuses_extreme_aspect_ratios():
    with pytest.raises(ValueError, match=r"absolute aspect ratio must be smaller than 200, got 210.0 \(2100x10 px\)"):
        smart_resize(10, 2100)


def test_qwen_images_are_fetched_as_qwen_vl_utils_does(qwen, qwen_images, adapter, images, monkeypatch):
    """The image processor receives smart-resized images (bicubic); LLaVA's receive the images as
    read. Each image object is processed once, however many batches it appears in."""
    resized = fetch_image(qwen_images[0])
    assert resized.size == (84, 56)
    assert resized.tobytes() == qwen_images[0].resize((84, 56), Image.Resampling.BICUBIC).tobytes()
    seen = []
    for model in (qwen, adapter):
        cls = type(model.processor.image_processor)
        monkeypatch.setattr(cls, "__call__", lambda self, *a, call=cls.__call__, **k:
                            seen.append([i.size for i in k["images"]]) or call(self, *a, **k))
    fresh_qwen, fresh_llava = [image.copy() for image in qwen_images], [image.copy() for image in images]
    for _ in range(2):
        qwen.teacher_forced(PROMPTS, TARGETS, fresh_qwen)
        adapter.teacher_forced(PROMPTS, TARGETS, fresh_llava)
    assert seen == [[(84, 56)], [(112, 28)], [(40, 24)], [(32, 32)]]


def assert_processor_batch(batch, model, prompts, targets, pictures):
    """Every tensor of ``batch`` equals (dtype included) that of the processor's own call."""
    reference = processor_batch(model, prompts, targets, pictures)
    assert set(batch.image_inputs) == set(reference.image_inputs)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(getattr(batch, key), getattr(reference, key)), key
    assert (batch.pixel_values is None) == (reference.pixel_values is None)
    if batch.pixel_values is not None:
        assert batch.pixel_values.dtype == reference.pixel_values.dtype
        assert torch.equal(batch.pixel_values, reference.pixel_values)
    for key, value in reference.image_inputs.items():
        assert batch.image_inputs[key].dtype == value.dtype and torch.equal(batch.image_inputs[key], value), key
    assert batch.sources == reference.sources


def test_batches_equal_the_uncached_processor_path(vlm):
    """Chat prompts, tokens and image processor outputs remembered per text and image: a mixed
    batch (a text-only row, one image twice) equals the processor's own output, tensor for tensor,
    on first sight and from the memo; so does a text-only batch."""
    model, images, _ = vlm
    fresh = [image.copy() for image in images]
    prompts, targets = PROMPTS + ["Who wrote it?", "Which shape?"], TARGETS + [" Ann", " a square"]
    pictures = [fresh[0], fresh[1], None, fresh[0]]
    for _ in range(2):
        assert_processor_batch(model.teacher_forced(prompts, targets, pictures), model, prompts, targets, pictures)
    assert_processor_batch(model.teacher_forced(prompts[2:], targets[2:], None), model, prompts[2:], targets[2:],
                           [None, None])


def test_tiled_image_outputs_concatenate_as_the_image_processor_batches_them():
    """LLaVA-OneVision pads each image's tiles to the batch's most: per-image outputs, padded and
    concatenated, equal the batch processed at once (here 5, 2 and 3 tiles)."""
    processor = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]])
    pictures = [Image.new("RGB", size, (200, 40, 40)) for size in ((64, 64), (30, 30), (40, 24))]
    together = processor(images=pictures, return_tensors="pt")
    alone = [processor(images=[picture], return_tensors="pt") for picture in pictures]
    assert [part["pixel_values"].shape[1] for part in alone] == [5, 2, 3]
    for key, value in together.items():
        assert torch.equal(concat_padded([part[key] for part in alone]), value), key


@pytest.mark.parametrize("family", ["qwen", "adapter"])
def test_prompt_length_from_the_tokenizer_equals_the_processed_prompt(family, request, qwen_images, images):
    """The target's token count from the tokenizer alone gives the same labels as processing the
    chat prompt with its images (the placeholder expands the same way with or without the target)."""
    model = request.getfixturevalue(family)
    pictures = qwen_images if family == "qwen" else images
    batch = model.teacher_forced(PROMPTS, TARGETS, pictures)
    chats = [model.chat_prompt(prompt, True) for prompt in PROMPTS]
    processed = model.processor(text=chats, images=model.prepare_images(pictures), padding=True,
                                return_tensors="pt")["attention_mask"].sum(dim=1)
    first_label = (batch.labels != IGNORE_INDEX).int().argmax(dim=1)
    assert first_label.tolist() == processed.tolist()


def test_a_resize_is_logged_once_per_model(qwen_dir, qwen_images, caplog):
    model = load_model("hf_vlm", qwen_dir)
    with caplog.at_level("WARNING", logger="mmke.models.base"):
        model.teacher_forced(PROMPTS, TARGETS, qwen_images)
        model.teacher_forced(PROMPTS, TARGETS, qwen_images)
    notes = [r.getMessage() for r in caplog.records if "resized" in r.getMessage()]
    assert notes == [f"{qwen_dir}: images are resized before the model sees them, e.g. 40x24 px -> 32x16 px "
                     "(said once per job)"]
