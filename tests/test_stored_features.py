"""The baseline job's stored image features stand in for the image encoder of every evaluate job
whose edits leave the features alone, with the values of computing them (mmke.image_features)."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch
from tokenizers import AddedToken
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

import mmke.data.images as images_module
import mmke.data.records as records_module
from mmke.data.demo import write_demo_dataset
from mmke.data.images import UndecodedImage, decoded, load_rgb
from mmke.data.records import ImageRoots, RecordImages
from mmke.evaluate import Protocol, Schedule, evaluate, run_baseline
from mmke.hparams import build_hparams
from mmke.image_features import StoredImageFeatures, save_image_features
from mmke.io import read_jsonl
from mmke.methods.base import get_method
from mmke.models import load_model
from mmke.models.base import VLMAdapter
from mmke.models.hf_vlm import HFVLMAdapter, without_video_processor
from mmke.models.tiny import (
    build_tiny_blip2,
    build_tiny_llava,
    build_tiny_minigpt4,
    build_tiny_qwen2vl,
    seeded,
    train_tokenizer,
)
from mmke.stages import baseline_stage, evaluate_stage

METHODS = {"base": {}, "FT-L": {"scopes": ["llm.mlp.last2"], "num_steps": 3, "lr": 1e-2},
           "FT-V": {"scopes": ["qformer"], "num_steps": 2, "lr": 1e-2},
           "WISE": {"scope": "llm.layers.-1.mlp.in", "n_iter": 3}}


def editor(method: str):
    cls = get_method(method)
    return cls(build_hparams(cls.hparams_class, {"method": method, **METHODS[method]}))


@contextlib.contextmanager
def encoder_calls(adapter):
    """How often the vision tower runs, as a one-element list filled while open."""
    calls = [0]
    handle = adapter.model.vision_model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


@contextlib.contextmanager
def decodes(monkeypatch):
    """How many image files are decoded, as a one-element list filled while open."""
    calls = [0]

    def counted(path, load=images_module.load_rgb):
        calls[0] += 1
        return load(path)

    with monkeypatch.context() as patch:
        for module in (images_module, records_module):
            patch.setattr(module, "load_rgb", counted)
        yield calls


@pytest.fixture(scope="module")
def stored(tiny_blip2_dir, eval_records, roots, tmp_path_factory):
    """The baseline with its features kept, and those features written and opened as a job would."""
    baseline = run_baseline(load_model("blip2", tiny_blip2_dir, image_size=32), eval_records, roots, Protocol(),
                            batch_size=3, keep_image_features=True)
    path = tmp_path_factory.mktemp("features") / "image_features.safetensors"
    save_image_features(path, baseline.image_features, {"family": "blip2"})
    return baseline, StoredImageFeatures(path, {"family": "blip2"})


def test_the_baseline_keeps_one_feature_per_image_file_equal_to_computing_it(stored, eval_records, roots, adapter):
    baseline, features = stored
    files = {roots.key(field, getattr(record, field))
             for record in eval_records for field in ("image", "image_rephrase", "m_loc")}
    assert set(baseline.image_features) == files and len(features) == len(files)
    record = eval_records[1]
    image = RecordImages(roots)(record)["image_rephrase"]
    batch = adapter.teacher_forced([""], ["."], [image])
    with torch.no_grad():
        (computed,) = adapter.image_features(batch, [0])
    assert torch.equal(features.get(roots.key("image_rephrase", record.image_rephrase)), computed)
    assert features.get("image/not-there.png") is None and features.get(None) is None


@pytest.mark.parametrize("method", list(METHODS))
def test_stored_features_give_the_records_of_computing_them_and_skip_the_encoder(method, stored, tiny_blip2_dir,
                                                                                eval_records, roots, monkeypatch):
    """...and BLIP-2's fixed query positions need no pixels then: no image file is decoded."""
    baseline, features = stored
    rows, calls, decoded_files = [], [], []
    # the third run as an evaluate job whose store covers its images: the image path freed, but for
    # FT-V, which recomputes the features
    released = method != "FT-V"
    for store, release in ((None, False), (features, False), (features, released)):
        model = load_model("blip2", tiny_blip2_dir, image_size=32)
        if release:
            assert model.release_image_modules() > 0
        with encoder_calls(model) as count, decodes(monkeypatch) as files:
            rows.append(evaluate(model, editor(method), eval_records, roots, baseline, Protocol(),
                                 stored_features=store).rows)
        calls.append(count[0])
        decoded_files.append(files[0])
    assert rows[0] == rows[1] == rows[2]
    if method == "FT-V":  # it trains the Q-Former: the baseline's features are not its model's
        assert calls[1] == calls[0] > 0 and decoded_files[1] == decoded_files[0] == 3 * len(eval_records)
    else:
        assert calls[0] > 0 and calls[1] == calls[2] == 0
        assert decoded_files == [3 * len(eval_records), 0, 0]


