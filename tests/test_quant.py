"""Tests of study.quant: export fidelity, INT8 recipes, calibration set, exclusions, kernel counts,
op-time categories, timers, TensorRT skip; and the section's pure helpers.

A tiny conv + attention segmenter (PSP bins that do not divide the feature map, SiLU,
LayerNorm, Softmax, MatMul) stands in for the zoo so the whole file runs in seconds.
"""
from types import SimpleNamespace

import numpy as np
import onnx
import pandas as pd
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
                                  nn.Conv2d(32, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.SiLU())
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
    s = quant.node_sensitivity(path, calib, val, groups=groups, work_dir=d / "sens")
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


# --------------------------------------------------------------------------- no timers outside the protocol

def test_quant_times_nothing_itself():
    # every latency of the study comes from study.bench.compare_latency (issue #15)
    assert not hasattr(quant, "latency_ms") and not hasattr(quant, "paired_latency_ms")


def test_ort_predict_missing_file(tiny, tmp_path):
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
    D.write_dataset(root, n_train=3, n_val=2, size=32, seed=0, workers=1, n_test=2)
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


# --------------------------------------------------------------------------- INT8 recipes (issue #15)

def _agreement(a, b):
    return float((a.argmax(1) == b.argmax(1)).mean())


@pytest.fixture(scope="module")
def recipes_built(tiny):
    _, path, calib, val, d = tiny
    out = {}
    for name, r in quant.INT8_RECIPES.items():
        out[name] = quant.quantize_recipe(path, d / f"tiny.{name}.onnx", r, calib, table_dir=d / "tables")
    return out


@pytest.mark.parametrize("name", list(quant.INT8_RECIPES))
def test_every_recipe_is_a_valid_int8_model_close_to_fp32(tiny, recipes_built, name):
    _, path, _, val, _ = tiny
    q = recipes_built[name]
    onnx.checker.check_model(str(q))
    ref, got = quant.ort_predict(path, val), quant.ort_predict(q, val)
    assert got.shape == ref.shape and got.dtype == np.float32 and np.isfinite(got).all()
    assert quant._sqnr_db(ref, got) > 10.0          # logits within ~30 % RMS of fp32 (random tiny weights)
    assert _agreement(ref, got) > 0.6
    kc = quant.kernel_counts(q)
    assert kc["int8_nodes"] + kc["qdq_nodes"] > 0     # something is integer
    assert kc["leftover_nodes"] == kc["q_nodes"] + kc["dq_nodes"] + kc["transpose_nodes"]


def test_recipes_cite_the_ort_docs_and_differ():
    rs = list(quant.INT8_RECIPES.values())
    assert len({r.name for r in rs}) == len(rs)
    assert all(r.doc and r.graph_prep in quant.GRAPH_PREPS for r in rs)
    assert len({(r.graph_prep, r.quant_format, r.activation_type, r.per_channel, r.op_types_to_quantize,
                 r.float_op_types) for r in rs}) == len(rs)
    assert quant.INT8_RECIPES["qdq_s8s8_pc"].kwargs()["activation_symmetric"] is True
    assert quant.INT8_RECIPES["qdq_u8s8_pc"].kwargs()["activation_symmetric"] is False


def _wrapped(graph_path, op_type):
    """(input from DequantizeLinear, output into QuantizeLinear) for every node of op_type."""
    g = onnx.load(str(graph_path)).graph
    prod = {o: n.op_type for n in g.node for o in n.output}
    cons = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n.op_type)
    return [(prod.get(n.input[0]) == "DequantizeLinear", "QuantizeLinear" in cons.get(n.output[0], []))
            for n in g.node if n.op_type == op_type]


