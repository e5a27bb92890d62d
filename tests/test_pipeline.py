"""Section ``pipeline`` (notebook 08): KD student -> structured pruning -> KD recovery -> export -> measure.

The section functions run on a tiny ``smoke`` context (its own build folder): pruned
variants really have fewer MACs, the recovery is cached, the rows carry the required
columns, and speed-up / mIoU change are computed against the dense row.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from study import BASE_COLUMNS, NUM_CLASSES, metrics, models
from study.context import setup
from study.sections import pipeline as sec


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A smoke context with the KD student, the teacher and the evaluation / calibration arrays."""
    ctx = setup(profile="smoke", build_dir=str(tmp_path_factory.mktemp("pipeline-build")))
    student, rec = sec.start_student(ctx)
    teacher, _ = sec.teacher(ctx)
    vx, vy = sec.eval_arrays(ctx)
    cx = sec.calibration_images(ctx, 2)
    return {"ctx": ctx, "student": student, "rec": rec, "teacher": teacher, "vx": vx, "vy": vy, "cx": cx}


@pytest.fixture(scope="module")
def chain(smoke):
    """The first MACs target of the smoke plan, pruned and recovered with KD."""
    ctx = smoke["ctx"]
    f = sec.plan(ctx.profile).macs_fractions[0]
    s, g = sec.sparsity_for_target(ctx, smoke["student"], f)
    model, info = sec.pruned_recovered(ctx, smoke["student"], smoke["teacher"], smoke["rec"], sparsity=s, fraction=f,
                                       importance="magnitude", steps=2, eval_x=smoke["vx"], eval_y=smoke["vy"])
    return {"fraction": f, "sparsity": s, "gmacs": g, "model": model, "info": info}


def test_plan_targets_are_fractions_of_dense():
    for name in ("smoke", "cpu", "paper"):
        from study.profiles import get_profile
        p = sec.plan(get_profile(name, data_root="x", has_gpu=True))
        assert len(p.macs_fractions) >= 2 and all(0 < f < 1 for f in p.macs_fractions)
        assert list(p.macs_fractions) == sorted(p.macs_fractions, reverse=True)
        assert p.precisions == ("fp32", "fp16", "int8")
        assert set(p.control_fractions) <= set(p.macs_fractions) and p.control_fractions
        assert p.round_to == sec.ALIGN_CHANNELS and p.rounds >= 2


def test_sparsity_for_macs_meets_the_target_and_rejects_bad_targets():
    m = models.create_model("upernet_mobilevit_s").eval()
    hw = (64, 64)
    dense = models.gmacs(m, hw)
    s, g = sec.sparsity_for_macs(m, hw, 0.4 * dense, rel_tol=0.05)
    assert 0 < s < sec.MAX_SPARSITY
    assert abs(g / (0.4 * dense) - 1) <= 0.05, (s, g, dense)
    assert models.gmacs(m, hw) == pytest.approx(dense)          # the model itself is untouched
    with pytest.raises(ValueError, match="target_gmacs"):
        sec.sparsity_for_macs(m, hw, 1.5 * dense)
    with pytest.raises(ValueError, match="target_gmacs"):
        sec.sparsity_for_macs(m, hw, 0.0)


def test_pruned_variant_has_fewer_macs_and_is_cached(smoke, chain):
    ctx, hw = smoke["ctx"], sec.input_hw(smoke["ctx"])
    dense = models.gmacs(smoke["student"], hw)
    assert models.gmacs(chain["model"], hw) == pytest.approx(chain["gmacs"], rel=1e-6)
    assert chain["gmacs"] < 0.75 * dense
    assert abs(chain["gmacs"] / (chain["fraction"] * dense) - 1) <= 0.05
    info = chain["info"]
    n = len(smoke["vx"])
    assert info["cms_after_prune"].shape == info["cms_after_recovery"].shape == (n, NUM_CLASSES, NUM_CLASSES)
    assert info["miou_after_recovery"] == pytest.approx(metrics.miou_from_confusion(info["cms_after_recovery"].sum(0)))
    assert info["train_steps"] == 2 and info["train_images"] == 2 * ctx.profile.batch_size
    assert info["kd"]["method"] != "none" and info["round_to"] == sec.ALIGN_CHANNELS
    # aligned widths: every pruned conv keeps a multiple of ALIGN_CHANNELS output channels
    convs = {n: m.out_channels for n, m in chain["model"].named_modules() if isinstance(m, torch.nn.Conv2d)}
    dense_convs = {n: m.out_channels for n, m in smoke["student"].named_modules() if isinstance(m, torch.nn.Conv2d)}
    shrunk = {n: c for n, c in convs.items() if c < dense_convs[n]}
    assert shrunk and all(c % sec.ALIGN_CHANNELS == 0 for c in shrunk.values()), shrunk
    # second call: a cache hit rebuilds the same pruned model
    again, info2 = sec.pruned_recovered(ctx, smoke["student"], smoke["teacher"], smoke["rec"], sparsity=chain["sparsity"],
                                        fraction=chain["fraction"], importance="magnitude", steps=2,
                                        eval_x=smoke["vx"], eval_y=smoke["vy"])
    assert again is not chain["model"]
    assert models.model_fingerprint(again) == models.model_fingerprint(chain["model"])
    np.testing.assert_array_equal(info2["cms_after_recovery"], info["cms_after_recovery"])
    with pytest.raises(ValueError, match="teacher"):
        sec.pruned_recovered(ctx, smoke["student"], None, smoke["rec"], sparsity=0.3, fraction=0.5,
                             importance="magnitude", steps=1, eval_x=smoke["vx"], eval_y=smoke["vy"])


