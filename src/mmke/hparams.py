"""Typed, validated hyperparameters per method, read from ``config/hparams/<METHOD>/<model>.yaml``.

Each method declares a frozen dataclass; the YAML's ``method`` key picks it. Unknown keys and
wrong types are errors naming the file and key, because a typo in an hparams file would
otherwise silently fall back to a default and produce a table row nobody can explain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


@dataclasses.dataclass(frozen=True)
class HParams:
    """Fields every method has. Subclasses add their own."""

    method: str
    model: str | None = None


#: The scope of the whole language model; every scope inside it is named ``llm.<...>``, in every
#: family (:meth:`mmke.models.base.VLMAdapter.scopes`), the image path's scopes never so.
LANGUAGE_MODEL_SCOPE = "llm"


def named_scopes(hparams: HParams | Mapping[str, Any]) -> list[str]:
    """The adapter scopes a method's hparams name (its ``scope`` or ``scopes`` field; none where it
    has neither), read or as the file gives them: what its edits write, wrap or hook."""
    values = hparams if isinstance(hparams, Mapping) else dataclasses.asdict(hparams)
    scopes = values.get("scopes") or values.get("scope") or []
    return [scopes] if isinstance(scopes, str) else list(scopes)


def language_model_scopes(hparams: HParams | Mapping[str, Any]) -> list[str]:
    """The :func:`named_scopes` inside the language model: those a quantised model must keep
    (``models.<name>.quantize.keep``), since int8 weights are only ever the language model's."""
    return [scope for scope in named_scopes(hparams)
            if scope == LANGUAGE_MODEL_SCOPE or scope.startswith(f"{LANGUAGE_MODEL_SCOPE}.")]


def digest(hparams: HParams) -> str:
    """Stable short hash of the values, recorded in metric JSONs and checkpoints."""
    blob = json.dumps(dataclasses.asdict(hparams), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_hparams(path: str | Path, overrides: Mapping[str, Any] | None = None,
                 expect_method: str | None = None) -> HParams:
    """Load a YAML hparams file into the method's dataclass (``overrides`` win over the file).

    ``expect_method``: the method a workflow job runs; a file naming another one is an error, so
    a copied hparams file cannot silently evaluate the wrong method under this method's name.
    """
    from mmke.methods.base import get_method  # the method registry owns the hparams classes

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read hparams: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: hparams must be a mapping, got {type(raw).__name__}")
    values = {**raw, **(overrides or {})}
    if "method" not in values:
        raise ValueError(f"{path}: field 'method' is missing")
    try:
        cls = get_method(str(values["method"])).hparams_class
    except ValueError as err:
        raise ValueError(f"{path}: field 'method': {err}") from err
    if expect_method is not None and values["method"] != expect_method:
        raise ValueError(f"{path}: field 'method' is {values['method']!r}, expected {expect_method!r}")
    return build_hparams(cls, values, source=str(path))


def build_hparams(cls: type[HParams], values: Mapping[str, Any], source: str = "<hparams>") -> HParams:
    """Check names and types against ``cls`` and construct it."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if not _matches(value, hints[name]):
            raise ValueError(f"{source}: field '{name}' must be {hints[name]}, got {value!r}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:  # a required field is missing, or values that do not fit together
        raise ValueError(f"{source}: {err}") from err


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        (item, *_) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if hint is Any:
        return True
    return isinstance(value, origin or hint)
