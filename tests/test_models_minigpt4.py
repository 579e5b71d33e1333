"""MiniGPT-4 on a tiny random model: EasyEdit's image wrap, BOS only with images, logits."""

import pytest
import torch
from PIL import Image

from mmke.models import MODELS, load_model
from mmke.models.minigpt4 import MiniGPT4Adapter
from mmke.models.tiny import build_tiny_minigpt4

Q = 4


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return load_model("minigpt4", build_tiny_minigpt4(tmp_path_factory.mktemp("tiny") / "m", num_query_tokens=Q))


def encode(adapter, text):
    return adapter.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_registered_with_a_llama_language_model(adapter):
    assert MODELS["minigpt4"] is MiniGPT4Adapter
    assert adapter.model.config.text_config.model_type == "llama"


def test_image_item_is_bos_human_img_queries_img_text(adapter):
    image = Image.new("RGB", (32, 32), (0, 0, 255))
    batch = adapter.teacher_forced(["What colour is it?"], [" blue"], [image])
    before, after = encode(adapter, "###Human: <Img>"), encode(adapter, "</Img> ")
    text = encode(adapter, "What colour is it? blue")
    head = [adapter.tokenizer.bos_token_id, *before, *[adapter.placeholder_id] * Q, *after]
    assert batch.input_ids[0].tolist() == head + text
    n_prompt = len(encode(adapter, "What colour is it?"))
    assert batch.labels[0].tolist() == [-100] * (len(head) + n_prompt) + text[n_prompt:]


def test_text_only_item_has_no_bos_and_no_wrap(adapter):
    batch = adapter.teacher_forced(["Who wrote it?"], [" Tolstoy"], None)
    assert batch.input_ids[0].tolist() == encode(adapter, "Who wrote it? Tolstoy")
    assert adapter.tokenizer.bos_token_id not in batch.input_ids[0].tolist()


@torch.no_grad()
def test_logits_equal_easyedit_concatenation(adapter):
    """[bos][p_before][projected queries][p_after][text] embedded and run, as EasyEdit's forward does."""
    image = Image.new("RGB", (32, 32), (0, 0, 255))
    batch = adapter.teacher_forced(["What colour is it?"], [" blue"], [image])
    model = adapter.model
    embed = model.language_model.get_input_embeddings()
    queries = model.get_image_features(batch.pixel_values, interpolate_pos_encoding=True, return_dict=True).pooler_output
    ids = lambda text: torch.tensor([encode(adapter, text)])  # noqa: E731
    parts = [embed(torch.tensor([[adapter.tokenizer.bos_token_id]])), embed(ids("###Human: <Img>")), queries,
             embed(ids("</Img> ")), embed(ids("What colour is it? blue"))]
    reference = model.language_model(inputs_embeds=torch.cat(parts, dim=1)).logits
    torch.testing.assert_close(adapter.logits(batch), reference, rtol=0, atol=1e-6)