def test_recovery_kd_config_keeps_the_logit_term():
    assert sec.recovery_kd_config({"kd": {"method": "kl+feat", "temperature": 4.0, "kd_weight": 2.0,
                                          "feat_weight": 1.0}}).__dict__ == \
        {"method": "kl", "temperature": 4.0, "kd_weight": 2.0, "feat_weight": 0.0}
    assert sec.recovery_kd_config({"kd": {"method": "none", "temperature": 1.0, "kd_weight": 0.0,
                                          "feat_weight": 0.0}}).method == "kl"


def test_pruning_choice_reads_notebook_02s_table(smoke, tmp_path):
    ctx = smoke["ctx"]
    assert sec.pruning_choice(ctx)["importance"] == "magnitude"          # no table: the fallback
    csv = ctx.out_dir / "tables" / "structured_pruning.csv"
    pd.DataFrame({"model": [sec.STUDENT] * 4, "method": ["structured_magnitude"] * 2 + ["structured_taylor"] * 2,
                  "sparsity": [0.2, 0.45, 0.2, 0.45], "miou": [0.30, 0.20, 0.31, 0.22]}).to_csv(csv, index=False)
    try:
        c = sec.pruning_choice(ctx)
        assert c["importance"] == "taylor" and c["evidence"]["taylor"] == pytest.approx(0.265)
    finally:
        csv.unlink()


def test_int8_choice_reads_notebook_05s_winner(smoke):
    ctx = smoke["ctx"]
    c = sec.int8_choice(ctx)                                           # no table: the default recipe
    assert c["recipe"] == sec.quantization.DEFAULT_RECIPE and "fallback" in c["source"]
    csv = ctx.out_dir / "tables" / "quantization.csv"
    base = {"model": sec.quantization.MAIN, "group": "recipes", "latency_ms_p50": 1.0, "speedup_ci95_low": 1.0,
            "speedup_ci95_high": 1.0, "latency_verdict_vs_fp32": "", "q_nodes": 0, "dq_nodes": 0,
            "transpose_nodes": 0, "leftover_nodes": 0, "int8_nodes": 0, "threads": 2, "rounds": 5}
    rows = [{**base, "recipe": "", "method": sec.quantization.FP32, "speedup_vs_ort_fp32": 1.0, "miou": 0.5},
            {**base, "recipe": "qdq_u8s8_pc", "method": "a", "speedup_vs_ort_fp32": 1.2, "miou": 0.498},
            {**base, "recipe": "qdq_mac_only", "method": "b", "speedup_vs_ort_fp32": 1.4, "miou": 0.497},
            {**base, "recipe": "qdq_s8s8_pc", "method": "c", "speedup_vs_ort_fp32": 2.0, "miou": 0.45}]
    rows = [{**r, "d_miou_vs_fp32": r["miou"] - 0.5} for r in rows]
    pd.DataFrame(rows).to_csv(csv, index=False)
    try:
        c = sec.int8_choice(ctx)      # the fastest recipe within 1 mIoU point, not the fastest overall
        assert c["recipe"] == "qdq_mac_only" and c["evidence"]["speedup_vs_ort_fp32"] == pytest.approx(1.4)
    finally:
        csv.unlink()


def _fake_latency(ms, rounds=(1.0, 1.0, 1.0)):
    return {"latency_ms_p50": ms, "latency_ms_p50_ci95_low": ms * 0.95, "latency_ms_p50_ci95_high": ms * 1.05,
            "threads": 2, "rounds": len(rounds), "round_p50s_ms": ";".join(str(ms * f) for f in rounds)}


