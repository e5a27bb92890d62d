"""Properties of the KD losses and loss builder (study.distill) and of section 01's runners,
choice rules and table (study.sections.distillation)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from study import BASE_COLUMNS, CLASS_NAMES, IGNORE_INDEX, RARE_CLASSES
from study.cache import code_closure
from study.distill import (FeatureAdapters, KDConfig, KDStudent, cwd_loss, feature_mse, kd_kl, kd_mse,
                           make_kd_loss)
from study.models import model_fingerprint
from study.profiles import PROFILES
from study.sections import distillation as sec
from study.train import TrainConfig, train

K = 5


def _logits(seed, n=2, c=K, h=6, w=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g) * 2


def _target(seed, n=2, h=6, w=7, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, K, (n, h, w), generator=g)
    t[torch.rand(n, h, w, generator=g) < ignore_frac] = IGNORE_INDEX
    return t


# ----------------------------------------------------------------------------- KL (Hinton)

def test_kl_zero_for_identical_logits_and_positive_otherwise():
    s, t, y = _logits(0), _logits(1), _target(2)
    assert kd_kl(s, s.clone(), y, T=2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl(s, t, y, T=2.0).item() > 1e-3


def test_kl_matches_hinton_definition_with_t_squared_scaling():
    s, t = _logits(3), _logits(4)
    for T in (1.0, 2.0, 4.0):
        ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
        ref = (pt * (pt.log() - ps.log())).sum(1).mean() * T * T
        assert kd_kl(s, t, None, T).item() == pytest.approx(ref.item(), rel=1e-5)
    # T^2 scaling: the loss is T^2 times the unscaled KL at the same temperature
    unscaled = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="none").sum(1).mean()
    assert kd_kl(s, t, None, 4.0).item() == pytest.approx(16 * unscaled.item(), rel=1e-5)


def test_kl_excludes_ignored_pixels():
    s, t, y = _logits(5), _logits(6), _target(7)
    ign = (y == IGNORE_INDEX).unsqueeze(1).expand_as(s)
    assert ign.any()
    s2, t2 = s.clone(), t.clone()
    s2[ign] = 100.0 * torch.randn(int(ign.sum()))
    t2[ign] = -50.0
    assert kd_kl(s2, t2, y, 2.0).item() == pytest.approx(kd_kl(s, t, y, 2.0).item(), rel=1e-6)
    # and equals the mean over the labelled pixels only
    valid = y != IGNORE_INDEX
    per_pix = (F.softmax(t / 2, 1) * (F.log_softmax(t / 2, 1) - F.log_softmax(s / 2, 1))).sum(1)
    assert kd_kl(s, t, y, 2.0).item() == pytest.approx(4 * per_pix[valid].mean().item(), rel=1e-5)
    # all ignored -> 0 and still differentiable
    s.requires_grad_(True)
    z = kd_kl(s, t, torch.full_like(y, IGNORE_INDEX), 2.0)
    z.backward()
    assert z.item() == 0.0


def test_kl_rejects_bad_inputs():
    with pytest.raises(ValueError):
        kd_kl(_logits(0), _logits(1, c=K + 1), None, 1.0)
    with pytest.raises(ValueError):
        kd_kl(_logits(0), _logits(1), None, 0.0)
    with pytest.raises(ValueError):
        kd_kl(_logits(0), _logits(1), torch.zeros(2, 3, 3, dtype=torch.long), 1.0)


# ----------------------------------------------------------------------------- MSE (source 000)

def test_mse_equals_source000_mse_loss_and_excludes_ignored():
    s, t = _logits(8), _logits(9)
    assert kd_mse(s, t, None).item() == pytest.approx(F.mse_loss(s, t).item(), rel=1e-6)
    y = _target(10)
    assert kd_mse(s, s.clone(), y).item() == 0.0
    ign = (y == IGNORE_INDEX).unsqueeze(1).expand_as(s)
    s2 = s.clone()
    s2[ign] = 1e3
    assert kd_mse(s2, t, y).item() == pytest.approx(kd_mse(s, t, y).item(), rel=1e-6)


# ----------------------------------------------------------------------------- CWD (Shu et al.)

def test_cwd_equals_independent_loop():
    s, t = _logits(11, n=2, c=3, h=3, w=4), _logits(12, n=2, c=3, h=3, w=4)
    T = 3.0
    total = 0.0
    for n in range(2):
        for c in range(3):
            zs = [float(v) / T for v in s[n, c].flatten()]
            zt = [float(v) / T for v in t[n, c].flatten()]
            es, et = [math.exp(v) for v in zs], [math.exp(v) for v in zt]
            ps, pt = [v / sum(es) for v in es], [v / sum(et) for v in et]
            total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    ref = T * T * total / (2 * 3)
    assert cwd_loss(s, t, T).item() == pytest.approx(ref, rel=1e-5)
    assert cwd_loss(s, s.clone(), T).item() == pytest.approx(0.0, abs=1e-6)
    assert cwd_loss(s, t, T).item() > 0


# ----------------------------------------------------------------------------- FitNets adapters

def test_feature_adapters_map_student_widths_to_teacher_widths():
    sc, tc = [64, 96, 128, 160], [96, 192, 384, 768]  # MobileViT-S -> Swin-V2-T
    ad = FeatureAdapters(sc, tc)
    feats = [torch.randn(2, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate(sc)]
    out = ad(feats)
    assert [o.shape[1] for o in out] == tc
    assert all(o.shape[-2:] == f.shape[-2:] for o, f in zip(out, feats))
    sizes = [(32 // 2**i, 32 // 2**i) for i in range(4)]
    out2 = ad(feats, sizes)
    assert [tuple(o.shape[-2:]) for o in out2] == sizes
    tfeats = [torch.randn(2, c, *hw) for c, hw in zip(tc, sizes)]
    assert feature_mse(out, tfeats).item() > 0  # resized inside feature_mse
    assert feature_mse(tfeats, [f.clone() for f in tfeats]).item() == 0.0
    with pytest.raises(ValueError):
        FeatureAdapters([64, 96], tc)
    with pytest.raises(ValueError):
        ad([torch.randn(1, 8, 4, 4)] * 4)


# ----------------------------------------------------------------------------- training glue

class TinySeg(nn.Module):
    """A two-stage 'segmenter' with forward_with_features, for fast tests."""

    def __init__(self, widths=(4, 6), classes=K):
        super().__init__()
        self.s1 = nn.Conv2d(3, widths[0], 3, padding=1)
        self.s2 = nn.Conv2d(widths[0], widths[1], 3, stride=2, padding=1)
        self.head = nn.Conv2d(widths[1], classes, 1)
        self.drop = nn.Dropout(0.5)
        self.feature_channels = list(widths)

    def forward_with_features(self, x):
        f1 = torch.relu(self.s1(x))
        f2 = torch.relu(self.s2(f1))
        y = F.interpolate(self.head(self.drop(f2)), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return y, [f1, f2]

    def forward(self, x):
        return self.forward_with_features(x)[0]


def _data(n_batches=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, K, (2, 8, 8), generator=g))
            for _ in range(n_batches)]


@pytest.mark.parametrize("method", ["kl", "mse", "kl+feat", "cwd"])
def test_teacher_gets_no_gradient_and_stays_in_eval(method):
    torch.manual_seed(0)
    teacher = TinySeg(widths=(8, 12))
    teacher.train()  # make_kd_loss must switch it to eval
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = TinySeg()
    cfg = KDConfig(method, temperature=2.0, kd_weight=1.0, feat_weight=1.0 if method == "kl+feat" else 0.0)
    model = KDStudent(student, FeatureAdapters(student.feature_channels, teacher.feature_channels)) \
        if method == "kl+feat" else student
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    loss_fn = make_kd_loss(teacher, cfg, train_cfg=TrainConfig(loss="ce"))
    calls = []

    def spy(module, inp, out):
        calls.append(module.training)

    teacher.head.register_forward_hook(spy)
    hist = train(model, _data(), None, TrainConfig(steps=3, lr=1e-2, loss="ce"), loss_fn=loss_fn, progress=False)
    assert calls and not any(calls), "teacher ran in training mode"
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, s_before[k]) for k, v in student.state_dict().items())
    assert "kd" in hist["logs"][0] and hist["logs"][0]["kd"] > 0
    if method == "kl+feat":
        assert "feat" in hist["logs"][0]
        assert all(p.grad is not None for p in model.adapters.parameters())  # adapters trained too


def test_kd_student_state_dict_is_the_plain_students():
    s = TinySeg()
    wrapped = KDStudent(s, FeatureAdapters(s.feature_channels, [8, 12]))
    sd = wrapped.state_dict()
    assert set(sd) == set(s.state_dict())
    fresh = KDStudent(TinySeg(), FeatureAdapters(s.feature_channels, [8, 12]))
    fresh.load_state_dict(sd)
    x = torch.randn(1, 3, 8, 8)
    s.eval(), fresh.eval()
    assert torch.allclose(fresh(x), s(x))
    logits, adapted = wrapped(x, with_features=True)
    assert [a.shape[1] for a in adapted] == [8, 12]


def test_none_method_is_plain_segmentation_loss_and_config_validation():
    s = TinySeg().eval()
    x, y = _data(1)[0]
    loss, logs = make_kd_loss(None, KDConfig("none"), train_cfg=TrainConfig(loss="ce"))(s, x, y)
    assert loss.item() == pytest.approx(F.cross_entropy(s(x), y).item(), rel=1e-6)
    assert set(logs) == {"seg"}
    with pytest.raises(ValueError):
        KDConfig("hint")
    with pytest.raises(ValueError):
        KDConfig("kl+feat", feat_weight=0.0)
    with pytest.raises(ValueError):
        make_kd_loss(None, KDConfig("kl"))
    # total = seg + w * kd
    teacher = TinySeg(widths=(8, 12)).eval()
    l1, lg = make_kd_loss(teacher, KDConfig("kl", 2.0, 0.5), train_cfg=TrainConfig(loss="ce"))(s, x, y)
    assert l1.item() == pytest.approx(lg["seg"] + 0.5 * lg["kd"], rel=1e-5)


def test_make_kd_loss_dispatches_each_method_to_its_loss():
    """The KD term logged is exactly the loss the method names (KL, MSE, CWD)."""
    torch.manual_seed(0)
    s, teacher = TinySeg().eval(), TinySeg(widths=(8, 12)).eval()
    x, y = _data(1)[0]
    with torch.no_grad():
        zs, zt = s(x), teacher(x)
    expect = {"kl": kd_kl(zs, zt, y, 3.0), "mse": kd_mse(zs, zt, y), "cwd": cwd_loss(zs, zt, 3.0)}
    for method, ref in expect.items():
        with torch.no_grad():
            _, logs = make_kd_loss(teacher, KDConfig(method, 3.0, 1.0), train_cfg=TrainConfig(loss="ce"))(s, x, y)
        assert logs["kd"] == pytest.approx(ref.item(), rel=1e-5), method


# ----------------------------------------------------------------------------- section 01 (study.sections.distillation)

def _ctx(tmp_path, fresh=False):
    return SimpleNamespace(out_dir=tmp_path, profile=PROFILES["smoke"], seed=0, data_fp="d", device=torch.device("cpu"),
                           cache=SimpleNamespace(root=tmp_path / "cache", fresh=fresh), generated_data=True)


def test_kd_student_reads_notebook_choice_and_falls_back(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(sec, "distill_student", lambda ctx, student, cfg, steps=None: seen.append((student, cfg, steps))
                        or ("model", {"miou": 0.5}))
    ctx = _ctx(tmp_path)
    _, rec = sec.kd_student(ctx)
    assert rec["kd_choice_source"] == "fallback" and "fallback" in capsys.readouterr().out
    assert seen[-1] == (sec.MAIN_STUDENT, KDConfig(**sec.FALLBACK_CHOICE), sec.kd_steps(ctx.profile))
    chosen = KDConfig("cwd", 4.0, 3.0)
    sec.save_kd_choice(ctx, chosen, 7, {"cwd": {"miou": 0.1}})
    _, rec = sec.kd_student(ctx)
    assert rec["kd_choice_source"] == "notebook 01" and seen[-1] == (sec.MAIN_STUDENT, chosen, 7)


def test_distill_student_cache_key_holds_the_teacher_weights_and_the_distill_code(tmp_path, monkeypatch):
    """The KD cache key names the exact teacher weights (model_fingerprint) and covers study.distill."""
    torch.manual_seed(0)
    teachers = iter([TinySeg(widths=(8, 12)), TinySeg(widths=(8, 12)), TinySeg()])  # two random teachers, a student
    loaded, calls = [], []

    def fake_trained_model(ctx, name, steps=None, seed=None):
        loaded.append(name)
        return next(teachers), {"miou": 0.4}

    def fake_train_cached(ctx, tag, build_fn, cfg, loss_fn_factory=None, seed=None, extra_key=None, modules=()):
        calls.append({"tag": tag, "steps": cfg.steps, "seed": seed, "extra": extra_key, "modules": list(modules),
                      "loss_fn": loss_fn_factory()})
        return TinySeg(), {"scores": {"miou": 0.1, "mdice": 0.2}, "test_scores": {"miou": 0.15, "mdice": 0.25},
                           "history": {"seconds": 1.5}}

    targets = []
    monkeypatch.setattr(sec, "trained_model", fake_trained_model)
    monkeypatch.setattr(sec, "train_cached", fake_train_cached)
    monkeypatch.setattr(sec, "teacher_outputs", lambda ctx, seed, steps, bf16=False: targets.append((seed, steps)))
    ctx = _ctx(tmp_path, fresh=True)  # fresh: the teacher is reloaded on every call
    _, rec = sec.distill_student(ctx, cfg=KDConfig("kl", 2.0, 1.0), seed=3)
    first = calls[-1]
    assert first["tag"] == f"kd-{sec.MAIN_STUDENT}-kl-T2-w1" and first["seed"] == 3
    assert first["steps"] == sec.kd_steps(ctx.profile) and rec["steps"] == first["steps"]
    assert first["extra"]["kd"] == {"method": "kl", "temperature": 2.0, "kd_weight": 1.0, "feat_weight": 0.0}
    assert first["extra"]["teacher"]["name"] == ctx.profile.teacher
    assert {"study.distill", "study.train"} <= set(code_closure(*first["modules"]))
    # the section's tables and verdicts are not in the key: editing them never retrains
    assert "study.sections.distillation" not in code_closure(*first["modules"])
    assert rec["teacher_miou"] == 0.4 and rec["train_seconds"] == 1.5 and rec["seed"] == 3
    # reported on test, selected on val; the teacher's outputs were asked for once per run (seed, steps)
    assert rec["miou"] == 0.15 and rec["val_miou"] == 0.1 and rec["split"] == "test"
    assert targets == [(3, first["steps"])]
    sec.distill_student(ctx, cfg=KDConfig("kl", 2.0, 1.0), seed=3)
    second = calls[-1]
    # a teacher with other weights gives another key
    assert first["extra"]["teacher"]["weights"] != second["extra"]["teacher"]["weights"]
    # "none" at the control's budget IS the section-0 baseline (no teacher, no new training)
    n, c = len(loaded), len(calls)
    _, rec = sec.distill_student(ctx, cfg=KDConfig("none"))
    assert loaded[n:] == [sec.MAIN_STUDENT] and len(calls) == c and math.isnan(rec["teacher_miou"])
    # "none" at another budget trains without loading a teacher and keys no teacher
    _, rec = sec.distill_student(ctx, cfg=KDConfig("none"), steps=sec.kd_steps(ctx.profile) + 1)
    assert calls[-1]["extra"]["teacher"] is None and math.isnan(rec["teacher_miou"])


def test_teacher_is_shared_and_its_key_is_model_fingerprint(tmp_path, monkeypatch):
    t = TinySeg(widths=(8, 12))
    keys, loads = [], []
    monkeypatch.setattr(sec, "trained_model",
                        lambda ctx, name, steps=None, seed=None: loads.append(name) or (t, {"miou": 0.4}))
    monkeypatch.setattr(sec, "train_cached", lambda ctx, tag, build_fn, cfg, **kw: keys.append(kw["extra_key"])
                        or (TinySeg(), {"scores": {"miou": 0.1}, "test_scores": {"miou": 0.1},
                                        "history": {"seconds": 0.0}}))
    monkeypatch.setattr(sec, "teacher_outputs", lambda *a, **k: None)
    ctx = _ctx(tmp_path / "shared")  # not fresh: the teacher is loaded once per process and context
    model, scores = sec.teacher(ctx)
    assert model is t and scores == {"miou": 0.4}
    sec.distill_student(ctx, cfg=KDConfig("mse", 1.0, 1.0))
    assert sec.teacher(ctx)[0] is t and len(loads) == 1
    assert keys[-1]["teacher"]["weights"] == model_fingerprint(t)


def test_choice_rules_take_the_best_and_the_first_on_ties():
    # choices read the validation score only (test numbers never choose)
    sweep = {(1.0, 1.0): {"val_miou": 0.3, "miou": 0.9}, (2.0, 1.0): {"val_miou": 0.5, "miou": 0.1},
             (4.0, 1.0): {"val_miou": 0.5, "miou": 0.1}, (2.0, 0.5): {"val_miou": 0.4, "miou": 0.1}}
    assert sec.best_kl(sweep) == KDConfig("kl", 2.0, 1.0)
    summ = {"none": {"val_miou": 0.9}, "kl": {"val_miou": 0.2, "miou": 0.9}, "mse": {"val_miou": 0.6},
            "cwd": {"val_miou": 0.6}}
    assert sec.best_kd_method(summ) == "mse"  # "none" never wins; the first of equal ones does
    cfgs = sec.main_configs(KDConfig("kl", 4.0, 0.5))
    assert list(cfgs) == ["none", "kl", "mse", "kl+feat", "cwd"]
    assert cfgs["kl+feat"] == KDConfig("kl+feat", 4.0, 0.5, sec.FEAT_WEIGHT)
    # every KD run trains as long as its no-KD control (the section-0 baseline)
    assert sec.sweep_plan(PROFILES["cpu"])["steps"] == PROFILES["cpu"].student_steps
    assert sec.kd_steps(PROFILES["smoke"]) == PROFILES["smoke"].student_steps
    core, full = sec.sweep_plan(PROFILES["cpu"]), sec.sweep_plan(PROFILES["cpu"], full_grid=True)
    assert core["methods"] == ("none", "mse") and not core["temperatures"] and not core["second_student"]
    assert set(core["methods"]) < set(full["methods"]) and full["temperatures"] and full["second_student"]


def test_compare_to_none_pairs_seeds_and_computes_the_verdict():
    summ = {"none": {"seed_mious": [0.30, 0.31, 0.29]}, "mse": {"seed_mious": [0.35, 0.36, 0.345]},
            "kl": {"seed_mious": [0.31, 0.29, 0.30]}}
    out = sec.compare_to_none(summ)
    d = np.array([0.05, 0.05, 0.055])
    half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert out["mse"]["ci95_low"] == pytest.approx(d.mean() - half) and out["mse"]["verdict"] == "helps"
    assert out["kl"]["verdict"] == "no detectable difference at this budget"
    assert "3 training seeds" in out["mse"]["ci_method"]


def test_summarize_means_sample_std_and_nan_classes():
    nan = float("nan")
    recs = [{"miou": 0.2, "mdice": 0.3, "train_seconds": 1.0, "per_class_iou": [0.1, nan, 0.5]},
            {"miou": 0.4, "mdice": 0.5, "train_seconds": 3.0, "per_class_iou": [0.3, nan, nan]}]
    s = sec.summarize(recs, ["a", "b", "c"])
    assert s["miou"] == pytest.approx(0.3) and s["miou_std"] == pytest.approx(math.sqrt(0.02))
    assert s["mdice"] == pytest.approx(0.4) and s["train_seconds"] == 2.0 and s["seeds"] == 2
    assert s["iou_a"] == pytest.approx(0.2) and math.isnan(s["iou_b"]) and s["iou_c"] == 0.5
    assert math.isnan(sec.summarize(recs[:1], ["a", "b", "c"])["miou_std"])


def test_table_rows_one_per_run_with_settings_and_reported_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(sec, "build", lambda name, profile: nn.Identity())
    monkeypatch.setattr(sec, "model_complexity", lambda model, hw: {"params_m": 1.5, "gmacs": 0.25})
    ctx = _ctx(tmp_path)

    def rec(m, val=None, steps=6):
        return {"miou": m, "val_miou": m if val is None else val, "mdice": m + 0.1, "train_seconds": 2.0,
                "per_class_iou": [m] * len(CLASS_NAMES), "split": "test", "train_steps": steps,
                "train_images": steps * 4, "steps": steps}

    sweep = {(1.0, 1.0): rec(0.1), (2.0, 1.0): rec(0.2), (4.0, 1.0): rec(0.15), (2.0, 0.5): rec(0.12),
             (2.0, 2.0): rec(0.11)}
    configs = sec.main_configs(sec.best_kl(sweep))
    summ = {m: sec.summarize([rec(0.3 + (m == "cwd") * 0.1), rec(0.5 + (m == "cwd") * 0.12)]) for m in configs}
    assert sec.best_kd_method(summ) == "cwd"
    second = {"none": rec(0.05), "cwd": rec(0.06)}
    rows = sec.table_rows(ctx, teacher_scores=rec(0.7, steps=8), base_scores=rec(0.4), configs=configs,
                          summaries=summ, sweep=sweep, second=second)
    assert len(rows) == 1 + len(configs) + len(sweep) + len(second)
    assert all(tuple(r)[:len(BASE_COLUMNS)] == BASE_COLUMNS and r["section"] == "distillation" for r in rows)
    assert all(r["params_m"] == 1.5 and r["gmacs"] == 0.25 and r["input_hw"] == "64x64" for r in rows)
    assert all(f"iou_{c}" in r for r in rows for c in RARE_CLASSES)
    assert all(r["split"] == "test" for r in rows)
    teacher = rows[0]
    assert teacher["model"] == ctx.profile.teacher and math.isnan(teacher["temperature"])
    assert math.isnan(teacher["teacher_miou"]) and teacher["train_steps"] == 8
    by = {(r["model"], r["method"]): r for r in rows}
    main = {m: by[(sec.MAIN_STUDENT, m if m != "none" else "none (= section-0 baseline, equal budget)")]
            for m in configs}
    # equal budgets in the main comparison, stated in the table
    assert {(r["train_steps"], r["train_images"]) for r in main.values()} == {(6, 24)}
    assert main["none"]["reported_by_source000_miou"] == 0.5365 and main["mse"]["reported_by_source000_miou"] == 0.6056
    assert math.isnan(main["kl"]["reported_by_source000_miou"])
    assert main["kl"]["miou"] == pytest.approx(0.4) and main["kl"]["seeds"] == 2 and main["kl"]["miou_std"] > 0
    assert main["kl"]["temperature"] == 2.0 and math.isnan(main["mse"]["temperature"])
    assert main["kl+feat"]["feat_weight"] == sec.FEAT_WEIGHT and math.isnan(main["cwd"]["feat_weight"])
    assert math.isnan(main["none"]["kd_weight"]) and main["cwd"]["kd_weight"] == sec.CWD_WEIGHT
    assert all(r["teacher_miou"] == 0.7 for r in rows[1:])
    assert by[(sec.SECOND_STUDENT, "cwd")]["temperature"] == sec.CWD_TEMPERATURE
    # the CI of cwd - none over 2 paired seeds: differences 0.1 and 0.12
    d = np.array([0.1, 0.12])
    half = 12.706204736174707 * d.std(ddof=1) / np.sqrt(2)
    # t(0.975, 1) = 12.7: two seeds cannot exclude 0 here, so the computed verdict is cautious
    assert main["cwd"]["ci95_low"] == pytest.approx(d.mean() - half)
    assert main["cwd"]["ci95_low"] < 0 < main["cwd"]["ci95_high"]
    assert main["cwd"]["verdict"] == main["kl"]["verdict"] == "no detectable difference at this budget"
    text = sec.verdict(ctx, teacher_scores=rec(0.7), base_scores=rec(0.4), summaries=summ, sweep=sweep, second=second)
    assert "T=2, λ=1" in text and "spans 0.1000" in text and "**no detectable" in text and "+0.0100" in text
