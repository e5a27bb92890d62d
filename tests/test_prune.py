"""Tests of study.prune: real shrinking, masked baselines, head surgery, save/load, ONNX,
and of the pruning sections' runner (:func:`study.sections.structured_pruning.pruned_variant`)
and measurement (:func:`study.sections.measure.measure_model`) on a smoke context.

A small stand-in segmenter (timm ``mobilevit_xxs`` features + a tiny fusion head with a
``classifier`` conv) at 64 px keeps the whole file fast; it has the same timm MobileViT
transformer blocks (fused-qkv ``Attention``, 4 heads) as the study's student.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from study import models, prune
from study.quant import export_onnx

HW = (64, 64)


class TinySeg(nn.Module):
    """mobilevit_xxs pyramid -> 1x1 laterals -> concat -> conv-BN-ReLU -> classifier."""

    def __init__(self, num_classes: int = 14, width: int = 32):
        super().__init__()
        import timm

        self.backbone = timm.create_model("mobilevit_xxs", pretrained=False, features_only=True,
                                          out_indices=(1, 2, 3, 4))
        chs = self.backbone.feature_info.channels()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in chs)
        self.fuse = nn.Sequential(nn.Conv2d(width * len(chs), width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        feats = self.backbone(x)
        size = feats[0].shape[-2:]
        outs = [F.interpolate(l(f), size=size, mode="bilinear", align_corners=False)
                for l, f in zip(self.lateral, feats)]
        y = self.classifier(self.fuse(torch.cat(outs, 1)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build():
    torch.manual_seed(0)
    m = TinySeg().eval()
    # non-trivial BN statistics so that channel removal is not a no-op numerically
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def batches(n=1, b=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 3, *HW, generator=g), torch.randint(0, 14, (b, *HW), generator=g)) for _ in range(n)]


def complexity(model):
    import torch_pruning as tp
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, *HW)
    with torch.no_grad():
        macs_tp, params = tp.utils.count_ops_and_params(model, x)
        fc = FlopCounterMode(display=False)
        with fc, sdpa_kernel([SDPBackend.MATH]):
            model(x)
    return {"params": params, "macs_tp": macs_tp, "macs_fc": fc.get_total_flops() / 2}


@pytest.fixture(scope="module")
def base():
    return build()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, *HW, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def pruned50(base):
    m = copy.deepcopy(base)
    prune.prune_structured(m, torch.randn(1, 3, *HW), 0.5)
    return m


def test_structured_shrinks_shapes_params_and_macs(base, pruned50, x):
    sd0, sd1 = base.state_dict(), pruned50.state_dict()
    assert sd0.keys() == sd1.keys()
    shrunk = [k for k in sd0 if sd0[k].shape != sd1[k].shape]
    assert len(shrunk) > 50  # many tensors physically smaller
    for k in shrunk:
        assert sd1[k].numel() < sd0[k].numel()
    # classifier ignored: keeps its 14 outputs
    assert pruned50.classifier.out_channels == 14
    c0, c1 = complexity(base), complexity(pruned50)
    assert models.gmacs(pruned50, HW) < 0.5 * models.gmacs(base, HW)  # the study's one MACs counter
    assert c1["params"] < 0.5 * c0["params"]
    assert c1["macs_tp"] < 0.5 * c0["macs_tp"]      # module-hook counter
    assert c1["macs_fc"] < 0.5 * c0["macs_fc"]      # aten-level counter
    with torch.no_grad():
        y = pruned50(x)
    assert y.shape == (2, 14, *HW) and torch.isfinite(y).all()
    # head structure consistent: 3*H*d rows, H*d proj columns
    for m in prune.attention_modules(pruned50).values():
        assert m.num_heads == 4
        assert m.qkv.out_features == 3 * m.num_heads * m.head_dim == 3 * m.attn_dim
        assert m.proj.in_features == m.attn_dim


def test_structured_taylor_and_heads(base, x):
    m = copy.deepcopy(base)
    prune.prune_structured(m, HW, 0.5, importance="taylor", calib_batches=batches(1), prune_heads=True)
    assert all(h == 2 for h, _ in prune.head_config(m).values())
    # head dims untouched when whole heads go
    assert [d for _, d in prune.head_config(m).values()] == [d for _, d in prune.head_config(base).values()]
    with torch.no_grad():
        assert m(x).shape == (2, 14, *HW)
    with pytest.raises(ValueError, match="calib_batches"):
        prune.prune_structured(copy.deepcopy(base), HW, 0.5, importance="taylor")


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "a"])
def test_bad_sparsity_raises(base, bad):
    for fn in (lambda m: prune.prune_structured(m, HW, bad), lambda m: prune.prune_unstructured(m, bad),
               lambda m: prune.prune_filter_norm_masks(m, bad), lambda m: prune.prune_mlp_hidden(m, bad)):
        with pytest.raises(ValueError, match="sparsity"):
            fn(base)  # validation happens before any change


def test_unstructured_keeps_shapes_and_zeroes_fraction(base, x):
    m = copy.deepcopy(base)
    prune.prune_unstructured(m, 0.6)
    sd0, sd1 = base.state_dict(), m.state_dict()
    assert sd0.keys() == sd1.keys() and all(sd0[k].shape == sd1[k].shape for k in sd0)
    assert prune.zero_fraction(m) == pytest.approx(0.6, abs=1e-3)
    assert prune.zero_fraction(base) < 0.01
    assert not any(n.endswith("_orig") or n.endswith("_mask") for n, _ in m.named_parameters())
    c0, c1 = complexity(base), complexity(m)
    assert c0 == c1  # dense params and MACs unchanged ("masked (zeros only)")
    assert torch.count_nonzero(m.classifier.weight) == base.classifier.weight.numel()


def test_filter_norm_masks_zero_whole_filters(base):
    m = copy.deepcopy(base)
    prune.prune_filter_norm_masks(m, 0.5)
    conv = m.lateral[0]
    zero_filters = (conv.weight.flatten(1).abs().sum(1) == 0).sum().item()
    assert zero_filters == round(0.5 * conv.out_channels)
    assert complexity(m) == complexity(base)


class ConvNet(nn.Module):
    """Three convs + a classifier at 16 px: enough weights to mask, cheap to train."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(16, 14, 1)

    def forward(self, x):
        return self.classifier(self.body(x))