def test_export_score_and_rows(smoke, chain, tmp_path):
    ctx, hw = smoke["ctx"], sec.input_hw(smoke["ctx"])
    files = sec.export_variants(chain["model"], tmp_path, "t", hw, smoke["cx"])
    assert list(files) == ["fp32", "fp16", "int8"] and all(p.is_file() for p in files.values())
    assert sec.quant.kernel_counts(files["int8"])["int8_nodes"] > 0
    with pytest.raises(ValueError, match="precision"):
        sec.export_variants(chain["model"], tmp_path, "t", hw, smoke["cx"], ("bf16",))
    scores, cms = sec.onnx_eval(files["fp32"], smoke["vx"], smoke["vy"])
    assert scores["miou"] == pytest.approx(metrics.miou_from_confusion(cms.sum(0)))
    # issue #13: with the context's cache, a second evaluation of the same file is read, not re-run
    s1, c1 = sec.onnx_eval(files["fp32"], smoke["vx"], smoke["vy"], ctx=ctx)
    real, sec.quant.ort_predict = sec.quant.ort_predict, None    # any ORT call would now fail
    try:
        s2, c2 = sec.onnx_eval(files["fp32"], smoke["vx"], smoke["vy"], ctx=ctx)
    finally:
        sec.quant.ort_predict = real
    assert s2["miou"] == s1["miou"] == pytest.approx(scores["miou"]) and np.array_equal(c2, c1)
    assert c2.dtype == cms.dtype and c2.shape == cms.shape
    # the exported fp32 file scores like the torch model it came from
    assert scores["miou"] == pytest.approx(chain["info"]["miou_after_recovery"], abs=0.02)
    cx = models.model_complexity(chain["model"], hw)
    row = sec.variant_row(ctx, "t fp32", "chain", complexity=cx, scores=scores, latency=_fake_latency(4.0),
                          precision="fp32", target_fraction=chain["fraction"], target_gmacs=0.1, sparsity=chain["sparsity"],
                          importance="magnitude", train_steps=2, train_images=8, recovery="kd",
                          miou_after_prune=chain["info"]["miou_after_prune"],
                          miou_after_recovery=chain["info"]["miou_after_recovery"], path=files["fp32"],
                          int8_recipe="qdq_u8s8_pc")
    assert row["int8_recipe"] == ""                                   # an fp32 row has no recipe
    assert tuple(row)[:len(BASE_COLUMNS)] == BASE_COLUMNS
    for c in ("threads", "rounds", "latency_ms_p50", "latency_ms_p50_ci95_low", "latency_ms_p50_ci95_high",
              "precision", "target_gmacs", "train_steps", "train_images", "miou_after_prune", "miou_after_recovery"):
        assert c in row, c
    assert row["threads"] == 2 and row["rounds"] == 3 and row["section"] == "pipeline"
    # the one latency protocol, on two of the files, in one interleaved call
    lat = sec.measure_latency(ctx, {"a": files["fp32"], "b": files["int8"]}, hw, rounds=2,
                              gmacs_of={"a": cx["gmacs"], "b": cx["gmacs"]})
    assert list(lat.index) == ["a", "b"] and (lat.rounds == 2).all() and (lat.threads >= 1).all()
    assert (lat.latency_ms_p50 > 0).all() and lat.attrs["protocol"]["measured_by"] == "study.bench.compare_latency"
    assert (lat.latency_ms_p50_ci95_low <= lat.latency_ms_p50).all() and "pct_of_peak" in lat
    row = sec.variant_row(ctx, "a", "chain", complexity=cx, scores=scores, latency=lat.loc["a"], precision="fp32",
                          target_fraction=1.0, target_gmacs=cx["gmacs"], sparsity=0.0, importance="-", train_steps=0,
                          train_images=0, recovery="-", miou_after_prune=np.nan, miou_after_recovery=np.nan,
                          path=files["fp32"])
    assert row["rounds"] == 2 and row["latency_ms_p50"] == lat.loc["a", "latency_ms_p50"]
    assert len(row["round_p50s_ms"].split(";")) == 2


def _rows_and_cms(rng):
    """Three synthetic variants on 6 images: dense (10 ms), a fast one, a slow-and-better one."""
    n, c = 6, NUM_CLASSES
    base = rng.integers(0, 50, (n, c, c))
    good = base.copy()
    idx = np.arange(c)
    good[:, idx, idx] += 200                         # more correct pixels: higher mIoU
    rows = []
    for name, ms, prec, frac, miou in (("dense fp32", 10.0, "fp32", 1.0, 0.5), ("t10 int8", 2.5, "int8", 0.1, 0.4),
                                       ("t50 fp32", 5.0, "fp32", 0.5, 0.495)):
        # round p50s that move together (a noisy machine): the per-round ratio stays exact
        rows.append({"variant": name, "precision": prec, "target_fraction": frac, "gmacs": frac,
                     **_fake_latency(ms, (1.0, 1.3, 0.9, 1.1)), "miou": miou, "miou_after_prune": miou - 0.1,
                     "miou_after_recovery": miou + 0.02})
    cms = {"dense fp32": good, "t10 int8": base, "t50 fp32": good}
    return rows, cms


