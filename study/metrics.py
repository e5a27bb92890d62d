"""Segmentation metrics: mIoU (dataset level), mDice (LPCVC 2023's score), pixel accuracy.

- IoU_c = TP_c / (TP_c + FP_c + FN_c) from one confusion matrix over the whole dataset;
  mIoU = mean over classes that occur in the ground truth or the prediction (source 000
  reports this).
- Dice_c = 2 TP_c / (|GT_c| + |Pred_c|) per image; the image's score is the nan-mean over
  classes present in its ground truth or prediction; mDice is the mean over images
  (the LPCVC 2023 official score, see shared/REFERENCE.md).
Pixels whose target equals ``ignore_index`` count nowhere.
"""
from __future__ import annotations

import numpy as np

from . import IGNORE_INDEX, NUM_CLASSES


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int = NUM_CLASSES,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Confusion matrix ``M[t, p]`` (int64, (C, C)) of integer label arrays of equal shape.

    Raises:
        ValueError: shapes differ, or a label outside ``0..num_classes-1`` (other than
            ``ignore_index`` in the target) is found.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
    valid = target != ignore_index
    t = target[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target has labels outside 0..{num_classes - 1} (and != {ignore_index})")
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"pred has labels outside 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _image_dice(cm: np.ndarray) -> float:
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(denom > 0, 2 * tp / denom, np.nan)
    return float(np.nanmean(dice)) if np.any(denom > 0) else float("nan")


class SegmentationMeter:
    """Streaming accumulator of :func:`segmentation_scores` over batches.

    ``update(pred, target)`` takes integer arrays (N, H, W) (or (H, W)); ``compute()``
    returns the same dict as :func:`segmentation_scores`.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.cm = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.image_dice: list[float] = []

    def update(self, pred, target) -> None:
        pred = np.asarray(pred)
        target = np.asarray(target)
        if pred.ndim == 2:
            pred, target = pred[None], target[None]
        for p, t in zip(pred, target):
            cm = confusion_matrix(p, t, self.num_classes, self.ignore_index)
            self.cm += cm
            self.image_dice.append(_image_dice(cm))

    def compute(self) -> dict:
        cm = self.cm.astype(np.float64)
        tp = np.diag(cm)
        denom = cm.sum(0) + cm.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(denom > 0, tp / denom, np.nan)
        dice = np.asarray(self.image_dice, dtype=np.float64)
        total = cm.sum()
        return {
            "miou": float(np.nanmean(iou)) if np.any(denom > 0) else float("nan"),
            "per_class_iou": iou,
            "mdice": float(np.nanmean(dice)) if dice.size and not np.all(np.isnan(dice)) else float("nan"),
            "pixel_acc": float(tp.sum() / total) if total else float("nan"),
            "confusion": self.cm.copy(),
        }


def segmentation_scores(pred, target, num_classes: int = NUM_CLASSES,
                        ignore_index: int = IGNORE_INDEX) -> dict:
    """Scores of predicted label maps against ground truth.

    Args:
        pred: int array (N, H, W) of predicted class indices in ``0..num_classes-1``.
        target: int array (N, H, W) of ground-truth indices; ``ignore_index`` pixels skipped.
        num_classes: number of classes (14 for LPCVC 2023).
        ignore_index: label excluded from every score (255).

    Returns:
        dict with ``miou`` (float, dataset-level confusion matrix, mean over classes that
        occur in GT or prediction), ``per_class_iou`` (float64 (C,), NaN for classes absent
        from both), ``mdice`` (float, LPCVC's per-image nan-mean Dice averaged over images),
        ``pixel_acc`` (float) and ``confusion`` (int64 (C, C), rows = ground truth).

    Raises:
        ValueError: shapes differ or labels are out of range.
    """
    meter = SegmentationMeter(num_classes, ignore_index)
    meter.update(pred, target)
    return meter.compute()


# --------------------------------------------------------------------------- intervals and verdicts

def miou_from_confusion(cm: np.ndarray) -> float:
    """mIoU of one confusion matrix ``(C, C)`` (mean over classes in GT or prediction)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
    return float(np.nanmean(iou)) if np.any(denom > 0) else float("nan")


def bootstrap_miou_diff(cms_a: np.ndarray, cms_b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95) -> dict:
    """Paired bootstrap over test images of ``mIoU(a) - mIoU(b)`` (percentile interval).

    Both arms are scored on the same images; each bootstrap replicate resamples image
    indices with replacement, sums the two arms' per-image confusion matrices over the
    resample and recomputes both dataset-level mIoUs (Efron & Tibshirani 1993, ch. 13).
    It captures data noise (which images were drawn), not training noise (seeds).

    Args:
        cms_a, cms_b: int arrays ``(N, C, C)``, per-image confusion matrices, same images.
        n_boot: number of replicates; seed: RNG seed; level: interval coverage.

    Returns:
        dict with ``diff`` (on all images), ``mean``, ``std`` (of the replicates),
        ``ci95_low``, ``ci95_high``, ``n`` (images) and ``ci_method``.

    Raises:
        ValueError: shapes differ or fewer than 2 images.
    """
    a = np.asarray(cms_a, dtype=np.int64)
    b = np.asarray(cms_b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 3 or a.shape[0] < 2:
        raise ValueError(f"bootstrap_miou_diff: need two (N>=2, C, C) arrays of one shape, got {a.shape}, {b.shape}")
    rng = np.random.default_rng(seed)
    n = a.shape[0]
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, n, n)
        diffs[i] = miou_from_confusion(a[idx].sum(0)) - miou_from_confusion(b[idx].sum(0))
    lo, hi = np.nanpercentile(diffs, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return {"diff": miou_from_confusion(a.sum(0)) - miou_from_confusion(b.sum(0)),
            "mean": float(np.nanmean(diffs)), "std": float(np.nanstd(diffs, ddof=1)),
            "ci95_low": float(lo), "ci95_high": float(hi), "n": n,
            "ci_method": f"paired bootstrap over {n} test images, 1 seed (data noise only)"}


def paired_seed_ci(values_a, values_b, level: float = 0.95) -> dict:
    """Student-t interval of the mean paired difference ``a - b`` over training seeds.

    Args:
        values_a, values_b: one score per seed, paired by position (seed ``i`` in both).

    Returns:
        dict with ``diff`` (mean difference), ``std`` (of the differences), ``ci95_low``,
        ``ci95_high``, ``n`` (seeds) and ``ci_method``.

    Raises:
        ValueError: lengths differ or fewer than 2 seeds.
    """
    from scipy import stats

    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"paired_seed_ci: need two equal-length 1-D arrays of >= 2 seeds, got {a.shape}, {b.shape}")
    d = a - b
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, d.size - 1)) * sd / np.sqrt(d.size)
    return {"diff": float(d.mean()), "std": sd, "ci95_low": float(d.mean() - half),
            "ci95_high": float(d.mean() + half), "n": int(d.size),
            "ci_method": f"paired t over {d.size} training seeds"}


def verdict(ci_low: float, ci_high: float, higher_is_better: bool = True) -> str:
    """The verdict a 95 % interval of ``arm - reference`` supports.

    ``"helps"`` when the whole interval is on the good side of 0, ``"hurts"`` when it is on
    the bad side, else ``"no detectable difference at this budget"`` (also for NaN bounds).
    """
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return "no detectable difference at this budget"
    if ci_low > 0:
        return "helps" if higher_is_better else "hurts"
    if ci_high < 0:
        return "hurts" if higher_is_better else "helps"
    return "no detectable difference at this budget"
