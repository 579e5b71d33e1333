"""Model adapters: one file per family, all behind :class:`mmke.models.base.VLMAdapter`."""

from mmke.models.base import MODELS, Batch, VLMAdapter, load_model, register_model

__all__ = ["MODELS", "Batch", "VLMAdapter", "load_model", "register_model"]
