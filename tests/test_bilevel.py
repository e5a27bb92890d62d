"""Tests of study.bilevel (bi-level pruning parameterization, source 002) on tiny CNNs, and of
the notebook-06 section runner study.sections.bilevel_search.compress on the smoke profile."""
from __future__ import annotations

import copy
import math
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from study import BASE_COLUMNS, bilevel
from study.context import setup
from study.data import batch_stream
from study.models import gmacs
from study.sections import bilevel_search as sec
from study.sections import common


class Tiny(nn.Module):
    """Conv-BN-ReLU stem, depth-wise conv, residual block, concat, classifier (32-64 px)."""

    def __init__(self, w: int = 16):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, groups=w, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv2d(w, 2 * w, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.c4 = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w))
        self.c5 = nn.Sequential(nn.Conv2d(2 * w, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.c6 = nn.Conv2d(3 * w, 3 * w, 1)  # no BN, after a concat
        self.classifier = nn.Conv2d(3 * w, 5, 1)

    def forward(self, x):
        a = self.c3(self.c2(self.c1(x)))
        a = torch.relu(a + self.c4(a))
        b = F.interpolate(self.c5(a), size=a.shape[-2:], mode="nearest")
        return self.classifier(torch.relu(self.c6(torch.cat([a, b], 1))))


def _randomise_bn(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model


def _random_keep(mm, p=0.4, seed=1):
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for grp in mm.groups:
        k = torch.rand(grp.channels, generator=g) > p
        k[0] = True
        keep[grp.key] = k
    return keep


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: one intra-op thread is ~10x faster on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return _randomise_bn(Tiny()).eval()


def test_groups_share_masks_and_skip_classifier(tiny):
    mm = bilevel.attach_masks(tiny, torch.zeros(1, 3, 32, 32))
    keys = [g.key for g in mm.groups]
    assert "classifier" not in keys
    # c1 + depth-wise c2 are one group; c3 + c4 (residual add) are one group
    by_mod = {m.name: g.key for g in mm.groups for m in g.out_members}
    assert by_mod["c1.0"] == by_mod["c2.0"]
    assert by_mod["c3.0"] == by_mod["c4.0"]
    assert len(mm.masks) == len(mm.groups)
    mm.remove()


def test_masked_macs_equals_counted_macs_of_pruned_model_and_same_function(tiny):
    x = torch.randn(2, 3, 32, 32)
    mm = bilevel.attach_masks(tiny, x[:1])
    assert mm.dense_gmacs == pytest.approx(gmacs(tiny, (32, 32)))
    keep = _random_keep(mm)
    mm.set_masks(keep)
    with torch.no_grad():
        y_masked = tiny(x)
        predicted = float(bilevel.masked_macs(mm))
    mm.remove()
    pruned = bilevel.apply_masks(tiny, keep, x[:1]).eval()
    counted = gmacs(pruned, (32, 32))
    # measured: exact (0 relative error) - every MAC is in a conv
    assert predicted == pytest.approx(counted, rel=1e-9)
    assert counted < mm.dense_gmacs
    with torch.no_grad():
        y_pruned = pruned(x)
    # physical removal computes the hard-masked network (eval mode)
    assert torch.allclose(y_masked, y_pruned, atol=1e-5)
    n_params = sum(p.numel() for p in pruned.parameters())
    assert n_params < sum(p.numel() for p in tiny.parameters())


def test_masked_macs_gradient_flows_to_s(tiny):
    mm = bilevel.attach_masks(tiny, torch.zeros(1, 3, 32, 32))
    m = bilevel.masked_macs(mm)
    m.backward()
    for mask in mm.masks:
        assert mask.s.grad is not None and (mask.s.grad > 0).all()
    mm.remove()


def test_ste_gradient_equals_continuous_mask_gradient(tiny):
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    mm = bilevel.attach_masks(tiny, x[:1])

    def grads(mode, s_values):
        for mask, v in zip(mm.masks, s_values):
            mask.mode = mode
            mask.s.data.copy_(v)
            mask.s.grad = None
        F.cross_entropy(tiny(x), y).backward()
        return [mask.s.grad.clone() for mask in mm.masks]

    # (1) at binary s (init s = 1, and a random 0/1 mask): STE == continuous mask at s
    for s_vals in ([torch.ones(g.channels) for g in mm.groups],
                   [k.float() for k in _random_keep(mm).values()]):
        g_ste, g_cont = grads("ste", s_vals), grads("continuous", s_vals)
        for a, b in zip(g_ste, g_cont):
            assert torch.equal(a, b)
    # (2) general s: STE gradient == continuous-mask gradient evaluated at m = b = 1[s > tau]
    gen = torch.Generator().manual_seed(5)
    s_vals = [torch.rand(g.channels, generator=gen) for g in mm.groups]
    g_ste = grads("ste", s_vals)
    g_cont = grads("continuous", [(v > 0.5).float() for v in s_vals])
    for a, b in zip(g_ste, g_cont):
        assert torch.equal(a, b)
    mm.remove()


def test_implicit_approximation_exact_when_loss_linear_in_masked_activations():
    # one conv+BN (eval) and a loss linear in its masked output: the Hessian terms the
    # approximation drops are zero, so approximation == exact double-backward term.
    torch.manual_seed(0)
    net = _randomise_bn(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))).eval()
    x, r = torch.randn(2, 3, 16, 16), torch.randn(2, 6, 16, 16)
    mm = bilevel.attach_masks(net, x[:1], ignored_layers=[])
    out = bilevel.implicit_agreement(mm, lambda: (net(x) * r).sum(), lam=0.1)
    assert out["cosine"] > 0.99999
    assert out["rel_err"] < 1e-4


def test_implicit_approximation_vs_exact_on_tiny_model(tiny):
    # Measured (seed 0, untrained tiny CNN, eval mode, lam 0.1): cosine ~0.5-0.8 across
    # seeds at init, decreasing (can turn negative) as the model trains because the
    # dropped curvature terms dominate; the approximation's norm is smaller (rel err ~0.7-1).
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4, 32, 32))
    mm = bilevel.attach_masks(tiny, x[:1])
    out = bilevel.implicit_agreement(mm, lambda: F.cross_entropy(tiny(x), y), lam=0.1)
    assert out["cosine"] > 0.3
    assert 0.3 < out["rel_err"] < 1.2
    assert out["norm_approx"] > 0
    mm.remove()


