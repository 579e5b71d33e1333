"""The BLIP-2 adapter on a tiny random model: EasyEdit's template, logits, scopes, restore."""

import pytest
import torch
from PIL import Image

from mmke.models import MODELS, load_model
from mmke.models.blip2 import Blip2Adapter
from mmke.models.tiny import build_tiny_blip2

Q = 4  # query tokens of the tiny model
PROMPTS = ["What colour is the shape in the picture?", "a photo of"]
TARGETS = [" red", " a blue triangle"]
LAST = "language_model.model.decoder.layers.1"
FIRST = "language_model.model.decoder.layers.0"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_blip2(tmp_path_factory.mktemp("tiny") / "blip2", seed=0, image_size=32, num_query_tokens=Q)


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_model("blip2", model_dir)


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (40, 24), (220, 40, 40)), Image.new("L", (32, 32), 200)]


def encode(adapter, text):
    return adapter.tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_batch(adapter, prompts, targets, query):
    """input_ids / attention_mask / labels worked out from the spec, item by item."""
    texts = [encode(adapter, p + t) for p, t in zip(prompts, targets)]
    width = query + max(map(len, texts))
    pad, image = adapter.tokenizer.pad_token_id, adapter.model.config.image_token_id
    ids, mask, labels = [], [], []
    for prompt, text in zip(prompts, texts):
        n_prompt, n_pad = len(encode(adapter, prompt)), width - query - len(text)
        ids.append([image] * query + text + [pad] * n_pad)
        mask.append([1] * (query + len(text)) + [0] * n_pad)
        labels.append([-100] * (query + n_prompt) + text[n_prompt:] + [-100] * n_pad)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def test_registered_and_unknown_family_lists_registered(model_dir):
    assert MODELS["blip2"] is Blip2Adapter
    with pytest.raises(ValueError, match="registered: .*blip2"):
        load_model("nope", model_dir)


def test_label_mask_matches_hand_computed_expectation(adapter, images):
    batch = adapter.teacher_forced(PROMPTS, TARGETS, images)
    ids, mask, labels = expected_batch(adapter, PROMPTS, TARGETS, Q)
    assert torch.equal(batch.input_ids, ids)
    assert torch.equal(batch.attention_mask, mask)
    assert torch.equal(batch.labels, labels)
    # the prompts have different lengths, so one item is padded; its pad positions are unlabelled
    lengths = [len(encode(adapter, p + t)) for p, t in zip(PROMPTS, TARGETS)]
    assert lengths[0] != lengths[1]
    short = lengths.index(min(lengths))
    assert (batch.labels[short, Q + lengths[short]:] == -100).all()
    assert (batch.labels[:, :Q] == -100).all()
    # exactly the target tokens are kept, in order
    for row, target in enumerate(TARGETS):
        assert batch.labels[row][batch.labels[row] != -100].tolist() == encode(adapter, target)


def test_no_bos_and_no_special_tokens_in_text(adapter, images):
    batch = adapter.teacher_forced(PROMPTS, TARGETS, images)
    text = batch.input_ids[:, Q:][batch.attention_mask[:, Q:].bool()]
    assert adapter.tokenizer.bos_token_id not in text.tolist()
    assert batch.input_ids[0, Q].item() == encode(adapter, PROMPTS[0])[0]


def test_pixel_values_and_logits_shape(adapter, images):
    batch = adapter.teacher_forced(PROMPTS, TARGETS, images)
    assert batch.pixel_values.shape == (2, 3, 32, 32)
    logits = adapter.logits(batch)
    assert logits.shape == (2, batch.labels.shape[1], adapter.model.config.text_config.vocab_size)
    assert logits.dtype == torch.float32


def test_text_only_batch_has_no_query_positions(adapter):
    batch = adapter.teacher_forced(PROMPTS, TARGETS, None)
    ids, mask, labels = expected_batch(adapter, PROMPTS, TARGETS, 0)
    assert batch.pixel_values is None
    assert torch.equal(batch.input_ids, ids) and torch.equal(batch.attention_mask, mask)
    assert torch.equal(batch.labels, labels)
    assert adapter.model.config.image_token_id not in batch.input_ids.tolist()
    assert adapter.logits(batch).shape[:2] == batch.input_ids.shape


