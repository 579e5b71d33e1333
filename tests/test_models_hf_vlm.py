"""The chat-template adapter on a tiny random LLaVA: image tokens in input_ids, target-only labels."""

import pytest
import torch
from PIL import Image

from mmke.models import MODELS, load_model
from mmke.models.hf_vlm import HFVLMAdapter
from mmke.models.tiny import build_tiny_llava

PROMPTS = ["What colour is the shape?", "a photo of"]
TARGETS = [" red", " a blue triangle"]
IMAGE_TOKENS = (32 // 8) ** 2  # one per patch; CLS dropped


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava", image_size=32)


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_model("hf_vlm", model_dir)


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (40, 24), (220, 40, 40)), Image.new("RGB", (32, 32), (20, 20, 200))]


def test_registered_and_prompt_follows_the_chat_template(adapter):
    assert MODELS["hf_vlm"] is HFVLMAdapter
    assert adapter.chat_prompt("Q?", True) == "USER: <image>\nQ? ASSISTANT:"
    assert adapter.chat_prompt("Q?", False) == "USER: Q? ASSISTANT:"


def test_labels_are_exactly_the_target_tokens(adapter, images):
    batch = adapter.teacher_forced(PROMPTS, TARGETS, images)
    image_id = adapter.model.config.image_token_id
    assert (batch.input_ids == image_id).sum(dim=1).tolist() == [IMAGE_TOKENS, IMAGE_TOKENS]
    for row, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        full = adapter.tokenizer(adapter.chat_prompt(prompt, False) + target)["input_ids"]
        prompt_only = adapter.tokenizer(adapter.chat_prompt(prompt, False))["input_ids"]
        kept = batch.labels[row][batch.labels[row] != -100].tolist()
        assert kept == full[len(prompt_only):]
        assert adapter.tokenizer.decode(kept) == target
    assert (batch.labels[batch.attention_mask == 0] == -100).all()
    assert (batch.labels[batch.input_ids == image_id] == -100).all()


@torch.no_grad()
def test_logits_equal_the_models_forward_and_depend_on_the_image(adapter, images):
    batch = adapter.teacher_forced(PROMPTS, TARGETS, images)
    reference = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              pixel_values=batch.pixel_values).logits
    torch.testing.assert_close(adapter.logits(batch), reference.float(), rtol=0, atol=1e-6)
    swapped = adapter.teacher_forced(PROMPTS, TARGETS, images[::-1])
    assert not torch.allclose(adapter.logits(swapped), adapter.logits(batch))


def test_text_only_batch_has_no_image_tokens(adapter):
    batch = adapter.teacher_forced(PROMPTS, TARGETS, None)
    assert batch.pixel_values is None
    assert adapter.model.config.image_token_id not in batch.input_ids.tolist()
    assert adapter.logits(batch).shape[:2] == batch.labels.shape


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
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(adapter.model.name_or_path, backend="pil", local_files_only=True)
    processor.chat_template = None
    with pytest.raises(ValueError, match="LlavaProcessor has no chat template"):
        HFVLMAdapter(adapter.model, processor, adapter.device)
