"""What every section module shares: data loaders, cached training, fine-tuning, table rows.

Everything here takes a :class:`~study.context.Context` (``ctx``) first. Cache keys are
derived, never hand-listed: :func:`cached` hashes the source of the section module that
asks and of every ``study`` module it imports, transitively
(:func:`study.cache.code_closure`).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Iterable, Sequence

import torch.nn as nn

from .. import BASE_COLUMNS, NUM_CLASSES
from ..cache import make_key
from ..data import make_loaders
from ..models import create_model, model_complexity, model_fingerprint
from ..train import LossFn, TrainConfig, evaluate, seed_everything, train


def _full_config(ctx, config: dict) -> dict:
    return {"profile": ctx.profile.to_dict(), **config}


def is_cached(ctx, name: str, config: dict, *, modules: Iterable[Any], seed: int | None = None) -> bool:
    """Whether :func:`cached` with the same arguments would be answered from the cache."""
    key = make_key(_full_config(ctx, config), ctx.seed if seed is None else seed, ctx.data_fp, list(modules))
    return ctx.cache.get(name, key) is not None


def cached(ctx, name: str, config: dict, compute: Callable[[], Any], *, modules: Iterable[Any],
           seed: int | None = None) -> Any:
    """``ctx.cache.memo`` with the profile, data fingerprint and derived code key filled in.

    Args:
        ctx: the notebook's context.
        name: entry name (file stem in ``build/cache``).
        config: JSON-able description of the experiment; every model it depends on must
            appear by :func:`study.models.model_fingerprint`.
        compute: zero-argument callable producing a ``torch.save``-able result.
        modules: the modules (objects or dotted names) whose import closure computes the
            result, normally ``[__name__]`` of the calling section module.
        seed: the seed of the result (default ``ctx.seed``).
    """
    return ctx.cache.memo(name, _full_config(ctx, config), compute,
                          seed=ctx.seed if seed is None else seed, data_fp=ctx.data_fp,
                          modules=list(modules))


def loaders(ctx, batch_size: int | None = None, seed: int | None = None):
    """``(train_loader, val_loader)`` of the context's dataset and profile (see :func:`study.data.make_loaders`)."""
    return make_loaders(ctx.data_root, ctx.profile, ctx.seed if seed is None else seed, batch_size=batch_size)


def model_kwargs(name: str, profile) -> dict:
    """Builder arguments that depend on the profile (Swin needs its input size)."""
    return {"img_size": profile.crop_size} if "swin" in name else {}


def build(name: str, profile) -> nn.Module:
    """``study.models.create_model(name)`` with the profile-dependent arguments."""
    return create_model(name, num_classes=NUM_CLASSES, **model_kwargs(name, profile))


def train_config(ctx, name: str, steps: int | None = None) -> TrainConfig:
    """The profile's training config for model ``name`` (the teacher gets ``teacher_steps``)."""
    p = ctx.profile
    if steps is None:
        steps = p.teacher_steps if name == p.teacher else p.student_steps
    return TrainConfig(steps=steps, lr=p.lr, eval_every=p.eval_every,
                       ohem_min_kept=max(256, p.batch_size * p.crop_size * p.crop_size // 16))


def train_cached(ctx, tag: str, build_fn: Callable[[], nn.Module], cfg: TrainConfig,
                 loss_fn_factory: Callable[[], LossFn] | None = None, seed: int | None = None,
                 extra_key: dict | None = None, modules: Sequence[Any] = ()) -> tuple[nn.Module, dict]:
    """Train ``build_fn()`` with ``cfg`` unless a cache entry exists; return ``(model, record)``.

    The key covers ``tag``, ``cfg``, the profile, the seed, the data fingerprint,
    ``extra_key`` and the import closure of this module and ``modules``. The record holds
    ``state_dict``, ``scores`` (see :func:`study.train.evaluate`, on val) and ``history``.
    """
    seed = ctx.seed if seed is None else seed
    key_cfg = {"tag": tag, "train": asdict(cfg), **(extra_key or {})}

    def compute():
        seed_everything(seed)
        model = build_fn().to(ctx.device)
        tr, va = loaders(ctx, seed=seed)
        loss_fn = loss_fn_factory() if loss_fn_factory else None
        log = ctx.out_dir / "logs" / f"{tag}-seed{seed}.csv"
        hist = train(model, tr, va, TrainConfig(**{**asdict(cfg), "log_csv": str(log)}), loss_fn=loss_fn, desc=tag)
        scores = evaluate(model, va, progress=False)
        return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "scores": scores, "history": {k: hist[k] for k in ("loss", "evals", "seconds")}}

    rec = cached(ctx, tag, key_cfg, compute, seed=seed, modules=[__name__, *modules])
    model = build_fn()
    model.load_state_dict(rec["state_dict"])
    model.to(ctx.device).eval()
    return model, rec


def trained_model(ctx, name: str, steps: int | None = None, seed: int | None = None) -> tuple[nn.Module, dict]:
    """A zoo model trained from scratch on the context's data (cached, shared by all sections).

    Args:
        ctx: the notebook's context.
        name: registry name (``ctx.profile.teacher`` trains for ``teacher_steps``).
        steps: override the number of training steps.
        seed: override the context seed.

    Returns:
        ``(model in eval mode, scores)`` with scores as returned by
        :func:`study.train.evaluate` plus ``train_seconds``.
    """
    cfg = train_config(ctx, name, steps)
    model, rec = train_cached(ctx, f"baseline-{name}", lambda: build(name, ctx.profile), cfg, seed=seed)
    return model, {**rec["scores"], "train_seconds": rec["history"]["seconds"]}


def finetune(ctx, model: nn.Module, steps: int, loss_fn: LossFn | None = None, lr: float | None = None,
             progress: bool = True, desc: str = "finetune", train_loader=None) -> dict:
    """Recovery fine-tune of ``model`` in place (not cached; callers cache the result).

    A quarter of the profile's peak learning rate, a warm-up of 10 % of ``steps``, the
    training loss and data of the profile. ``train_loader`` (a loader or a
    :class:`study.data.BatchStream`) replaces the context's train loader. Returns the
    :func:`study.train.train` history.
    """
    if steps <= 0:
        return {"loss": [], "evals": [], "seconds": 0.0}
    tr = train_loader if train_loader is not None else loaders(ctx)[0]
    cfg = finetune_config(ctx, steps, lr)
    return train(model, tr, None, cfg, loss_fn=loss_fn, progress=progress, desc=desc)


def finetune_config(ctx, steps: int, lr: float | None = None) -> TrainConfig:
    """The :func:`finetune` settings for ``steps`` optimizer steps: a quarter of the
    profile's peak learning rate (unless ``lr``), no evaluation, 10 % warm-up."""
    cfg = train_config(ctx, "", steps)
    cfg.lr = lr if lr is not None else ctx.profile.lr * 0.25
    cfg.eval_every = 0
    cfg.warmup_steps = max(1, steps // 10)
    return cfg


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
        extra: the section's own columns, in order.

    Returns:
        dict ready for ``pandas.DataFrame``.
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
    row.update(extra)
    return row


__all__ = ["cached", "is_cached", "finetune_config", "loaders", "build", "model_kwargs", "train_config", "train_cached", "trained_model",
           "finetune", "table_row", "model_fingerprint"]