def _loader(n=6, hw=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, hw, hw, generator=g), torch.randint(0, 5, (4, hw, hw), generator=g))
            for _ in range(n)]


def test_short_search_hits_macs_target(tiny):
    dense = gmacs(tiny, (32, 32))
    target = 0.55 * dense
    res = bilevel.bilevel_search(tiny, _loader(), target, input_hw=(32, 32), steps=8, inner_steps=1,
                           lr_s=0.05, beta=1.0, implicit=True, seed=0)
    assert len(res.history["ce"]) == 8
    assert res.history["gmacs"][0] == pytest.approx(dense)
    pruned = bilevel.apply_masks(tiny, res.masks, torch.zeros(1, 3, 32, 32))
    counted = gmacs(pruned, (32, 32))
    assert abs(counted - target) / target < 0.05
    assert counted == pytest.approx(res.gmacs_final, rel=1e-9)
    assert {w["group"] for w in res.widths} == set(res.masks)
    assert not tiny._forward_hooks and all(not m._forward_hooks for m in tiny.modules())


def test_regulariser_alone_drives_macs_down(tiny):
    dense = gmacs(tiny, (32, 32))
    res = bilevel.bilevel_search(tiny, _loader(), 0.5 * dense, input_hw=(32, 32), steps=20, lr_s=0.05,
                           beta=100.0, implicit=False, project=False, seed=0)
    assert res.gmacs_raw < dense  # s crossed tau for some channels
    assert res.history["gmacs"][-1] < res.history["gmacs"][0]