def test_mac_only_leaves_softmax_and_layernorm_without_qdq(recipes_built):
    mac = recipes_built["qdq_mac_constb"]          # Conv/MatMul/Gemm, attention MatMuls float
    for op in ("Softmax", "LayerNormalization"):
        w = _wrapped(mac, op)
        assert w and not any(dq or q for dq, q in w), (op, w)
    ops = quant.kernel_counts(mac)["ops"]
    assert ops["QLinearSoftmax"] == 0 and ops["Softmax"] >= 1 and ops["LayerNormalization"] >= 1
    assert ops["QLinearConv"] >= 1                  # the MACs are still integer
    # op_types_to_quantize alone: Softmax / LayerNorm get no Q/DQ on their inputs
    for op in ("Softmax", "LayerNormalization"):
        assert not any(dq for dq, _ in _wrapped(recipes_built["qdq_mac_only"], op))
    # the control: quantizing all ops wraps Softmax (so the test above can fail)
    assert any(dq and q for dq, q in _wrapped(recipes_built["qdq_u8s8_pc"], "Softmax"))


def test_float_silu_softmax_ln_runs_them_in_float(tiny, recipes_built):
    q = recipes_built["qdq_float_silu_softmax_ln"]
    pre = quant.prepare_graph(tiny[1])
    names = quant.float_nodes(pre, ["SiLU", "Softmax", "LayerNorm"])
    g = onnx.load(str(q)).graph
    by_name = {n.name: n.op_type for n in g.node}
    assert names and all(by_name.get(n) in ("Sigmoid", "Mul", "Softmax", "LayerNormalization") for n in names)
    ops = quant.kernel_counts(q)["ops"]
    assert ops["QLinearSigmoid"] == 0 and ops["QLinearSoftmax"] == 0 and ops["QLinearConv"] >= 1
    assert not any(dq and q for dq, q in _wrapped(q, "Softmax"))  # no DQ -> Softmax -> Q sandwich left
    full = quant.kernel_counts(recipes_built["qdq_u8s8_pc"])["ops"]
    assert full["QLinearSigmoid"] >= 1 and full["QLinearSoftmax"] >= 1   # the default recipe quantizes them


def test_float_nodes_patterns(tiny):
    pre = quant.prepare_graph(tiny[1])
    g = onnx.load(str(pre)).graph
    ops = {n.name: n.op_type for n in g.node}
    silu = quant.float_nodes(pre, ["SiLU"])
    assert sorted(ops[n] for n in silu) == ["Mul", "Sigmoid"]        # one SiLU in the tiny model
    act = quant.float_nodes(pre, ["ActMatMul"])
    assert len(act) == 2 and all(ops[n] == "MatMul" for n in act)   # q@k^T and attn@v, not the Linear layers
    assert quant.float_nodes(pre, []) == []
    assert quant.float_nodes(pre, ["Softmax"]) == sorted(n for n, o in ops.items() if o == "Softmax")
    assert quant.float_nodes(pre, ["SiLU"]) == silu                  # deterministic


@pytest.mark.parametrize("how", quant.GRAPH_PREPS)
def test_prepare_graph_modes_give_equivalent_float_graphs(tiny, how):
    _, path, _, val, _ = tiny
    g = quant.prepare_graph(path, how)
    assert g.is_file() and (g == path) == (how == "none")
    np.testing.assert_allclose(quant.ort_predict(g, val), quant.ort_predict(path, val), atol=1e-4)
    assert quant.prepare_graph(path, how) == g                       # reused
    with pytest.raises(ValueError, match="how must be one of"):
        quant.prepare_graph(path, "bogus")


def test_calibration_set_is_a_checked_copy():
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    c = quant.calibration_set(x, 3, input_hw=8)
    assert c.shape == (3, 3, 8, 8) and np.array_equal(c, x[:3]) and not np.shares_memory(c, x)
    assert np.array_equal(quant.calibration_set(x, 3), c)
    assert quant.calibration_fingerprint(c) == quant.calibration_fingerprint(x[:3].copy())
    assert quant.calibration_fingerprint(c) != quant.calibration_fingerprint(x[1:4])
    with pytest.raises(ValueError, match="requested"):
        quant.calibration_set(x, 6)
    with pytest.raises(ValueError, match="export size"):
        quant.calibration_set(x, 2, input_hw=16)
    with pytest.raises(ValueError, match=">= 1"):
        quant.calibration_set(x, 0)


