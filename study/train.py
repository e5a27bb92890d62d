"""Training loop and evaluation of a segmentation model (no context, no cache).

A plain loop (d2l style): AdamW, poly learning-rate schedule with linear warm-up,
cross-entropy or OHEM cross-entropy (source 000's loss, threshold 0.7) with the ignore
index, evaluation every N steps, a CSV log, AMP when a GPU is present. It runs unchanged
under ``torchrun`` (DDP; gloo on CPU, NCCL on GPU): each rank takes every
``world_size``-th batch of one :func:`study.data.batch_stream` and DDP averages the
gradients. ``loss_fn`` plugs in other objectives (knowledge distillation:
:func:`study.distill.make_kd_loss`)::

    from study import train
    cfg = train.TrainConfig(steps=300, lr=2e-3, loss="ohem")
    history = train.train(model, train_loader, val_loader, cfg)     # model trained in place
    scores = train.evaluate(model, val_loader)                       # miou, mdice, per_class_iou...

Entry points: :func:`train`, :func:`evaluate`, :func:`predict`, :func:`seed_everything`,
:class:`TrainConfig`, :func:`segmentation_loss`. The cached baseline models, the profile's
training config and recovery fine-tuning (all of which take a context) are in
:mod:`study.sections.common` (``trained_model``, ``train_config``, ``finetune``).
"""
from __future__ import annotations

import csv
import io
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import IGNORE_INDEX, NUM_CLASSES
from .cache import atomic_write_text
from .data import batch_stream
from .metrics import SegmentationMeter


#: Set (to "1") by the notebook runner: notebooks executed in batch print one summary line
#: per training instead of progress bars, so saved notebooks stay readable.
BATCH_ENV = "SEGCOMPRESS_BATCH"


def progress_bar(iterable, desc: str, enabled: bool = True, **kw):
    """A tqdm progress bar over ``iterable`` (widgets in JupyterLab, text in a terminal).

    Disabled when ``enabled`` is False or when the environment variable
    :data:`BATCH_ENV` is ``"1"`` (papermill runs); callers then print one summary line.
    """
    quiet = not enabled or os.environ.get(BATCH_ENV) == "1"
    return tqdm(iterable, desc=desc, disable=quiet, leave=False, **kw)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, and ask torch for deterministic algorithms.

    Args:
        seed: any non-negative int.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False


@dataclass
class TrainConfig:
    """Optimisation settings.

    Attributes:
        steps: optimizer steps.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps (None: 5% of ``steps``).
        poly_power: exponent of the poly decay ``lr * (1 - t/T)**p`` after warm-up.
        loss: ``"ce"`` or ``"ohem"`` (online hard example mining, Shrivastava et al. 2016,
            as in source 000's code: keep pixels whose true-class probability < ``ohem_thresh``,
            at least ``ohem_min_kept`` per batch).
        eval_every: evaluate on the validation loader every N steps (0: only at the end).
        grad_clip: max gradient norm (0 disables).
        amp: mixed precision on CUDA (ignored on CPU).
        log_csv: path of the CSV log ('' for none).
    """

    steps: int = 100
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int | None = None
    poly_power: float = 0.9
    loss: str = "ohem"
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 4096
    eval_every: int = 0
    grad_clip: float = 5.0
    amp: bool = True
    log_csv: str = ""


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7,
                       min_kept: int = 4096, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """OHEM cross-entropy (source 000's training loss).

    Args:
        logits: float (N, C, H, W).
        target: int64 (N, H, W) with ``ignore_index`` for pixels to skip.
        thresh: pixels whose predicted probability of the true class is below ``thresh``
            are "hard" and kept.
        min_kept: at least this many (hardest) pixels are kept.

    Returns:
        scalar loss (mean CE over kept pixels).
    """
    pix = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten()
    valid = target.flatten() != ignore_index
    pix = pix[valid]
    if pix.numel() == 0:
        return logits.sum() * 0.0
    hard = pix > -float(np.log(thresh))  # p_true < thresh  <=>  CE > -log(thresh)
    k = min(pix.numel(), max(int(min_kept), int(hard.sum())))
    if int(hard.sum()) >= k:
        return pix[hard].mean()
    return pix.topk(k).values.mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """CE or OHEM CE (per ``cfg.loss``) with the ignore index. Shapes as :func:`ohem_cross_entropy`.

    Raises:
        ValueError: unknown ``cfg.loss``.
    """
    if cfg.loss == "ce":
        return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    if cfg.loss == "ohem":
        return ohem_cross_entropy(logits, target, cfg.ohem_thresh, cfg.ohem_min_kept)
    raise ValueError(f"TrainConfig.loss must be 'ce' or 'ohem', got {cfg.loss!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then poly decay."""
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (1.0 - min(t, 1.0)) ** cfg.poly_power


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple]


