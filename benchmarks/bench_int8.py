"""Speed target of issue #15 (point 3): ORT INT8 recipes vs ORT fp32 on this CPU, in one run.

Budget: an INT8 graph >= 1.5x faster than ORT fp32 (same threads) with <= 1 mIoU point lost.
For each model (the MobileViT student; UPerNet + ResNet18, the CNN control) every recipe of
``study.quant.INT8_RECIPES`` is built from the same calibration set and timed with THE
latency protocol, ``study.bench.compare_latency`` (fresh process per measurement, all
variants interleaved in rotated rounds with their ORT fp32). Printed, measured numbers only
(never asserted):

- per recipe: p50 (ms), speed-up over ORT fp32 as the median of same-round ratios with its
  95 % interval, the protocol's verdict, and the Q / DQ / Transpose nodes left in the
  ORT-optimised graph (also as a ratio to the default recipe's);
- accuracy: mIoU change (points) with a trained student (``--build-dir``), else arg-max
  agreement with fp32 on random inputs (speed does not depend on training);
- where the time goes: the ORT profiler's kernel time by category for fp32 and the fastest
  recipe, and the Amdahl bound it implies.

Usage: .venv/bin/python benchmarks/bench_int8.py [--size 96] [--rounds 5] [--threads N]
       [--models upernet_mobilevit_s upernet_resnet18] [--recipes qdq_u8s8_pc ...] [--build-dir build]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study import bench, quant  # noqa: E402
from study.models import create_model  # noqa: E402


def _model(name: str, build_dir: str):
    """(model, trained?, (calib, eval_x, eval_y) or None) of a registry name."""
    if build_dir:
        from study.context import setup
        from study.sections import quantization as sec
        ctx = setup(profile="cpu", build_dir=build_dir)
        m = sec.kd_student(ctx)[0] if name == sec.STUDENT else sec.trained_model(ctx, name)[0]
        ex, ey = sec.eval_arrays(ctx)
        return m.eval(), True, (sec.calibration_images(ctx), ex, ey), ctx.profile.image_size
    torch.manual_seed(0)
    return create_model(name).eval(), False, None, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96, help="input side, px (the cpu profile's 96)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the study's policy, physical cores)")
    ap.add_argument("--min-s", type=float, default=1.0, help="timed seconds per round and model")
    ap.add_argument("--calib", type=int, default=16, help="calibration images (random ones without --build-dir)")
    ap.add_argument("--models", nargs="+", default=["upernet_mobilevit_s", "upernet_resnet18"])
    ap.add_argument("--recipes", nargs="+", default=list(quant.INT8_RECIPES), choices=list(quant.INT8_RECIPES))
    ap.add_argument("--build-dir", default="", help="use the cached trained models of this build folder (cpu profile)")
    ap.add_argument("--no-profile", action="store_true", help="skip the op-time breakdown")
    a = ap.parse_args(argv)
    threads = a.threads or bench.default_threads()
    print(f"ORT CPU, batch 1, {threads} threads (policy: {bench.default_threads()}), protocol: {a.rounds} rotated "
          f"rounds, fresh process per measurement, >= {a.min_s} s timed per round; speed-up = median of same-round "
          f"fp32/variant ratios [95 % CI]")
    with tempfile.TemporaryDirectory(prefix="bench_int8_") as d:
        d = Path(d)
        for name in a.models:
            model, trained, arrays, size = _model(name, a.build_dir)
            s = size or a.size
            rng = np.random.default_rng(0)
            calib, ex, ey = arrays if arrays else (rng.standard_normal((a.calib, 3, s, s)).astype(np.float32),
                                                   rng.standard_normal((4, 3, s, s)).astype(np.float32), None)
            fp = quant.export_onnx(model, d / f"{name}.onnx", s)
            files = {"fp32": fp}
            for r in a.recipes:
                files[r] = quant.quantize_recipe(fp, d / f"{name}.{r}.onnx", r, calib, table_dir=d)
            lat = bench.compare_latency(files, None, threads=threads, rounds=a.rounds, min_s=a.min_s,
                                        warmup_s=0.5, errors="record").set_index("name")
            ref_out = quant.ort_predict(fp, ex, threads)
            ref_miou = quant.scores_from_logits(ref_out, ey)["miou"] if ey is not None else None
            nodes = {k: quant.kernel_counts(p, threads) for k, p in files.items()}
            base_left = nodes[a.recipes[0]]["leftover_nodes"] if a.recipes else 1   # "left/first" column
            print(f"\n{name} ({'trained' if trained else 'random init'}), {s}x{s} px; ORT fp32 p50 "
                  f"{lat.loc['fp32', 'latency_ms_p50']:.2f} ms, Q/DQ/Transpose nodes {nodes['fp32']['leftover_nodes']}")
            print(f"{'recipe':28s} {'p50 ms':>7s} {'speed-up [95% CI]':>20s} {'verdict':>24s} {'Q':>4s} {'DQ':>4s} "
                  f"{'T':>4s} {'left/first':>10s}  accuracy")
            ref_rounds = lat.loc["fp32"]
            best = None
            for k in a.recipes:
                row = lat.loc[k]
                rr = np.array([float(v) for v in str(row["round_p50s_ms"]).split(";") if v])
                fr = np.array([float(v) for v in str(ref_rounds["round_p50s_ms"]).split(";") if v])
                if rr.size and rr.size == fr.size:
                    ratio = fr / rr
                    sp, (lo, hi) = float(np.median(ratio)), bench.median_ci(ratio)
                else:
                    sp, lo, hi = float("nan"), float("nan"), float("nan")
                out = quant.ort_predict(files[k], ex, threads)
                if ey is not None:
                    acc = f"mIoU {100 * (quant.scores_from_logits(out, ey)['miou'] - ref_miou):+.2f} pts"
                else:
                    acc = f"argmax agreement {(out.argmax(1) == ref_out.argmax(1)).mean():.3f}"
                n = nodes[k]
                print(f"{k:28s} {row['latency_ms_p50']:7.2f} {sp:6.2f}x [{lo:5.2f}-{hi:5.2f}] "
                      f"{bench.latency_verdict(row, ref_rounds):>24s} {n['q_nodes']:4d} {n['dq_nodes']:4d} "
                      f"{n['transpose_nodes']:4d} {n['leftover_nodes'] / max(base_left, 1):10.2f}  {acc}"
                      + (f"  [{row['error'][:80]}]" if row.get("error") else ""))
                if sp == sp and (best is None or sp > best[1]):
                    best = (k, sp)
            if best and not a.no_profile:
                rows = {}
                for k in ("fp32", best[0]):
                    rows[k] = quant.op_time_categories(quant.profile_ops(files[k], s, runs=20, threads=threads))
                f, q = rows["fp32"].set_index("category"), rows[best[0]].set_index("category")
                print(f"where the time goes (ORT profiler, ms of kernels per inference), fp32 -> {best[0]}:")
                for cat in f.index:
                    print(f"  {cat:32s} {f.loc[cat, 'ms_per_run']:7.2f} ({100 * f.loc[cat, 'share']:4.1f} %) -> "
                          f"{q.loc[cat, 'ms_per_run']:7.2f} ({100 * q.loc[cat, 'share']:4.1f} %)")
                mac_f = f.loc["Conv/MatMul/Gemm float", "ms_per_run"] + f.loc["Conv/MatMul/Gemm int8", "ms_per_run"]
                mac_q = q.loc["Conv/MatMul/Gemm float", "ms_per_run"] + q.loc["Conv/MatMul/Gemm int8", "ms_per_run"]
                share, k_mac = mac_f / f["ms_per_run"].sum(), mac_f / max(mac_q, 1e-9)
                print(f"  Conv/MatMul/Gemm: {100 * share:.0f} % of fp32 kernel time, {k_mac:.2f}x faster in {best[0]} -> "
                      f"Amdahl bound {quant.amdahl_bound(share, k_mac):.2f}x; measured {best[1]:.2f}x")
    print("\nbudget: >= 1.5x over ORT fp32 at the same threads with <= 1 mIoU point lost")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