def test_section_calibration_images_identical_across_calls(tmp_path):
    root = tmp_path / "data"
    D.write_dataset(root, n_train=6, n_val=2, size=32, seed=0, workers=1)
    ctx = SimpleNamespace(profile=SimpleNamespace(image_size=16, calib_images=4, n_val=2), data_root=root)
    a, b = sec.calibration_images(ctx), sec.calibration_images(ctx)
    assert a.shape == (4, 3, 16, 16) and a.dtype == np.float32 and np.array_equal(a, b)
    train_x, _ = sec.split_arrays(ctx, "train")
    assert np.array_equal(a, train_x[:4])                            # the first train images, export size
    assert np.array_equal(sec.calibration_images(ctx, 2), a[:2])
    ev, _ = sec.eval_arrays(ctx)
    assert not any(np.array_equal(e, c) for e in ev for c in a)      # never the evaluation images
    with pytest.raises(ValueError, match="requested"):
        sec.calibration_images(ctx, 7)
    with pytest.raises(ValueError, match="calibration images"):
        sec.eval_arrays(ctx, "train")
    s = sec.sensitivity_images(ctx, 2)
    assert np.array_equal(s, train_x[4:6])                          # after the calibration set


def test_quantize_recipe_shares_one_table_per_graph_and_images(tiny, tmp_path):
    _, path, calib, _, _ = tiny
    quant.quantize_recipe(path, tmp_path / "a.onnx", "qdq_u8s8_pc", calib, table_dir=tmp_path)
    quant.quantize_recipe(path, tmp_path / "b.onnx", "qdq_u8s8_pt", calib, table_dir=tmp_path)
    assert len(list(tmp_path.glob("*.calib.minmax.*.json"))) == 1
    quant.quantize_recipe(path, tmp_path / "c.onnx", "qdq_u8s8_pc", calib[:2], table_dir=tmp_path)
    assert len(list(tmp_path.glob("*.calib.minmax.*.json"))) == 2   # other images, other table
    with pytest.raises(KeyError):
        quant.quantize_recipe(path, tmp_path / "d.onnx", "nope", calib)


def test_selection_by_accuracy_is_deterministic(tiny):
    _, path, calib, val, d = tiny
    groups = quant.node_groups(path, by="pattern")
    assert "SiLU" in groups and "Sigmoid" not in groups
    runs = [quant.node_sensitivity(path, calib, val, groups=groups, work_dir=d / f"det{i}", threads=1) for i in range(2)]
    assert not any("latency" in c for c in runs[0].columns)            # accuracy only, no timing
    picks = [quant.select_nodes_to_exclude(s) for s in runs]
    assert picks[0][0] == picks[1][0]
    assert picks[0][1]["excluded"].tolist() == picks[1][1]["excluded"].tolist()


def test_op_time_categories_and_amdahl(tiny):
    _, path, calib, _, d = tiny
    q = quant.quantize_int8(path, d / "cat.int8.onnx", calib)
    for p, mac in ((path, "Conv/MatMul/Gemm float"), (q, "Conv/MatMul/Gemm int8")):
        nodes = quant.profile_ops(p, HW, runs=2, warmup=1)
        cat = quant.op_time_categories(nodes)
        assert list(cat["category"]) == list(quant.OP_CATEGORIES) + ["other float", "other int8"]
        assert cat["nodes"].sum() == len(nodes) and abs(cat["share"].sum() - 1) < 1e-9
        assert cat.set_index("category").loc[mac, "nodes"] >= 1
    assert quant.op_category("QLinearConv") == "Conv/MatMul/Gemm int8"
    assert quant.op_category("DequantizeLinear") == "Q/DQ"
    assert quant.op_category("QLinearSigmoid") == "other int8" and quant.op_category("QuickGelu") == "other float"
    assert quant.amdahl_bound(0.5, 2.0) == pytest.approx(1 / 0.75)
    assert quant.amdahl_bound(0.0, 10.0) == 1.0
    with pytest.raises(ValueError):
        quant.amdahl_bound(1.5, 2.0)