def test_the_baseline_encodes_each_image_once_also_when_a_chunk_exceeds_the_memo(tiny_blip2_dir, eval_records,
                                                                                  roots, monkeypatch):
    model = load_model("blip2", tiny_blip2_dir, image_size=32)
    monkeypatch.setattr(model, "FEATURE_MEMO_SIZE", 4)  # a chunk of 4 records has 12 images
    with encoder_calls(model) as count:
        kept = run_baseline(model, eval_records, roots, Protocol(), batch_size=4, keep_image_features=True)
    assert count[0] == len(eval_records)  # one encoder call per record's three images, none in the forward
    assert kept.accuracy == run_baseline(model, eval_records, roots, Protocol(), batch_size=1).accuracy


def test_prefetch_encodes_only_the_images_neither_memoised_nor_stored(adapter, eval_records, roots, monkeypatch):
    """One encoder call on a batch of exactly those images; with every image stored or memoised,
    no batch is built at all."""
    record_images = RecordImages(roots)(eval_records[0])
    image, rephrase, m_loc = (record_images[field] for field in ("image", "image_rephrase", "m_loc"))
    with torch.no_grad():
        computed = adapter.image_features(adapter.teacher_forced([""] * 3, ["."] * 3, [image, rephrase, m_loc]),
                                          [0, 1, 2])
    known = {id(image): computed[0] + 1}  # stored: not what the encoder gives, so its use shows
    built, encoded = [], []
    template, encoder = type(adapter).teacher_forced, type(adapter).image_features
    monkeypatch.setattr(type(adapter), "teacher_forced",
                        lambda self, *args: built.append(list(args[2])) or template(self, *args))
    monkeypatch.setattr(type(adapter), "image_features",
                        lambda self, batch, which: encoded.append(len(batch.sources)) or encoder(self, batch, which))
    with adapter.frozen_image_features(lambda source: known.get(id(source))):
        first = adapter.prefetch_image_features([image, rephrase, m_loc, rephrase])
        again = adapter.prefetch_image_features([m_loc, image])
    assert [[id(source) for source in sources] for sources in built] == [[id(rephrase), id(m_loc)]]
    assert encoded == [2]
    for got, want in zip(first, [known[id(image)], computed[1], computed[2], computed[1]]):
        assert torch.allclose(got, want, atol=1e-6)
    assert again[0] is first[2] and again[1] is first[0]  # from the memo


def test_a_sequential_group_larger_than_the_memo_reads_every_feature_from_the_store(stored, adapter, eval_records,
                                                                                    roots, monkeypatch):
    """Measured after all edits, a group's images have left the memo: the store still has them."""
    baseline, features = stored
    monkeypatch.setattr(adapter, "FEATURE_MEMO_SIZE", 2)
    with encoder_calls(adapter) as count:
        result = evaluate(adapter, editor("FT-L"), eval_records, roots, baseline, Protocol(),
                          Schedule("sequential", "all"), stored_features=features)
    assert count[0] == 0 and len(result.rows) == len(eval_records)