def train(model: nn.Module, train_loader, val_loader, cfg: TrainConfig, loss_fn: LossFn | None = None,
          progress: bool = True, desc: str = "train") -> dict:
    """Train ``model`` in place.

    Args:
        model: segmentation model, (N, 3, H, W) float32 -> (N, C, H, W) logits.
        train_loader: yields ``(images float32 (N,3,H,W), masks int64 (N,H,W))``.
        val_loader: same format, or None to skip evaluation.
        cfg: :class:`TrainConfig`.
        loss_fn: optional ``loss_fn(model, images, masks) -> (loss, logs: dict of floats)``
            replacing the default CE/OHEM loss (used by KD and the bi-level search).
        progress: show a tqdm bar.
        desc: label of the bar and log.

    Returns:
        history dict: ``steps`` (list), ``loss`` (list of floats), ``lr``, ``evals``
        (list of dicts with step, miou, mdice), ``seconds`` (wall time, s), ``config``.
    """

    device = _model_device(model)
    rank, world = _dist_info()
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    hist = {"steps": [], "loss": [], "lr": [], "evals": [], "logs": [], "config": asdict(cfg)}
    stream = batch_stream(train_loader, rank, world)
    t0 = time.perf_counter()
    bar = progress_bar(range(cfg.steps), desc, enabled=progress and rank == 0)
    model.train()
    for step in bar:
        images, masks = next(stream)
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, enabled=use_amp):
            if loss_fn is None:
                loss, logs = segmentation_loss(net(images), masks, cfg), {}
            else:
                loss, logs = loss_fn(net, images, masks)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        lv = float(loss.detach())
        if not np.isfinite(lv):
            raise FloatingPointError(f"{desc}: loss became {lv} at step {step} (lr {lr:.3g})")
        hist["steps"].append(step)
        hist["loss"].append(lv)
        hist["lr"].append(lr)
        hist["logs"].append({k: float(v) for k, v in logs.items()})
        bar.set_postfix(loss=f"{lv:.3f}")
        last = step == cfg.steps - 1
        if val_loader is not None and rank == 0 and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
            s = evaluate(model, val_loader, progress=False)
            hist["evals"].append({"step": step + 1, "miou": s["miou"], "mdice": s["mdice"]})
            model.train()
    model.eval()
    hist["seconds"] = time.perf_counter() - t0
    if progress and rank == 0 and os.environ.get(BATCH_ENV) == "1" and cfg.steps:
        last_eval = f", val mIoU {hist['evals'][-1]['miou']:.4f}" if hist["evals"] else ""
        print(f"{desc}: {cfg.steps} steps in {hist['seconds']:.0f} s, final loss "
              f"{np.mean(hist['loss'][-10:]):.3f}{last_eval}", flush=True)
    if cfg.log_csv and rank == 0:
        _write_log(cfg.log_csv, hist)
    return hist


def _write_log(path: str, hist: dict) -> None:
    buf = io.StringIO()
    keys = sorted({k for d in hist["logs"] for k in d})
    w = csv.writer(buf)
    w.writerow(["step", "loss", "lr", *keys])
    for s, l, r, d in zip(hist["steps"], hist["loss"], hist["lr"], hist["logs"]):
        w.writerow([s, f"{l:.6g}", f"{r:.6g}", *[f"{d.get(k, float('nan')):.6g}" for k in keys]])
    atomic_write_text(path, buf.getvalue())


@torch.inference_mode()
def predict(model: nn.Module, loader, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true label maps: two uint8 arrays (N, H, W) over the whole loader."""

    device = _model_device(model)
    model.eval()
    preds, targets = [], []
    for images, masks in progress_bar(loader, "predict", enabled=progress):
        preds.append(model(images.to(device)).argmax(1).cpu().numpy().astype(np.uint8))
        targets.append(masks.numpy().astype(np.uint8))
    return np.concatenate(preds), np.concatenate(targets)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, num_classes: int = NUM_CLASSES, progress: bool = True) -> dict:
    """Scores of ``model`` on ``loader`` (see :func:`study.metrics.segmentation_scores`).

    Returns:
        dict with ``miou``, ``mdice``, ``pixel_acc``, ``per_class_iou`` (list of C floats,
        NaN where a class is absent), ``confusion`` (C x C nested list), ``seconds``.
    """

    device = _model_device(model)
    was_training = model.training
    model.eval()
    meter = SegmentationMeter(num_classes)
    t0 = time.perf_counter()
    for images, masks in progress_bar(loader, "eval", enabled=progress):
        logits = model(images.to(device))
        meter.update(logits.argmax(1).cpu().numpy(), masks.numpy())
    s = meter.compute()
    model.train(was_training)
    return {"miou": s["miou"], "mdice": s["mdice"], "pixel_acc": s["pixel_acc"],
            "per_class_iou": [float(x) for x in s["per_class_iou"]],
            "confusion": s["confusion"].tolist(), "seconds": time.perf_counter() - t0}


def _ddp_main() -> None:  # pragma: no cover - exercised through torchrun in tests
    """``torchrun --nproc_per_node 2 -m study.train OUT``: train a tiny model under DDP (gloo)
    on synthetic data and write each rank's flattened weights to ``OUT/rank<r>.pt``."""
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, _ = _dist_info()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, NUM_CLASSES, 1))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, NUM_CLASSES, (2, 16, 16), generator=g))
            for _ in range(4)]
    train(model, data, None, TrainConfig(steps=6, lr=1e-2, loss="ce"), progress=False)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    out = Path(sys.argv[1])
    torch.save(flat, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    _ddp_main()