# --------------------------------------------------------------------------- section: pairing and verdicts

def _lat_row(name, rounds, threads=2):
    arr = np.asarray(rounds, float)
    return {"name": name, "runtime": "ort", "threads": threads, "rounds": len(arr), "latency_ms_p50": float(np.median(arr)),
            "latency_ms_p50_ci95_low": float(arr.min()), "latency_ms_p50_ci95_high": float(arr.max()),
            "latency_ms_p90": float(arr.max()), "latency_ms_p99": float(arr.max()), "fps": 1000 / float(np.median(arr)),
            "cv_p50": float(arr.std() / arr.mean()), "peak_rss_mb": 100.0, "load_s": 0.1, "runs": 10 * len(arr),
            "round_p50s_ms": ";".join(f"{v:.4f}" for v in arr), "input_hw": "48x48", "batch": 1, "error": ""}


def test_paired_speedup_pairs_rounds():
    ref = _lat_row("fp32", [10, 20, 10, 20, 10])
    row = _lat_row("int8", [5, 10, 5, 10, 5])        # always 2x faster in the same round
    sp, lo, hi = sec.paired_speedup(ref, row)
    assert sp == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    # paired by round, not a ratio of medians: ratios 0.67, 2, 2 -> 2 (the medians give 20 / 15)
    sp2, lo2, hi2 = sec.paired_speedup(_lat_row("a", [10, 20, 30]), _lat_row("b", [15, 10, 15]))
    assert sp2 == pytest.approx(2.0) and lo2 == pytest.approx(2 / 3) and hi2 == pytest.approx(2.0)
    assert all(np.isnan(v) for v in sec.paired_speedup(ref, _lat_row("y", [5, 5])))


def test_measure_variants_groups_and_verdicts(tiny, monkeypatch, tmp_path):
    _, path, calib, val, d = tiny
    q = quant.quantize_int8(path, d / "mv.int8.onnx", calib)
    masks = np.random.default_rng(0).integers(0, NUM_CLASSES, (len(val), HW, HW))
    seen = {}

    def fake_compare(items, input_hw, **kw):
        seen.update(items=list(items), **kw)
        return pd.DataFrame([_lat_row("ORT fp32", [10, 11, 10], kw["threads"]),
                             _lat_row("int8", [5, 5.5, 5], kw["threads"])])

    monkeypatch.setattr(sec.bench, "compare_latency", fake_compare)
    # the selection (val) images: here the same images with other labels, so val and test scores differ
    val_masks = (masks + 1) % NUM_CLASSES
    monkeypatch.setattr(sec, "selection_arrays", lambda ctx: (val, val_masks))
    monkeypatch.setattr(sec, "model_budgets", lambda ctx: {sec.MAIN: 6})
    ctx = SimpleNamespace(profile=SimpleNamespace(name="smoke", image_size=HW, crop_size=HW, pretrained=False,
                                                  bench_warmup_s=0.05, bench_min_s=0.1, bench_min_runs=5,
                                                  batch_size=4, extra={}))
    variants = {"int8": (q, "int8", "minmax", 4, "qdq_u8s8_pc"), sec.FP32: (path, "fp32", "-", 0, "")}
    rows = sec.measure_variants(ctx, sec.MAIN, variants, val, masks, {"params_m": 0.1, "gmacs": 0.01}, n_threads=1)
    assert seen["items"] == [sec.FP32, "int8"] and seen["threads"] == 1 and seen["errors"] == "record"
    df, per_class = sec.results_table(rows)
    r = df.set_index("method")
    assert r.loc["int8", "speedup_vs_ort_fp32"] == pytest.approx(2.0)
    assert r.loc["int8", "latency_verdict_vs_fp32"] == "faster" and r.loc[sec.FP32, "latency_verdict_vs_fp32"] == "reference"
    assert r.loc["int8", "threads"] == 1 and r.loc["int8", "group"] == "recipes" and r.loc["int8", "eval_split"] == "test"
    assert r.loc["int8", "split"] == "test" and r.loc["int8", "train_steps"] == 6 and r.loc["int8", "train_images"] == 24
    assert r.loc["int8", "val_miou"] == pytest.approx(quant.onnx_scores(q, val, val_masks, 1)["miou"])
    assert r.loc[sec.FP32, "d_miou_vs_fp32"] == 0.0 and per_class.shape == (2, NUM_CLASSES)
    assert r.loc["int8", "q_nodes"] >= 1 and r.loc[sec.FP32, "q_nodes"] == 0
    s = sec.recipe_summary(df, sec.MAIN)
    w = sec.winner(s)
    assert w.recipe == "qdq_u8s8_pc"
    ok = w.d_val_miou_points >= -1.0 and w.speedup_vs_ort_fp32 >= sec.SPEEDUP_TARGET  # checked on val, not test
    assert bool(s.set_index("recipe").loc["qdq_u8s8_pc", "meets_budget"]) == ok
    with pytest.raises(KeyError):
        sec.measure_variants(ctx, sec.MAIN, {"int8": variants["int8"]}, val, masks, {})


