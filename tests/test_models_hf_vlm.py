"""The chat-template adapter on tiny random LLaVA and Qwen2-VL: image tokens in input_ids, target-only labels."""

import json
import shutil

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaOnevisionProcessor, LlavaProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor

from mmke.models import MODELS, load_model
from mmke.models.hf_vlm import HFVLMAdapter, image_only_processor_class
from mmke.models.tiny import build_tiny_llava, build_tiny_qwen2vl

PROMPTS = ["What colour is the shape?", "a photo of"]
TARGETS = [" red", " a blue triangle"]
IMAGE_TOKENS = (32 // 8) ** 2  # LLaVA: one per patch; CLS dropped
# Qwen2-VL resizes each image to about 32x32 pixels in multiples of 16 keeping the aspect ratio,
# cuts 8x8 patches and merges 2x2 of them per token: 40x24 -> 32x32 (4x4 patches), 64x16 -> 16x64 (2x8).
QWEN_GRIDS = [[1, 4, 4], [1, 2, 8]]
QWEN_IMAGE_TOKENS = [4, 4]


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


def test_labels_are_exactly_the_target_tokens(vlm):
    model, images, image_tokens = vlm
    batch = model.teacher_forced(PROMPTS, TARGETS, images)
    image_id = model.model.config.image_token_id
    assert (batch.input_ids == image_id).sum(dim=1).tolist() == image_tokens
    for row, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        full = model.tokenizer(model.chat_prompt(prompt, False) + target)["input_ids"]
        prompt_only = model.tokenizer(model.chat_prompt(prompt, False))["input_ids"]
        kept = batch.labels[row][batch.labels[row] != -100].tolist()
        assert kept == full[len(prompt_only):]
        assert model.tokenizer.decode(kept) == target
    assert (batch.labels[batch.attention_mask == 0] == -100).all()
    assert (batch.labels[batch.input_ids == image_id] == -100).all()


@torch.no_grad()
def test_logits_equal_the_models_forward_and_depend_on_the_image(vlm):
    model, images, _ = vlm
    batch = model.teacher_forced(PROMPTS, TARGETS, images)
    reference = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            pixel_values=batch.pixel_values, **batch.image_inputs).logits
    torch.testing.assert_close(model.logits(batch), reference.float(), rtol=0, atol=1e-6)
    swapped = model.teacher_forced(PROMPTS, TARGETS, images[::-1])
    assert not torch.allclose(model.logits(swapped), model.logits(batch))


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
