"""Hyperparameter files: typed, validated, errors that name the file and the field."""

import dataclasses

import pytest

from mmke.hparams import HParams, build_hparams, digest, read_hparams


@dataclasses.dataclass(frozen=True)
class ToyHParams(HParams):
    layers: list[int] = dataclasses.field(default_factory=lambda: [1])
    lr: float = 0.1
    steps: int = 3
    norm: float | None = None


def test_read_base_hparams(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("method: base\nmodel: tiny\n")
    hparams = read_hparams(path)
    assert (hparams.method, hparams.model) == ("base", "tiny")


def test_unknown_method_names_file_and_field(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("method: ROME-9000\n")
    with pytest.raises(ValueError, match=r"h\.yaml: field 'method': unknown method 'ROME-9000'"):
        read_hparams(path)


def test_unknown_key_is_an_error_not_a_silent_default(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("method: base\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"h\.yaml: unknown field\(s\) \['learning_rate'\]"):
        read_hparams(path)


def test_types_are_checked():
    assert build_hparams(ToyHParams, {"method": "toy", "lr": 1, "layers": [2, 3], "norm": None}).lr == 1
    with pytest.raises(ValueError, match="field 'steps' must be"):
        build_hparams(ToyHParams, {"method": "toy", "steps": 2.5})
    with pytest.raises(ValueError, match="field 'layers' must be"):
        build_hparams(ToyHParams, {"method": "toy", "layers": ["a"]})
    with pytest.raises(ValueError, match="field 'steps' must be"):
        build_hparams(ToyHParams, {"method": "toy", "steps": True})


def test_not_a_mapping(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("- method\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        read_hparams(path)


def test_digest_changes_with_values_only():
    a = build_hparams(ToyHParams, {"method": "toy", "lr": 0.1})
    assert digest(a) == digest(build_hparams(ToyHParams, {"method": "toy", "lr": 0.1}))
    assert digest(a) != digest(build_hparams(ToyHParams, {"method": "toy", "lr": 0.2}))


def test_a_file_naming_another_method_is_refused(tmp_path):
    path = tmp_path / "FT-L.yaml"
    path.write_text("method: base\nmodel: m\n")
    assert read_hparams(path, expect_method="base").method == "base"
    with pytest.raises(ValueError, match=r"FT-L\.yaml: field 'method' is 'base', expected 'FT-L'"):
        read_hparams(path, expect_method="FT-L")