@torch.no_grad()
def test_logits_equal_the_models_own_forward(adapter, images):
    batch = adapter.teacher_forced(PROMPTS, TARGETS, images)
    reference = adapter.model(pixel_values=batch.pixel_values, input_ids=batch.input_ids,
                              attention_mask=batch.attention_mask, interpolate_pos_encoding=True).logits
    torch.testing.assert_close(adapter.logits(batch), reference.float(), rtol=0, atol=1e-6)
    text = adapter.teacher_forced(PROMPTS, TARGETS, None)
    reference = adapter.model.language_model(input_ids=text.input_ids, attention_mask=text.attention_mask).logits
    torch.testing.assert_close(adapter.logits(text), reference.float(), rtol=0, atol=1e-6)


@torch.no_grad()
def test_logits_depend_on_the_image(adapter, images):
    first = adapter.logits(adapter.teacher_forced(PROMPTS[:1], TARGETS[:1], images[:1]))
    second = adapter.logits(adapter.teacher_forced(PROMPTS[:1], TARGETS[:1], images[1:]))
    assert not torch.allclose(first, second)


def test_logits_carry_gradients(adapter, images):
    batch = adapter.teacher_forced(PROMPTS, TARGETS, images)
    params = adapter.editable("llm.mlp.last1")
    adapter.logits(batch).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    adapter.model.zero_grad(set_to_none=True)


def test_mlp_scopes_are_the_last_opt_layers(adapter):
    last1 = adapter.editable("llm.mlp.last1")
    assert list(last1) == [f"{LAST}.fc1.weight", f"{LAST}.fc2.weight"]
    params = dict(adapter.model.named_parameters())
    assert all(last1[name] is params[name] for name in last1)
    assert set(adapter.editable("llm.mlp.last2")) == {
        f"{layer}.{w}" for layer in (FIRST, LAST) for w in ("fc1.weight", "fc2.weight")}


def test_component_scopes_partition_the_model(adapter):
    scopes = adapter.scopes()
    assert "query_tokens" in scopes["qformer"]
    assert scopes["vision_proj"] == ["language_projection.weight", "language_projection.bias"]
    assert set(scopes["llm.mlp.last2"]) < set(scopes["llm"])
    parts = [set(scopes[name]) for name in ("llm", "qformer", "vision_proj", "vision")]
    assert set().union(*parts) == {name for name, _ in adapter.model.named_parameters()}
    assert sum(map(len, parts)) == len(set().union(*parts))


@pytest.mark.parametrize("scope", ["llm.mlp.last3", "mlp", "llm.mlp.last0"])
def test_unknown_scope_lists_valid_scopes(adapter, scope):
    with pytest.raises(KeyError, match="valid scopes: llm.mlp.last1, llm.mlp.last2, llm.attn.q, llm.attn.v, llm.attn.qv, llm.layers.0.mlp.in"):
        adapter.editable(scope)


def test_snapshot_restore_is_bit_for_bit(adapter):
    before = {name: p.detach().clone() for name, p in adapter.model.named_parameters()}
    params = adapter.editable("llm.mlp.last2") | adapter.editable("vision_proj")
    snapshot = adapter.snapshot(params)
    assert set(snapshot) == set(params)
    assert all(snapshot[name].data_ptr() != params[name].data_ptr() for name in params)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p)).mul_(1.5)
    assert not torch.equal(params[f"{LAST}.fc1.weight"], before[f"{LAST}.fc1.weight"])
    adapter.restore(snapshot)
    after = dict(adapter.model.named_parameters())
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert all(after[name] is params[name] for name in params)  # restored in place


def test_image_size_override_changes_pixel_values(model_dir, images):
    adapter = load_model("blip2", model_dir, image_size=48)
    assert adapter.pixel_values(images).shape == (2, 3, 48, 48)
    batch = adapter.teacher_forced(PROMPTS, TARGETS, images)
    # the vision encoder interpolates its position embeddings to the larger grid
    assert adapter.logits(batch).shape[:2] == batch.labels.shape


def test_rejects_mismatched_lengths(adapter, images):
    with pytest.raises(ValueError, match="2 prompts, 1 targets"):
        adapter.teacher_forced(PROMPTS, TARGETS[:1], images)
    with pytest.raises(ValueError, match="1 images"):
        adapter.teacher_forced(PROMPTS, TARGETS, images[:1])