def test_section_calibration_sweeps(tiny, tmp_path):
    _, path, calib, val, _ = tiny
    masks = np.random.default_rng(3).integers(0, NUM_CLASSES, (len(val), HW, HW))
    size = sec.calibration_size_sweep(path, calib, val, masks, tmp_path)
    assert list(size["calib_images"]) == sec.calibration_sizes(len(calib))
    meth = sec.calibration_method_sweep(path, calib, val, masks, tmp_path, methods=("minmax", "percentile"))
    assert list(meth["calibration"]) == ["minmax", "percentile"] and meth["miou"].between(0, 1).all()
    # the MinMax row of the method sweep is the full-size row of the size sweep (same set, same table)
    assert meth["miou"].iloc[0] == pytest.approx(size["miou"].iloc[-1])


def _summary_df(speedups, dmious, model=sec.MAIN):
    rows = [{"model": model, "group": "recipes", "method": sec.FP32, "recipe": "", "runtime": "ort", "miou": 0.5,
             "latency_ms_p50": 10.0, "latency_ms_p50_ci95_low": 9.5, "latency_ms_p50_ci95_high": 10.5,
             "speedup_vs_ort_fp32": 1.0, "speedup_ci95_low": 1.0, "speedup_ci95_high": 1.0,
             "latency_verdict_vs_fp32": "reference", "q_nodes": 0, "dq_nodes": 0, "transpose_nodes": 4,
             "leftover_nodes": 4, "int8_nodes": 0, "threads": 2, "rounds": 5}]
    for i, (sp, dm) in enumerate(zip(speedups, dmious)):
        rows.append({**rows[0], "method": f"r{i}", "recipe": f"r{i}", "miou": 0.5 + dm, "latency_ms_p50": 10 / sp,
                     "latency_ms_p50_ci95_low": 0.95 * 10 / sp, "latency_ms_p50_ci95_high": 1.05 * 10 / sp,
                     "speedup_vs_ort_fp32": sp, "speedup_ci95_low": sp - 0.1, "speedup_ci95_high": sp + 0.1,
                     "latency_verdict_vs_fp32": "faster", "leftover_nodes": 50})
    return pd.DataFrame(rows)


