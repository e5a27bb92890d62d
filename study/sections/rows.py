"""One table row for every section: :func:`table_row` (the base columns, split, budget, provenance flags).

Kept out of :mod:`study.sections.common` so that editing how rows look never changes the
cache keys of trained models (keys cover the import closure of the code that trains).
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from .. import BASE_COLUMNS
from ..models import list_models, model_complexity
from .common import uses_pretrained


def table_row(ctx, section: str, model_name: str, method: str, scores: dict, *, model: nn.Module | None = None,
              complexity: dict | None = None, input_hw: Sequence[int] | None = None, **extra) -> dict:
    """One table row with the required columns (:data:`study.BASE_COLUMNS`) first.

    Args:
        ctx: the notebook's context (gives the default ``input_hw``: the profile's crop).
        section: the section the table belongs to.
        model_name, method: what the row measures.
        scores: dict with ``miou`` and ``mdice`` (NaN when absent).
        model: measured for ``params_m`` and ``gmacs`` (:func:`study.models.model_complexity`)
            unless ``complexity`` (a dict with those keys) is given.
        input_hw: ``(H, W)`` px of the MACs count and of the ``input_hw`` column.
        extra: the section's own columns, in order. ``pretrained=`` overrides the
            ``pretrained`` column; ``split=`` (default ``scores["split"]``, else ``"val"``),
            ``train_steps=`` (weight updates of every training phase of the row's model,
            default ``scores["train_steps"]``, else NaN) and ``train_images=`` (images seen,
            default ``train_steps * batch_size``) fill the columns of the same names.

    Returns:
        dict ready for ``pandas.DataFrame``: the base columns, ``split``, ``train_steps``,
        ``train_images``, ``extra``, then
        ``pretrained`` (bool: the encoder started from ImageNet weights - ``extra``'s value,
        else ``model.pretrained``, else :func:`uses_pretrained` when ``model_name`` is a
        registry name, else ``ctx.profile.pretrained``) and ``dry_run`` (bool: a
        ``--fast-dev-run``, whose numbers are not results).
    """
    hw = tuple(input_hw or (ctx.profile.crop_size, ctx.profile.crop_size))
    if complexity is None and model is not None:
        complexity = model_complexity(model, hw)
    complexity = complexity or {}
    nan = float("nan")
    row = {"section": section, "model": model_name, "method": method, "input_hw": f"{hw[0]}x{hw[1]}",
           "params_m": complexity.get("params_m", nan), "gmacs": complexity.get("gmacs", nan),
           "miou": scores.get("miou", nan), "mdice": scores.get("mdice", nan)}
    assert tuple(row) == BASE_COLUMNS
    row["split"] = extra.pop("split", None) or scores.get("split") or "val"
    steps = extra.pop("train_steps", None)
    steps = scores.get("train_steps", nan) if steps is None else steps
    images = extra.pop("train_images", None)
    row["train_steps"] = steps
    row["train_images"] = (steps * ctx.profile.batch_size if steps == steps else nan) if images is None else images
    pretrained = extra.pop("pretrained", None)
    if pretrained is None and model is not None and hasattr(model, "pretrained"):
        pretrained = model.pretrained
    if pretrained is None and model_name in _REGISTERED:
        pretrained = uses_pretrained(model_name, ctx.profile)
    if pretrained is None:
        pretrained = bool(ctx.profile.pretrained)
    row.update(extra)
    row["pretrained"] = bool(pretrained)
    row["dry_run"] = bool(getattr(ctx.profile, "dry_run", False))
    return row


_REGISTERED = frozenset(list_models())

__all__ = ["table_row"]
