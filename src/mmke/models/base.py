"""The model adapter protocol and the registry of model families.

Methods, metrics and the evaluation loop only ever talk to a :class:`VLMAdapter`: it turns
(prompt, target, image) triples into a teacher-forced :class:`Batch`, returns logits aligned with
that batch's labels, and exposes named parameter groups ("scopes") that a method may change. This
keeps module paths and each family's input template out of the editing methods, so one hparams
file works on a 2-layer tiny model and on BLIP-2 OPT-2.7b alike.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import importlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NoReturn

import torch
from PIL import Image

from mmke.data.images import UndecodedImage
from mmke.data.records import lead_space
# The scope holding every language-model parameter. Everything in it lies downstream of the image
# features (vision tower + Q-Former + projection, or the family's equivalent), so an edit confined
# to it leaves those features unchanged (VLMAdapter.downstream_of_features).
from mmke.hparams import LANGUAGE_MODEL_SCOPE

IGNORE_INDEX = -100
LOG = logging.getLogger(__name__)
# Modules that define model families; load_model imports them so their @register_model runs
# without every caller having to import each family (adding a family = one file + one entry).
FAMILY_MODULES = ("mmke.models.blip2", "mmke.models.minigpt4", "mmke.models.hf_vlm")
#: How a target follows its prompt (spec §2, §7): ``space`` = " " + target, EasyEdit's BLIP-2 and
#: MiniGPT-4 path, whose prompts are plain text; ``raw`` = the target as written, straight after the
#: chat template's assistant header, EasyEdit's editor path for chat models. In a BPE vocabulary
#: " red" and "red" are different tokens, so the choice changes every score.
TARGET_JOINS = ("space", "raw")
# The MLP weight pair of one decoder layer that MEND/SERAC edit (spec section 4), per layer style:
# OPT names them fc1/fc2, Llama-style models (Vicuna, Qwen2) up_proj/down_proj.
MLP_WEIGHT_PAIRS = (("fc1.weight", "fc2.weight"), ("mlp.up_proj.weight", "mlp.down_proj.weight"))
# The attention query and value projections of one decoder layer (OPT, Llama, Qwen2 alike), where
# LoRA puts its adapters (EasyEdit's LoRA target_modules q_proj, v_proj).
ATTENTION_WEIGHTS = {"q": "self_attn.q_proj.weight", "v": "self_attn.v_proj.weight"}


@dataclass
class Batch:
    """Teacher-forced inputs of one family's template, with labels aligned position by position.

    ``input_ids`` covers the whole sequence the language model sees, image/query positions
    included (they hold a placeholder id), so ``labels`` and the logits share one length ``T``.
    """

    input_ids: torch.LongTensor  # [B, T]; image/query positions hold a placeholder id
    attention_mask: torch.LongTensor  # [B, T]
    labels: torch.LongTensor  # [B, T]; -100 everywhere except target tokens
    # One entry per image: [N, 3, H, W] for BLIP-2; the processor's layout otherwise. None: no images,
    # or images whose stored features stand in for them (VLMAdapter.stored_features_stand_in).
    pixel_values: torch.Tensor | None
    # Further model inputs some families need next to the pixels (Qwen2-VL's image_grid_thw,
    # LLaVA-OneVision's image_sizes), passed to the model by name.
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    # The rows that carry an image, in the order of the images; None: every row if there are pixels.
    # A batch may mix image items with text-only ones (the measured items of a record in one forward).
    image_rows: torch.Tensor | None = None
    # The image objects, one per image: each distinct object's features are computed once per
    # forward (VLMAdapter.batch_image_features), and within VLMAdapter.frozen_image_features once
    # per memo (empty: no images, or a hand-built batch whose every row's pixels are encoded).
    sources: tuple[object, ...] = ()

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device`` (pixel values keep their dtype; the model casts them)."""
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            pixel_values=None if self.pixel_values is None else self.pixel_values.to(device),
            image_inputs={name: value.to(device) for name, value in self.image_inputs.items()},
        )


def batch_pixels(batch: Batch) -> torch.Tensor:
    """``batch.pixel_values``; a batch built without them (its images' stored features stood in,
    :meth:`VLMAdapter.stored_features_stand_in`) is refused once those features are not open."""
    if batch.pixel_values is None:
        raise RuntimeError(f"the batch of images {list(batch.sources)} was built without pixels, "
                           "for stored features that are not open now (frozen_image_features)")
    return batch.pixel_values