def test_image_keys_name_the_root_and_the_relative_path(tmp_path):
    roots = ImageRoots(tmp_path / "images", tmp_path / "rephrased")
    assert roots.key("image", "a/b.png") == roots.key("m_loc", "a/b.png") == "image/a/b.png"
    assert roots.key("image_rephrase", "a/b.png") == "rephrase/a/b.png"
    assert ImageRoots(tmp_path).key("image_rephrase", "a/b.png") == "image/a/b.png"
    with pytest.raises(ValueError, match="unknown image field 'loc'"):
        roots.key("loc", "a/b.png")


def test_record_images_name_only_the_images_they_still_keep(eval_records, roots):
    images = RecordImages(roots, memo=1)
    first = images(eval_records[0])
    assert images.key(first["m_loc"]) == roots.key("m_loc", eval_records[0].m_loc)
    images(eval_records[1])  # the first record leaves the memo
    assert images.key(first["m_loc"]) is None
    assert images.key(first["m_loc"].copy()) is None  # an equal picture is not the object
    second = images(eval_records[1])
    images(dataclasses.replace(eval_records[2], id=eval_records[1].id))  # another record, the same id
    assert images.key(second["image"]) is None


def test_stages_store_features_only_when_asked_and_refuse_another_models(tmp_path, monkeypatch):
    moves = []  # per evaluate job: whether the image path was gone when the model went to its device

    def to(adapter, device, move=VLMAdapter.to):
        moves.append(not [tensor for path, _ in adapter.image_stages()
                          for tensor in adapter.model.get_submodule(path).state_dict().values()])
        return move(adapter, device)

    monkeypatch.setattr(VLMAdapter, "to", to)
    model = {"family": "blip2", "path": str(build_tiny_blip2(tmp_path / "model", seed=0)), "image_size": 32}
    write_demo_dataset(tmp_path / "data", "evqa", n_train=2, n_eval=3, seed=0, image_size=32)
    dataset = {"kind": "evqa", "eval": str(tmp_path / "data/eval.json"), "image_root": str(tmp_path / "data/images")}
    protocol = {"exact_match": True, "mloc_template": "trainer"}
    (tmp_path / "ft.yaml").write_text("method: FT-L\nscopes: [llm.mlp.last1]\nnum_steps: 2\n")
    outputs = {}
    for store in (False, True):
        base = dict(rows_out=tmp_path / f"pre{store}.jsonl", tensors_out=tmp_path / f"pre{store}.safetensors",
                    features_out=tmp_path / f"features{store}.safetensors")
        tokens = 40 if store else None  # a token budget too: the baseline's forwards split, the values stay
        baseline_stage(model, dataset, protocol, device="cpu", store_image_features=store, batch_tokens=tokens, **base)
        assert len(StoredImageFeatures(base["features_out"], model)) == (9 if store else 0)
        common = dict(names={"method": "FT-L", "model": "tiny", "dataset": "d"}, model=model, dataset=dataset,
                      protocol=protocol, hparams_path=tmp_path / "ft.yaml", baseline_rows=base["rows_out"],
                      baseline_tensors=base["tensors_out"], image_features=base["features_out"], device="cpu")
        evaluate_stage(**common, metrics_out=tmp_path / f"m{store}.json", records_out=tmp_path / f"r{store}.jsonl",
                       evaluation={"batch_tokens": tokens})
        outputs[store] = read_jsonl(tmp_path / f"r{store}.jsonl"), read_jsonl(base["rows_out"])
        metrics = json.loads((tmp_path / f"m{store}.json").read_text())
        assert metrics["batch_tokens"] == tokens
        assert metrics["versions"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert metrics["image_modules_released"] is store  # the store covers every image FT-L's job reads
    assert outputs[True] == outputs[False]
    (tmp_path / "ftv.yaml").write_text("method: FT-V\nscopes: [qformer]\nnum_steps: 1\n")
    ftv = {**common, "hparams_path": tmp_path / "ftv.yaml", "names": {**common["names"], "method": "FT-V"}}
    # it trains upstream of the features: they are recomputed, the image path stays
    evaluate_stage(**ftv, metrics_out=tmp_path / "v.json", records_out=tmp_path / "v.jsonl")
    assert json.loads((tmp_path / "v.json").read_text())["image_modules_released"] is False
    assert moves == [False, True, False]  # FT-L without and with the store, FT-V
    with pytest.raises(ValueError, match=r"featuresTrue.safetensors: features of model settings .* rerun the baseline"):
        evaluate_stage(**{**common, "model": {**model, "image_size": 64}}, metrics_out=tmp_path / "x.json",
                       records_out=tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "featuresTrue.safetensors").read_bytes()[:20])
    with pytest.raises(ValueError, match=r"cut.safetensors: corrupt or truncated .* rule baseline writes it again"):
        StoredImageFeatures(tmp_path / "cut.safetensors")


