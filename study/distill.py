"""Knowledge distillation (KD) of a small segmenter from a large teacher: losses and KD training.

Context-free: everything here works on tensors and modules. The cached runs of notebook 01
(sweeps, seeds, the KD student later sections start from) live in
:mod:`study.sections.distillation`.

Losses (all return a scalar float32 tensor; logits are float ``(N, C, H, W)``, targets int64
``(N, H, W)`` with :data:`study.IGNORE_INDEX` (255) marking pixels to skip):

- :func:`kd_kl` - Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural
  Network": per-pixel ``KL(softmax(t/T) || softmax(s/T))`` averaged over labelled pixels,
  multiplied by ``T**2`` so its gradient magnitude does not shrink as ``T`` grows.
- :func:`kd_mse` - what source 000's public code does: mean squared error between the
  student's and the teacher's raw logits, added to the segmentation loss with weight 1.
- :class:`FeatureAdapters` + :func:`feature_mse` - FitNets (Romero et al., ICLR 2015)
  hints: a 1x1 convolution per pyramid stage maps the student's feature width to the
  teacher's, and the squared error to the teacher's feature is minimised.
- :func:`cwd_loss` - Channel-wise Distillation (Shu et al., ICCV 2021, "Channel-wise
  Knowledge Distillation for Dense Prediction"): each channel's logit map is turned into
  a spatial distribution ``softmax_{hw}(y/T)``; the loss is the KL divergence teacher ->
  student summed over positions, averaged over ``N*C`` channel maps, times ``T**2``.

Teacher outputs paid once (issue #13): KD runs that share a seed see the same batches, so
:func:`teacher_targets` runs the teacher once over a seeded batch stream and keeps its
logits at the decoder's resolution (before the final bilinear upsampling) in float16,
with a checksum of every batch; ``make_kd_loss(..., targets=...)`` replays them step by
step instead of running the teacher (and refuses a batch whose checksum differs). The
stored logits are 1/16 of the full-resolution logits' size; FitNets features would be
~13x the logits, so ``kl+feat`` keeps the live teacher.

Training: :class:`KDConfig` names one setting, :func:`make_kd_loss` turns it into the
``loss_fn(model, images, masks)`` that :func:`study.train.train` accepts
(``seg + kd_weight * KD term [+ feat_weight * hint term]``), and :class:`KDStudent` wraps a
student with its FitNets adapters so one optimizer trains both::

    from study import distill, train
    cfg = distill.KDConfig("kl", temperature=2.0, kd_weight=1.0)
    loss_fn = distill.make_kd_loss(teacher, cfg, train_cfg=train.TrainConfig())
    train.train(student, train_loader, val_loader, train.TrainConfig(steps=300), loss_fn=loss_fn)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import IGNORE_INDEX
from .train import TrainConfig, segmentation_loss

#: Values of :attr:`KDConfig.method`.
METHODS = ("none", "kl", "mse", "kl+feat", "cwd")


# --------------------------------------------------------------------------- losses

def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, where: str) -> None:
    if student_logits.dim() != 4 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{where}: student and teacher logits must both be (N, C, H, W) of the "
                         f"same shape, got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")


def _valid_mask(target: torch.Tensor | None, logits: torch.Tensor, where: str) -> torch.Tensor | None:
    """Bool (N, H, W) mask of labelled pixels, or None when ``target`` is None."""
    if target is None:
        return None
    n, _, h, w = logits.shape
    if tuple(target.shape) != (n, h, w):
        raise ValueError(f"{where}: target must be (N, H, W) = {(n, h, w)}, got {tuple(target.shape)}")
    return target != IGNORE_INDEX


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None,
          T: float = 1.0) -> torch.Tensor:
    """Hinton et al. (2015) soft-target KD loss for dense prediction.

    ``T**2 * mean_{valid pixels} sum_c p_t,c (log p_t,c - log p_s,c)`` with
    ``p = softmax(logits / T)`` over the class axis.

    Args:
        student_logits: float ``(N, C, H, W)`` (gradients flow through it).
        teacher_logits: float ``(N, C, H, W)`` (treated as constant: detached).
        target: int64 ``(N, H, W)`` labels; pixels equal to ``IGNORE_INDEX`` (255) are
            excluded from the mean. None: every pixel counts.
        T: softmax temperature (> 0).

    Returns:
        scalar float32 tensor >= 0 (0 when no pixel is labelled).

    Raises:
        ValueError: shape mismatch or ``T <= 0``.
    """
    _check_logits(student_logits, teacher_logits, "kd_kl")
    if T <= 0:
        raise ValueError(f"kd_kl: temperature must be > 0, got {T}")
    log_ps = F.log_softmax(student_logits.float() / T, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach().float() / T, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(1)  # (N, H, W)
    valid = _valid_mask(target, student_logits, "kd_kl")
    if valid is not None:
        if not bool(valid.any()):
            return student_logits.sum() * 0.0
        kl = kl[valid]
    return kl.mean() * (T * T)


def kd_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
           target: torch.Tensor | None = None) -> torch.Tensor:
    """Source 000's KD term: mean squared error between raw student and teacher logits.

    Source 000's public code adds ``MSE(student_logits, teacher_logits)`` (weight 1) to
    the OHEM cross-entropy. With ``target=None`` (or no ignored pixel) this equals
    ``F.mse_loss(student_logits, teacher_logits)`` exactly; ignored pixels, if any, are
    left out of the mean (a choice of this study: they carry no label and on LPCVC are
    padding).

    Args:
        student_logits, teacher_logits: float ``(N, C, H, W)``; the teacher is detached.
        target: int64 ``(N, H, W)`` or None.

    Returns:
        scalar float32 tensor >= 0 (mean over classes and valid pixels).

    Raises:
        ValueError: shape mismatch.
    """
    _check_logits(student_logits, teacher_logits, "kd_mse")
    sq = (student_logits.float() - teacher_logits.detach().float()).pow(2).mean(1)  # (N, H, W)
    valid = _valid_mask(target, student_logits, "kd_mse")
    if valid is not None:
        if not bool(valid.any()):
            return student_logits.sum() * 0.0
        sq = sq[valid]
    return sq.mean()


def cwd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021).

    For every image n and channel c, ``phi(y) = softmax over the H*W positions of y / T``;
    the loss is ``T**2 / (N*C) * sum_{n,c} KL(phi(t_nc) || phi(s_nc))``. Every pixel takes
    part (the distributions are spatial, so there is no per-pixel ignore mask, as in the
    paper).

    Args:
        student_logits, teacher_logits: float ``(N, C, H, W)`` of equal shape (teacher detached).
        T: temperature (> 0).

    Returns:
        scalar float32 tensor >= 0.

    Raises:
        ValueError: shape mismatch or ``T <= 0``.
    """
    _check_logits(student_logits, teacher_logits, "cwd_loss")
    if T <= 0:
        raise ValueError(f"cwd_loss: temperature must be > 0, got {T}")
    n, c, h, w = student_logits.shape
    s = student_logits.float().reshape(n * c, h * w) / T
    t = teacher_logits.detach().float().reshape(n * c, h * w) / T
    log_pt = F.log_softmax(t, dim=1)
    kl = (log_pt.exp() * (log_pt - F.log_softmax(s, dim=1))).sum()
    return kl * (T * T) / (n * c)