class Memo:
    """At most ``size`` values, the least recently used dropped first, so per-record work (a
    prompt's tokens, an image's pixels, its features) is done once however often the record's
    items meet the model.

    ``by_identity``: keyed by object identity (images); each entry keeps its key object alive, so
    an ``id`` is never reused while it is remembered. Otherwise keyed by equality (texts).
    """

    def __init__(self, size: int, by_identity: bool = False):
        self.size = size
        self.by_identity = by_identity
        self._entries: OrderedDict[Hashable, tuple[object, object]] = OrderedDict()

    def get_many(self, keys: Sequence[object], compute: Callable[[list[object]], Sequence[object]]) -> list[object]:
        """The value of each key; ``compute`` gets the distinct keys not remembered, in one call."""
        slot = id if self.by_identity else (lambda key: key)
        found = {}
        for key in keys:
            entry = self._entries.get(slot(key))
            if entry is not None and (entry[0] is key or not self.by_identity):
                self._entries.move_to_end(slot(key))
                found[slot(key)] = entry[1]
        missing = list({slot(key): key for key in keys if slot(key) not in found}.values())
        if missing:
            for key, value in zip(missing, compute(missing), strict=True):
                found[slot(key)] = value
                self._entries[slot(key)] = (key, value)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return [found[slot(key)] for key in keys]


class RepeatedCall:
    """Stands in for ``module.forward`` (an instance attribute shadows the class's method): a call
    with arguments equal to the last call's returns a copy of its output instead of computing it.

    Inputs and output are kept as copies, so a caller writing into either cannot make a later
    call match wrongly or return a changed value. An output that requires grad is never kept.
    A ``forward`` the instance already had (accelerate's device-map hooks set one) is put back.
    """

    def __init__(self, module: torch.nn.Module):
        self.module, self.forward = module, module.forward
        self._installed = module.__dict__.get("forward")
        self.last: tuple[object, object] | None = None  # (args, kwargs), output
        module.forward = self

    def __call__(self, *args, **kwargs) -> object:
        if self.last is not None and _equal((args, kwargs), self.last[0]):
            return _copy(self.last[1])
        output = self.forward(*args, **kwargs)
        tensors = [value for value in _flat(output) if isinstance(value, torch.Tensor)]
        self.last = None if any(t.requires_grad for t in tensors) else (_copy((args, kwargs)), _copy(output))
        return output

    def remove(self) -> None:
        if self._installed is None:
            del self.module.forward
        else:
            self.module.forward = self._installed