def test_search_prunes_by_itself_calibrated_but_not_source002(tiny):
    # the calibrated parameterisation (defaults) prunes by itself: the search's own hard-mask
    # MACs (before any projection) fall below the dense MACs and reach the target within 40
    # steps. On this 5-group toy whole groups cross tau together, so the trajectory
    # over/undershoots (measured: it oscillates between ~0.2x and 1.4x the target); on
    # TopFormer-B (64 px, parent trained 250 steps) the raw MACs settled at -3.8 % of the
    # TopFormer-S target but -41 % of the TopFormer-T target (see notebook 06). Source 002's
    # parameterisation (s = 1, per-entry Adam at lr 0.02) cannot move any s below tau = 0.5 in
    # fewer than 25 steps, so its raw MACs stay dense.
    dense = gmacs(tiny, (32, 32))
    target = 0.7 * dense
    res = bilevel.bilevel_search(copy.deepcopy(tiny), _loader(), target, input_hw=(32, 32), steps=40,
                                 project=False, seed=0)
    assert min(res.history["gmacs"]) <= target < dense
    assert res.gmacs_raw < dense
    assert res.gmacs_final == pytest.approx(res.gmacs_raw)  # no projection
    assert res.config["reg_scale_value"] == sum(len(k) for k in res.masks.values())
    # keep_alive (default): every group keeps >= ceil(0.35 C) channels during the search; without
    # it and with one shared second moment, a strong penalty switches whole groups off
    ka = bilevel.bilevel_search(copy.deepcopy(tiny), _loader(), 0.4 * dense, input_hw=(32, 32), steps=10,
                                project=False, seed=0, beta=100.0)
    assert all(int(k.sum()) >= math.ceil(0.35 * len(k)) for k in ka.masks.values())
    off = bilevel.bilevel_search(copy.deepcopy(tiny), _loader(), 0.4 * dense, input_hw=(32, 32), steps=10,
                                 project=False, seed=0, beta=100.0, keep_alive=False, s_optim="adam_shared")
    assert not all(int(k.sum()) >= math.ceil(0.35 * len(k)) for k in off.masks.values())
    src = bilevel.bilevel_search(copy.deepcopy(tiny), _loader(), 0.5 * dense, input_hw=(32, 32), steps=20,
                                 project=False, seed=0, **bilevel.SOURCE002_PARAMS)
    assert src.gmacs_raw == pytest.approx(dense)
    assert src.config["s_init"] == 1.0 and src.config["s_optim"] == "adam"


def test_mask_parameterisation_options_validated(tiny):
    with pytest.raises(ValueError, match="init"):
        bilevel.ChannelMask(4, tau=0.5, init=0.5)
    mm = bilevel.attach_masks(tiny, torch.zeros(1, 3, 32, 32), s_init=0.7)
    assert all(torch.all(m.s == 0.7) for m in mm.masks)
    mm.remove()
    m = torch.tensor(3.0, dtype=torch.float64)
    assert float(bilevel.macs_regulariser(m, 2.0)) == pytest.approx(0.25)
    assert float(bilevel.macs_regulariser(m, 2.0, "source002")) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="norm"):
        bilevel.macs_regulariser(m, 2.0, "l1")
    for kw in ({"s_init": 0.4}, {"s_optim": "sgd"}, {"reg_scale": "layers"}, {"reg_norm": "x"}):
        with pytest.raises(ValueError, match="bad"):
            bilevel.bilevel_search(tiny, _loader(1), 0.5 * gmacs(tiny, (32, 32)), input_hw=(32, 32), steps=1, **kw)


@pytest.mark.parametrize("bad", [0, -1.0, 1e9, float("nan")])
def test_bad_target_raises(tiny, bad):
    with pytest.raises(ValueError, match="target_gmacs"):
        bilevel.bilevel_search(tiny, _loader(1), bad, input_hw=(32, 32), steps=1)
    with pytest.raises(ValueError, match="target_gmacs"):
        bilevel.magnitude_prune_to_macs(tiny, bad, (32, 32))


def test_baselines_match_macs(tiny):
    dense = gmacs(tiny, (32, 32))
    target = 0.6 * dense
    for fn in (bilevel.magnitude_prune_to_macs, bilevel.uniform_width, bilevel.random_masks_to_macs):
        pruned, keep = fn(tiny, target, (32, 32))
        counted = gmacs(pruned, (32, 32))
        assert abs(counted - target) / target < 0.1, fn.__name__
    # uniform: the same kept fraction in every group (up to rounding)
    _, keep = bilevel.uniform_width(tiny, target, (32, 32))
    fr = [k.float().mean().item() for k in keep.values()]
    assert max(fr) - min(fr) < 0.1


def test_search_continues_a_batch_stream(tiny):
    # the search reads its batches from one study.data.batch_stream: a stream given to it is
    # continued (steps * (inner_steps + 1) batches consumed), not restarted
    batches = _loader(n=20)
    stream = batch_stream(batches)
    bilevel.bilevel_search(tiny, stream, 0.7 * gmacs(tiny, (32, 32)), input_hw=(32, 32), steps=2, inner_steps=2,
                           seed=0)
    assert torch.equal(next(stream)[0], batches[6][0])


# --------------------------------------------------------------------------- section runner (smoke)


@pytest.fixture(scope="module")
def smoke_ctx(tmp_path_factory):
    return setup(profile="smoke", build_dir=str(tmp_path_factory.mktemp("bilevel-build")))


