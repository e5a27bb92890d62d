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

from .. import NUM_CLASSES
from ..cache import make_key
from ..data import make_eval_loader, make_loaders
from ..metrics import confusion_matrix
from ..models import (PRETRAINED_ENCODERS, TOPFORMER_CHECKPOINTS, WeightsError, create_model, model_fingerprint,
                      pretrained_weights_file)
from ..train import LossFn, TrainConfig, evaluate, last_quarter_gain, launch_job, seed_everything, train, write_job

#: Training-speed modes per model, chosen by measurement (``benchmarks/bench_train_speed.py``,
#: recorded in ``benchmarks/results/train_speed-2026-11-28.txt``: 2-core AMD EPYC with AVX-512
#: BF16, idle, 96 px, batch 8, 2 threads, interleaved rounds). Speed-up over fp32 contiguous:
#: MobileViT-S UPerNet channels_last 1.16x, bf16 1.23x, both 1.40x; ResNet-18 UPerNet
#: channels_last 1.00x, bf16 1.33x, both 1.37x; Swin-V2-T UPerNet channels_last 1.02x,
#: bf16 1.51x, both 1.54x. bf16 applies only on a CPU (:class:`study.train.TrainConfig`);
#: models not listed train in fp32, contiguous. Whether bf16 changes what a model learns is
#: checked by ``benchmarks/bench_bf16_levels.py``.
TRAIN_MODES = {
    "upernet_mobilevit_s": {"channels_last": True, "bf16": True},
    "upernet_resnet18": {"channels_last": True, "bf16": True},
    "upernet_swinv2_t": {"channels_last": True, "bf16": True},
}


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


def eval_loader(ctx, split: str = "test"):
    """Fixed-order loader of ``split`` (``"val"`` for choices, ``"test"`` for reported numbers).

    Batches of 8 at ``image_size``; with ``profile.eval_batches`` > 0 (a ``--fast-dev-run``)
    only the first ``eval_batches`` batches. See :func:`study.data.split_pairs` for where
    the splits come from.
    """
    ld = make_eval_loader(ctx.data_root, ctx.profile, split)
    n = int(getattr(ctx.profile, "eval_batches", 0) or 0)
    if n > 0 and len(ld.dataset) > n * ld.batch_size:
        ld = torch.utils.data.DataLoader(torch.utils.data.Subset(ld.dataset, range(n * ld.batch_size)),
                                         batch_size=ld.batch_size, shuffle=False, drop_last=False)
    return ld


def test_scores(ctx, model: nn.Module) -> dict:
    """:func:`study.train.evaluate` of ``model`` on the test split plus ``split = "test"``."""
    return {**evaluate(model, eval_loader(ctx, "test"), progress=False), "split": "test"}


@torch.inference_mode()
def test_confusions(ctx, model: nn.Module, split: str = "test"):
    """Per-image confusion matrices of ``model`` on ``split``: int64 array ``(N, C, C)``.

    The input of :func:`study.metrics.bootstrap_miou_diff` (paired bootstrap over test
    images, for comparisons made with one training seed).
    """
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for x, y in eval_loader(ctx, split):
        pred = model(x.to(dev)).argmax(1).cpu().numpy()
        out += [confusion_matrix(p, t, NUM_CLASSES) for p, t in zip(pred, y.numpy())]
    import numpy as np

    return np.stack(out).astype(np.int64)


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
                       ohem_min_kept=max(256, p.batch_size * p.crop_size * p.crop_size // 16),
                       **TRAIN_MODES.get(name, {}))


def distributed(ctx) -> bool:
    """Whether cached trainings run as ``torchrun`` jobs (``ctx.nproc * ctx.nnodes > 1``)."""
    return int(getattr(ctx, "nproc", 1)) * int(getattr(ctx, "nnodes", 1)) > 1