def _flat(value: object) -> Iterator[object]:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _flat(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flat(item)
    else:
        yield value


def _copy(value: object) -> object:
    """``value`` with every tensor in it cloned (tuples, lists and dicts rebuilt, the rest shared)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(item) for item in value)
    if isinstance(value, dict):  # transformers' ModelOutput too (a vision tower's), kept as such
        items = {key: _copy(item) for key, item in value.items()}
        return items if type(value) is dict else type(value)(**items)
    return value


class ReleasedModule(torch.nn.Module):
    """Stands where :meth:`VLMAdapter.release_image_modules` took a module out: no weights, and a
    call is an error that names the module."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, *args, **kwargs) -> NoReturn:
        raise RuntimeError(f"{self.name} was released because the baseline's stored image features stand in for "
                           "it (evaluation.store_image_features), but an image without stored features reached it")


def _equal(a: object, b: object) -> bool:
    """Equal structure, equal tensors (shape, dtype, device, values), equal other values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a is b or a == b


class VLMAdapter(abc.ABC):
    """One loaded model; owns tokenizer/processor; hides the family's input format."""

    family: ClassVar[str]
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    placeholder_id: int  # the id ``input_ids`` holds at image positions (query slots, image tokens)
    #: The family's target convention (one of :data:`TARGET_JOINS`); ``protocol.target_join`` in
    #: the config may pick the other one per family (:func:`load_model`).
    target_join: str = "space"
    #: How many images :meth:`frozen_image_features` (and the pixel memos) keep: a batch of records.
    FEATURE_MEMO_SIZE: ClassVar[int] = 32

    def __init_subclass__(cls, **kwargs) -> None:
        """Cache each family's ``scopes`` per adapter instance: parameter names never change after
        loading, and a lookup walks the whole module tree."""
        super().__init_subclass__(**kwargs)
        if "scopes" in cls.__dict__:
            cls.scopes = _cached_scopes(cls.__dict__["scopes"])

    @classmethod
    @abc.abstractmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, image_size: int | None = None) -> VLMAdapter:
        """Load a model directory; ``image_size`` overrides the processor's resize size."""

    @abc.abstractmethod
    def teacher_forced(self, prompts: Sequence[str], targets: Sequence[str],
                       images: Sequence[Image.Image | None] | None) -> Batch:
        """Inputs for prompt + target with only the target tokens labelled (spec section 2).

        ``images`` None: text-only items; a None entry makes that one item text-only, so a
        record's image and text items share one batch (one forward). Each row is exactly the
        row it would be alone, right-padded.
        """

    @abc.abstractmethod
    def logits(self, batch: Batch, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits ``[B, T, V]`` over the full sequence, not shifted.

        ``logits[:, t]`` predicts token ``t + 1``; the metrics do the shift once (spec section 3),
        so every family returns the same alignment. Gradients flow, so methods can train on it.
        With a boolean ``positions`` mask ``[B, T]``, only those rows ``[N, V]`` (row-major), as
        ``logits(batch)[positions]`` but without computing the output layer elsewhere: training
        on a few labelled positions then skips most of the vocabulary projection.
        """

    @abc.abstractmethod
    def image_features(self, batch: Batch, which: Sequence[int]) -> list[torch.Tensor]:
        """The language-model inputs of images ``which`` of ``batch`` (indices into its images):
        the family's vision tower + Q-Former + projection or equivalent, one tensor per image.

        Everything a language-model scope holds lies downstream of these, so while only such
        scopes change they are computed once per image (:meth:`frozen_image_features`).
        """

    @contextlib.contextmanager
    def frozen_image_features(self, stored: Callable[[object], torch.Tensor | None] | None = None
                              ) -> Iterator[None]:
        """While open, ``logits`` computes each image object's features once and reuses them.

        The caller promises that no parameter upstream of the features changes meanwhile (the
        edit is :meth:`downstream_of_features`, or leaves the weights alone). Features are taken
        without gradient: nothing upstream of them is trained in here. Nested use shares the
        outer memo. Exact: the same module calls on the same pixels, only fewer of them.

        ``stored``: an image object's features computed earlier by this model (the baseline
        job's, :mod:`mmke.image_features`), or None; an image it knows is not encoded at all,
        and a batch of such images left undecoded carries no pixels (:meth:`stored_features_stand_in`).
        """
        if self._feature_memo is not None:
            yield
            return
        self._feature_memo = Memo(self.FEATURE_MEMO_SIZE, by_identity=True)
        self._stored_features = stored
        try:
            yield
        finally:
            self._feature_memo = None
            self._stored_features = None

    _feature_memo: Memo | None = None
    _stored_features: Callable[[object], torch.Tensor | None] | None = None

    def batch_image_features(self, batch: Batch) -> list[torch.Tensor] | None:
        """The features of every image of ``batch``, each distinct image's computed once (a
        record's measured items show its edit image on three or four rows): from the memo of
        :meth:`frozen_image_features` where one is open (:meth:`_memoised_features`); else
        computed now, as part of the graph (FT-V trains through them). None when the batch does
        not name its images (then ``logits`` computes them from the pixels).
        """
        if not batch.sources:
            return None
        index: dict[int, int] = {}  # first row of each image
        for i, source in enumerate(batch.sources):
            index.setdefault(id(source), i)
        if self._feature_memo is None:
            computed = dict(zip(index, self.image_features(batch, list(index.values()))))
            return [computed[id(source)] for source in batch.sources]
        return self._memoised_features(batch.sources,
                                       lambda new: self.image_features(batch, [index[id(source)] for source in new]))

    def _memoised_features(self, sources: Sequence[object],
                           encode: Callable[[list[object]], list[torch.Tensor]]) -> list[torch.Tensor]:
        """Within :meth:`frozen_image_features`: each source's features from its memo, else from its
        ``stored`` features, else ``encode``d (the sources neither knows, in one call, without
        gradient), and memoised."""
        stored = self._stored_features or (lambda source: None)

        def compute(missing: list[object]) -> list[torch.Tensor]:
            found = {id(source): stored(source) for source in missing}
            new = [source for source in missing if found[id(source)] is None]
            if new:
                with torch.no_grad():
                    found |= zip(map(id, new), encode(new))
            return [found[id(source)].to(self.device) for source in missing]

        return self._feature_memo.get_many(sources, compute)

    def stored_features_stand_in(self, sources: Sequence[object]) -> bool:
        """Whether a batch of ``sources`` goes without pixels: every image is an undecoded one
        (made only for stored keys) while stored features are open, so every feature the batch
        needs will be read. Its tokens are then those of the images' sizes (a family whose image
        tokens follow the size reads it from the file's header, :class:`UndecodedImage`)."""
        return self._stored_features is not None and all(isinstance(source, UndecodedImage) for source in sources)

    def prefetch_image_features(self, images: Sequence[Image.Image]) -> list[torch.Tensor] | None:
        """Within :meth:`frozen_image_features`: the features of ``images`` not memoised yet, those
        not stored in one encoder call, so a record's (or a batch of records') images cost one pass
        rather than one per forward that first meets them; returns every image's features, in
        order. Outside it (or if they would not fit): nothing, and None."""
        distinct = list({id(image): image for image in images}.values())
        if self._feature_memo is None or not distinct or len(distinct) > self.FEATURE_MEMO_SIZE:
            return None

        def encode(new: list[object]) -> list[torch.Tensor]:
            # The class's own template, not a live edit's interception of teacher_forced (SERAC's
            # router registers what it will score): these pixels are what the items' batches use.
            batch = type(self).teacher_forced(self, [""] * len(new), ["."] * len(new), new)
            return self.image_features(batch, range(len(new)))

        features = dict(zip(map(id, distinct), self._memoised_features(distinct, encode)))
        return [features[id(image)] for image in images]

    @contextlib.contextmanager
    def frozen_layers_below(self, trained: Iterable[str]) -> Iterator[None]:
        """While open, each stage of the model below the lowest one holding a ``trained``
        parameter returns its last output again when it is called with equal inputs. The stages,
        in the order inputs pass them: the image path's modules (:meth:`image_stages`), then the
        decoder layers.

        An edit that trains high in the language model (FT-L's last MLP, GRACE's and WISE's one
        layer) runs the same item through the same frozen lower layers at every step; their
        output cannot change, so only the first step computes it (on a 32-layer LM trained at
        layer 23, later steps skip 23 of its 32 layers). FT-V, which trains the Q-Former or the
        projection, computes every step's image features from the pixels, but the vision tower
        below them is frozen: the paper's EVA ViT-g runs once per edit instead of once per step.
        Exact: an output is reused only for arguments equal (``torch.equal``) to those it was
        computed from, by a stage with nothing trained in it, in eval mode. A trained parameter
        in no stage turns it off.
        """
        if getattr(self, "_stage_of", None) is None:  # walks of the module tree, once per adapter
            scopes = self.scopes()
            layers = decoder_layer_prefixes(self.model, self.model)
            stages = [(path, scopes.get(scope, [])) for path, scope in self.image_stages()]
            stages += [(prefix, [name for name in self.named_parameters() if name.startswith(f"{prefix}.")])
                       for prefix in layers]
            self._stages = [path for path, _ in stages]
            self._stage_of = {name: index for index, (_, names) in enumerate(stages) for name in names}
        trained = set(trained)
        lowest = min((self._stage_of.get(name, 0) for name in trained), default=len(self._stages))
        if self.model.training:
            lowest = 0  # dropout: a stage is no function of its inputs
        memos = [RepeatedCall(self.model.get_submodule(path)) for path in self._stages[:lowest]
                 if not any(name.startswith(f"{path}.") for name in trained)]  # a stage holding a later one
        try:
            yield
        finally:
            for memo in memos:
                memo.remove()

    def image_stages(self) -> list[tuple[str, str]]:
        """The image path's modules in the order images pass them, each with the scope naming its
        parameters: ``(module path, scope name)``, for :meth:`frozen_layers_below`. Default: none."""
        return []

    def to(self, device: torch.device | str) -> "VLMAdapter":
        """Move the loaded model to ``device``, before any use. Loading puts it on its device; a
        job that frees part of the model first (:meth:`release_image_modules`) loads it on the CPU
        and moves only the rest, so the freed weights never take device memory."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    _released_scopes: frozenset[str] = frozenset()  # the image path's scopes, once released

    def release_image_modules(self) -> int:
        """Free the weights of the image path (:meth:`image_stages`) for good; returns the bytes freed.

        For a job in which stored features (:mod:`mmke.image_features`) stand in for every image
        pass, these weights are never read again: on the paper's BLIP-2 OPT-2.7b the EVA ViT-g
        and Q-Former are 2.0 GiB of its 7.0 GiB of weights in bfloat16. Each module is replaced by a
        :class:`ReleasedModule`, which holds nothing; a call of one (an image without stored
        features) is an error naming it, never a silent computation on nothing.
        """
        stages = self.image_stages()
        freed, released = 0, []
        for path, _ in stages:
            if any(path.startswith(f"{outer}.") for outer in released):
                continue  # inside one released already (Qwen2-VL's merger, in its vision module)
            released.append(path)
            module = self.model.get_submodule(path)
            freed += sum(t.nbytes for t in (*module.parameters(), *module.buffers()))
            self.model.set_submodule(path, ReleasedModule(f"{self.family}: {path}"))
        self._released_scopes = frozenset(scope for _, scope in stages)
        self._params = self._stage_of = None  # parameters and stages are found again without them
        return freed

    _quantized: frozenset[str] = frozenset()  # parameters held in a quantised format
    #: What quantising did (:class:`mmke.models.quantize.Quantized` as a dict), for ``metrics.json``.
    quantization: dict[str, object] | None = None

    def mark_quantized(self, names: Iterable[str], summary: Mapping[str, object]) -> None:
        """Record the parameters now held quantised (:mod:`mmke.models.quantize`): :meth:`editable`
        refuses their scopes, and the parameter dict is built again (quantising replaced them)."""
        self._quantized = frozenset(names)
        self.quantization = dict(summary)
        self._params = None

    def downstream_of_features(self, names: Iterable[str]) -> bool:
        """Whether every named parameter lies downstream of the image features (in the language
        model), so that changing them leaves the features, and their memo, valid."""
        return set(names) <= set(self.scopes()[LANGUAGE_MODEL_SCOPE])

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """``model.named_parameters()`` as a dict, built once per adapter (names never change)."""
        if getattr(self, "_params", None) is None:
            self._params = dict(self.model.named_parameters())
        return self._params

    @contextlib.contextmanager
    def trainable_only(self, params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
        """While open, of the model's parameters only ``params`` require grad; every flag is put
        back afterwards.

        An edit's backward then reaches only what it trains, and the layers below the lowest
        trained one record no graph at all (a loaded model has every flag set). ``params`` may
        include tensors injected after loading (LoRA's adapters). Gradients are the same values:
        freezing a weight removes only the branches of the graph that lead to it.
        """
        chosen = {id(p): p for p in params}
        every = {id(p): p for p in self.named_parameters().values()} | chosen
        flags = {key: p.requires_grad for key, p in every.items()}
        try:
            for key, p in every.items():
                p.requires_grad_(key in chosen)
            yield
        finally:
            for key, p in every.items():
                p.requires_grad_(flags[key])

    @abc.abstractmethod
    def scopes(self) -> dict[str, list[str]]:
        """Scope name -> parameter names as in ``model.named_parameters()``.

        Every family offers the same names (``llm.mlp.last1`` .. ``llm.mlp.last{L}``, ``llm``,
        ``qformer``, ``vision_proj``, ``vision``, and the single-matrix scopes of
        :func:`layer_scopes`) so method hparams stay model-independent.
        """

    def text_labels(self, batch: Batch) -> torch.LongTensor:
        """Every real text token of ``batch`` as a label (image positions and padding -100).

        The targets of a next-token loss over the whole text, as language models are pretrained
        (:mod:`mmke.world_training`); ``batch.labels`` covers only the answer.
        """
        text = batch.attention_mask.bool() & (batch.input_ids != self.placeholder_id)
        return batch.input_ids.masked_fill(~text, IGNORE_INDEX)
    def note_resize(self, sizes: Sequence[tuple[int, int]], model_sizes: Sequence[tuple[int, int]]) -> None:
        """Log once per loaded model (one job) when images reach the model at another size.

        ``sizes`` are the images' (width, height) as read, ``model_sizes`` what the model sees. A
        64-pixel dataset on a 32-pixel model is legitimate, but it should not happen unnoticed.
        """
        if getattr(self, "_resize_noted", False):
            return
        for size, model_size in zip(sizes, model_sizes):
            if tuple(size) != tuple(model_size):
                self._resize_noted = True
                LOG.warning("%s: images are resized before the model sees them, e.g. %dx%d px -> %dx%d px "
                            "(said once per job)", getattr(self.model, "name_or_path", self.family),
                            *size, *model_size)
                return

    def target_text(self, target: str) -> str:
        """``target`` as appended to the prompt: callers pass it with one leading space (spec §2)."""
        return lead_space(target) if self.target_join == "space" else target.removeprefix(" ")

    def editable(self, scope: str) -> dict[str, torch.nn.Parameter]:
        """The parameters of ``scope``; an unknown scope is a KeyError naming the valid ones."""
        scopes = self.scopes()
        if scope not in scopes:
            raise KeyError(f"unknown scope {scope!r} for {self.family}; valid scopes: {', '.join(scopes)}")
        if scope in self._released_scopes:
            raise RuntimeError(f"{self.family}: scope {scope!r} lies in the image path, whose weights were released "
                               "for stored image features (release_image_modules)")
        quantized = [name for name in scopes[scope] if name in self._quantized]
        if quantized:
            raise ValueError(f"{self.family}: scope {scope!r} holds quantised weights ({quantized[0]}"
                             f"{f' and {len(quantized) - 1} more' if len(quantized) > 1 else ''}), which no "
                             "method may write, wrap or hook: list the scope under quantize.keep in the model's "
                             "config entry")
        params = self.named_parameters()
        return {name: params[name] for name in scopes[scope]}

    def snapshot(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Detached clones of only the named parameters: an edit saves what it will touch."""
        params = self.named_parameters()
        return {name: params[name].detach().clone() for name in names}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Copy a snapshot back in place, bit for bit, keeping the Parameter objects.

        In-place copy (not reassignment) keeps optimisers and hooks that hold the parameters valid.
        """
        params = self.named_parameters()
        with torch.no_grad():
            for name, value in snapshot.items():
                params[name].copy_(value)

    @contextlib.contextmanager
    def restored_on_failure(self, snapshot: dict[str, torch.Tensor]) -> Iterator[None]:
        """Put ``snapshot`` back if the block raises: an edit that fails part way (a device out of
        memory at its next step or layer) leaves no weight half written."""
        try:
            yield
        except BaseException:
            self.restore(snapshot)
            raise


def _cached_scopes(scopes: Callable[[VLMAdapter], dict[str, list[str]]]) -> Callable[[VLMAdapter], dict[str, list[str]]]:
    @functools.wraps(scopes)
    def cached(self: VLMAdapter) -> dict[str, list[str]]:
        if getattr(self, "_scopes", None) is None:
            self._scopes = scopes(self)
        return {name: list(params) for name, params in self._scopes.items()}  # callers may mutate

    return cached


def check_items(prompts: Sequence[str], targets: Sequence[str],
                images: Sequence[Image.Image | None] | None) -> None:
    """``teacher_forced`` arguments: one target (and image or None, if any) per prompt, at least one item."""
    if len(prompts) != len(targets) or (images is not None and len(images) != len(prompts)):
        raise ValueError(f"got {len(prompts)} prompts, {len(targets)} targets and "
                         f"{'no' if images is None else len(images)} images")
    if not prompts:
        raise ValueError("teacher_forced needs at least one item")


def decoder_layer_prefixes(model: torch.nn.Module, language_model: torch.nn.Module) -> list[str]:
    """Parameter-name prefixes of ``language_model``'s decoder layers inside ``model``, first to last.

    Causal-LM wrappers nest the layer list at different depths (OPTForCausalLM -> OPTDecoder,
    LLaVA -> LlamaModel), so follow ``get_decoder()`` until a module holds ``layers``.
    """
    decoder = language_model
    while not hasattr(decoder, "layers"):
        inner = decoder.get_decoder()
        if inner is decoder:
            raise ValueError(f"cannot find the decoder layers of {type(language_model).__name__}")
        decoder = inner
    layers = decoder.layers
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return [f"{prefix}.{index}" for index in range(len(layers))]


def mlp_scopes(model: torch.nn.Module, layer_prefixes: Sequence[str]) -> dict[str, list[str]]:
    """``llm.mlp.last1`` .. ``llm.mlp.last{L}``: the MLP weight pair of the last n decoder layers."""
    names = {name for name, _ in model.named_parameters()}
    first = layer_prefixes[0]
    pair = next((pair for pair in MLP_WEIGHT_PAIRS if all(f"{first}.{w}" in names for w in pair)), None)
    if pair is None:
        raise ValueError(f"{first} has none of the MLP weight pairs {MLP_WEIGHT_PAIRS}")
    return {
        f"llm.mlp.last{n}": [f"{layer}.{weight}" for layer in layer_prefixes[-n:] for weight in pair]
        for n in range(1, len(layer_prefixes) + 1)
    }


def layer_scopes(model: torch.nn.Module, layer_prefixes: Sequence[str]) -> dict[str, list[str]]:
    """The single-matrix scopes the lifelong editors (LoRA, GRACE, WISE) hook, every family alike.

    ``llm.attn.q`` / ``llm.attn.v`` / ``llm.attn.qv``: the attention query and/or value projection
    weights of every decoder layer. ``llm.layers.{i}.mlp.in`` / ``.mlp.out``: the MLP's input
    projection (fc1, up_proj) and output projection (fc2, down_proj) of decoder layer ``i``; ``i``
    counts from 0, or from the end when negative (``-1`` = the last layer), so one hparams file
    names "layer 18" of a 28-layer model and "the last layer" of a 2-layer one.
    """
    names = {name for name, _ in model.named_parameters()}
    first = layer_prefixes[0]
    missing = [weight for weight in ATTENTION_WEIGHTS.values() if f"{first}.{weight}" not in names]
    if missing:
        raise ValueError(f"{first} lacks the attention weights {missing}")
    scopes = {f"llm.attn.{key}": [f"{layer}.{weight}" for layer in layer_prefixes]
              for key, weight in ATTENTION_WEIGHTS.items()}
    scopes["llm.attn.qv"] = [f"{layer}.{weight}" for layer in layer_prefixes for weight in ATTENTION_WEIGHTS.values()]
    mlp_in, mlp_out = next(pair for pair in MLP_WEIGHT_PAIRS if all(f"{first}.{w}" in names for w in pair))
    count = len(layer_prefixes)
    for index, layer in enumerate(layer_prefixes):
        for label in (str(index), str(index - count)):
            scopes[f"llm.layers.{label}.mlp.in"] = [f"{layer}.{mlp_in}"]
            scopes[f"llm.layers.{label}.mlp.out"] = [f"{layer}.{mlp_out}"]
    return scopes


def output_logits(model: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """``model``'s output layer on its last hidden states, at ``positions`` only if given, in float32.

    The causal LMs and VLMs of transformers compute their logits as exactly this projection of the
    base model's last hidden state (no scaling), so families call their base model and this.
    """
    head = model.get_output_embeddings()
    return head(hidden if positions is None else hidden[positions]).float()


def params_under(model: torch.nn.Module, *prefixes: str) -> list[str]:
    """Names of the parameters of ``model`` that start with one of ``prefixes``."""
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


MODELS: dict[str, type[VLMAdapter]] = {}


def register_model(family: str) -> Callable[[type[VLMAdapter]], type[VLMAdapter]]:
    """Class decorator: make an adapter loadable by its family name."""

    def register(cls: type[VLMAdapter]) -> type[VLMAdapter]:
        if family in MODELS and MODELS[family] is not cls:
            raise ValueError(f"model family {family!r} is already registered by {MODELS[family].__name__}")
        cls.family = family
        MODELS[family] = cls
        return cls

    return register


def adapter_class(family: str) -> type[VLMAdapter]:
    """The registered adapter of ``family`` (importing the built-in families first)."""
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    if family not in MODELS:
        raise ValueError(f"unknown model family {family!r}; registered: {', '.join(sorted(MODELS))}")
    return MODELS[family]


def load_model(family: str, path: str | os.PathLike, *, target_join: str | None = None, **kwargs) -> VLMAdapter:
    """Load ``path`` with the adapter of ``family``; kwargs go to the adapter's ``load``.

    ``target_join`` overrides the family's target convention (None keeps it).
    """
    cls = adapter_class(family)
    if target_join is not None and target_join not in TARGET_JOINS:
        raise ValueError(f"target_join for family {family!r} must be one of {', '.join(TARGET_JOINS)}, "
                         f"got {target_join!r}")
    adapter = cls.load(path, **kwargs)
    if target_join is not None:
        adapter.target_join = target_join
    return adapter
