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