@pytest.fixture(scope="module")
def other_families(tmp_path_factory):
    """family -> a function giving a fresh adapter of one tiny model (the same weights every call)."""
    root = tmp_path_factory.mktemp("families")
    minigpt4 = build_tiny_minigpt4(root / "minigpt4", image_size=32)
    llava = build_tiny_llava(root / "llava", image_size=32)
    qwen2vl = build_tiny_qwen2vl(root / "qwen2vl", image_size=32)
    return {"minigpt4": lambda: load_model("minigpt4", minigpt4, image_size=32),
            "llava": lambda: load_model("hf_vlm", llava),
            "qwen2vl": lambda: load_model("hf_vlm", qwen2vl),
            "onevision": tiny_onevision}


def tiny_onevision() -> HFVLMAdapter:
    """A tiny random LLaVA-OneVision (SigLIP 32 px + 2-layer Qwen2), in memory: its images become
    tiles of a grid chosen by their size (anyres), so its image tokens follow each image's size."""
    tokenizer = train_tokenizer(1000)
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=True) for token in ("<image>", "<video>")],
                         special_tokens=True)
    template = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
                "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
                "{% else %}{{ content['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    grid = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=4).to_dict(),
        text_config=Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2,
                                pad_token_id=tokenizer.pad_token_id).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=grid, vision_feature_select_strategy="full", vision_feature_layer=-1)
    with seeded(0):
        model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=grid)
    # in memory, without the video processor (torchvision is not installed here): no option is dropped
    processor = without_video_processor(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=64,
        vision_feature_select_strategy="full", chat_template=template)
    return HFVLMAdapter(model, processor, torch.device("cpu"))


@pytest.fixture(scope="module")
def varied_roots(eval_records, roots, tmp_path_factory):
    """The eval images at four shapes: Qwen2-VL gives each shape its own number of image tokens."""
    root = tmp_path_factory.mktemp("varied")
    shapes = [(64, 64), (96, 32), (32, 96), (80, 48)]
    names = sorted({getattr(record, field) for record in eval_records for field in ("image", "image_rephrase", "m_loc")})
    for index, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        load_rgb(roots.resolve("image", name)).resize(shapes[index % len(shapes)]).save(root / name)
    return ImageRoots(root)