@pytest.mark.parametrize("method", ["bilevel", "magnitude"])
def test_section_compress_is_smaller_near_target_and_cached(smoke_ctx, method, monkeypatch, tmp_path):
    ctx = smoke_ctx
    hw = sec.input_hw(ctx)
    base, base_scores = common.trained_model(ctx, "topformer_t")
    dense = gmacs(base, hw)
    target = 0.6 * dense
    r = sec.compress(ctx, "topformer_t", method, target, search_kw=sec.DEFAULT_SEARCH, search_steps=2, budget=3)
    small = r["model"]
    # physically smaller: fewer parameters, fewer MACs (the one MACs counter), near the target
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(small) < n(base)
    counted = gmacs(small, hw)
    assert counted < dense
    assert abs(counted - target) / target < 0.05
    assert not any(m._forward_hooks for m in small.modules())
    # equal budgets: 3 weight updates after the parent whatever the method
    assert r["train_steps"] == base_scores["train_steps"] + 3
    if method == "bilevel":
        assert counted == pytest.approx(r["search"]["gmacs_final"], rel=1e-6)
        assert r["search_steps"] == 2 and len(r["search"]["history"]["step"]) == 2
        assert (r["search_weight_steps"], r["finetune_steps"], r["mask_passes"]) == (2, 1, 2)
        # images: parent + 2 weight + 2 mask batches + 1 fine-tune batch
        assert r["train_images"] == base_scores["train_images"] + 5 * ctx.profile.batch_size
        assert r["search_cpu_s"] > 0
    else:
        assert r["search"] is None and r["search_steps"] == 0 and r["finetune_steps"] == 3
        assert r["train_images"] == base_scores["train_images"] + 3 * ctx.profile.batch_size
    assert set(r["masks"]) and all(k.dtype == torch.bool for k in r["masks"].values())
    assert 0.0 <= r["scores"]["miou"] <= 1.0 and r["scores"]["split"] == "test"
    assert r["test_cms"].shape[0] == len(common.eval_loader(ctx, "test").dataset)
    # the second call is a cache hit: nothing is searched, pruned or fine-tuned again
    for fn in ("bilevel_search", "magnitude_prune_to_macs"):
        monkeypatch.setattr(sec.bilevel, fn, lambda *a, **k: pytest.fail("recomputed a cached result"))
    monkeypatch.setattr(sec, "finetune", lambda *a, **k: pytest.fail("fine-tuned a cached result"))
    r2 = sec.compress(ctx, "topformer_t", method, target, search_kw=sec.DEFAULT_SEARCH, search_steps=2, budget=3)
    np.testing.assert_equal(r2["scores"], r["scores"])  # NaN (absent class) == NaN
    assert all(torch.equal(r2["masks"][k], r["masks"][k]) for k in r["masks"])
    sd, sd2 = small.state_dict(), r2["model"].state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # its table row: the required columns first, split and budget next, MACs of the pruned model
    from study.sections import measure

    plan = measure.LatencyPlan(ctx, sec.input_hw(ctx), tmp_path / "lat", runtimes=("torch",))
    dense_ref = {"params_m": n(base) / 1e6, "gmacs": dense}
    row = sec.row(ctx, "topformer_t->x", r2, experiment="test", dense_ref=dense_ref, vs=("self", r2), plan=plan)
    assert tuple(row)[:len(BASE_COLUMNS) + 3] == BASE_COLUMNS + ("split", "train_steps", "train_images")
    assert row["split"] == "test" and row["train_steps"] == r2["train_steps"]
    assert row["gmacs"] == pytest.approx(counted) and row["method"] == method
    assert row["macs_target_err_pct"] == pytest.approx(100 * abs(counted - target) / target)
    assert row["macs_removed"] == pytest.approx(1 - counted / dense)
    assert 0 < row["params_removed"] < 1 and 0 < row["channels_removed"] < 1
    assert (row["gmacs_raw"] > 0) == (method == "bilevel")
    # an arm against itself: zero difference, interval [0, 0], no detectable difference
    assert row["delta_miou"] == 0 and row["ci95_low"] == 0 == row["ci95_high"]
    assert row["verdict"] == "no detectable difference at this budget" and "bootstrap" in row["ci_method"]
    row = sec.add_latency([row], plan.measure())[0]  # timed by the one protocol, in a subprocess
    assert row["finetune_steps"] == r2["finetune_steps"] and row["latency_ms_p50"] > 0 and row["threads"] >= 1


