r"""Iterative structured pruning: prune a little, fine-tune, re-rank, prune again.

Question: does reaching a channel sparsity :math:`s_f` in :math:`k` small steps (each
followed by a short recovery fine-tune, with the channel importance re-estimated on the
already-pruned model) keep more accuracy than removing all channels at once and
fine-tuning for the same total number of steps? Source 000 reports that iterative
pruning gave only marginal gains over one-shot ("bulk") pruning on MobileViT.

Schedules (cumulative channel sparsity after step :math:`t = 1..n`, relative to the
**original** widths; :math:`s_i = 0`):

* ``"oneshot"``: :math:`s_t = s_f` for every step (everything is removed at step 1;
  with ``steps > 1`` the later steps only fine-tune).
* ``"linear"``: :math:`s_t = s_f\, t / n`.
* ``"cubic"``: automated gradual pruning (AGP, Zhu & Gupta 2017, "To prune, or not to
  prune"): :math:`s_t = s_f + (s_i - s_f)(1 - t/n)^3`, which removes most channels early,
  while the network is still redundant, and little at the end.

Pruning is physical (torch-pruning 1.6.1 DepGraph, as :func:`study.prune.prune_structured`):
tensors shrink, params and MACs are measured on the smaller model after every step.
Exact widths: torch-pruning's own iterative mode (one ``MetaPruner`` with
``iterative_steps = n`` and a custom ``iterative_pruning_ratio_scheduler``) computes the
number of channels to keep at step :math:`t` of every group as
``int(C0 * (1 - s_t))`` with ``C0`` the group's width *before the first step*. So the last
step keeps ``int(C0 * (1 - s_f))`` channels - exactly what one-shot
``prune_structured(model, x, s_f)`` keeps. (Composing independent one-shot calls with
per-step ratios ``1 - (1-s_t)/(1-s_{t-1})`` would not: flooring at every step drifts by
a channel or more, e.g. 64 channels at ``s_f = 0.45`` in two linear steps give 34, not 35.)

Importance (re-estimated at every step on the current model): ``"magnitude"`` - L1 norm
of each filter summed over the coupled group (Li et al., ICLR 2017); ``"taylor"`` -
:math:`\sum |g\,w|` over the group with gradients of cross-entropy accumulated over a few
calibration batches (Molchanov et al., CVPR 2019).

Fine-tuning: a total budget of ``total_finetune_steps`` optimizer steps is split as
``total // k`` per step with the remainder given to the last step, so every schedule gets
the same budget. All steps draw from one continuing stream of training batches (the
configurations see the same images in the same order), each chunk with the settings of
:func:`study.train.finetune` (AdamW, a quarter of the profile's peak learning rate, 10 %
warm-up, poly decay). With ``kd=True`` the fine-tune loss is knowledge distillation from
a teacher (the prune -> distill pipeline).
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEDULES = ("oneshot", "linear", "cubic")
IMPORTANCES = ("magnitude", "taylor")
#: The step counts the study compares (any positive int is accepted).
STUDY_STEPS = (1, 2, 4, 8)


# --------------------------------------------------------------------------- schedules
def _check_final_sparsity(value, name: str = "final_sparsity") -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if math.isnan(v) or not (0.0 <= v < 1.0):
        raise ValueError(f"{name} must be in [0, 1) (fraction of channels removed), got {value!r}")
    return v


def _check_steps(value, name: str = "steps") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int (number of prune/fine-tune steps k), got {value!r}")
    return value


def sparsity_schedule(final_sparsity: float, steps: int, kind: str = "linear") -> list[float]:
    r"""Cumulative channel sparsity after each of ``steps`` pruning steps.

    Sparsity is the fraction of each group's channels removed, relative to the original
    widths. ``"linear"``: :math:`s_t = s_f t/n`; ``"cubic"`` (AGP, Zhu & Gupta 2017):
    :math:`s_t = s_f + (0 - s_f)(1 - t/n)^3`; ``"oneshot"``: :math:`s_t = s_f` for all t.
    The last entry is exactly ``final_sparsity``; the list is non-decreasing.

    Args:
        final_sparsity: :math:`s_f` in [0, 1).
        steps: number of steps :math:`n \ge 1`.
        kind: ``"linear"`` | ``"cubic"`` | ``"oneshot"``.

    Returns:
        list of ``steps`` floats in [0, final_sparsity].

    Raises:
        ValueError: ``final_sparsity`` outside [0, 1), ``steps`` not a positive int, or
            unknown ``kind`` (the message names the parameter).
    """
    sf = _check_final_sparsity(final_sparsity)
    n = _check_steps(steps)
    if kind == "oneshot":
        out = [sf] * n
    elif kind == "linear":
        out = [sf * t / n for t in range(1, n + 1)]
    elif kind == "cubic":
        out = [sf + (0.0 - sf) * (1.0 - t / n) ** 3 for t in range(1, n + 1)]
    else:
        raise ValueError(f"kind must be one of {SCHEDULES}, got {kind!r}")
    out[-1] = sf  # exact, whatever the float arithmetic
    return [float(min(max(v, 0.0), sf)) for v in out]


def finetune_split(total_steps: int, steps: int) -> list[int]:
    """Fine-tune steps after each pruning step: ``total // k`` each, remainder to the last.

    Args:
        total_steps: total optimizer steps (>= 0).
        steps: number of pruning steps k (>= 1).

    Returns:
        list of ``steps`` non-negative ints summing to ``total_steps``.

    Raises:
        ValueError: ``total_steps`` negative / not an int, or bad ``steps``.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 0:
        raise ValueError(f"total_finetune_steps must be a non-negative int, got {total_steps!r}")
    n = _check_steps(steps)
    out = [total_steps // n] * n
    out[-1] += total_steps - sum(out)
    return out


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class IterativeConfig:
    """One configuration of the iterative-pruning study.

    Attributes:
        final_sparsity: channel sparsity reached at the last step, in [0, 1).
        steps: number of prune -> fine-tune steps k (the study uses 1, 2, 4, 8).
        schedule: ``"oneshot"`` | ``"linear"`` | ``"cubic"`` (see :func:`sparsity_schedule`).
        importance: ``"magnitude"`` (L1, Li et al. 2017) | ``"taylor"`` (Molchanov et al. 2019).
        kd: fine-tune with knowledge distillation from a teacher instead of plain CE/OHEM.
        total_finetune_steps: optimizer steps over all k steps (same for every schedule).
        calib_batches: training batches whose gradients feed Taylor importance (None:
            ``ceil(profile.calib_images / batch_size)``); ignored for magnitude.

    Raises:
        ValueError: any field out of range (the message names the field).
    """

    final_sparsity: float = 0.45
    steps: int = 1
    schedule: str = "oneshot"
    importance: str = "magnitude"
    kd: bool = False
    total_finetune_steps: int = 0
    calib_batches: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "final_sparsity", _check_final_sparsity(self.final_sparsity))
        _check_steps(self.steps)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if not isinstance(self.kd, bool):
            raise ValueError(f"kd must be a bool, got {self.kd!r}")
        finetune_split(self.total_finetune_steps, self.steps)  # validates total_finetune_steps
        if self.calib_batches is not None and (isinstance(self.calib_batches, bool)
                                               or not isinstance(self.calib_batches, int)
                                               or self.calib_batches < 1):
            raise ValueError(f"calib_batches must be a positive int or None, got {self.calib_batches!r}")

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``"cubic k=4"`` or ``"one-shot"``."""
        return "one-shot" if self.schedule == "oneshot" and self.steps == 1 else f"{self.schedule} k={self.steps}"

    def sparsities(self) -> list[float]:
        """:func:`sparsity_schedule` of this config."""
        return sparsity_schedule(self.final_sparsity, self.steps, self.schedule)

    def finetune_steps(self) -> list[int]:
        """:func:`finetune_split` of this config."""
        return finetune_split(self.total_finetune_steps, self.steps)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- helpers
def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex) of a model's state_dict (names, shapes, dtypes, values) and pruning record.

    Used as the "start model identity" in cache keys.
    """
    from .prune import pruning_record

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(pruning_record(model), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class _ContinuingStream:
    """Iterable over one endless stream of loader batches.

    Every ``iter()`` returns the same generator, so successive ``train`` calls continue
    where the previous one stopped instead of restarting the epoch.
    """

    def __init__(self, loader):
        self._gen = itertools.chain.from_iterable(itertools.repeat(loader))

    def __iter__(self):
        return self._gen

    def take(self, n: int) -> list:
        return list(itertools.islice(self._gen, n))


def _fallback_kd_loss(teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5) -> Callable:
    """CE + T^2-scaled pixel-wise KL(teacher || student) at temperature T (Hinton et al. 2015)."""
    from . import IGNORE_INDEX

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(model, images, masks):
        logits = model(images)
        with torch.no_grad():
            t = teacher(images)
        if t.shape[-2:] != logits.shape[-2:]:
            t = F.interpolate(t, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        ce = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
        T = temperature
        kl = F.kl_div(F.log_softmax(logits / T, 1), F.log_softmax(t / T, 1), reduction="none",
                      log_target=True).sum(1).mean() * T * T
        loss = (1 - alpha) * ce + alpha * kl
        return loss, {"ce": float(ce.detach()), "kd": float(kl.detach())}

    return loss_fn


def make_finetune_loss(teacher: nn.Module, kd_config: dict | None = None, train_cfg=None) -> tuple[Callable, dict]:
    """KD loss for the prune -> distill fine-tune, and the KD settings it uses.

    Uses :func:`study.distill.make_kd_loss` with ``kd_config`` (the ``kd`` entry of the
    record :func:`study.distill.kd_student` returns, i.e. the KD configuration the
    starting student was distilled with; default ``study.distill.FALLBACK_CHOICE``).
    ``"kl+feat"`` becomes ``"kl"`` (same T and weight): the FitNets adapters were fitted to
    the unpruned feature widths, which pruning changes. Without :mod:`study.distill`:
    CE + pixel-wise KL at T = 2 (:func:`_fallback_kd_loss`).

    Args:
        teacher: frozen teacher ``(N,3,H,W) -> (N,14,H,W)``.
        kd_config: dict of :class:`study.distill.KDConfig` fields, or None.
        train_cfg: :class:`study.train.TrainConfig` of the segmentation term.

    Returns:
        ``(loss_fn(model, images, masks) -> (loss, logs), settings dict)``.
    """
    try:
        from . import distill
    except ImportError:  # documented fallback
        distill = None
    if distill is None or not hasattr(distill, "make_kd_loss"):
        return _fallback_kd_loss(teacher), {"method": "fallback-kl", "temperature": 2.0, "kd_weight": 0.5}
    kd = dict(kd_config or getattr(distill, "FALLBACK_CHOICE", {}))
    if kd.get("method") == "kl+feat":
        kd = {**kd, "method": "kl", "feat_weight": 0.0}
    cfg = distill.KDConfig(**kd)
    return distill.make_kd_loss(teacher, cfg, train_cfg=train_cfg), asdict(cfg)


def _finetune_cfg(ctx, steps: int):
    """The :func:`study.train.finetune` settings for ``steps`` optimizer steps."""
    from .train import default_config

    cfg = default_config(ctx, "", steps)
    cfg.lr = ctx.profile.lr * 0.25
    cfg.eval_every = 0
    cfg.warmup_steps = max(1, steps // 10)
    return cfg


def _complexity(model: nn.Module, hw) -> dict:
    try:
        from .models import model_complexity

        c = model_complexity(model, tuple(int(v) for v in hw))
        return {"params_m": float(c["params_m"]), "gmacs": float(c["gmacs"])}
    except ImportError:  # pragma: no cover - models.py always ships with the package
        return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "gmacs": float("nan")}


def _score(model, val_loader) -> dict:
    from .train import evaluate

    s = evaluate(model, val_loader, progress=False)
    return {"miou": float(s["miou"]), "mdice": float(s["mdice"])}


def channel_widths(model: nn.Module) -> dict:
    """``{param_name: shape}`` of every parameter: compares the widths of two pruned models."""
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


# --------------------------------------------------------------------------- pruning core
def prune_iteratively(model: nn.Module, example_inputs, sparsities: Iterable[float], importance: str = "magnitude",
                      between: Callable[[int, nn.Module], None] | None = None,
                      before: Callable[[int, nn.Module], None] | None = None,
                      calib_batches: Callable[[int], Iterable] | None = None) -> nn.Module:
    """Prune ``model`` in place through cumulative sparsities, re-ranking channels at each step.

    One torch-pruning ``MetaPruner`` with ``iterative_steps = len(sparsities)`` and a
    scheduler returning ``[0, *sparsities]``: at step t every group keeps
    ``int(C0 * (1 - sparsities[t]))`` channels, ``C0`` its width before step 1, so the
    final widths equal one-shot :func:`study.prune.prune_structured` at ``sparsities[-1]``.
    Settings mirror ``prune_structured`` (classifier never pruned, attention blocks pruned
    by head dimension with ``num_heads`` kept, the softmax temperature folded into q),
    and each step is appended to the model's :func:`study.prune.pruning_record` so it can be
    saved with :func:`study.prune.save_pruned`.

    Args:
        model: float segmenter ``(N,3,H,W) -> (N,C,H,W)``; modified in place and returned.
        example_inputs: ``(N,3,H,W)`` tensor or ``(H, W)`` for tracing.
        sparsities: non-decreasing cumulative channel sparsities in [0, 1), one per step.
        importance: ``"magnitude"`` | ``"taylor"``.
        before: ``before(t, model)`` called before step t's importance estimate.
        between: ``between(t, model)`` called after step t's pruning (fine-tune, evaluate).
        calib_batches: ``calib_batches(t) -> iterable of (images, masks)``; required for
            Taylor (gradients of cross-entropy on the current model).

    Raises:
        ValueError: empty / decreasing / out-of-range ``sparsities`` (names ``sparsities``),
            unknown ``importance``, Taylor without ``calib_batches``.
    """
    import torch_pruning as tp

    from .prune import (_accumulate_grads, _example_inputs, _fix_attention, _make_importance, _record,
                        _snapshot_attention, attention_modules)

    sched = [float(s) for s in sparsities]
    if not sched:
        raise ValueError("sparsities must hold at least one step")
    for s in sched:
        _check_final_sparsity(s, "sparsities")
    if any(b < a for a, b in zip(sched, sched[1:])):
        raise ValueError(f"sparsities must be non-decreasing, got {sched}")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    if importance == "taylor" and calib_batches is None:
        raise ValueError("importance='taylor' needs calib_batches (gradients of a few batches per step)")
    x = _example_inputs(example_inputs, model)
    imp = _make_importance(importance)
    final = sched[-1]

    def scheduler(ratio, n):
        # called for pruning_ratio (== final) and head_pruning_ratio (0 here); another
        # ratio keeps the shape of the schedule
        if ratio == final:
            return [0.0, *sched]
        return [0.0, *[ratio * s / final for s in sched]]

    ignored = []
    cls = getattr(model, "classifier", None)
    if isinstance(cls, nn.Module):
        ignored.append(cls)
    num_heads = {m.qkv: m.num_heads for m in attention_modules(model).values()}
    was_training = model.training
    model.eval()
    pruner = None
    if final > 0:
        pruner = tp.pruner.MetaPruner(
            model, x, importance=imp, pruning_ratio=final, iterative_steps=len(sched),
            iterative_pruning_ratio_scheduler=scheduler,
            ignored_layers=ignored, num_heads=num_heads, prune_num_heads=False, prune_head_dims=True,
            head_pruning_ratio=0.0)
    for t, s in enumerate(sched):
        if before is not None:
            before(t, model)
        if pruner is not None and (t == 0 or s > sched[t - 1]):
            model.eval()
            snap = _snapshot_attention(model)
            n_hist = len(pruner.pruning_history())
            if importance == "taylor":
                _accumulate_grads(model, calib_batches(t), None, "calib_batches")
            pruner.step()
            model.zero_grad(set_to_none=True)
            _fix_attention(model, snap, pruner.num_heads, keep_scale=True)
            _record(model).append({
                "kind": "tp", "input_hw": [int(x.shape[-2]), int(x.shape[-1])],
                "history": [[str(n), bool(o), [int(i) for i in idx]]
                            for n, o, idx in pruner.pruning_history()[n_hist:]],
                "attention": {n: [m.num_heads, m.head_dim] for n, m in attention_modules(model).items()},
                "sparsity": s, "importance": importance, "prune_heads": False, "iterative_step": t + 1,
            })
        elif pruner is not None:
            pruner.current_step += 1  # same target as before: nothing to remove at this step
        model.train(was_training)
        if between is not None:
            between(t, model)
    return model


# --------------------------------------------------------------------------- study entry point
def _cache_spec(model_fp: str, ctx, cfg: IterativeConfig, teacher_fp: str | None, kd_config: dict | None):
    """(entry name, key config, code objects) of one configuration's cache entry."""
    from . import prune as sprune
    from . import train as strain

    hw = [ctx.profile.crop_size, ctx.profile.crop_size]
    key = {"iterative": cfg.to_dict(), "start": model_fp, "teacher": teacher_fp if cfg.kd else None,
           "kd_config": kd_config if cfg.kd else None, "profile": ctx.profile.to_dict(), "input_hw": hw}
    name = (f"iterative-{cfg.label.replace(' ', '').replace('=', '')}-s{cfg.final_sparsity:g}-{cfg.importance}"
            + ("-kd" if cfg.kd else ""))
    return name, key, (sys.modules[__name__], sprune, strain)


def is_cached(model: nn.Module, ctx, cfg: IterativeConfig, teacher: nn.Module | None = None,
              kd_config: dict | None = None, model_fp: str | None = None) -> bool:
    """Whether :func:`iterative_prune` would be answered from the cache (costs no compute)."""
    from .cache import make_key

    fp = model_fp or model_fingerprint(model)
    tfp = model_fingerprint(teacher) if (cfg.kd and teacher is not None) else None
    name, key, code = _cache_spec(fp, ctx, cfg, tfp, kd_config)
    return ctx.cache.get(name, make_key(key, ctx.seed, ctx.data_fp, code)) is not None


def iterative_prune(model: nn.Module, ctx, cfg: IterativeConfig, teacher: nn.Module | None = None,
                    kd_config: dict | None = None, progress: bool = False,
                    rebuild: bool = True) -> tuple[nn.Module | None, list[dict]]:
    """Prune ``model`` to ``cfg.final_sparsity`` in ``cfg.steps`` steps with fine-tuning between.

    At step t: re-estimate channel importance on the current model (Taylor: on
    ``cfg.calib_batches`` training batches from a separately seeded stream), prune to the schedule's cumulative sparsity
    (relative to the original widths; final widths equal one-shot's, see
    :func:`prune_iteratively`), measure params / MACs on the smaller model, evaluate,
    fine-tune ``cfg.finetune_steps()[t]`` steps (KD from ``teacher`` when ``cfg.kd``),
    evaluate again. Every configuration starts from the same seed and draws the same
    stream of training batches. The result is cached with ``ctx.cache.memo`` (key: cfg,
    start-model fingerprint, teacher fingerprint and KD settings, profile, seed, data,
    code of this module, :mod:`study.prune` and :mod:`study.train`); a hit rebuilds the
    pruned model from the stored pruning history + state_dict.

    Args:
        model: trained segmenter (float32 ``(N,3,H,W) -> (N,14,H,W)``); not modified
            (a deep copy is pruned).
        ctx: :class:`study.context.Context` (profile sizes, data, cache, seed).
        cfg: :class:`IterativeConfig`.
        teacher: teacher segmenter, required when ``cfg.kd``.
        kd_config: KD settings (see :func:`make_finetune_loss`).
        progress: show tqdm bars while fine-tuning.
        rebuild: on a cache hit, rebuild the pruned model (one graph trace per step); with
            False the model is returned as None when it was not computed in this call.

    Returns:
        ``(pruned model in eval mode on ctx.device, trajectory)``; ``trajectory`` is a list
        of dicts, step 0 (the start model) then steps 1..k, with ``step``, ``sparsity``
        (cumulative channel sparsity), ``params_m`` (M params), ``gmacs`` (GMACs per image
        at ``crop_size``), ``miou_before_ft``, ``miou_after_ft``, ``mdice_before_ft``,
        ``mdice_after_ft``, ``finetune_steps``, ``finetune_seconds``, ``prune_seconds``,
        ``eval_seconds`` (s, wall clock); step 0 also holds ``wall_seconds``, the whole
        configuration's wall time (s, incl. graph tracing and MAC counting).

    Raises:
        ValueError: ``cfg`` not an IterativeConfig, or ``cfg.kd`` without ``teacher``.
    """
    from . import prune as sprune
    from . import train as strain
    from .context import seed_everything

    if not isinstance(cfg, IterativeConfig):
        raise ValueError(f"cfg must be an IterativeConfig, got {type(cfg).__name__}")
    if cfg.kd and teacher is None:
        raise ValueError("teacher is required when cfg.kd is True (prune -> distill fine-tune)")
    device = ctx.device
    start = copy.deepcopy(model).to(device).eval()
    hw = (ctx.profile.crop_size, ctx.profile.crop_size)
    name, key, code = _cache_spec(model_fingerprint(start), ctx, cfg,
                                  model_fingerprint(teacher) if cfg.kd else None, kd_config)
    n_start = len(sprune.pruning_record(start))

    def compute():
        import torch_pruning as tp

        wall0 = time.perf_counter()
        seed_everything(ctx.seed)
        m = copy.deepcopy(start)
        tr, va = strain.loaders(ctx)
        stream = _ContinuingStream(tr)
        ft_steps = cfg.finetune_steps()
        sched = cfg.sparsities()
        loss_fn, kd_used = None, None
        if cfg.kd:
            loss_fn, kd_used = make_finetune_loss(teacher.to(device).eval(), kd_config, _finetune_cfg(ctx, 1))
        n_calib = cfg.calib_batches or max(1, math.ceil(ctx.profile.calib_images / ctx.profile.batch_size))

        def score(net):
            t0 = time.perf_counter()
            s = _score(net, va)
            return s, time.perf_counter() - t0

        b0, e0 = score(m)
        traj = [{"step": 0, "sparsity": 0.0, **_complexity(m, hw),
                 "miou_before_ft": b0["miou"], "miou_after_ft": b0["miou"],
                 "mdice_before_ft": b0["mdice"], "mdice_after_ft": b0["mdice"],
                 "finetune_steps": 0, "finetune_seconds": 0.0, "prune_seconds": 0.0, "eval_seconds": e0}]
        clock = {}

        def before(t, net):
            clock["t0"] = time.perf_counter()

        def between(t, net):
            prune_s = time.perf_counter() - clock["t0"]
            c = _complexity(net, hw)
            b, eb = score(net)
            secs, loss_end, ea = 0.0, float("nan"), 0.0
            a = b
            if ft_steps[t] > 0:
                h = strain.train(net, stream, None, _finetune_cfg(ctx, ft_steps[t]), loss_fn=loss_fn,
                                 progress=progress, desc=f"{cfg.label} step {t + 1}")
                secs, loss_end = float(h["seconds"]), float(h["loss"][-1])
                a, ea = score(net)
            traj.append({"step": t + 1, "sparsity": sched[t], **c,
                         "miou_before_ft": b["miou"], "miou_after_ft": a["miou"],
                         "mdice_before_ft": b["mdice"], "mdice_after_ft": a["mdice"],
                         "finetune_steps": ft_steps[t], "finetune_seconds": secs,
                         "prune_seconds": prune_s, "eval_seconds": eb + ea, "loss_end": loss_end})

        calib = None
        if cfg.importance == "taylor":  # own stream: the fine-tune batches stay identical across configs
            calib_stream = _ContinuingStream(strain.loaders(ctx, seed=ctx.seed + 1)[0])
            calib = lambda t: calib_stream.take(n_calib)  # noqa: E731
        prune_iteratively(m, hw, sched, cfg.importance, between=between, before=before, calib_batches=calib)
        m.eval()
        traj[0]["wall_seconds"] = time.perf_counter() - wall0
        computed["model"] = m
        new_steps = sprune.pruning_record(m)[n_start:]
        return {"trajectory": traj, "payload": sprune.pruned_payload(m, new_steps),
                "kd": kd_used or {}, "tp_version": str(tp.__version__), "config": cfg.to_dict()}

    computed = {}
    rec = ctx.cache.memo(name, key, compute, seed=ctx.seed, data_fp=ctx.data_fp, code=code)
    pruned = computed.get("model")
    if pruned is None and not rebuild:
        return None, [dict(r) for r in rec["trajectory"]]
    if pruned is None:  # cache hit: replay the stored pruning history on a copy of the start model
        pruned = sprune.rebuild_pruned(lambda: copy.deepcopy(start), rec["payload"])
    pruned = pruned.to(device).eval()
    return pruned, [dict(r) for r in rec["trajectory"]]


def trajectory_frame(trajectory: list[dict], cfg: IterativeConfig):
    """A trajectory as a DataFrame with the config's label / schedule / steps / importance / kd."""
    import pandas as pd

    df = pd.DataFrame(trajectory)
    for k, v in (("config", cfg.label), ("schedule", cfg.schedule), ("steps", cfg.steps),
                 ("importance", cfg.importance), ("kd", cfg.kd), ("final_sparsity", cfg.final_sparsity)):
        df[k] = v
    return df


# --------------------------------------------------------------------------- the study grid
#: Wall-clock budget (s) of a profile's iterative grid; None = run everything.
#: ``profile.extra["iterative_budget_s"]`` overrides it.
BUDGET_S = {"smoke": 45.0, "cpu": 600.0}
#: Cost of a KD fine-tune step relative to a plain one (teacher forward on the same batch;
#: ~2-3x on 2 CPU cores per study.distill.kd_steps' note) - used only for planning.
KD_COST_FACTOR = 3.0
MAIN_SPARSITY = 0.45


def study_grid(profile) -> dict:
    """Sizes of the iterative-pruning grid for ``profile``.

    Returns:
        dict with ``main_sparsity`` (0.45 if in ``profile.sparsities``, else the median),
        ``extra_sparsities`` (up to two other sparsities of the profile, nearest first),
        ``ks`` (step counts compared with one-shot: smoke (2,), cpu (2, 4), else (2, 4, 8)),
        ``total_finetune_steps`` (``profile.finetune_steps``), ``budget_s`` (s or None).
    """
    sp = sorted(float(s) for s in profile.sparsities)
    main = MAIN_SPARSITY if MAIN_SPARSITY in sp else sp[len(sp) // 2]
    extra = sorted((s for s in sp if s != main), key=lambda s: (abs(s - main), s))[:2]
    ks = {"smoke": (2,), "cpu": (2, 4)}.get(profile.name, (2, 4, 8))
    budget = (profile.extra or {}).get("iterative_budget_s", BUDGET_S.get(profile.name))
    return {"main_sparsity": main, "extra_sparsities": sorted(extra), "ks": tuple(ks),
            "total_finetune_steps": int(profile.finetune_steps),
            "budget_s": None if budget is None else float(budget)}


def estimate_seconds(cfg: IterativeConfig, timing: dict) -> float:
    """Planned wall time of ``cfg`` (s) from a measured configuration's ``timing``.

    ``timing``: ``sec_per_step`` (s per fine-tune step), ``prune_s`` (s per pruning step),
    ``eval_s`` (s per evaluation), ``overhead_s`` (s per configuration: graph tracing,
    MAC counting, copies).
    """
    ft = cfg.total_finetune_steps * timing["sec_per_step"] * (KD_COST_FACTOR if cfg.kd else 1.0)
    evals = 1 + cfg.steps + sum(1 for n in cfg.finetune_steps() if n > 0)
    return ft + cfg.steps * timing["prune_s"] + evals * timing["eval_s"] + timing.get("overhead_s", 0.0)


def timing_of(trajectory: list[dict]) -> dict:
    """Per-unit costs measured on one configuration (see :func:`estimate_seconds`)."""
    steps = [r for r in trajectory if r["step"] > 0]
    n_ft = sum(r["finetune_steps"] for r in steps)
    n_eval = 1 + len(steps) + sum(1 for r in steps if r["finetune_steps"] > 0)
    parts = (sum(r["finetune_seconds"] + r["prune_seconds"] for r in steps)
             + sum(r.get("eval_seconds", 0.0) for r in trajectory))
    return {"sec_per_step": sum(r["finetune_seconds"] for r in steps) / max(1, n_ft),
            "prune_s": sum(r["prune_seconds"] for r in steps) / max(1, len(steps)),
            "eval_s": sum(r.get("eval_seconds", 0.0) for r in trajectory) / max(1, n_eval),
            "overhead_s": max(0.0, trajectory[0].get("wall_seconds", parts) - parts)}


def result_row(cfg: IterativeConfig, trajectory: list[dict], model_name: str, role: str = "") -> dict:
    """One table row (base columns of :data:`study.BASE_COLUMNS` first) for a finished config."""
    from . import BASE_COLUMNS  # noqa: F401 - documents the contract

    last = trajectory[-1]
    method = f"{cfg.label}, {cfg.importance}" + (", prune->distill" if cfg.kd else ", plain FT")
    return {"section": "iterative_pruning", "model": model_name, "method": method,
            "input_hw": f"{last.get('input_hw', '')}",
            "params_m": last["params_m"], "gmacs": last["gmacs"],
            "miou": last["miou_after_ft"], "mdice": last["mdice_after_ft"],
            "schedule": cfg.schedule, "steps": cfg.steps, "importance": cfg.importance, "kd": cfg.kd,
            "final_sparsity": cfg.final_sparsity, "finetune_steps": sum(r["finetune_steps"] for r in trajectory),
            "finetune_seconds": sum(r["finetune_seconds"] for r in trajectory),
            "miou_start": trajectory[0]["miou_after_ft"],
            "miou_pruned_no_ft": trajectory[-1]["miou_before_ft"] if cfg.steps == 1 else float("nan"),
            "role": role}


def run_study(ctx, model: nn.Module, teacher: nn.Module | None = None, kd_config: dict | None = None,
              model_name: str = "upernet_mobilevit_s", log: Callable[[str], None] = print) -> dict:
    """Run the iterative-pruning grid within the profile's time budget.

    Order (later groups are dropped first when the budget would be exceeded; every drop
    is reported in ``dropped``):

    1. one-shot, magnitude, plain fine-tune at the main sparsity - always run; its
       measured costs size the rest (:func:`estimate_seconds`);
    2. linear and cubic schedules for each k in ``ks`` (largest k first), magnitude, plain
       fine-tune; the **best schedule** is the one with the highest final mIoU;
    3. Taylor importance for one-shot and the best schedule;
    4. prune -> distill (KD fine-tune) for one-shot and the best schedule (needs ``teacher``);
    5. one-shot and the best schedule at the extra sparsities.

    Groups 3-5 are run as pairs (a pair is dropped whole). Cached configurations cost nothing
    and are never dropped.

    Args:
        ctx: :class:`study.context.Context`.
        model: the starting (trained, unpruned) model.
        teacher: teacher for group 4 (None: group 4 is skipped and reported).
        kd_config: KD settings of the starting student (see :func:`make_finetune_loss`).
        model_name: value of the table's ``model`` column.
        log: where progress notes go.

    Returns:
        dict with ``rows`` (list of table rows, :func:`result_row`), ``trajectories``
        (label -> DataFrame), ``best`` (IterativeConfig or None), ``grid``, ``timing``,
        ``dropped`` (list of (label, reason)), ``spent_s`` (s, estimated for cached entries: 0).
    """
    grid = study_grid(ctx.profile)
    total, main = grid["total_finetune_steps"], grid["main_sparsity"]
    budget = grid["budget_s"]
    fp = model_fingerprint(model)
    hw = f"{ctx.profile.crop_size}x{ctx.profile.crop_size}"
    rows, trajs, dropped = [], {}, []
    spent = {"s": 0.0}
    timing = {}

    def tag(cfg):
        return f"{cfg.label}, {cfg.importance}, {'KD' if cfg.kd else 'FT'}, s={cfg.final_sparsity:g}"

    def run(cfg, role):
        t0 = time.perf_counter()
        cached = is_cached(model, ctx, cfg, teacher, kd_config, model_fp=fp)
        _, traj = iterative_prune(model, ctx, cfg, teacher=teacher if cfg.kd else None, kd_config=kd_config,
                                  rebuild=False)
        if not cached:
            spent["s"] += time.perf_counter() - t0
        for r in traj:
            r["input_hw"] = hw
        row = result_row(cfg, traj, model_name, role)
        rows.append(row)
        trajs[tag(cfg)] = trajectory_frame(traj, cfg)
        log(f"  {tag(cfg):45s} mIoU {row['miou']:.4f}  params {row['params_m']:.3f} M  "
            f"{'(cached)' if cached else f'{time.perf_counter() - t0:.0f} s'}")
        return traj

    def fits(cfgs):
        need = sum(0.0 if is_cached(model, ctx, c, teacher, kd_config, model_fp=fp) else estimate_seconds(c, timing)
                   for c in cfgs)
        return budget is None or spent["s"] + need <= budget, need

    def group(cfgs, role):
        ok, need = fits(cfgs)
        if not ok:
            for c in cfgs:
                dropped.append((tag(c), f"time budget: needs ~{need:.0f} s, "
                                        f"{budget - spent['s']:.0f} s of {budget:.0f} s left"))
            log(f"  dropped {[tag(c) for c in cfgs]} (budget)")
            return False
        for c in cfgs:
            run(c, role)
        return True

    def cfg_of(schedule, k, s=main, importance="magnitude", kd=False):
        return IterativeConfig(final_sparsity=s, steps=k, schedule=schedule, importance=importance, kd=kd,
                               total_finetune_steps=total)

    oneshot = cfg_of("oneshot", 1)
    timing.update(timing_of(run(oneshot, "one-shot")))
    iters = []
    for k in sorted(grid["ks"], reverse=True):
        cs = [cfg_of("cubic", k), cfg_of("linear", k)]
        if group(cs, "schedule"):
            iters += cs
    best = None
    if iters:
        miou = {(r["schedule"], r["steps"], r["importance"], r["kd"], r["final_sparsity"]): r["miou"] for r in rows}
        best = max(iters, key=lambda c: miou[(c.schedule, c.steps, c.importance, c.kd, c.final_sparsity)])
        log(f"best iterative schedule at s={main:g}: {best.label}")
    if best is not None:
        group([cfg_of("oneshot", 1, importance="taylor"), cfg_of(best.schedule, best.steps, importance="taylor")],
              "taylor")
        if teacher is not None:
            group([cfg_of("oneshot", 1, kd=True), cfg_of(best.schedule, best.steps, kd=True)], "kd")
        else:
            dropped.append(("prune->distill pair", "no teacher available"))
        for s in grid["extra_sparsities"]:
            group([cfg_of("oneshot", 1, s), cfg_of(best.schedule, best.steps, s)], "sparsity")
    return {"rows": rows, "trajectories": trajs, "best": best, "grid": grid, "timing": timing,
            "dropped": dropped, "spent_s": spent["s"]}
