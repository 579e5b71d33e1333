"""SERAC (Mitchell et al., 2022): a scope classifier and a counterfactual model beside the frozen model.

Edits are kept in a memory, never written into weights. For each query the scope classifier (a
text encoder, distilbert-base-cased in MMEdit) scores it against every stored edit prompt:
``scale * cos(embed(query prompt), embed(edit prompt)) + bias``. If the best score is positive
the query is in scope and its text positions get the logits of the counterfactual model (OPT-125m
for BLIP-2) reading ``edit prompt + target </s> query``; otherwise the base model answers, so
out-of-scope outputs are exactly the unedited ones. Image positions always keep the base model's
logits: the counterfactual model is text-only and must share the base model's vocabulary.

Training uses the soft version of the routing (a mixture of the two distributions weighted by
``sigmoid(score)``) inside the shared meta-loss, plus the classifier's own binary cross-entropy:
rephrased prompts are in scope of their edit, the locality questions are not.

``unlikelihood`` adds the unlikelihood term of SERAC's (and EasyEdit's) edit loss: outer samples
whose answer the edit contradicts get ``-log(1 - p + eps)`` on their answer tokens, added with
weight 1 to the outer NLL. In EasyEdit only the sentiment and personality tasks have such
samples; its multimodal trainer never passes the flag to the loss, so MMEdit's ``unlikelihood:
True`` changes nothing there. Here the contradicted samples are the two generality items (the
rephrase with the edit image, the prompt with the rephrased image) answered with the record's
old answer ``pred``, weighted like their NLLs (``cedit``, ``iedit``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from mmke.data.records import EditRecord, lead_space, multimodal_locality_prompt
from mmke.io import broken_model_message, broken_safetensors_in
from mmke.methods.base import Edit, register_method
from mmke.methods.meta import MetaEditor, MetaHParams
from mmke.models.base import IGNORE_INDEX, Batch, VLMAdapter
from mmke.train import Item, TrainBatch, target_unlikelihood


@dataclasses.dataclass(frozen=True)
class SERACHParams(MetaHParams):
    classifier: str = "distilbert-base-cased"  # directory of the scope classifier's text encoder
    counterfactual: str = "facebook/opt-125m"  # directory of the counterfactual causal LM
    edit_lr: float = 1e-2  # learning rate of the classifier's similarity scale and bias
    max_length: int = 128  # classifier input tokens
    unlikelihood: bool = False  # push the old answer down on the generality items (module docstring)


class SERACNetwork(nn.Module):
    def __init__(self, classifier: nn.Module, classifier_tokenizer, counterfactual: nn.Module, max_length: int):
        super().__init__()
        self.classifier = classifier
        self.counterfactual = counterfactual
        self.classifier_tokenizer = classifier_tokenizer
        self.max_length = max_length
        # cosine similarities of a fresh encoder are all close to 1; a wide scale lets training
        # separate them, the bias puts the initial threshold just below identical texts
        self.scale = nn.Parameter(torch.tensor(20.0))
        self.bias = nn.Parameter(torch.tensor(-19.0))

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised mean of the encoder's last hidden states over the real tokens."""
        device = self.scale.device
        tokens = self.classifier_tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                           add_special_tokens=True, return_tensors="pt")
        mask = tokens["attention_mask"].to(device)
        states = self.classifier(input_ids=tokens["input_ids"].to(device), attention_mask=mask).last_hidden_state
        mean = (states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return F.normalize(mean, dim=-1)

    def scope_logits(self, queries: Sequence[str], edits: Sequence[str]) -> torch.Tensor:
        """[Q, E] scores; positive = the query is in the scope of that edit."""
        return self.similarity(self.embed(queries), self.embed(edits))

    def similarity(self, queries: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
        """[Q, E] scores of embedded queries against embedded edits."""
        return self.scale * (queries @ edits.T) + self.bias


class Router:
    """While live, ``model.logits`` routes each registered batch between base and counterfactual.

    Routers nest: each one's base logits are those of the router (or model) it was installed
    over, and it routes only the rows it owns (:meth:`SERACEdit.measure_rows`), so the edits of
    several records can be measured in one batch, each row against its own record's edit.
    """

    def __init__(self, network: SERACNetwork, model: VLMAdapter, edits: Sequence[tuple[str, str]], soft: bool):
        self.network, self.model, self.edits, self.soft = network, model, list(edits), soft
        self.base_logits = model.logits
        self.texts: dict[int, tuple[Batch, list[str], list[str]]] = {}
        self.rows: list[int] | None = None  # the rows this router routes; None: all
        self._edit_vectors: torch.Tensor | None = None
        vocab = network.counterfactual.get_output_embeddings().out_features
        base_vocab = model.model.get_output_embeddings().out_features
        if vocab != base_vocab:
            raise ValueError(f"SERAC's counterfactual model has {vocab} output tokens, the edited model "
                             f"{base_vocab}: they must share one vocabulary")

    def register(self, item: Item) -> None:
        # keeping the batch alive keeps its id unique while the router lives
        self.texts[id(item.batch)] = (item.batch, item.prompts, item.targets)

    def teacher_forced(self, original, prompts, targets, images) -> Batch:
        batch = original(prompts, targets, images)
        self.register(Item(batch, list(prompts), list(targets)))
        return batch

    def scope_scores(self, queries: Sequence[str]) -> torch.Tensor:
        """[Q, E] scope logits of the queries against the stored edits.

        At evaluation (hard routing) the stored edits are embedded once per edit, not per call;
        training (soft) embeds them each time, so the loss reaches the classifier through them.
        """
        if self.soft:
            return self.network.scope_logits(queries, [prompt for prompt, _ in self.edits])
        if self._edit_vectors is None:
            with torch.no_grad():
                self._edit_vectors = self.network.embed([prompt for prompt, _ in self.edits])
        return self.network.similarity(self.network.embed(queries), self._edit_vectors)

    def logits(self, batch: Batch, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The base model's logits, with the counterfactual model's at the answer of routed rows.

        Only the positions that predict a row's answer tokens are replaced: there the two models
        read the same answer tokens, whichever target convention the family uses. The routed rows
        go through the counterfactual model in one batch.
        """
        if id(batch) not in self.texts:
            raise KeyError("SERAC can only score batches made by the model's teacher_forced while the edit is live")
        _, prompts, targets = self.texts[id(batch)]
        base = self.base_logits(batch)
        owned = list(range(len(prompts))) if self.rows is None else self.rows
        rows = list(base.unbind(0))
        if owned:
            best_score, best = self.scope_scores([prompts[row] for row in owned]).max(dim=1)
            routed = [(row, best[i], best_score[i]) for i, row in enumerate(owned) if self.soft or best_score[i] > 0]
            answers = self.counterfactual_logits([(self.edits[edit], prompts[row], targets[row])
                                                  for row, edit, _ in routed])
            for (row, _, weight), cf in zip(routed, answers):
                where = torch.nonzero(batch.labels[row] != IGNORE_INDEX).flatten() - 1  # predict the answer
                if len(where) != cf.shape[0]:
                    raise ValueError(f"SERAC: the edited model labels {len(where)} answer tokens of {targets[row]!r}, "
                                     f"the counterfactual model reads {cf.shape[0]}: their tokenizers must agree")
                text = cf
                if self.soft:
                    text = torch.logaddexp(F.logsigmoid(weight) + cf.log_softmax(-1),
                                           F.logsigmoid(-weight) + base[row, where].log_softmax(-1))
                rows[row] = base[row].index_copy(0, where, text.to(base.dtype))
        logits = torch.stack(rows)
        return logits if positions is None else logits[positions]

    def counterfactual_logits(self, queries: Sequence[tuple[tuple[str, str], str, str]]) -> list[torch.Tensor]:
        """Per (edit, prompt, target): the counterfactual model's logits predicting each answer token,
        conditioned on the edit; all queries in one right-padded batch.

        The edit's target and the answer are written as the edited model writes them (its family's
        target convention), so the edit in the context also tells the counterfactual model which
        form to answer in.
        """
        if not queries:
            return []
        written, tokenizer = self.model.target_text, self.model.tokenizer
        built = [counterfactual_ids(tokenizer, (edit[0], written(edit[1])), prompt, written(target))
                 for edit, prompt, target in queries]
        width = max(len(ids) for ids, _ in built)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids = torch.full((len(built), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(built), width), dtype=torch.long)
        for row, (ids, _) in enumerate(built):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        device = self.model.device
        out = self.network.counterfactual(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                          use_cache=False).logits
        return [out[row, start - 1:len(ids) - 1].float() for row, (ids, start) in enumerate(built)]


def counterfactual_ids(tokenizer, edit: tuple[str, str], prompt: str, answer: str) -> tuple[list[int], int]:
    """The counterfactual model's input ``edit prompt + target </s> query prompt + answer`` and
    where the answer starts.

    The query's prompt and answer are tokenized apart, as the edited model's labels are counted
    (spec §2). The one place this format lives: the router and the counterfactual model's
    pretraining (:func:`mmke.world_training.pretrain_counterfactual`) both build their rows here.
    """
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    query = encode(edit[0] + edit[1]) + [tokenizer.eos_token_id] + encode(prompt)
    return query + encode(answer), len(query)


@contextlib.contextmanager
def routing(model: VLMAdapter, router: Router) -> Iterator[Router]:
    """Install the router on this adapter instance (not its class); on exit put back what was
    there before (the class's methods, or the router it was installed over)."""
    installed = {name: model.__dict__[name] for name in ("logits", "teacher_forced") if name in model.__dict__}
    original = model.teacher_forced
    model.logits = router.logits
    model.teacher_forced = lambda prompts, targets, images: router.teacher_forced(original, prompts, targets, images)
    try:
        yield router
    finally:
        for name in ("logits", "teacher_forced"):
            if name in installed:
                setattr(model, name, installed[name])
            else:
                delattr(model, name)


class SERACEdit(Edit):
    def __init__(self, stack: contextlib.ExitStack, router: Router):
        super().__init__()
        self._stack = stack
        self._router = router

    def measure_rows(self, rows: Sequence[int] | None) -> None:
        self._router.rows = None if rows is None else list(rows)

    def revert(self) -> None:
        self._stack.close()


@register_method
class SERAC(MetaEditor):
    name = "SERAC"
    hparams_class = SERACHParams
    weights_unchanged = True  # edits live in a memory beside the frozen model

    def make_network(self, model: VLMAdapter) -> SERACNetwork:
        hp = self.hparams
        try:
            classifier = AutoModel.from_pretrained(hp.classifier, local_files_only=True)
            classifier_tokenizer = AutoTokenizer.from_pretrained(hp.classifier, local_files_only=True)
            counterfactual = AutoModelForCausalLM.from_pretrained(hp.counterfactual, local_files_only=True)
        except OSError as err:
            raise ValueError(f"SERAC hparams: cannot load classifier {hp.classifier!r} or counterfactual "
                             f"{hp.counterfactual!r}: {err}") from err
        except SafetensorError as err:
            broken = next((d for d in (hp.classifier, hp.counterfactual) if broken_safetensors_in(d)), hp.classifier)
            raise ValueError(broken_model_message(broken, err)) from err
        return SERACNetwork(classifier, classifier_tokenizer, counterfactual, hp.max_length)

    def param_groups(self) -> list[dict]:
        network = self.network
        routing_params = [network.scale, network.bias]
        models = [p for n, p in network.named_parameters() if n not in ("scale", "bias")]
        return [{"params": models, "lr": self.hparams.lr}, {"params": routing_params, "lr": self.hparams.edit_lr}]

    def training_edit(self, model: VLMAdapter, batch: TrainBatch) -> contextlib.AbstractContextManager:
        if len(batch.records) != 1:
            raise ValueError("SERAC trains on one edit per batch (batch_size: 1)")
        router = Router(self.network, model, [(batch.edit.prompts[0], batch.edit.targets[0])], soft=True)
        for item in (batch.edit, batch.rephrase, batch.image_rephrase, batch.loc, batch.m_loc):
            router.register(item)
        return routing(model, router)

    def auxiliary_loss(self, model: VLMAdapter, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """The scope classifier's BCE, and with ``unlikelihood`` the old answer's unlikelihood."""
        terms = {"scope": self.scope_loss(batch.records[0])}
        if self.hparams.unlikelihood:
            terms["unlikelihood"] = self.unlikelihood_loss(model, batch)
        return terms

    def scope_loss(self, record: EditRecord) -> torch.Tensor:
        """Binary cross-entropy of the scope classifier: rephrases in scope, locality questions not."""
        queries = [record.rephrase, record.loc, multimodal_locality_prompt(record)]
        logits = self.network.scope_logits(queries, [record.prompt])[:, 0]
        labels = torch.tensor([1.0, 0.0, 0.0], device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, labels)

    def unlikelihood_loss(self, model: VLMAdapter, batch: TrainBatch) -> torch.Tensor:
        """``cedit * UL(rephrase -> pred) + iedit * UL(rephrased image -> pred)`` under the live edit.

        The items are built through ``model.teacher_forced`` inside the training edit, so the
        router scores them like any other batch.
        """
        record, images = batch.records[0], batch.images[0]
        old = lead_space(record.pred)
        items = model.teacher_forced([record.rephrase, record.prompt], [old, old],
                                     [images["image"], images["image_rephrase"]])
        logits = model.logits(items)
        hp = self.hparams
        return (hp.cedit * target_unlikelihood(logits[:1], items.labels[:1])
                + hp.iedit * target_unlikelihood(logits[1:], items.labels[1:]))

    def auxiliary_accuracies(self, batch: TrainBatch) -> dict[str, list[float]]:
        """How the scope classifier routes each record's items at evaluation (hard routing):
        ``scope_in`` the share of [prompt, rephrase] sent to the counterfactual model,
        ``scope_out`` the share of [loc, m_loc] left to the base model."""
        rows = {"scope_in": [], "scope_out": []}
        for i in range(len(batch.records)):
            queries = [item.prompts[i] for item in (batch.edit, batch.rephrase, batch.loc, batch.m_loc)]
            routed = self.in_scope(queries, [batch.edit.prompts[i]])
            rows["scope_in"].append(sum(routed[:2]) / 2)
            rows["scope_out"].append(sum(not r for r in routed[2:]) / 2)
        return rows

    def in_scope(self, queries: Sequence[str], edits: Sequence[str]) -> list[bool]:
        """Whether each query would be routed to the counterfactual model (for tests and analysis)."""
        with torch.no_grad():
            return (self.network.scope_logits(queries, edits).max(dim=1).values > 0).tolist()

    def apply(self, model: VLMAdapter, records: Sequence[EditRecord]) -> Edit:
        network = self.ready(model)
        router = Router(network, model, [(r.prompt, r.target) for r in records], soft=False)
        stack = contextlib.ExitStack()
        stack.enter_context(routing(model, router))
        return SERACEdit(stack, router)