def test_section_control_and_hand_designed_get_the_same_budget(smoke_ctx):
    ctx = smoke_ctx
    _, sc = common.trained_model(ctx, "topformer_t")
    ctrl = sec.compress(ctx, "topformer_t", sec.CONTROL, budget=2)
    assert ctrl["masks"] == {} and ctrl["train_steps"] == sc["train_steps"] + 2 and ctrl["finetune_steps"] == 2
    hand = sec.hand_designed(ctx, "topformer_t", budget=2)
    assert hand["train_steps"] == ctrl["train_steps"] and hand["method"] == "hand-designed"
    c = sec.compare(hand, ctrl)
    assert c["ci95_low"] <= c["diff"] <= c["ci95_high"] and c["equal_train_steps"]


def test_section_plan_budgets():
    from study.profiles import PROFILES

    for name in ("smoke", "cpu", "paper"):
        p = sec.plan(PROFILES[name])
        w, ft = sec.budget_split("bilevel", p.budget, p.main_steps)
        assert w == p.main_steps and w + ft == p.budget and ft >= 1
        assert sec.budget_split("magnitude", p.budget, p.main_steps) == (0, p.budget)
        assert p.sweep_budget > p.sweep_steps
    cpu = sec.plan(PROFILES["cpu"])
    assert (cpu.main_steps, cpu.budget) == (120, 150)
    assert 1.0 not in cpu.betas and 1.0 in sec.plan(PROFILES["cpu"], full_grid=True).betas
    with pytest.raises(ValueError, match="exceed"):
        sec.budget_split("bilevel", 3, 4)


def test_choose_search_uses_val_among_points_that_meet_the_budget():
    def pt(beta, val, test, implicit=True, raw=1.0):
        return {"val_miou": val, "scores": {"miou": test}, "target_gmacs": 1.0,
                "search": {"gmacs_raw": raw, "config": {"beta": beta, "lam": 0.1, "implicit": implicit}}}

    pts = [pt(0.001, 0.2, 0.9), pt(0.01, 0.3, 0.1), pt(0.1, 0.9, 0.0, implicit=False)]
    assert sec.choose_search(pts) == {"beta": 0.01, "lam": 0.1, "implicit": True}
    # a better val score does not win when its search missed the MACs target by > 10 %
    pts = [pt(0.001, 0.5, 0.0, raw=1.3), pt(0.01, 0.4, 0.0, raw=0.95), pt(0.1, 0.3, 0.0, raw=1.05)]
    assert sec.choose_search(pts)["beta"] == 0.01
    # none within 10 %: the closest raw MACs wins, whatever val says
    pts = [pt(0.001, 0.5, 0.0, raw=1.6), pt(0.1, 0.1, 0.0, raw=1.2)]
    assert sec.choose_search(pts)["beta"] == 0.1
    assert sec.raw_target_error(pts[0]) == pytest.approx(0.6)
    assert sec.raw_target_error({"search": None, "target_gmacs": 1.0}) != sec.raw_target_error(pts[0])


def test_section_compress_rejects_unknown_method(smoke_ctx):
    with pytest.raises(ValueError, match="unknown method"):
        sec.compress(smoke_ctx, "topformer_t", "lottery", 0.01)


class _Branches(nn.Module):
    """Two conv branches concatenated and followed by a depth-wise conv (as DeepLabV3+'s
    decoder after its concat): the depth-wise conv couples both branches into one mask group
    whose entries are written by two modules."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.classifier = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        h = self.stem(x)
        return self.classifier(self.project(self.dw(torch.cat([self.a(h), self.b(h)], 1))))


def test_keep_alive_floors_every_concat_branch_so_the_pruned_model_runs():
    torch.manual_seed(0)
    net = _Branches()
    x = torch.zeros(1, 3, 32, 32)
    dense = gmacs(net, (32, 32))
    res = bilevel.bilevel_search(net, _loader(), 0.3 * dense, input_hw=(32, 32), steps=12, beta=100.0,
                                 lr_s=0.1, project=False, seed=0)
    mm = bilevel.attach_masks(copy.deepcopy(net), x)
    segs = [(g.key, seg) for g in mm.groups for seg in bilevel._segments(g) if len(seg) < g.channels]
    mm.remove()
    assert segs, "the toy must have a concat group written by two modules"
    for key, seg in segs:
        assert int(res.masks[key][seg].sum()) >= math.ceil(0.35 * len(seg)), (key, seg)
    pruned = bilevel.apply_masks(net, res.masks, x)
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 5, 32, 32)
    assert all(m.out_channels > 0 for m in pruned.modules() if isinstance(m, nn.Conv2d))
