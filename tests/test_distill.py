"""Properties of the distillation losses and of the KD training glue (study.distill)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from study import IGNORE_INDEX
from study.distill import (FeatureAdapters, KDConfig, KDStudent, cwd_loss, feature_mse, kd_kl, kd_mse,
                           make_kd_loss)
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


def test_kd_student_reads_notebook_choice_and_falls_back(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    import study.distill as D
    from study.profiles import PROFILES

    seen = []
    monkeypatch.setattr(D, "distill_student", lambda ctx, student, cfg, steps=None: seen.append((student, cfg, steps))
                        or ("model", {"miou": 0.5}))
    ctx = SimpleNamespace(out_dir=tmp_path, profile=PROFILES["smoke"], seed=0)
    _, rec = D.kd_student(ctx)
    assert rec["kd_choice_source"] == "fallback" and "fallback" in capsys.readouterr().out
    assert seen[-1] == (D.MAIN_STUDENT, KDConfig(**D.FALLBACK_CHOICE), D.kd_steps(ctx.profile))
    chosen = KDConfig("cwd", 4.0, 3.0)
    D.save_kd_choice(ctx, chosen, 7, {"cwd": {"miou": 0.1}})
    _, rec = D.kd_student(ctx)
    assert rec["kd_choice_source"] == "notebook 01" and seen[-1] == (D.MAIN_STUDENT, chosen, 7)