def test_winner_respects_the_miou_budget_and_verdict_says_why():
    df = _summary_df([2.0, 1.6, 1.2], [-0.02, -0.005, 0.0])          # the fastest loses 2 points
    s = sec.recipe_summary(df, sec.MAIN)
    assert sec.winner(s).recipe == "r1"
    assert s.set_index("recipe")["meets_budget"].to_dict() == {"r0": False, "r1": True, "r2": False, "": False}
    lines = sec.verdict(pd.concat([df, _summary_df([1.3], [0.0], sec.RESNET)]), sec.MAIN, sec.RESNET)
    assert any("r1" in l and "1.60x" in l for l in lines) and any("-> met" in l for l in lines)
    assert any(sec.RESNET in l and "NOT met" in l and "1.30x" in l and "lies below" in l for l in lines)
    # r0 (2.0x: 4.75-5.25 ms) overlaps r1 (1.6x: 5.94-6.56 ms)? no; r2 (1.2x) neither -> no tie line
    assert not any("not distinguishable" in l for l in lines)
    tie = _summary_df([1.6, 1.55], [0.0, 0.0])
    assert any("not distinguishable from r0" in l and "r1" in l for l in sec.verdict(tie, sec.MAIN, sec.MAIN))
    assert sec.winner(sec.recipe_summary(_summary_df([2.0], [-0.05]), sec.MAIN)) is None


def test_warm_run_reads_scores_sensitivity_and_sweeps_from_the_cache(tiny, tmp_path, monkeypatch):
    """Issue #13: a warm run of notebook 05 re-runs no ORT evaluation, no sensitivity scan and no
    quantization; the cached values equal a fresh computation (arrays included)."""
    from study.cache import ArtifactCache

    _, path, calib, val, _ = tiny
    masks = np.random.default_rng(5).integers(0, NUM_CLASSES, (len(val), HW, HW))
    ctx = SimpleNamespace(cache=ArtifactCache(tmp_path / "cache"))
    groups = {k: v for k, v in quant.node_groups(path, by="op_type").items() if k in ("Conv", "Softmax")}
    first = sec.scores(ctx, path, val, masks)
    sens1 = sec.sensitivity(ctx, path, calib, val, groups, tmp_path / "sens")
    sweep1 = sec.calibration_size_sweep(path, calib, val, masks, tmp_path / "a", ctx=ctx)
    fp16 = sec.derived_model(ctx, "fp16", path, tmp_path / "a" / "m.fp16.onnx")
    calls = []
    for fn in ("onnx_scores", "node_sensitivity", "quantize_recipe", "convert_fp16"):
        monkeypatch.setattr(sec.quant, fn, lambda *a, fn=fn, **k: calls.append(fn))
    again = sec.scores(ctx, path, val, masks)
    sens2 = sec.sensitivity(ctx, path, calib, val, groups, tmp_path / "sens")
    sweep2 = sec.calibration_size_sweep(path, calib, val, masks, tmp_path / "b", ctx=ctx)
    fp16b = sec.derived_model(ctx, "fp16", path, tmp_path / "b" / "m.fp16.onnx")
    assert calls == []
    monkeypatch.undo()
    ref = quant.onnx_scores(path, val, masks, sec.threads())
    assert again["miou"] == first["miou"] == ref["miou"]
    np.testing.assert_array_equal(again["confusion"], ref["confusion"])
    np.testing.assert_array_equal(again["per_class_iou"], ref["per_class_iou"])
    pd.testing.assert_frame_equal(sens1, sens2)
    pd.testing.assert_frame_equal(sweep1, sweep2)
    assert fp16b.read_bytes() == fp16.read_bytes()
    # other masks are another entry, and bad input names the parameter at fault
    other = sec.scores(ctx, path, val, (masks + 1) % NUM_CLASSES)
    assert other["miou"] == pytest.approx(quant.onnx_scores(path, val, (masks + 1) % NUM_CLASSES, 1)["miou"])
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        sec.scores(ctx, tmp_path / "missing.onnx", val, masks)
    with pytest.raises(ValueError, match="kind"):
        sec.derived_model(ctx, "int4", path, tmp_path / "x.onnx")


