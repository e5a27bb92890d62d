"""Fair comparisons in the pruning sections (02 structured, 03 heads): the "dense + same
fine-tune" control, equal budgets, axes in params / MACs removed, verdicts from a paired
bootstrap over test images, and choices made on val."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from study import NUM_CLASSES, prune
from study.profiles import PROFILES
from study.sections import head_pruning as hp
from study.sections import structured_pruning as sec

C = NUM_CLASSES


# --------------------------------------------------------------------------- plans (pure)
def test_core_plan_is_a_subset_of_the_full_grid_and_keeps_the_sources_points():
    cpu = PROFILES["cpu"]
    core, full = sec.student_plan(cpu), sec.student_plan(cpu, full_grid=True)
    assert set(core) < set(full)
    assert len(full) == len(sec.STUDENT_METHODS) * len(cpu.sparsities)
    assert ("unstructured", 0.6) in core and ("structured_magnitude", 0.45) in core   # source 001's points
    # the importance choice compares magnitude and Taylor at the same sparsities
    assert {s for m, s in core if m == "structured_magnitude"} == {s for m, s in core if m == "structured_taylor"}
    smoke = sec.student_plan(PROFILES["smoke"])
    assert smoke and all(s in PROFILES["smoke"].sparsities for _, s in smoke)
    for prof in (cpu, PROFILES["smoke"]):
        tp, tf = sec.teacher_plan(prof), sec.teacher_plan(prof, full_grid=True)
        assert sec.SWIN_REPORTED_SPARSITY in tp["sparsities"] and set(tp["sparsities"]) <= set(tf["sparsities"])
        assert tp["ft_steps"] == tf["ft_steps"] == max(1, prof.finetune_steps // 3)
    assert hp.variants() == hp.CORE_VARIANTS and hp.variants(True) == hp.VARIANTS
    assert ("repartition", {"num_heads": 2}) in hp.CORE_VARIANTS and ("heads", {"keep_heads": 2}) in hp.CORE_VARIANTS


# --------------------------------------------------------------------------- budgets, axes, verdicts (pure)
def test_budget_adds_the_finetune_and_arms_equal_the_control():
    rec = {"train_steps": 2000, "train_images": 16000}
    assert sec.budget(rec, 0, 8) == {"train_steps": 2000, "train_images": 16000}
    assert sec.budget(rec, 150, 8) == {"train_steps": 2150, "train_images": 17200}
    assert sec.budget({"train_steps": 10}, 5, 4) == {"train_steps": 15, "train_images": 60}
    with pytest.raises(KeyError):
        sec.budget({}, 1, 1)


def test_removed_counts_real_tensors_so_masks_remove_nothing():
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 1))
    masked = prune.prune_unstructured(copy.deepcopy(dense), 0.6, include_classifier=True)
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    from study.models import model_complexity

    cx = {k: model_complexity(m, (16, 16)) for k, m in (("d", dense), ("m", masked), ("s", small))}
    assert sec.removed(cx["m"], cx["d"]) == {"params_removed": 0.0, "macs_removed": 0.0}
    assert prune.zero_fraction(masked, include_classifier=True) > 0.5
    r = sec.removed(cx["s"], cx["d"])
    n_dense, n_small = 3 * 16 * 9 + 16 + 16 * 4 + 4, 3 * 8 * 9 + 8 + 8 * 4 + 4
    assert r["params_removed"] == pytest.approx(1 - n_small / n_dense, rel=1e-3)
    assert 0.45 < r["macs_removed"] < 0.55


def _cms(n, correct, rng):
    """``n`` per-image confusions of 100 pixels over classes 0..3, ``correct`` of them right."""
    out = np.zeros((n, C, C), np.int64)
    for i in range(n):
        for _ in range(100):
            t = rng.integers(0, 4)
            p = t if rng.random() < correct else (t + 1) % 4
            out[i, t, p] += 1
    return out


def test_verdict_columns_follow_the_interval_and_say_what_they_capture():
    rng = np.random.default_rng(0)
    good, bad = _cms(24, 0.9, rng), _cms(24, 0.5, rng)
    v = sec.verdict_columns(bad, good, n_boot=300)
    assert v["ci95_high"] < 0 and v["verdict"] == "hurts" and v["diff_vs_control"] < 0
    assert v["ci95_low"] <= v["diff_vs_control"] <= v["ci95_high"]
    assert v["ci_method"] == "paired bootstrap over 24 test images, 1 seed (data noise only)"
    assert sec.verdict_columns(good, bad, n_boot=300)["verdict"] == "helps"
    same = sec.verdict_columns(good, good, n_boot=300)
    assert same["diff_vs_control"] == 0 and same["verdict"] == "no detectable difference at this budget"


def test_comparison_columns_control_and_budget_note():
    rng = np.random.default_rng(1)
    ctl = {"test_cms": _cms(8, 0.8, rng)}
    arm = {"test_cms": _cms(8, 0.8, rng)}
    b = {"train_steps": 10, "train_images": 40}
    c = sec.comparison_columns(ctl, ctl, sec.CONTROL, b, b)
    assert c["verdict"] == "control" and c["diff_vs_control"] == 0 and c["budget_vs_control"] == "equal"
    a = sec.comparison_columns(arm, ctl, "structured_magnitude", b, b)
    assert a["budget_vs_control"] == "equal" and np.isfinite(a["ci95_low"])
    d = sec.comparison_columns(arm, ctl, sec.DENSE, {"train_steps": 7, "train_images": 28}, b)
    assert d["budget_vs_control"].startswith("-3 steps, -12 images") and "fine-tune" in d["budget_vs_control"]


def _row(method, s, val_miou, miou, model=sec.STUDENT, **kw):
    return {"section": sec.SECTION, "model": model, "method": method, "input_hw": "8x8", "params_m": 1.0, "gmacs": 1.0,
            "miou": miou, "mdice": miou, "sparsity": s, "val_miou": val_miou, "diff_vs_control": miou - 0.3,
            "ci95_low": miou - 0.35, "ci95_high": miou - 0.25, "verdict": "x", "params_removed": s,
            "macs_removed": s, "zero_fraction": 0.0, "speedup": 1.0, "verdict_vs_dense_ort": "y", "ft_steps": 3,
            "train_steps": 13, **kw}


def test_importance_is_chosen_on_val_not_on_test():
    rows = [_row("structured_magnitude", 0.2, 0.40, 0.20), _row("structured_magnitude", 0.45, 0.30, 0.10),
            _row("structured_taylor", 0.2, 0.30, 0.30), _row("structured_taylor", 0.45, 0.20, 0.25),
            _row("structured_taylor", 0.6, 0.99, 0.99)]  # only Taylor ran 0.6: not compared
    ch = sec.best_importance(rows)
    assert ch["method"] == "structured_magnitude" and ch["split"] == "val" and ch["sparsities"] == [0.2, 0.45]
    assert ch["evidence"]["structured_magnitude"] == pytest.approx(0.35)
    teacher = [_row(sec.DENSE, 0.0, 0.3, 0.3, model="t"), _row(sec.CONTROL, 0.0, 0.3, 0.3, model="t")]
    df = sec.section_table([_row(sec.DENSE, 0.0, 0.3, 0.3), _row(sec.CONTROL, 0.0, 0.3, 0.3), *rows], teacher,
                           depgraph_on_swin="ok")
    assert (df.miou_drop == -df.diff_vs_control).all()
    assert set(df[df.chosen_on_val].method) == {"structured_magnitude"}
    lines = sec.what_it_means(df, "t")
    assert any(line.startswith("Source 000 says MobileViT") and "CI [" in line for line in lines)
    assert any(line.startswith("Importance chosen on val: structured_magnitude") for line in lines)


# --------------------------------------------------------------------------- the control on a smoke context
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from study.context import setup
    from study.sections import common

    ctx = setup(profile="smoke", build_dir=str(tmp_path_factory.mktemp("build")))
    torch.manual_seed(0)
    student = common.build(sec.STUDENT, ctx.profile).eval()
    hw = (ctx.profile.image_size, ctx.profile.image_size)
    return {"ctx": ctx, "student": student, "builder": lambda: common.build(sec.STUDENT, ctx.profile),
            "val": common.loaders(ctx)[1], "hw": hw}


def _weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_control_is_the_arms_finetune_without_pruning(smoke, monkeypatch):
    from study.sections import common
    from study.train import seed_everything

    ctx, base, hw = smoke["ctx"], smoke["student"], smoke["hw"]
    kw = dict(base_tag="t-ctl", input_hw=hw, ft_steps=2, val_loader=smoke["val"], curve_points=2)
    ctl, cinfo = sec.control_variant(ctx, base, smoke["builder"], **kw)
    # the control = seed, copy, the same common.finetune every arm gets (no pruning step)
    seed_everything(ctx.seed)
    ref = copy.deepcopy(base)
    common.finetune(ctx, ref, 2, progress=False, curve_points=2)
    w, wr = _weights(ctl), _weights(ref.eval())
    assert all(torch.allclose(w[k].float(), wr[k].float(), atol=1e-5) for k in w)
    assert not all(torch.equal(w[k], v) for k, v in _weights(base).items())       # it did train
    n_test = len(common.eval_loader(ctx, "test").dataset)
    assert cinfo["test_cms"].shape == (n_test, C, C) and cinfo["test_cms"].dtype == np.int64
    assert cinfo["test_scores"]["split"] == "test"
    assert [p["step"] for p in cinfo["curve"]] == [0, 1, 2]                          # step 0 + 2 val points
    assert cinfo["ft_lr"] == pytest.approx(common.finetune_config(ctx, 2).lr)
    # an arm gets the same fine-tune settings; the dense info has none
    _, ainfo = sec.pruned_variant(ctx, base, smoke["builder"], "structured_magnitude", sparsity=0.5, **kw)
    assert (ainfo["ft_steps"], ainfo["ft_lr"], len(ainfo["curve"])) == (cinfo["ft_steps"], cinfo["ft_lr"], 3)
    dinfo = sec.dense_info(ctx, base, base_tag="t-ctl", val_loader=smoke["val"])
    assert dinfo["ft_steps"] == 0 and dinfo["curve"] == [] and dinfo["test_cms"].shape == cinfo["test_cms"].shape
    # second call: a cache hit (no fine-tune), the same weights and confusions
    monkeypatch.setattr(sec, "finetune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fine-tuned")))
    again, cinfo2 = sec.control_variant(ctx, base, smoke["builder"], **kw)
    assert all(torch.equal(v, _weights(again)[k]) for k, v in w.items())
    np.testing.assert_array_equal(cinfo2["test_cms"], cinfo["test_cms"])
    v = sec.verdict_columns(ainfo["test_cms"], cinfo["test_cms"], n_boot=200)
    assert v["ci_method"].startswith(f"paired bootstrap over {n_test} test images")
