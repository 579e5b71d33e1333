"""Tiny model directories: deterministic, atomic, and loadable like a real checkpoint."""

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Blip2ForConditionalGeneration

from mmke.data.demo import ATTRIBUTES, NUMBERS
from mmke.models import load_model, tiny


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "a": tiny.build_tiny_blip2(root / "a", seed=0),
        "a_again": tiny.build_tiny_blip2(root / "a_again", seed=0),
        "b": tiny.build_tiny_blip2(root / "b", seed=1),
    }


def state_dict(path):
    return Blip2ForConditionalGeneration.from_pretrained(path, local_files_only=True).state_dict()


def test_same_seed_gives_identical_weights(built):
    first, second = state_dict(built["a"]), state_dict(built["a_again"])
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_different_seed_gives_different_weights(built):
    first, other = state_dict(built["a"]), state_dict(built["b"])
    differing = [name for name in first if not torch.equal(first[name], other[name])]
    assert "language_model.model.decoder.layers.1.fc1.weight" in differing
    assert "query_tokens" in differing


def test_build_does_not_touch_callers_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_blip2(tmp_path / "m", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_is_deterministic():
    first, second = tiny.train_tokenizer(), tiny.train_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


@pytest.mark.parametrize("text", [
    " What colour is the shape?",
    "Ünïcødé naïve café — 日本語のテキスト 🙂👍🏽\ttabs\nand newlines  double  spaces",
    "Zyxwvut qq 12345.678 <notatoken> x",
])
def test_tokenizer_round_trips_arbitrary_text(built, text):
    tokenizer = AutoTokenizer.from_pretrained(built["a"], local_files_only=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_specials_follow_opt(built):
    tokenizer = AutoTokenizer.from_pretrained(built["a"], local_files_only=True)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "</s>", "</s>", "<pad>", "<unk>")
    assert tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    # like OPT, default encoding prepends BOS (the adapter must ask for no special tokens)
    assert tokenizer("hello")["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.tokenize("a <image> b").count("<image>") == 1


def test_directory_loads_like_a_blip2_checkpoint(built):
    model = Blip2ForConditionalGeneration.from_pretrained(built["a"], local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(built["a"], local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(built["a"], backend="pil", local_files_only=True)
    config = model.config
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert config.image_token_id < config.text_config.vocab_size
    assert len(tokenizer) <= config.text_config.vocab_size
    assert config.num_query_tokens == 4
    assert config.text_config.model_type == "opt" and config.text_config.num_hidden_layers == 2
    assert (processor.size.height, processor.size.width) == (32, 32)


def test_cli_builds_and_replaces_atomically(tmp_path):
    out = tmp_path / "model"
    tiny.main([str(out), "--family", "blip2", "--seed", "0", "--image-size", "16"])
    tiny.main([str(out), "--seed", "1", "--image-size", "16"])  # rebuild over an existing directory
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or old directory left
    assert Blip2ForConditionalGeneration.from_pretrained(out, local_files_only=True).config.vision_config.image_size == 16


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny.Blip2Processor, "save_pretrained", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny.build_tiny_blip2(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_rejects_bad_image_size_and_family(tmp_path):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny.build_tiny_blip2(tmp_path / "m", image_size=30)
    with pytest.raises(ValueError, match="available: blip2"):
        tiny.build_tiny("nope", tmp_path / "m")


def test_every_world_answer_is_one_token():
    """The pretraining learns a small answer vocabulary: each answer word of the world is one token."""
    tokenizer = tiny.train_tokenizer()
    words = [word for values in ATTRIBUTES.values() for word in values] + list(NUMBERS)
    assert {word: len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) for word in words} == dict.fromkeys(words, 1)


def test_random_vision_encoder_sees_the_image(tmp_path):
    """Blip2VisionConfig's default init (1e-10) would give every image the same features."""
    adapter = load_model("blip2", tiny.build_tiny_blip2(tmp_path / "m"))
    red, blue = Image.new("RGB", (32, 32), (220, 40, 40)), Image.new("RGB", (32, 32), (40, 80, 220))
    features = adapter.model.get_image_features(adapter.pixel_values([red, blue]), return_dict=True).pooler_output
    assert (features[0] - features[1]).abs().max() > 1e-3


def test_position_sincos_sets_only_the_vision_position_embeddings(tmp_path):
    """The demo's base model gets a fixed 2-D sin-cos grid instead of random vision positions."""
    default = state_dict(tiny.build_tiny_blip2(tmp_path / "d", init_std=0.1, patch_size=4))
    grid = state_dict(tiny.build_tiny_blip2(tmp_path / "s", init_std=0.1, patch_size=4, position_sincos=3.0))
    key = "vision_model.embeddings.position_embedding"
    assert default[key].std().item() == pytest.approx(0.1, rel=0.15)
    table = grid[key][0]
    assert table.shape == (1 + 8 * 8, 32)
    assert torch.equal(table[0], torch.zeros(32))  # CLS: no place in the grid
    assert torch.allclose(table[1:], 3.0 * tiny.sincos_2d(8, 32))
    assert {name for name in default if not torch.equal(default[name], grid[name])} == {key}


def test_sincos_table_encodes_row_and_column_separately():
    table = tiny.sincos_2d(4, 16).view(4, 4, 16)  # row, column, channel
    rows, columns = table[..., :8], table[..., 8:]
    assert torch.equal(rows[1, 0], rows[1, 3]) and not torch.equal(rows[0, 0], rows[1, 0])
    assert torch.equal(columns[0, 2], columns[3, 2]) and not torch.equal(columns[0, 0], columns[0, 1])
    assert torch.equal(table[0, 0], torch.tensor([0.0, 1.0]).repeat_interleave(4).repeat(2))  # sin 0, cos 0
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny.sincos_2d(4, 18)