@pytest.mark.parametrize("family", ["minigpt4", "llava", "qwen2vl", "onevision"])
def test_every_family_reads_stored_features_with_the_records_of_computing_them(family, other_families, eval_records,
                                                                                varied_roots, tmp_path, monkeypatch):
    """No family decodes an image whose features are stored, and the records are those of decoding
    it: Qwen2-VL's image tokens (and its features' length) follow each image's size, which an
    undecoded image reads from its file's header."""
    roots = varied_roots
    baseline = run_baseline(other_families[family](), eval_records, roots, Protocol(),
                            batch_size=2, keep_image_features=True)
    save_image_features(tmp_path / "features.safetensors", baseline.image_features, {"family": family})
    features = StoredImageFeatures(tmp_path / "features.safetensors")
    rows, calls, decoded_files = [], [], []
    for store, release in ((None, False), (features, False), (features, True)):
        model = other_families[family]()
        if release:  # as a job whose store covers its images: the image path's weights are freed
            stages = model.image_stages()
            with model.frozen_layers_below(()):  # its stages found before (Qwen2-VL's merger is one)
                pass
            assert model.release_image_modules() > 0
            assert not [tensor for path, _ in model.image_stages()
                        for tensor in model.model.get_submodule(path).state_dict().values()]
            for _, scope in stages:
                with pytest.raises(RuntimeError, match=f"scope '{scope}' lies in the image path"):
                    model.editable(scope)
        count = [0]

        def image_features(batch, which, compute=model.image_features):
            count[0] += len(which)
            return compute(batch, which)

        monkeypatch.setattr(model, "image_features", image_features)
        with decodes(monkeypatch) as files:
            for method in ("base", "FT-L"):
                rows.append(evaluate(model, editor(method), eval_records, roots, baseline, Protocol(), batch_size=2,
                                     stored_features=store).rows)
        calls.append(count[0])
        decoded_files.append(files[0])
    assert rows[:2] == rows[2:4] == rows[4:]
    assert calls[0] >= 2 * len(baseline.image_features) and calls[1] == calls[2] == 0
    assert decoded_files == [2 * 3 * len(eval_records), 0, 0]
    if family in ("qwen2vl", "onevision"):  # the shapes matter: images with different numbers of image tokens
        assert len({features.get(key).shape[0] for key in baseline.image_features}) > 1


def test_undecoded_images_keep_their_key_and_their_root_check(eval_records, roots, tmp_path):
    record = eval_records[0]
    images = RecordImages(roots, memo=1, undecoded=lambda key: key == roots.key("image", record.image))
    first = images(record)
    assert isinstance(first["image"], UndecodedImage) and not isinstance(first["m_loc"], UndecodedImage)
    assert first["image"].path == roots.resolve("image", record.image)
    assert list(decoded(first["image"]).getdata()) == list(load_rgb(first["image"].path).getdata())
    assert first["image"].size == load_rgb(first["image"].path).size  # from the header
    assert decoded(first["m_loc"]) is first["m_loc"]
    images(eval_records[1])  # the record leaves the memo: an undecoded image still names its file
    assert images.key(first["image"]) == roots.key("image", record.image) and images.key(first["m_loc"]) is None
    outside = dataclasses.replace(record, image="../outside.png")
    with pytest.raises(ValueError, match="escapes image root"):
        RecordImages(roots, undecoded=lambda key: True)(outside)


def test_an_undecoded_image_with_a_broken_header_names_its_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        UndecodedImage(tmp_path / "broken.png", "image/broken.png").size


def test_a_batch_without_pixels_is_refused_once_its_store_is_closed(stored, adapter, eval_records, roots):
    baseline, features = stored
    images = RecordImages(roots, undecoded=features.__contains__)(eval_records[0])
    with adapter.frozen_image_features(lambda image: features.get(image.key)):
        batch = adapter.teacher_forced(["a"], [" b"], [images["image"]])
        assert batch.pixel_values is None
        with torch.no_grad():
            adapter.logits(batch)
    with pytest.raises(RuntimeError, match="built without pixels, for stored features that are not open now"):
        adapter.logits(batch)


def test_released_image_modules_refuse_an_image_the_store_lacks(stored, tiny_blip2_dir, eval_records, roots):
    baseline, features = stored
    model = load_model("blip2", tiny_blip2_dir, image_size=32)
    weights = sum(tensor.nbytes for path, _ in model.image_stages()
                  for tensor in model.model.get_submodule(path).state_dict().values())
    assert model.release_image_modules() == weights
    assert features.covers(eval_records, roots)
    with pytest.raises(RuntimeError, match=r"blip2: vision_model was released .* an image without stored features"):
        evaluate(model, editor("base"), eval_records, roots, baseline, Protocol())  # no store: every image encoded
    with pytest.raises(RuntimeError, match="scope 'qformer' lies in the image path, whose weights were released"):
        model.editable("qformer")  # what FT-V would train
    other = ImageRoots(roots.image, rephrase=roots.image.parent)  # rephrased images under another root: not stored
    assert not features.covers(eval_records, other)
