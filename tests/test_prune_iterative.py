"""Iterative pruning: schedules, equal fine-tune budgets, exact final widths (study.prune), and the
section's cached runner (study.sections.iterative_pruning.run_schedule): trajectory, cache, Taylor, KD."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention

from study.cache import ArtifactCache
from study.context import Context
from study.models import model_fingerprint
from study.profiles import PROFILES, get_profile
from study.prune import (channel_widths, finetune_split, prune_iteratively, prune_structured, pruning_record,
                         sparsity_schedule)
from study.sections import iterative_pruning as sec
from study.sections.iterative_pruning import IterativeConfig, run_schedule, study_grid

KINDS = ("oneshot", "linear", "cubic")


class TinySeg(nn.Module):
    """Conv stem + residual stage + timm Attention (4 heads) + concat decoder + classifier.

    Odd widths (22, 37, 29) make flooring differences visible. (N,3,H,W) -> (N,14,H,W).
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 22, 3, 2, 1), nn.BatchNorm2d(22), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(22, 37, 3, 2, 1), nn.BatchNorm2d(37), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(37, 37, 3, 1, 1), nn.BatchNorm2d(37))
        self.proj_in = nn.Conv2d(37, 48, 1)
        self.attn = Attention(48, num_heads=4)
        self.head = nn.Sequential(nn.Conv2d(48 + 22, 29, 3, 1, 1), nn.ReLU())
        self.classifier = nn.Conv2d(29, 14, 1)

    def forward(self, x):
        f0 = self.stem(x)
        f = self.b1(f0)
        f = torch.relu(f + self.b2(f))
        f = self.proj_in(f)
        b, c, h, w = f.shape
        t = f.flatten(2).transpose(1, 2)
        t = t + self.attn(t)
        f = t.transpose(1, 2).reshape(b, c, h, w)
        f = F.interpolate(f, size=f0.shape[-2:], mode="bilinear", align_corners=False)
        y = self.classifier(self.head(torch.cat([f, f0], 1)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return TinySeg().eval()


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("sf", [0.0, 0.2, 0.45, 0.6, 0.8, 0.9999])
def test_schedule_ends_exactly_at_final_and_is_monotone(kind, k, sf):
    s = sparsity_schedule(sf, k, kind)
    assert len(s) == k
    assert s[-1] == sf  # exact, not approx
    assert all(b >= a for a, b in zip(s, s[1:]))
    assert all(0.0 <= v <= sf for v in s)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_cubic_front_loads_pruning(k):
    sf = 0.45
    cub, lin = sparsity_schedule(sf, k, "cubic"), sparsity_schedule(sf, k, "linear")
    assert all(c > l for c, l in zip(cub[:-1], lin[:-1]))  # ahead of linear before the end
    inc = [b - a for a, b in zip([0.0] + cub, cub)]
    assert all(b < a for a, b in zip(inc, inc[1:]))  # strictly shrinking increments
    assert cub[0] == pytest.approx(sf * (1 - (1 - 1 / k) ** 3))  # Zhu & Gupta 2017 with s_i = 0
    assert sparsity_schedule(sf, k, "oneshot") == [sf] * k


@pytest.mark.parametrize("total", [0, 1, 7, 150, 151])
def test_total_finetune_budget_identical_across_schedules(total):
    sums = {}
    for kind in KINDS:
        for k in (1, 2, 4, 8):
            cfg = IterativeConfig(final_sparsity=0.45, steps=k, schedule=kind, total_finetune_steps=total)
            split = cfg.finetune_steps()
            assert len(split) == k and all(n >= 0 for n in split)
            assert split[:-1] == [total // k] * (k - 1)  # remainder goes to the last step
            sums[(kind, k)] = sum(split)
    assert set(sums.values()) == {total}


@pytest.mark.parametrize("args, name", [
    ((1.0, 2), "final_sparsity"), ((-0.1, 2), "final_sparsity"), ((float("nan"), 2), "final_sparsity"),
    (("half", 2), "final_sparsity"), ((0.5, 0), "steps"), ((0.5, -2), "steps"), ((0.5, 2.5), "steps"),
    ((0.5, True), "steps"), ((0.5, "4"), "steps"),
])
def test_bad_sparsity_or_k_raises_naming_parameter(args, name):
    with pytest.raises(ValueError, match=name):
        sparsity_schedule(*args, "linear")


@pytest.mark.parametrize("kw, name", [
    ({"steps": 0}, "steps"), ({"final_sparsity": 1.2}, "final_sparsity"), ({"schedule": "exp"}, "schedule"),
    ({"importance": "l2"}, "importance"), ({"total_finetune_steps": -1}, "total_finetune_steps"),
    ({"kd": "yes"}, "kd"), ({"calib_batches": 0}, "calib_batches"),
])
def test_config_validation_names_the_field(kw, name):
    with pytest.raises(ValueError, match=name):
        IterativeConfig(**kw)
    with pytest.raises(ValueError, match="kind"):
        sparsity_schedule(0.5, 2, "exponential")
    with pytest.raises(ValueError, match="total_finetune_steps"):
        finetune_split(-3, 2)


# --------------------------------------------------------------------------- exact widths
def test_naive_ratio_composition_would_drift():
    """Why per-step ratios relative to the current widths are not used: flooring drifts."""
    c0, sf = 64, 0.45
    s1 = sparsity_schedule(sf, 2, "linear")[0]
    after1 = int(c0 * (1 - s1))  # 49
    naive = int(after1 * ((1 - sf) / (1 - s1)))  # 34
    assert naive != int(c0 * (1 - sf)) == 35


@pytest.mark.parametrize("sf, ks", [(0.45, (2, 4, 8)), (0.8, (3,))])
def test_iterative_reaches_oneshot_widths(sf, ks):
    base = _tiny()
    x = torch.randn(1, 3, 32, 32)
    one = prune_structured(copy.deepcopy(base), x, sf)
    want = channel_widths(one)
    assert want["stem.0.weight"][0] == int(22 * (1 - sf))  # int(C0 * (1 - s_f)) per group
    assert one.attn.head_dim == int(12 * (1 - sf))
    for kind in ("linear", "cubic"):
        for k in ks:
            seen = []
            it = prune_iteratively(copy.deepcopy(base), x, sparsity_schedule(sf, k, kind),
                                   between=lambda t, m: seen.append(m.stem[0].out_channels))
            assert channel_widths(it) == want, (kind, k)
            assert it.attn.head_dim == one.attn.head_dim and it.attn.num_heads == 4
            assert seen == [int(22 * (1 - s)) for s in sparsity_schedule(sf, k, kind)]  # relative to ORIGINAL
            assert it(x).shape == (1, 14, 32, 32)


def test_taylor_reestimates_on_current_model_each_step():
    base = _tiny()
    x = torch.randn(1, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 14, (2, 32, 32), generator=g))]
    calls = []

    def calib(t):
        calls.append(t)
        return batches

    sched = sparsity_schedule(0.45, 4, "cubic")
    it = prune_iteratively(copy.deepcopy(base), x, sched, "taylor", calib_batches=calib)
    assert calls == [0, 1, 2, 3]
    assert channel_widths(it) == channel_widths(prune_structured(copy.deepcopy(base), x, 0.45))
    with pytest.raises(ValueError, match="calib_batches"):
        prune_iteratively(copy.deepcopy(base), x, sched, "taylor")
    with pytest.raises(ValueError, match="sparsities"):
        prune_iteratively(copy.deepcopy(base), x, [0.4, 0.2])


# --------------------------------------------------------------------------- end to end
def _toy_loaders(n=4, bs=2, hw=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        xb = torch.randn(bs, 3, hw, hw, generator=g)
        data.append((xb, (xb[:, 0] > 0).long() * 3))
    return data, data[:2]


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    monkeypatch.setattr(sec, "loaders", lambda ctx, batch_size=None, seed=None: _toy_loaders())
    # the toy val batches stand in for the test split
    monkeypatch.setattr(sec, "test_scores", lambda ctx, m: {**sec.evaluate(m, _toy_loaders()[1], progress=False),
                                                            "split": "test"})

    def toy_confusions(ctx, m):
        from study.metrics import confusion_matrix
        with torch.no_grad():
            return np.stack([confusion_matrix(m(x[i:i + 1]).argmax(1)[0].numpy(), y[i].numpy(), 14)
                             for x, y in _toy_loaders()[1] for i in range(len(x))])
    monkeypatch.setattr(sec, "test_confusions", toy_confusions)
    prof = get_profile("smoke").replace(crop_size=32, image_size=32, batch_size=2, calib_images=2)
    return Context(profile=prof, seed=0, out_dir=tmp_path / "smoke", cache=ArtifactCache(tmp_path / "cache"),
                   data_root=tmp_path, data_fp="toy")


def test_run_schedule_trajectory_budget_and_cache(ctx, monkeypatch):
    base = _tiny()
    p0 = sum(p.numel() for p in base.parameters())
    cfg = IterativeConfig(final_sparsity=0.45, steps=2, schedule="cubic", total_finetune_steps=3)
    assert not sec.is_cached(ctx, base, cfg)
    model, traj = run_schedule(ctx, base, cfg)
    assert sec.is_cached(ctx, base, cfg)
    assert [r["step"] for r in traj] == [0, 1, 2]
    assert [r["finetune_steps"] for r in traj] == [0, 1, 2]
    assert [r["sparsity"] for r in traj[1:]] == cfg.sparsities()
    assert traj[-1]["params_m"] < traj[1]["params_m"] < traj[0]["params_m"] == pytest.approx(p0 / 1e6)
    assert sum(p.numel() for p in base.parameters()) == p0  # the input model is untouched
    assert channel_widths(model) == channel_widths(prune_structured(copy.deepcopy(base), (32, 32), 0.45))
    # second call: answered from the cache (fine-tuning would raise), same weights rebuilt
    monkeypatch.setattr(sec, "finetune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again, traj2 = run_schedule(ctx, base, cfg)
    assert traj2 == traj
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(again(x), model(x))


def test_control_scores_the_start_model_before_its_fine_tune(ctx):
    """Step 0 of the control is the unpruned START model: its test score must be taken before
    the fine-tune (a bug once stored the fine-tuned score there)."""
    base = _tiny()
    start_test = sec.test_scores(ctx, copy.deepcopy(base).eval())["miou"]
    traj = sec.control_finetune(ctx, base, 3, progress=False)
    assert traj[0]["test_miou"] == pytest.approx(start_test)
    assert traj[0]["finetune_steps"] == 0 and traj[1]["finetune_steps"] == 3


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def test_taylor_importance_is_used(ctx):
    """Taylor must pick other channels than magnitude (same widths, same fine-tune batches)."""
    base = _tiny(0)
    kw = dict(final_sparsity=0.45, steps=2, schedule="linear", total_finetune_steps=2, calib_batches=1)
    mag, traj_m = run_schedule(ctx, base, IterativeConfig(importance="magnitude", **kw))
    tay, traj_t = run_schedule(ctx, base, IterativeConfig(importance="taylor", **kw))
    assert channel_widths(tay) == channel_widths(mag)
    assert sum(r["finetune_steps"] for r in traj_t) == 2 and traj_t[-1]["sparsity"] == 0.45
    assert not _same(_weights(tay), _weights(mag))  # fails if "taylor" silently fell back to magnitude
    # the Taylor ranking itself differs from the L1 one on this model
    hist = {imp: [st["history"] for st in pruning_record(m)] for imp, m in (("m", mag), ("t", tay))}
    assert hist["m"] != hist["t"]


def test_kd_finetune_uses_the_teacher(ctx, monkeypatch):
    base, teacher = _tiny(0), _tiny(1)
    calls = {"make": [], "loss": 0}
    real = sec.make_kd_loss

    def spy(t, cfg, *, train_cfg=None):
        calls["make"].append((model_fingerprint(t), cfg))
        fn = real(t, cfg, train_cfg=train_cfg)

        def loss_fn(model, images, masks):
            calls["loss"] += 1
            return fn(model, images, masks)
        return loss_fn

    monkeypatch.setattr(sec, "make_kd_loss", spy)
    kw = dict(final_sparsity=0.45, steps=1, schedule="oneshot", total_finetune_steps=2)
    plain, _ = run_schedule(ctx, base, IterativeConfig(**kw))
    assert calls == {"make": [], "loss": 0}
    kd, traj = run_schedule(ctx, base, IterativeConfig(kd=True, **kw), teacher=teacher,
                            kd_config={"method": "kl", "temperature": 4.0, "kd_weight": 2.0, "feat_weight": 0.0})
    assert [fp for fp, _ in calls["make"]] == [model_fingerprint(teacher)]
    assert calls["make"][0][1].temperature == 4.0 and calls["make"][0][1].kd_weight == 2.0
    assert calls["loss"] == 2  # every fine-tune step used the KD loss
    assert sum(r["finetune_steps"] for r in traj) == 2
    assert not _same(_weights(kd), _weights(plain))  # fails if kd=True were silently ignored
    with pytest.raises(ValueError, match="teacher"):
        run_schedule(ctx, base, IterativeConfig(0.45, 1, kd=True))


def test_kd_finetune_loss_drops_feature_hints():
    teacher = _tiny(1)
    _, used = sec.kd_finetune_loss(teacher, {"method": "kl+feat", "temperature": 2.0, "kd_weight": 1.0,
                                             "feat_weight": 1.0})
    assert used["method"] == "kl" and used["feat_weight"] == 0.0
    _, used = sec.kd_finetune_loss(teacher, None)
    assert used == sec.distillation.FALLBACK_CHOICE


def test_study_grid_sizes_from_profile():
    for name in ("smoke", "cpu", "paper"):
        p = PROFILES[name]
        g = study_grid(p)
        assert g["total_finetune_steps"] == p.finetune_steps
        assert g["main_sparsity"] in p.sparsities and g["main_sparsity"] not in g["extra_sparsities"]
        assert set(g["extra_sparsities"]) <= set(p.sparsities)
    assert study_grid(get_profile("cpu"))["ks"] == (2, 4)
