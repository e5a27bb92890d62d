"""Metrics against an independent, loop-based computation."""
import numpy as np
import pytest

from study.metrics import SegmentationMeter, segmentation_scores


def _reference(pred, target, C, ignore=255):
    """Plain-Python reference: per-class set counting."""
    ious = []
    for c in range(C):
        inter = union = 0
        for p, t in zip(pred.ravel(), target.ravel()):
            if t == ignore:
                continue
            inter += (p == c) and (t == c)
            union += (p == c) or (t == c)
        ious.append(inter / union if union else None)
    miou = np.mean([x for x in ious if x is not None])
    dices = []
    for p_img, t_img in zip(pred, target):
        keep = t_img != ignore
        per = []
        for c in range(C):
            g = np.sum((t_img == c) & keep)
            q = np.sum((p_img == c) & keep)
            if g + q:
                per.append(2 * np.sum((t_img == c) & (p_img == c) & keep) / (g + q))
        dices.append(np.mean(per))
    return miou, ious, float(np.mean(dices))


def test_matches_independent_computation():
    rng = np.random.default_rng(0)
    C = 5
    target = rng.integers(0, C, size=(3, 9, 11))
    target[0, :2] = 255
    target[2] = np.where(target[2] == 4, 0, target[2])  # class 4 absent from image 2's GT
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, C, target.shape))
    pred = np.where(target == 255, rng.integers(0, C, target.shape), pred)
    s = segmentation_scores(pred, target, num_classes=C)
    miou, ious, mdice = _reference(pred, target, C)
    assert s["miou"] == pytest.approx(miou)
    assert s["mdice"] == pytest.approx(mdice)
    for a, b in zip(s["per_class_iou"], ious):
        assert (np.isnan(a) and b is None) or a == pytest.approx(b)
    valid = target != 255
    assert s["pixel_acc"] == pytest.approx(np.mean(pred[valid] == target[valid]))


def test_absent_classes_are_skipped_not_zero():
    target = np.zeros((1, 4, 4), dtype=np.int64)
    pred = np.zeros_like(target)
    s = segmentation_scores(pred, target, num_classes=14)
    assert s["miou"] == 1.0 and s["mdice"] == 1.0
    assert np.isnan(s["per_class_iou"][1:]).all()


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 14, (6, 8, 8))
    p = rng.integers(0, 14, (6, 8, 8))
    m = SegmentationMeter()
    m.update(p[:2], t[:2])
    m.update(p[2:], t[2:])
    a, b = m.compute(), segmentation_scores(p, t)
    assert a["miou"] == pytest.approx(b["miou"]) and a["mdice"] == pytest.approx(b["mdice"])


def test_bad_input_raises():
    with pytest.raises(ValueError, match="shape"):
        segmentation_scores(np.zeros((1, 2, 2)), np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="outside"):
        segmentation_scores(np.full((1, 2, 2), 20), np.zeros((1, 2, 2)))