def train_cached(ctx, tag: str, build_fn: Callable[[], nn.Module], cfg: TrainConfig,
                 loss_fn_factory: Callable[[], LossFn] | None = None, seed: int | None = None,
                 extra_key: dict | None = None, modules: Sequence[Any] = ()) -> tuple[nn.Module, dict]:
    """Train ``build_fn()`` with ``cfg`` unless a cache entry exists; return ``(model, record)``.

    The key covers ``tag``, ``cfg``, the profile, the seed, the data fingerprint,
    ``extra_key`` and the import closure of this module and ``modules``. The record holds
    ``state_dict``, ``scores`` (see :func:`study.train.evaluate`, on val: for choices),
    ``test_scores`` (the same on test: for reported numbers) and ``history`` (``loss``,
    ``evals`` - the validation learning curve - and ``seconds``).

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
                "scores": scores, "test_scores": test_scores(ctx, model),
                "history": {k: hist[k] for k in ("loss", "evals", "seconds")}}

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
    if "test_scores" not in rec:  # written by a torchrun job (rank 0 scores on val only)
        rec = {**rec, "test_scores": test_scores(ctx, model)}
    return model, rec


def record_scores(rec: dict, steps: int, batch_size: int) -> dict:
    """The reported view of a :func:`train_cached` record: test scores plus the training facts.

    Returns:
        the ``test_scores`` (``miou``, ``mdice``, ``per_class_iou``..., ``split = "test"``)
        with ``val_miou`` (the selection score), ``train_seconds`` (s), ``steps`` and
        ``train_steps`` (optimizer steps), ``train_images`` (``steps * batch_size``),
        ``curve`` (the validation learning curve: list of ``{step, miou, mdice}``) and
        ``miou_last_quarter_gain`` (:func:`study.train.last_quarter_gain`).
    """
    evals = rec["history"].get("evals", [])
    return {**rec["test_scores"], "split": "test", "val_miou": rec["scores"]["miou"],
            "train_seconds": rec["history"]["seconds"], "steps": int(steps), "train_steps": int(steps),
            "train_images": int(steps) * int(batch_size), "curve": list(evals),
            "miou_last_quarter_gain": last_quarter_gain(evals, steps)}


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
        ``(model in eval mode, scores)``: :func:`record_scores` (test scores, ``val_miou``,
        ``steps``, ``train_steps``, ``train_images``, ``curve``, ``miou_last_quarter_gain``,
        ``train_seconds``) plus ``pretrained`` (bool).
    """
    cfg = train_config(ctx, name, steps)
    pre = uses_pretrained(name, ctx.profile)
    model, rec = train_cached(ctx, f"baseline-{name}", lambda: build(name, ctx.profile), cfg, seed=seed,
                              extra_key={"start": start_label(name, ctx.profile)} if pre else None)
    return model, {**record_scores(rec, cfg.steps, ctx.profile.batch_size), "pretrained": pre}


def finetune(ctx, model: nn.Module, steps: int, loss_fn: LossFn | None = None, lr: float | None = None,
             progress: bool = True, desc: str = "finetune", train_loader=None, curve_points: int = 0) -> dict:
    """Recovery fine-tune of ``model`` in place (not cached; callers cache the result).

    A quarter of the profile's peak learning rate, a warm-up of 10 % of ``steps``, the
    training loss and data of the profile. ``train_loader`` (a loader or a
    :class:`study.data.BatchStream`) replaces the context's train loader. With
    ``curve_points`` > 0 the model is scored on the val split that many times, evenly
    spaced (the recovery's learning curve, ``history["evals"]``). Returns the
    :func:`study.train.train` history.
    """
    if steps <= 0:
        return {"loss": [], "evals": [], "seconds": 0.0}
    tr = train_loader if train_loader is not None else loaders(ctx)[0]
    cfg = finetune_config(ctx, steps, lr)
    va = None
    if curve_points > 0:
        cfg.eval_every = max(1, steps // int(curve_points))
        va = eval_loader(ctx, "val")
    return train(model, tr, va, cfg, loss_fn=loss_fn, progress=progress, desc=desc)


def finetune_config(ctx, steps: int, lr: float | None = None) -> TrainConfig:
    """The :func:`finetune` settings for ``steps`` optimizer steps: a quarter of the
    profile's peak learning rate (unless ``lr``), no evaluation, 10 % warm-up."""
    cfg = train_config(ctx, "", steps)
    cfg.lr = lr if lr is not None else ctx.profile.lr * 0.25
    cfg.eval_every = 0
    cfg.warmup_steps = max(1, steps // 10)
    return cfg



__all__ = ["TRAIN_MODES", "eval_loader", "test_scores", "record_scores", "cached", "is_cached", "finetune_config", "loaders", "bench_kwargs", "build", "model_kwargs",
           "uses_pretrained", "start_label", "distributed", "train_config", "train_cached", "trained_model",
           "finetune", "model_fingerprint", "test_confusions"]
