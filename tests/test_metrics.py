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


def test_bootstrap_interval_excludes_zero_only_for_a_real_difference():
    from study.metrics import bootstrap_miou_diff, confusion_matrix, miou_from_confusion, verdict

    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, (40, 16, 16))
    good = np.where(rng.random(target.shape) < 0.9, target, rng.integers(0, 3, target.shape))
    bad = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 3, target.shape))
    cm = lambda p: np.stack([confusion_matrix(a, b, 3) for a, b in zip(p, target)])  # noqa: E731
    res = bootstrap_miou_diff(cm(good), cm(bad), n_boot=300)
    # the point estimate is the dataset-level mIoU difference, computed independently
    direct = miou_from_confusion(confusion_matrix(good, target, 3)) - miou_from_confusion(confusion_matrix(bad, target, 3))
    assert res["diff"] == pytest.approx(direct)
    assert res["ci95_low"] > 0 and verdict(res["ci95_low"], res["ci95_high"]) == "helps"
    same = bootstrap_miou_diff(cm(good), cm(good), n_boot=100)
    assert same["ci95_low"] == same["ci95_high"] == 0.0
    assert verdict(same["ci95_low"], same["ci95_high"]) == "no detectable difference at this budget"
    with pytest.raises(ValueError):
        bootstrap_miou_diff(cm(good)[:1], cm(bad)[:1])


def test_paired_seed_interval_matches_t_formula_and_verdicts():
    from study.metrics import paired_seed_ci, verdict

    a, b = [0.52, 0.55, 0.50], [0.40, 0.45, 0.41]
    r = paired_seed_ci(a, b)
    d = np.subtract(a, b)
    half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)  # t_{0.975, 2}
    assert r["diff"] == pytest.approx(d.mean()) and r["ci95_high"] - r["diff"] == pytest.approx(half)
    assert verdict(r["ci95_low"], r["ci95_high"]) == "helps"
    assert verdict(-0.2, -0.1) == "hurts" and verdict(-0.2, -0.1, higher_is_better=False) == "helps"
    assert verdict(float("nan"), 1.0) == "no detectable difference at this budget"
    with pytest.raises(ValueError):
        paired_seed_ci([0.5], [0.4])
