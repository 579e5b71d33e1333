"""``base``: the unedited model, measured by the same loop as every method.

Its row anchors the table: reliability/generality show what the model already answers, and its
locality is 1.0 by construction, so any other figure below 1.0 is caused by the edit.
"""

from __future__ import annotations

from collections.abc import Sequence

from mmke.data.records import EditRecord
from mmke.methods.base import Edit, Editor, register_method
from mmke.models.base import VLMAdapter


@register_method
class NoEdit(Editor):
    name = "base"
    weights_unchanged = True

    def apply(self, model: VLMAdapter, records: Sequence[EditRecord]) -> Edit:
        return Edit()