def _adamw_steps(model, n=3, lr=1e-2, weight_decay=0.1):
    """``n`` AdamW steps (with weight decay) on random 16 px batches; yields after each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(4)
    model.train()
    for _ in range(n):
        xb, yb = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 14, (4, 16, 16), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        yield
    model.eval()


@pytest.mark.parametrize("method", ["unstructured", "filter_norm_masks"])
def test_keep_pruned_zeros_during_finetune(method):
    torch.manual_seed(0)
    m = ConvNet()
    (prune.prune_unstructured if method == "unstructured" else prune.prune_filter_norm_masks)(m, 0.5)
    zeros = {n: (p == 0).clone() for n, p in m.named_parameters() if p.dim() > 1 and (p == 0).any()}
    assert len(zeros) == 3 and sum(int(z.sum()) for z in zeros.values()) > 1000
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    params = dict(m.named_parameters())
    with prune.keep_pruned_zeros(m) as masks:
        assert set(masks) == set(zeros)
        for _ in _adamw_steps(m):
            for n, z in zeros.items():  # after EVERY optimizer step, not only at exit
                assert torch.count_nonzero(params[n][z]) == 0, n
    # the kept weights did train
    assert all(not torch.equal(params[n][~z], before[n][~z]) for n, z in zeros.items())
    # the hooks are gone after exit: the same loop now revives zeros
    for _ in _adamw_steps(m, n=1):
        pass
    assert all(torch.count_nonzero(params[n][z]) > 0 for n, z in zeros.items())


def _masked_heads_output(model, keep_idx, x):
    gates = {n: torch.zeros(m.num_heads).index_fill_(0, torch.tensor(keep_idx[n]), 1.0)
             for n, m in prune.attention_modules(model).items()}
    handles = prune.head_gates(model, gates)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("keep", [2, 1])
def test_head_pruning_equals_masked_heads(base, x, keep):
    imp = prune.head_importance(base, batches(1))
    assert all(v.shape == (4,) and torch.isfinite(v).all() for v in imp.values())
    m = copy.deepcopy(base)
    prune.prune_heads(m, keep, imp)
    keep_idx = {n: sorted(torch.topk(v, keep).indices.tolist()) for n, v in imp.items()}
    ref = _masked_heads_output(base, keep_idx, x)
    with torch.no_grad():
        out = m(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for a0, a1 in zip(prune.attention_modules(base).values(), prune.attention_modules(m).values()):
        assert a1.num_heads == keep and a1.head_dim == a0.head_dim
        assert a1.qkv.out_features == 3 * keep * a0.head_dim
        assert a1.proj.in_features == keep * a0.head_dim == a1.attn_dim
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in base.parameters())
    # and the result differs from the unpruned model (the heads really mattered)
    with torch.no_grad():
        assert (out - base(x)).abs().max() > 1e-4


@pytest.mark.parametrize("fused", [True, False])
def test_head_dim_pruning_equals_masked_qkv(base, x, fused):
    b = copy.deepcopy(base)
    for a in prune.attention_modules(b).values():
        a.fused_attn = fused
    imp = prune.head_dim_importance(b)
    m = copy.deepcopy(b)
    prune.prune_head_dim(m, 0.5, imp)
    masked = copy.deepcopy(b)
    with torch.no_grad():
        for n, a in prune.attention_modules(masked).items():
            H, d = a.num_heads, a.head_dim
            keep = [set(torch.topk(imp[n][h], round(0.5 * d)).indices.tolist()) for h in range(H)]
            for h in range(H):
                for j in range(d):
                    if j not in keep[h]:
                        for t in range(3):
                            a.qkv.weight[t * H * d + h * d + j] = 0
                            a.qkv.bias[t * H * d + h * d + j] = 0
        ref, out = masked(x), m(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for a0, a1 in zip(prune.attention_modules(b).values(), prune.attention_modules(m).values()):
        assert a1.head_dim == round(0.5 * a0.head_dim) and a1.num_heads == a0.num_heads
        # the original temperature is kept: stored scale is the new default, q absorbs the ratio
        assert a1.scale == pytest.approx(a1.head_dim ** -0.5)


def test_repartition_keeps_params(base, x):
    m = copy.deepcopy(base)
    prune.repartition_heads(m, 2)
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in base.parameters())
    assert all(h == 2 for h, _ in prune.head_config(m).values())
    with torch.no_grad():
        assert m(x).shape == (2, 14, *HW)


def test_save_load_roundtrip_exact(base, pruned50, x, tmp_path):
    m = copy.deepcopy(pruned50)
    prune.prune_heads(m, 2)
    prune.prune_head_dim(m, 0.5)
    prune.prune_mlp_hidden(m, 0.25)
    path = prune.save_pruned(m, None, tmp_path / "p.pt")
    payload = torch.load(path, weights_only=True)  # must be weights_only-loadable
    assert {"history", "state_dict"} <= set(payload)
    r = prune.load_pruned(build, path).eval()
    with torch.no_grad():
        assert torch.equal(r(x), m(x))
    assert prune.head_config(r) == prune.head_config(m)
    with pytest.raises(FileNotFoundError, match="path"):
        prune.load_pruned(build, tmp_path / "missing.pt")


def test_pruned_model_exports_to_onnx(pruned50, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    xin = torch.randn(1, 3, *HW, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "p.onnx"
    export_onnx(pruned50, path, HW)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: xin.numpy()})[0]
    with torch.no_grad():
        ref = pruned50(xin).numpy()
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_mlp_hidden_pruning_on_swin_equals_zeroed_units():
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    torch.manual_seed(0)
    swin = SwinTransformerV2(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1),
                             num_heads=(1, 2), num_classes=5).eval()
    xin = torch.randn(2, 3, 32, 32)
    mlps = prune.mlp_modules(swin)
    assert len(mlps) == 2
    masked = copy.deepcopy(swin)
    m = copy.deepcopy(swin)
    prune.prune_mlp_hidden(m, 0.5)
    with torch.no_grad():
        for (n, mm), (_, mk) in zip(prune.mlp_modules(m).items(), prune.mlp_modules(masked).items()):
            assert mm.fc1.out_features == mk.fc1.out_features // 2
            keep = [st for st in prune.pruning_record(m) if st["module"] == n][0]["keep"]
            drop = sorted(set(range(mk.fc2.in_features)) - set(keep))
            mk.fc2.weight[:, drop] = 0
        torch.testing.assert_close(m(xin), masked(xin), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in swin.parameters())


def test_stage_sensitivity_table(base):
    xs = batches(1)[0][0]
    with torch.no_grad():
        ref = base(xs).argmax(1)

    def agree(model):  # fraction of pixels whose argmax is unchanged: a cheap stand-in for mIoU
        with torch.no_grad():
            return (model(xs).argmax(1) == ref).float().mean().item()

    df = prune.stage_sensitivity(base, agree, 0.5, {"s3": "backbone.stages_3"}, HW)
    assert list(df["stage"]) == ["s3"]
    assert (df["miou_base"] == 1.0).all()
    assert (df["params_m"] < df["params_m_base"]).all()
    assert set(["miou_drop", "sparsity"]) <= set(df.columns)


# --------------------------------------------------------------------------- pruning sections (smoke context)
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A smoke context (generated data) and an untrained student at the smoke size."""
    from study.context import setup
    from study.sections import common
    from study.sections import structured_pruning as sec

    ctx = setup(profile="smoke", build_dir=str(tmp_path_factory.mktemp("build")))
    torch.manual_seed(0)
    student = common.build(sec.STUDENT, ctx.profile).eval()
    hw = (ctx.profile.image_size, ctx.profile.image_size)
    return {"ctx": ctx, "student": student, "builder": lambda: common.build(sec.STUDENT, ctx.profile),
            "val": common.loaders(ctx)[1], "hw": hw}