class FeatureAdapters(nn.Module):
    """FitNets regressors (Romero et al., 2015): one 1x1 conv per pyramid stage.

    Args:
        student_channels: widths of the student's features, e.g. ``[64, 96, 128, 160]``.
        teacher_channels: widths of the teacher's features, e.g. ``[96, 192, 384, 768]``
            (same number of stages).

    Raises:
        ValueError: different numbers of stages or a non-positive width.
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]):
        super().__init__()
        sc, tc = [int(c) for c in student_channels], [int(c) for c in teacher_channels]
        if len(sc) != len(tc) or not sc or min(sc + tc) <= 0:
            raise ValueError(f"FeatureAdapters: need the same number of positive widths, got "
                             f"student {sc} and teacher {tc}")
        self.student_channels, self.teacher_channels = sc, tc
        self.convs = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip(sc, tc))

    def forward(self, feats: Sequence[torch.Tensor],
                sizes: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
        """Map student features to teacher widths.

        Args:
            feats: list of float ``(N, student_channels[i], H_i, W_i)``.
            sizes: optional ``(H, W)`` per stage (the teacher's); a mapped feature of
                another size is bilinearly resized to it.

        Returns:
            list of float ``(N, teacher_channels[i], H_i', W_i')``.

        Raises:
            ValueError: wrong number of features or channel mismatch.
        """
        if len(feats) != len(self.convs):
            raise ValueError(f"FeatureAdapters: expected {len(self.convs)} features, got {len(feats)}")
        out = []
        for i, (f, conv) in enumerate(zip(feats, self.convs)):
            if f.shape[1] != conv.in_channels:
                raise ValueError(f"FeatureAdapters: stage {i} has {f.shape[1]} channels, "
                                 f"expected {conv.in_channels}")
            y = conv(f)
            if sizes is not None and tuple(y.shape[-2:]) != tuple(sizes[i]):
                y = F.interpolate(y, size=tuple(sizes[i]), mode="bilinear", align_corners=False)
            out.append(y)
        return out


def feature_mse(adapted: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """FitNets hint loss: mean over stages of ``MSE(adapted_i, teacher_i)``.

    Args:
        adapted: student features already mapped by :class:`FeatureAdapters`, float
            ``(N, C_t,i, h, w)``; resized bilinearly to the teacher's size if it differs.
        teacher_feats: float ``(N, C_t,i, H_i, W_i)`` (detached).

    Returns:
        scalar float32 tensor >= 0.

    Raises:
        ValueError: different numbers of stages, or channel / batch mismatch.
    """
    if len(adapted) != len(teacher_feats) or not adapted:
        raise ValueError(f"feature_mse: {len(adapted)} student vs {len(teacher_feats)} teacher features")
    total = 0.0
    for i, (a, t) in enumerate(zip(adapted, teacher_feats)):
        if a.shape[:2] != t.shape[:2]:
            raise ValueError(f"feature_mse: stage {i}: adapted {tuple(a.shape)} vs teacher {tuple(t.shape)}")
        if a.shape[-2:] != t.shape[-2:]:
            a = F.interpolate(a, size=t.shape[-2:], mode="bilinear", align_corners=False)
        total = total + F.mse_loss(a.float(), t.detach().float())
    return total / len(adapted)


# --------------------------------------------------------------------------- KD training

@dataclass
class KDConfig:
    """One distillation setting.

    Attributes:
        method: ``"none"`` (segmentation loss only), ``"kl"`` (:func:`kd_kl`), ``"mse"``
            (:func:`kd_mse`, source 000), ``"kl+feat"`` (:func:`kd_kl` + FitNets hints),
            ``"cwd"`` (:func:`cwd_loss`).
        temperature: T of ``kl``, ``kl+feat`` and ``cwd`` (ignored otherwise).
        kd_weight: weight of the logit KD term.
        feat_weight: weight of the feature term (``kl+feat`` only).

    Raises:
        ValueError: unknown method, ``temperature <= 0``, a negative weight, or ``kl+feat``
            with ``feat_weight == 0``.
    """

    method: str = "kl"
    temperature: float = 2.0
    kd_weight: float = 1.0
    feat_weight: float = 0.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"KDConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.temperature <= 0 or self.kd_weight < 0 or self.feat_weight < 0:
            raise ValueError(f"KDConfig: temperature must be > 0 and weights >= 0, got {self}")
        if self.method == "kl+feat" and self.feat_weight == 0:
            raise ValueError("KDConfig: method 'kl+feat' needs feat_weight > 0")

    @property
    def tag(self) -> str:
        """Short name used in cache tags, e.g. ``kl-T2-w1``."""
        if self.method == "none":
            return "none"
        if self.method == "mse":
            return f"mse-w{self.kd_weight:g}"
        t = f"{self.method.replace('+', '')}-T{self.temperature:g}-w{self.kd_weight:g}"
        return t + (f"-f{self.feat_weight:g}" if self.method == "kl+feat" else "")


class KDStudent(nn.Module):
    """Student plus FitNets adapters, so that one optimizer trains both during KD.

    ``forward(x)`` returns the student's logits (so :func:`study.train.evaluate` works);
    ``forward(x, with_features=True)`` returns ``(logits, adapted_features)``. Calling it
    through the module (not ``.student``) keeps DDP's gradient synchronisation intact.

    ``state_dict`` / ``load_state_dict`` are those of the plain student: the adapters are
    training scaffolding and are dropped from cached checkpoints.

    Args:
        student: segmenter with ``forward_with_features(x) -> (logits, [features])``.
        adapters: :class:`FeatureAdapters` from the student's to the teacher's widths.
    """

    def __init__(self, student: nn.Module, adapters: FeatureAdapters):
        super().__init__()
        self.student = student
        self.adapters = adapters

    def forward(self, x: torch.Tensor, with_features: bool = False):
        """x: float32 ``(N, 3, H, W)`` -> logits ``(N, K, H, W)`` [, list of adapted features]."""
        if not with_features:
            return self.student(x)
        logits, feats = self.student.forward_with_features(x)
        return logits, self.adapters(feats)

    def state_dict(self, *args, **kwargs):  # noqa: D102 - see class docstring
        return self.student.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D102
        return self.student.load_state_dict(state_dict, strict=strict, assign=assign)


@torch.no_grad()
def teacher_targets(teacher: nn.Module, batches, steps: int, bf16: bool = False) -> dict:
    """Run ``teacher`` once over the first ``steps`` batches of ``batches``; keep compact logits.

    Args:
        teacher: frozen teacher with ``forward_decoder(x) -> (logits (N, K, h, w), feats)``
            (a :class:`study.models.UPerNet`); other models: ``teacher(x)`` logits kept at
            full resolution.
        batches: iterator of ``(images float32 (N, 3, H, W), masks)`` - the same seeded
            stream the KD run will train on (:func:`study.data.batch_stream` of an identically
            built loader).
        steps: number of batches (the KD run's optimizer steps).
        bf16: run the teacher under CPU bfloat16 autocast (as it would run inside a bf16
            training step).

    Returns:
        ``{"logits": [float16 (N, K, h, w)] * steps, "checksum": float64 (steps,),
        "hw": (H, W)}``; the checksum is the sum of each batch's images (float64).
    """
    teacher.eval()
    logits, sums, hw = [], [], None
    dec = getattr(teacher, "forward_decoder", None)
    for _, (images, _) in zip(range(int(steps)), batches):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(bf16) and images.device.type == "cpu"):
            y = dec(images)[0] if dec is not None else teacher(images)
        logits.append(y.to(torch.float16).cpu())
        sums.append(float(images.double().sum()))
        hw = tuple(images.shape[-2:])
    if len(logits) < int(steps):
        raise ValueError(f"teacher_targets: the batch stream ended after {len(logits)} of {steps} batches")
    return {"logits": logits, "checksum": torch.tensor(sums, dtype=torch.float64), "hw": hw}


def make_kd_loss(teacher: nn.Module | None, cfg: KDConfig, *, train_cfg: TrainConfig | None = None,
                 targets: dict | None = None):
    """Build ``loss_fn(model, images, masks) -> (loss, logs)`` for :func:`study.train.train`.

    ``loss = seg + kd_weight * KD(student, teacher) [+ feat_weight * hints]`` where ``seg``
    is :func:`study.train.segmentation_loss` (CE or OHEM per ``train_cfg``) and ``KD`` is
    :func:`kd_kl`, :func:`kd_mse` or :func:`cwd_loss` per ``cfg.method`` (``hints`` =
    :func:`feature_mse`, FitNets). The teacher runs in eval mode under ``torch.no_grad()``
    on the same augmented batch; it is put back in eval mode on every call and its
    parameters are frozen (``requires_grad=False``, set here, in place).

    Args:
        teacher: frozen teacher, float ``(N, 3, H, W)`` -> logits ``(N, K, H, W)`` (with
            ``forward_with_features`` for ``kl+feat``); may be None only for ``none``.
        cfg: :class:`KDConfig`. For ``kl+feat`` the ``model`` given to ``loss_fn`` must be
            a :class:`KDStudent` (possibly DDP-wrapped) holding the adapters.
        train_cfg: :class:`study.train.TrainConfig` of the segmentation loss (default
            ``TrainConfig()``).
        targets: :func:`teacher_targets` of the batch stream this loss will see: call ``k``
            uses the stored logits of batch ``k`` (upsampled bilinearly to the batch's size,
            as the teacher's own forward does) instead of running the teacher. Not for
            ``kl+feat`` (features are not stored) nor for multi-process training (each
            rank sees another part of the stream).

    Returns:
        the loss function; ``loss`` is a scalar tensor, ``logs`` a dict of floats ``seg``,
        ``kd`` and ``feat`` (those used).

    Raises:
        ValueError: a teacher is missing for a KD method (and no ``targets``); ``targets``
            with ``kl+feat``.
        RuntimeError (from the loss): more calls than stored batches, or a batch whose
            checksum differs from the stored one (the stream is not the one the targets
            were computed on).
    """
    tcfg = train_cfg if train_cfg is not None else TrainConfig()
    if cfg.method != "none" and teacher is None and targets is None:
        raise ValueError(f"make_kd_loss: method {cfg.method!r} needs a teacher")
    if targets is not None and cfg.method == "kl+feat":
        raise ValueError("make_kd_loss: stored teacher targets hold no features; kl+feat needs the live teacher")
    calls = [0]

    def replay(images: torch.Tensor) -> torch.Tensor:
        k = calls[0]
        calls[0] += 1
        if k >= len(targets["logits"]):
            raise RuntimeError(f"KD: stored teacher targets cover {len(targets['logits'])} batches; "
                               f"call {k + 1} has none")
        got, want = float(images.double().sum()), float(targets["checksum"][k])
        if abs(got - want) > 1e-6 * max(1.0, abs(want)):
            raise RuntimeError(f"KD: batch {k} differs from the one the stored teacher targets were computed on "
                               f"(image sum {got:.6g} vs {want:.6g}); the KD run's loader must be built with the "
                               "same seed and settings")
        y = targets["logits"][k].to(images.device, torch.float32)
        return F.interpolate(y, size=images.shape[-2:], mode="bilinear", align_corners=False)

    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    use_feat = cfg.method == "kl+feat"

    def loss_fn(model: nn.Module, images: torch.Tensor, masks: torch.Tensor):
        if use_feat:
            logits, adapted = model(images, with_features=True)
        else:
            logits = model(images)
        seg = segmentation_loss(logits, masks, tcfg)
        logs = {"seg": float(seg.detach())}
        if cfg.method == "none":
            return seg, logs
        if targets is not None:
            t_logits = replay(images)
        else:
            teacher.eval()
            with torch.no_grad():
                if use_feat:
                    t_logits, t_feats = teacher.forward_with_features(images)
                else:
                    t_logits = teacher(images)
        if cfg.method in ("kl", "kl+feat"):
            kd = kd_kl(logits, t_logits, masks, cfg.temperature)
        elif cfg.method == "mse":
            kd = kd_mse(logits, t_logits, masks)
        else:
            kd = cwd_loss(logits, t_logits, cfg.temperature)
        loss = seg + cfg.kd_weight * kd
        logs["kd"] = float(kd.detach())
        if use_feat:
            feat = feature_mse(adapted, t_feats)
            loss = loss + cfg.feat_weight * feat
            logs["feat"] = float(feat.detach())
        return loss, logs

    return loss_fn


__all__ = ["METHODS", "kd_kl", "kd_mse", "cwd_loss", "FeatureAdapters", "feature_mse", "KDConfig", "KDStudent",
           "teacher_targets", "make_kd_loss"]