def test_table_speedup_and_delta_against_the_dense_row():
    rows, cms = _rows_and_cms(np.random.default_rng(0))
    df = sec.pipeline_table(rows, cms, n_boot=200).set_index("variant")
    assert df.loc["dense fp32", "speedup_vs_dense"] == 1.0 and df.loc["dense fp32", "miou_delta_vs_dense"] == 0.0
    assert df.loc["t10 int8", "speedup_vs_dense"] == pytest.approx(4.0)
    assert df.loc["t50 fp32", "speedup_vs_dense"] == pytest.approx(2.0)
    # paired by round: the machine's slow round 2 cancels out of the ratio
    assert df.loc["t10 int8", "speedup_ci95_low"] == pytest.approx(4.0)
    assert df.loc["t10 int8", "speedup_ci95_high"] == pytest.approx(4.0)
    assert df.loc["t10 int8", "latency_verdict"] == "faster" and df.loc["dense fp32", "latency_verdict"] == "reference"
    assert df.loc["t10 int8", "miou_delta_vs_dense"] == pytest.approx(-0.1)
    assert df.loc["t10 int8", "miou_verdict"] == "hurts"             # fewer correct pixels on every image
    assert df.loc["t50 fp32", "miou_verdict"] == "no detectable difference at this budget"   # identical matrices
    assert not df.meets_target.any()
    with pytest.raises(KeyError):
        sec.pipeline_table(rows[1:], cms)


def test_headline_and_step_costs():
    rows, cms = _rows_and_cms(np.random.default_rng(1))
    df = sec.pipeline_table(rows, cms, n_boot=100)
    h = sec.headline(df)
    assert not h["reached"] and h["winner"] is None
    assert h["best_within_budget"]["variant"] == "t50 fp32"        # 2x at -0.5 points
    assert h["best_fast"]["variant"] == "t10 int8"                 # 4x at -10 points
    assert any("not reached" in line for line in h["lines"])
    costs = sec.step_costs(df, 0.5).set_index("variant")
    assert "dense fp32" not in costs.index
    r = costs.loc["t10 int8"]
    assert r.d_prune == pytest.approx(-0.2) and r.d_recovery == pytest.approx(0.12)
    assert r.d_quantization == pytest.approx(-0.02)
    assert r.d_total == pytest.approx(0.4 - 0.5) and r.costliest_step == "prune"
    rows[1]["miou"] = 0.495                                        # now 4x at -0.5 points
    h2 = sec.headline(sec.pipeline_table(rows, cms, n_boot=100))
    assert h2["reached"] and h2["winner"]["variant"] == "t10 int8"
    # the row's mIoU meets the budget, but its per-image matrices (fewer correct pixels) do not:
    # the verdict says the target is reached on point estimates only
    assert "point estimates" in h2["lines"][0] and "not established" in h2["lines"][0]
    cms["t10 int8"] = cms["dense fp32"]
    h3 = sec.headline(sec.pipeline_table(rows, cms, n_boot=100))
    assert "both 95 % intervals clear the target" in h3["lines"][0]


def test_pareto_front():
    lat = [10, 5, 2, 6, np.nan]
    acc = [0.5, 0.45, 0.3, 0.4, 0.9]
    assert sec.pareto_front(lat, acc).tolist() == [True, True, True, False, False]


def test_other_section_points_reads_tables_with_latency_and_miou(smoke):
    ctx = smoke["ctx"]
    tdir = ctx.out_dir / "tables"
    hw = "{}x{}".format(*sec.input_hw(ctx))
    pd.DataFrame({"model": ["a", "b"], "method": ["m", "m"], "input_hw": [hw, "999x999"],
                  "latency_ms_p50": [3.0, 4.0], "miou": [0.2, 0.3]}).to_csv(tdir / "zz_fake.csv", index=False)
    pd.DataFrame({"model": ["c"], "miou": [0.2]}).to_csv(tdir / "zz_nolatency.csv", index=False)
    try:
        pts = sec.other_section_points(ctx)
        assert pts.section.tolist() == ["zz_fake"] and pts.latency_ms_p50.tolist() == [3.0]
    finally:
        (tdir / "zz_fake.csv").unlink()
        (tdir / "zz_nolatency.csv").unlink()