def test_pruned_variant_masked_finetune_keeps_zeros_and_caches(smoke, monkeypatch):
    from study.sections import structured_pruning as sec

    ctx, base, hw = smoke["ctx"], smoke["student"], smoke["hw"]
    kw = dict(base_tag="test", input_hw=hw, ft_steps=2, val_loader=smoke["val"])
    m, info = sec.pruned_variant(ctx, base, smoke["builder"], "unstructured", sparsity=0.5, **kw)
    ref = prune.prune_unstructured(copy.deepcopy(base), 0.5)  # the same masks, not fine-tuned
    zeros = {n: p == 0 for n, p in ref.named_parameters() if p.dim() > 1 and (p == 0).any()}
    params = dict(m.named_parameters())
    assert zeros
    for n, z in zeros.items():
        assert torch.count_nonzero(params[n][z]) == 0, n  # zeros stayed zero through the fine-tune
    assert not _same_weights(m, ref)  # and the fine-tune did train the rest
    assert prune.zero_fraction(m) == pytest.approx(0.5, abs=1e-3)
    assert info["ft_steps"] == 2 and {"miou", "mdice"} <= set(info["scores"])
    assert 0.0 <= info["miou_before_ft"] <= 1.0
    assert sum(p.numel() for p in base.parameters()) == sum(p.numel() for p in m.parameters())
    # a second call is a cache hit: no fine-tune, the same weights rebuilt from the payload
    monkeypatch.setattr(sec, "finetune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fine-tuned")))
    monkeypatch.setattr(sec, "masked_finetune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fine-tuned")))
    again, info2 = sec.pruned_variant(ctx, base, smoke["builder"], "unstructured", sparsity=0.5, **kw)
    assert _same_weights(again, m)
    assert {k: info2[k] for k in ("miou_before_ft", "ft_steps", "ft_seconds")} == \
        {k: info[k] for k in ("miou_before_ft", "ft_steps", "ft_seconds")}
    assert info2["scores"]["miou"] == info["scores"]["miou"]
    with pytest.raises(ValueError, match="keep_heads"):
        sec.pruned_variant(ctx, base, smoke["builder"], "heads", sparsity=0.5, **kw)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def test_structured_variant_drops_macs_and_measure_model(smoke, tmp_path):
    from study.sections import structured_pruning as sec
    from study.sections.measure import measure_model

    ctx, base, hw = smoke["ctx"], smoke["student"], smoke["hw"]
    m, info = sec.pruned_variant(ctx, base, smoke["builder"], "structured_magnitude", sparsity=0.5, base_tag="test",
                                 input_hw=hw, ft_steps=1, val_loader=smoke["val"])
    d = measure_model(ctx, base, hw, bench=False)  # counts only: latency columns NaN
    assert np.isnan(d["latency_ms_p50_torch"]) and np.isnan(d["latency_ms_p50_ort"])
    p = measure_model(ctx, m, hw, tmp_path / "pruned.onnx")
    assert p["params_m"] < 0.5 * d["params_m"]
    assert p["gmacs"] < 0.5 * d["gmacs"] and p["gmacs"] == pytest.approx(models.gmacs(m, hw))
    assert p["gmacs_tp"] < 0.5 * d["gmacs_tp"]
    assert p["ort_error"] == "" and (tmp_path / "pruned.onnx").exists()
    for k in ("latency_ms_p50_torch", "latency_ms_p99_torch", "latency_ms_p50_ort", "latency_ms_p99_ort"):
        assert np.isfinite(p[k]) and p[k] > 0, k
    assert p["latency_ms_p99_ort"] >= p["latency_ms_p50_ort"]
