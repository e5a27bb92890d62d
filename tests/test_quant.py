"""Tests of study.quant: export fidelity, INT8 size, exclusions, kernel counts, timers, TensorRT skip.

A tiny conv + attention segmenter (PSP bins that do not divide the feature map, LayerNorm,
Softmax, MatMul) stands in for the zoo so the whole file runs in seconds.
"""
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from study import NUM_CLASSES, quant
from study import data as D
from study.sections import quantization as sec


class _Attn(nn.Module):
    def __init__(self, c, heads=2):
        super().__init__()
        self.ln, self.qkv, self.proj, self.h = nn.LayerNorm(c), nn.Linear(c, 3 * c), nn.Linear(c, c), heads

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.ln(x.flatten(2).transpose(1, 2))
        q, k, v = self.qkv(t).reshape(b, -1, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (c // self.h) ** -0.5).softmax(-1)
        o = (a @ v).transpose(1, 2).reshape(b, -1, c)
        return x + self.proj(o).transpose(1, 2).reshape(b, c, h, w)


class TinySeg(nn.Module):
    def __init__(self, nc=14, bins=(1, 2, 3, 6)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.attn, self.bins = _Attn(32), bins
        self.psp = nn.ModuleList([nn.Conv2d(32, 8, 1) for _ in bins])
        self.fuse, self.cls = nn.Conv2d(32 + 8 * len(bins), 32, 3, padding=1), nn.Conv2d(32, nc, 1)

    def forward(self, x):
        hw = x.shape[-2:]
        f = self.attn(self.stem(x))
        ps = [F.interpolate(c(F.adaptive_avg_pool2d(f, b)), f.shape[-2:], mode="bilinear", align_corners=False)
              for c, b in zip(self.psp, self.bins)]
        y = self.cls(F.relu(self.fuse(torch.cat([f] + ps, 1))))
        return F.interpolate(y, hw, mode="bilinear", align_corners=False)


HW = 48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = TinySeg(bins=(1, 2, 4)).eval()
    d = tmp_path_factory.mktemp("quant")
    path = quant.export_onnx(model, d / "tiny.onnx", HW)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((4, 3, HW, HW)).astype(np.float32)
    val = rng.standard_normal((3, 3, HW, HW)).astype(np.float32)
    return model, path, calib, val, d


def test_export_matches_torch(tiny):
    model, path, _, val, _ = tiny
    r = quant.verify_onnx(model, path, val)
    assert r["max_abs_diff"] < 1e-4
    assert r["argmax_agreement"] > 0.999
    assert r["n_images"] == 3


def test_export_falls_back_to_dynamo_for_non_dividing_pool(tmp_path):
    torch.manual_seed(0)
    model = TinySeg(bins=(1, 2, 3, 6)).eval()  # bins 3 and 6 on a 6x6 map: legacy exporter refuses
    p = quant.export_onnx(model, tmp_path / "psp.onnx", HW)
    meta = {m.key: m.value for m in onnx.load(str(p)).metadata_props}
    assert meta["exporter"] in ("torchscript", "dynamo")
    r = quant.verify_onnx(model, p, np.random.default_rng(1).standard_normal((2, 3, HW, HW)).astype(np.float32))
    assert r["max_abs_diff"] < 1e-4 and r["argmax_agreement"] > 0.999
    assert not list(tmp_path.glob("onnx_export_*")), "temporary export folder left behind"


def test_export_bad_input_hw(tiny, tmp_path):
    with pytest.raises(ValueError, match="input_hw"):
        quant.export_onnx(tiny[0], tmp_path / "x.onnx", (0, 32))


def test_verify_rejects_bad_images(tiny):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        quant.verify_onnx(tiny[0], tiny[1], np.zeros((2, 1, HW, HW), np.float32))


def test_int8_smaller_and_runs_integer_kernels(tiny):
    model, path, calib, val, d = tiny
    q8 = quant.quantize_int8(path, d / "tiny.int8.onnx", calib, method="minmax")
    assert quant.model_size_mb(q8) < 0.5 * quant.model_size_mb(path)
    kc = quant.kernel_counts(q8)
    assert kc["ops"]["QLinearConv"] >= 1 and kc["int8_nodes"] > 0
    assert quant.kernel_counts(path)["int8_nodes"] == 0
    ref, got = quant.ort_predict(path, val), quant.ort_predict(q8, val)
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.5  # INT8 approximates fp32


def test_excluded_nodes_stay_float(tiny):
    _, path, calib, _, d = tiny
    convs = [n for n, op in quant.quantizable_nodes(path) if op == "Conv"]
    keep = convs[0]
    q8 = quant.quantize_int8(path, d / "tiny.excl.onnx", calib, nodes_to_exclude=[keep])
    g = onnx.load(str(q8)).graph
    node = next(n for n in g.node if n.name == keep)
    producers = {o: n.op_type for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    # the excluded conv's weight is a float initializer, not a DequantizeLinear output
    assert node.input[1] in inits and producers.get(node.input[1]) != "DequantizeLinear"
    others = [n for n in g.node if n.op_type == "Conv" and n.name != keep]
    assert all(producers.get(n.input[1]) == "DequantizeLinear" for n in others)


def test_calibration_table_reuse_and_stale(tiny):
    _, path, calib, val, d = tiny
    t1 = quant.calibration_table(path, calib, d / "cal_a.json")
    t2 = quant.calibration_table(path, calib[:1] * 3.0, d / "cal_b.json")
    out, stats = quant.stale_calibration_table(t1, t2, d / "cal_stale.json")
    assert stats["stale"] == stats["tensors"] > 0 and stats["unmatched"] == 0
    q = quant.quantize_int8(path, d / "tiny.cached.onnx", None, calibration_cache=out)
    assert np.isfinite(quant.ort_predict(q, val)).all()
    with pytest.raises(ValueError, match="calib_images"):
        quant.quantize_int8(path, d / "nope.onnx", None)


def test_dynamic_and_fp16(tiny):
    _, path, _, val, d = tiny
    dq = quant.quantize_dynamic_int8(path, d / "tiny.dyn.onnx")
    assert quant.kernel_counts(dq)["int8_nodes"] > 0
    h = quant.convert_fp16(path, d / "tiny.fp16.onnx")
    assert quant.model_size_mb(h) < 0.7 * quant.model_size_mb(path)
    ref, got = quant.ort_predict(path, val), quant.ort_predict(h, val)
    assert got.dtype == np.float32 and np.abs(ref - got).max() < 0.05


def test_profile_ops_times_every_op_type(tiny):
    _, path, _, _, _ = tiny
    df = quant.profile_ops(path, HW, runs=3, warmup=1)
    assert {"node", "op_type", "ms_per_run", "share"} <= set(df.columns)
    assert (df["ms_per_run"] >= 0).all() and abs(df["share"].sum() - 1) < 1e-6
    by = quant.op_time_by_type(df)
    assert by["nodes"].sum() == len(df)


def test_sensitivity_and_selection(tiny):
    _, path, calib, val, d = tiny
    groups = {k: v for k, v in quant.node_groups(path, by="op_type").items() if k in ("Conv", "Softmax")}
    s = quant.node_sensitivity(path, calib, val, groups=groups, timing_runs=3, work_dir=d / "sens")
    assert list(s["group"][:2]) == ["fp32", "int8_all"] and len(s) == 2 + len(groups)
    assert s.loc[0, "argmax_agreement"] == 1.0
    nodes, dec = quant.select_nodes_to_exclude(s)
    assert set(dec["group"]) == set(groups)
    chosen = set(dec.loc[dec["excluded"], "group"])
    assert set(nodes) == {n for g in chosen for n in groups[g]}
    with pytest.raises(ValueError, match="exclude"):
        quant.select_nodes_to_exclude(s.assign(mode="only"))


class _Overflows(nn.Module):
    """Finite in float32 and bfloat16 (8 exponent bits), +-inf in float16 (max 65504)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(x) * 1e6


def test_torch_lowp_runs_bf16_and_leaves_the_model_alone(tiny):
    model = tiny[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m, why = quant.torch_lowp(model, torch.bfloat16, input_hw=32)
    assert why == "" and m is not None
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    x = torch.from_numpy(tiny[3])
    with torch.no_grad():
        out, ref = m(x), model(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape      # fp32 I/O kept
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3      # bf16 keeps ~3 significant digits
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the input model is not modified
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torch_lowp_reports_non_finite_logits():
    torch.manual_seed(0)
    m, why = quant.torch_lowp(_Overflows().eval(), torch.float16, input_hw=8)
    assert m is None and why == "torch.float16 forward produced non-finite logits"
    m, why = quant.torch_lowp(_Overflows().eval(), torch.bfloat16, input_hw=8)
    assert m is not None and why == ""


def test_tensorrt_skip_message(tiny):
    ok, why = quant.trt_available()
    if ok:
        pytest.skip("TensorRT and CUDA present: the skip path does not apply")
    with pytest.raises(quant.QuantUnavailable, match="tensorrt is not installed|no CUDA device"):
        quant.build_tensorrt_engine(tiny[1], "int8", calib_images=tiny[2])


def test_tensorrt_rejects_bad_arguments(tiny):
    if not quant.trt_available()[0]:
        pytest.skip("TensorRT or CUDA absent: availability is checked first (test_tensorrt_skip_message)")
    with pytest.raises(ValueError, match="precision"):
        quant.build_tensorrt_engine(tiny[1], "int4")
    with pytest.raises(ValueError, match="calib_images"):
        quant.build_tensorrt_engine(tiny[1], "int8")


# --------------------------------------------------------------------------- timers (study.bench.time_callable)

class _FakeSession:
    """Stands in for an ORT session and records each run in a shared log."""

    def __init__(self, tag, log):
        self.tag, self.log = tag, log

    def get_inputs(self):
        return [SimpleNamespace(name="image")]

    def run(self, _outputs, feed):
        assert list(feed) == ["image"] and feed["image"].shape == (1, 3, 16, 24)
        self.log.append(self.tag)
        return [feed["image"]]


@pytest.fixture
def fake_sessions(monkeypatch):
    log = []
    opened = []

    def fake(path, threads, **kw):
        opened.append((str(path), threads))
        return _FakeSession(str(path), log)

    monkeypatch.setattr(quant, "ort_session", fake)
    return log, opened


def test_latency_ms_runs_warmup_then_runs(fake_sessions):
    log, opened = fake_sessions
    ms = quant.latency_ms("a.onnx", (16, 24), runs=7, warmup=3)
    assert log == ["a.onnx"] * 10 and opened == [("a.onnx", quant.DEFAULT_THREADS)]
    assert np.isfinite(ms) and ms >= 0


def test_paired_latency_interleaves_a_and_b(fake_sessions):
    log, opened = fake_sessions
    ref_ms, ms = quant.paired_latency_ms("ref.onnx", "b.onnx", (16, 24), runs=4, warmup=2, threads=3)
    assert log == ["ref.onnx", "b.onnx"] * 6                        # 2 warm-up + 4 timed pairs, A/B/A/B
    assert opened == [("ref.onnx", 3), ("b.onnx", 3)]
    assert np.isfinite(ref_ms) and np.isfinite(ms) and ref_ms >= 0 and ms >= 0


def test_paired_latency_medians_belong_to_their_model(monkeypatch, fake_sessions):
    # time_callable's latencies alternate A, B: give A 1 ms and B 5 ms and check which is which
    def fake_timer(fn, warmup_s, min_s, min_runs, warmup_runs):
        assert warmup_s == 0 and min_s == 0 and min_runs == 2 * 5 and warmup_runs == 2 * 1
        return {"latencies_s": [1e-3, 5e-3] * 5, "warmup_runs": warmup_runs, "warmup_s": 0.0, "measure_s": 0.0}

    monkeypatch.setattr(quant, "time_callable", fake_timer)
    assert quant.paired_latency_ms("ref.onnx", "b.onnx", (16, 24), runs=5, warmup=1) == pytest.approx((1.0, 5.0))


def test_real_session_timers_and_missing_file(tiny, tmp_path):
    _, path, _, _, _ = tiny
    assert quant.latency_ms(path, HW, runs=2, warmup=1) > 0
    a, b = quant.paired_latency_ms(path, path, HW, runs=2, warmup=1)
    assert a > 0 and b > 0
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        quant.ort_predict(tmp_path / "nope.onnx", tiny[3])


# --------------------------------------------------------------------------- scores

def test_onnx_scores_are_the_scores_of_the_onnx_logits(tiny):
    _, path, _, val, _ = tiny
    logits = quant.ort_predict(path, val)
    masks = np.random.default_rng(2).integers(0, NUM_CLASSES, (len(val), HW, HW))
    masks[:, :4] = 255  # ignored
    s = quant.onnx_scores(path, val, masks)
    ref = quant.scores_from_logits(logits, masks)
    assert s["miou"] == ref["miou"] and s["mdice"] == ref["mdice"]
    perfect = quant.onnx_scores(path, val, np.where(masks == 255, 255, logits.argmax(1)))
    assert perfect["miou"] == 1.0 and perfect["pixel_acc"] == 1.0
    with pytest.raises(ValueError):
        quant.onnx_scores(path, val, masks[:, :8])


# --------------------------------------------------------------------------- section module (no training)

def test_section_split_arrays_normalises_and_offsets(tmp_path):
    root = tmp_path / "data"
    D.write_dataset(root, n_train=3, n_val=2, size=32, seed=0, workers=1)
    ctx = SimpleNamespace(profile=SimpleNamespace(image_size=16), data_root=root)
    x, y = sec.split_arrays(ctx, "train")
    assert x.shape == (3, 3, 16, 16) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    assert y.shape == (3, 16, 16) and y.dtype == np.int64
    raw, masks = D.load_split_arrays(root, "train", 16)
    mean, std = np.asarray(D.IMAGENET_MEAN, np.float32), np.asarray(D.IMAGENET_STD, np.float32)
    np.testing.assert_allclose(x[1].transpose(1, 2, 0), (raw[1] / 255.0 - mean) / std, rtol=1e-6, atol=1e-6)
    x2, y2 = sec.split_arrays(ctx, "train", limit=1, offset=1)
    assert np.array_equal(x2, x[1:2]) and np.array_equal(y2, y[1:2])


def test_section_calibration_sizes():
    assert sec.calibration_sizes(32) == [1, 4, 16, 32]
    assert sec.calibration_sizes(4) == [1, 2, 4]
    assert sec.calibration_sizes(1) == [1]