def _float_outputs_mb(graph_path, image):
    """Independent count: expose every node output of the graph and sum the float bytes ORT returns."""
    m = onnx.load(str(graph_path))
    have = {o.name for o in m.graph.output}
    for n in m.graph.node:
        for o in n.output:
            if o and o not in have:
                m.graph.output.append(onnx.helper.make_empty_tensor_value_info(o))
                have.add(o)
    import onnxruntime as ort
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {quant.INPUT_NAME: image})
    return sum(a.nbytes for a in outs if a.dtype in (np.float32, np.float16)) / 2**20


def test_activation_mb_equals_the_bytes_ort_computes(tiny):
    _, path, calib, _, _ = tiny
    pre = quant.prepare_graph(path, "quant_pre_process")
    assert quant.activation_mb(pre) == pytest.approx(_float_outputs_mb(pre, calib[:1]), rel=1e-6)


def test_calibration_chunk_rule(tiny):
    _, path, _, _, _ = tiny
    pre = quant.prepare_graph(path, "quant_pre_process")
    per = quant.activation_mb(pre)
    assert quant.calibration_chunk(pre, 6, "minmax", max_mb=per / 10) == 6          # MinMax: reductions only
    assert quant.calibration_chunk(pre, 6, "entropy", max_mb=4.5 * per) == 3        # largest divisor <= 4
    assert quant.calibration_chunk(pre, 7, "percentile", max_mb=4.5 * per) == 1     # prime: one image a pass
    assert quant.calibration_chunk(pre, 6, "entropy", max_mb=per / 10) == 1         # at least one image
    assert quant.calibration_chunk(pre, 6, "entropy", max_mb=100 * per) == 6
    for bad in ({"n_images": 0}, {"max_mb": 0.0}, {"method": "kl"}):
        with pytest.raises(ValueError):
            quant.calibration_chunk(pre, **{"n_images": 4, "method": "entropy", "max_mb": per, **bad})


def test_histogram_calibration_reads_the_images_in_passes(tiny, tmp_path, monkeypatch, capsys):
    """Issue #17's OOM: Entropy / Percentile hold every tensor of a pass; passes bound that."""
    _, path, calib, val, _ = tiny
    pre = quant.prepare_graph(path, "quant_pre_process")
    per = quant.activation_mb(pre)
    passes = []
    real = quant.create_calibrator

    def spy(*a, **k):
        cal = real(*a, **k)
        collect = cal.collect_data

        def counted(reader):
            passes.append(min(reader.end, len(reader)) - reader.start)
            return collect(reader)
        cal.collect_data = counted
        return cal
    monkeypatch.setattr(quant, "create_calibrator", spy)
    chunked = quant.calibration_table(path, calib, tmp_path / "e2.json", method="entropy", max_mb=2.5 * per)
    assert passes == [2, 2]
    assert "histogram" not in capsys.readouterr().out          # ORT's per-pass prints do not reach the notebook
    passes.clear()
    whole = quant.calibration_table(path, calib, tmp_path / "e4.json", method="entropy")
    assert passes == [4]
    passes.clear()
    quant.calibration_table(path, calib, tmp_path / "m.json", method="minmax", max_mb=per / 10)
    assert passes == [4]                                          # MinMax never needs passes
    a, b = quant.load_tensors_data(chunked).data, quant.load_tensors_data(whole).data
    assert set(a) == set(b) and len(a) > 10

    # quantize_static calibrating itself gets the same passes through CalibStridedMinMax
    seen = {}
    real_qs = quant.ortq.quantize_static

    def qs(*a, **k):
        seen.update(k["extra_options"])
        return real_qs(*a, **k)
    monkeypatch.setattr(quant.ortq, "quantize_static", qs)
    q = quant.quantize_int8(path, tmp_path / "e.int8.onnx", calib, method="entropy", max_mb=2.5 * per)
    assert seen["CalibStridedMinMax"] == 2 and np.isfinite(quant.ort_predict(q, val)).all()
    seen.clear()
    quant.quantize_int8(path, tmp_path / "m.int8.onnx", calib, method="minmax", max_mb=2.5 * per)
    assert "CalibStridedMinMax" not in seen
