"""What every section module shares: data loaders, cached training, fine-tuning, table rows.

Everything here takes a :class:`~study.context.Context` (``ctx``) first. Cache keys are
derived, never hand-listed: :func:`cached` hashes the source of the section module that
asks and of every ``study`` module it imports, transitively
(:func:`study.cache.code_closure`).

What a run's options do here:

- ``pretrained`` / ``--weights-dir``: :func:`build` starts every encoder from its ImageNet
  checkpoint (:func:`uses_pretrained`); every row of :func:`table_row` has a
  ``pretrained`` column.
- ``--fast-dev-run``: :func:`loaders` keeps only the profile's ``eval_batches`` validation
  batches; every row has a ``dry_run`` column.
- ``--nproc`` / ``--nnodes``: :func:`train_cached` runs every cached training as a
  ``torchrun`` job (:func:`study.train.launch_job`) and reads its checkpoint from the cache.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .. import BASE_COLUMNS, NUM_CLASSES
from ..cache import make_key
from ..data import make_loaders
from ..models import (PRETRAINED_ENCODERS, TOPFORMER_CHECKPOINTS, WeightsError, create_model, list_models,
                      model_complexity, model_fingerprint, pretrained_weights_file)
from ..train import LossFn, TrainConfig, evaluate, launch_job, seed_everything, train, write_job


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
    """``(train_loader, val_loader)`` of the context's dataset and profile (see :func:`study.data.make_loaders`).

    With ``profile.eval_batches`` > 0 (a ``--fast-dev-run``) the val loader holds only the
    first ``eval_batches`` batches of the split (same order, same batch size).
    """
    tr, va = make_loaders(ctx.data_root, ctx.profile, ctx.seed if seed is None else seed, batch_size=batch_size)
    n = int(getattr(ctx.profile, "eval_batches", 0) or 0)
    if n > 0 and len(va.dataset) > n * va.batch_size:
        va = torch.utils.data.DataLoader(torch.utils.data.Subset(va.dataset, range(n * va.batch_size)),
                                         batch_size=va.batch_size, shuffle=False, drop_last=False)
    return tr, va


def bench_kwargs(ctx) -> dict:
    """The profile's benchmark settings as keyword arguments of :func:`study.bench.time_callable`
    (and of ``benchmark_torch`` / ``benchmark_onnx``): ``warmup_s`` (s), ``min_s`` (s),
    ``min_runs``, ``warmup_runs``. A ``--fast-dev-run`` gives 3 timed runs, no warm-up."""
    p = ctx.profile
    return {"warmup_s": p.bench_warmup_s, "min_s": p.bench_min_s, "min_runs": p.bench_min_runs,
            "warmup_runs": p.bench_warmup_runs}


def model_kwargs(name: str, profile) -> dict:
    """Builder arguments that depend on the profile (Swin is built for the training crop;
    it also takes other sizes, see :func:`study.models.upernet_swinv2_t`)."""
    return {"img_size": profile.crop_size} if "swin" in name else {}


def uses_pretrained(name: str, profile) -> bool:
    """Whether :func:`build` starts ``name``'s encoder from an ImageNet checkpoint.

    True when ``profile.pretrained`` and the model has one
    (:data:`study.models.PRETRAINED_ENCODERS`); for TopFormer only when its official file
    is in ``profile.weights_dir`` (:data:`study.models.TOPFORMER_CHECKPOINTS`) - without it
    the bi-level section trains TopFormer from scratch, a deviation from source 002 that its
    rows show as ``pretrained = False``.
    """
    if not getattr(profile, "pretrained", False):
        return False
    if name in TOPFORMER_CHECKPOINTS:
        if not profile.weights_dir:
            return False
        try:
            pretrained_weights_file(name, profile.weights_dir)
        except WeightsError:
            return False
        return True
    return name in PRETRAINED_ENCODERS


def start_label(name: str, profile) -> str:
    """``"ImageNet encoder (<checkpoint>)"`` or ``"from scratch"``: how :func:`build` starts ``name``."""
    if not uses_pretrained(name, profile):
        return "from scratch"
    ck = PRETRAINED_ENCODERS.get(name) or f"topformer/{TOPFORMER_CHECKPOINTS[name]}"
    return f"ImageNet encoder ({ck})"


def build(name: str, profile, pretrained: bool | None = None) -> nn.Module:
    """``study.models.create_model(name)`` with the profile-dependent arguments.

    Args:
        name: registry name.
        profile: the context's profile (``ctx.profile``).
        pretrained: start the encoder from its ImageNet checkpoint (from
            ``profile.weights_dir``, or the Hugging Face hub / cache when that is ""); None:
            :func:`uses_pretrained`. Pass False for an architecture whose weights are loaded
            right after (saves reading the checkpoint).

    Raises:
        study.models.WeightsError: a checkpoint is missing or not this encoder's.
    """
    pre = uses_pretrained(name, profile) if pretrained is None else bool(pretrained)
    return create_model(name, num_classes=NUM_CLASSES, pretrained=pre,
                        weights_dir=(getattr(profile, "weights_dir", "") or None) if pre else None,
                        **model_kwargs(name, profile))


def train_config(ctx, name: str, steps: int | None = None) -> TrainConfig:
    """The profile's training config for model ``name`` (the teacher gets ``teacher_steps``)."""
    p = ctx.profile
    if steps is None:
        steps = p.teacher_steps if name == p.teacher else p.student_steps
    return TrainConfig(steps=steps, lr=p.lr, eval_every=p.eval_every,
                       ohem_min_kept=max(256, p.batch_size * p.crop_size * p.crop_size // 16))


def distributed(ctx) -> bool:
    """Whether cached trainings run as ``torchrun`` jobs (``ctx.nproc * ctx.nnodes > 1``)."""
    return int(getattr(ctx, "nproc", 1)) * int(getattr(ctx, "nnodes", 1)) > 1


def train_cached(ctx, tag: str, build_fn: Callable[[], nn.Module], cfg: TrainConfig,
                 loss_fn_factory: Callable[[], LossFn] | None = None, seed: int | None = None,
                 extra_key: dict | None = None, modules: Sequence[Any] = ()) -> tuple[nn.Module, dict]:
    """Train ``build_fn()`` with ``cfg`` unless a cache entry exists; return ``(model, record)``.

    The key covers ``tag``, ``cfg``, the profile, the seed, the data fingerprint,
    ``extra_key`` and the import closure of this module and ``modules``. The record holds
    ``state_dict``, ``scores`` (see :func:`study.train.evaluate`, on val) and ``history``.

    With ``ctx.nproc * ctx.nnodes > 1`` (:func:`distributed`) the training is a
    ``torchrun`` job: this process seeds and builds the initial model, builds the loaders
    with the per-process batch ``profile.batch_size / world`` (so one optimizer step still
    sees the profile's global batch and its learning rate applies unchanged), writes the
    job (:func:`study.train.write_job`, under ``<cache>/jobs/``), runs ``torchrun
    --nproc_per_node N -m study.train job FILE`` (:func:`study.train.launch_job`; NCCL on
    GPUs, gloo on CPUs) and loads the checkpoint that rank 0 wrote into the cache. The
    record's ``history["ddp"]`` then says how many processes trained it and that they ended
    with identical weights. The cache key does not depend on the number of processes.

    Raises:
        ValueError: the profile's batch size is not divisible by the number of processes.
        RuntimeError: the ``torchrun`` job failed (with the end of its output).
    """
    seed = ctx.seed if seed is None else seed
    key_cfg = {"tag": tag, "train": asdict(cfg), **(extra_key or {})}
    mods = [__name__, *modules]

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

    def compute_distributed():
        world = int(ctx.nproc) * int(ctx.nnodes)
        bs = int(ctx.profile.batch_size)
        if bs % world:
            raise ValueError(f"--nproc {ctx.nproc} x --nnodes {ctx.nnodes} = {world} processes do not divide the "
                             f"profile's batch size {bs}: the global batch must split evenly")
        key = make_key(_full_config(ctx, key_cfg), seed, ctx.data_fp, mods)
        seed_everything(seed)
        model = build_fn().cpu()
        tr, va = loaders(ctx, batch_size=bs // world, seed=seed)
        loss_fn = loss_fn_factory() if loss_fn_factory else None
        log = ctx.out_dir / "logs" / f"{tag}-seed{seed}.csv"
        job_cfg = TrainConfig(**{**asdict(cfg), "log_csv": str(log)})
        job = ctx.cache.root / "jobs" / f"{tag}-{key}.job.pt"
        write_job(job, model=model, train_loader=tr, val_loader=va, cfg=job_cfg, loss_fn=loss_fn,
                  out=ctx.cache.path(tag, key), seed=seed, world=world, desc=tag)
        try:
            return launch_job(job, ctx.nproc, ctx.nnodes, ctx.rdzv_endpoint, rdzv_id=f"{tag}-{key}")
        finally:
            job.unlink(missing_ok=True)

    rec = cached(ctx, tag, key_cfg, compute_distributed if distributed(ctx) else compute, seed=seed, modules=mods)
    model = build_fn()
    model.load_state_dict(rec["state_dict"])
    model.to(ctx.device).eval()
    return model, rec


def trained_model(ctx, name: str, steps: int | None = None, seed: int | None = None) -> tuple[nn.Module, dict]:
    """A zoo model trained on the context's data (cached, shared by all sections).

    It starts as :func:`build` builds it: from scratch, or - with ``ctx.profile.pretrained``
    (the ``paper`` profile, or ``--weights-dir``) - from the encoder's ImageNet checkpoint
    (:func:`uses_pretrained`; the key holds which).

    Args:
        ctx: the notebook's context.
        name: registry name (``ctx.profile.teacher`` trains for ``teacher_steps``).
        steps: override the number of training steps.
        seed: override the context seed.

    Returns:
        ``(model in eval mode, scores)`` with scores as returned by
        :func:`study.train.evaluate` plus ``train_seconds`` and ``pretrained`` (bool).
    """
    cfg = train_config(ctx, name, steps)
    pre = uses_pretrained(name, ctx.profile)
    model, rec = train_cached(ctx, f"baseline-{name}", lambda: build(name, ctx.profile), cfg, seed=seed,
                              extra_key={"start": start_label(name, ctx.profile)} if pre else None)
    return model, {**rec["scores"], "train_seconds": rec["history"]["seconds"], "pretrained": pre}


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
        extra: the section's own columns, in order. ``pretrained=`` overrides the
            ``pretrained`` column.

    Returns:
        dict ready for ``pandas.DataFrame``: the base columns, ``extra``, then
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

__all__ = ["cached", "is_cached", "finetune_config", "loaders", "bench_kwargs", "build", "model_kwargs",
           "uses_pretrained", "start_label", "distributed", "train_config", "train_cached", "trained_model",
           "finetune", "table_row", "model_fingerprint"]
