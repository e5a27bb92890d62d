"""Does structured pruning turn MACs into ORT latency? (issue #5 speed target)

Builds the study's student (UPerNet + MobileViT-S, random weights: latency depends on the
shapes, not on the values), prunes it physically with :func:`study.prune.prune_structured`
(DepGraph, L1 magnitude) at the largest sparsity of the ``cpu`` profile, exports both
models to ONNX and times them with ONNX Runtime (batch 1, 2 threads, CPU provider).

Target: latency reduction >= 0.8 x MACs reduction. Prints both reductions and their
ratio; when the target is missed, prints where the time goes (ORT per-op-type time of
both models) so the non-scaling ops are visible.

Usage::

    .venv/bin/python benchmarks/bench_prune_latency.py [--hw 128] [--sparsity 0.8] [--min-s 3]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from study import bench, models, prune  # noqa: E402
from study.profiles import PROFILES  # noqa: E402
from study.quant import export_onnx, op_time_by_type, profile_ops  # noqa: E402

TARGET = 0.8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="upernet_mobilevit_s")
    ap.add_argument("--hw", type=int, default=128, help="input side, px")
    ap.add_argument("--sparsity", type=float, default=max(PROFILES["cpu"].sparsities),
                    help="channel pruning ratio (default: largest cpu-profile sparsity)")
    ap.add_argument("--importance", default="magnitude", choices=[i for i in prune.IMPORTANCES if i != "taylor"],
                    help="channel importance (Taylor needs training data, which this benchmark has none of)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-s", type=float, default=3.0, help="seconds of timed runs per model")
    ap.add_argument("--min-runs", type=int, default=50)
    ap.add_argument("--round-to", type=int, default=None)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    hw = (args.hw, args.hw)
    dense = models.create_model(args.model).eval()
    pruned = prune.prune_structured(copy.deepcopy(dense), hw, args.sparsity, importance=args.importance,
                                    round_to=args.round_to)
    cd, cp = models.model_complexity(dense, hw), models.model_complexity(pruned, hw)
    res = {}
    with tempfile.TemporaryDirectory(prefix="bench_prune_") as tmp:
        paths = {}
        for tag, m in (("dense", dense), ("pruned", pruned)):
            paths[tag] = export_onnx(m, Path(tmp) / f"{tag}.onnx", hw)
            res[tag] = bench.benchmark_onnx(paths[tag], hw, batch=1, threads=args.threads,
                                            providers=["CPUExecutionProvider"], warmup_s=1.0,
                                            min_s=args.min_s, min_runs=args.min_runs)
        macs_red = 1 - cp["gmacs"] / cd["gmacs"]
        lat_red = 1 - res["pruned"]["latency_ms_p50"] / res["dense"]["latency_ms_p50"]
        ratio = lat_red / macs_red if macs_red > 0 else float("nan")
        print(f"model {args.model} @ {args.hw}px, structured {args.importance} sparsity {args.sparsity}, "
              f"ORT CPU {args.threads} threads, batch 1")
        print(f"params  : {cd['params_m']:.3f} M -> {cp['params_m']:.3f} M")
        print(f"GMACs   : {cd['gmacs']:.4f} -> {cp['gmacs']:.4f} (torch-pruning counter: "
              f"{cd['gmacs_tp']:.4f} -> {cp['gmacs_tp']:.4f})")
        for tag in ("dense", "pruned"):
            r = res[tag]
            print(f"ORT {tag:6s}: p50 {r['latency_ms_p50']:.2f} ms, p99 {r['latency_ms_p99']:.2f} ms, "
                  f"{r['runs']} runs, peak RSS {r.get('peak_rss_mb', float('nan')):.0f} MB")
        print(f"MACs reduction    : {macs_red:.3f}")
        print(f"latency reduction : {lat_red:.3f}")
        print(f"ratio (latency / MACs reduction): {ratio:.3f}  target >= {TARGET}: "
              f"{'MET' if ratio >= TARGET else 'MISSED'}")
        if not ratio >= TARGET:
            print("\nwhere the time goes (ORT kernel time per op type, ms per run):")
            a = op_time_by_type(profile_ops(paths["dense"], hw, runs=20, threads=args.threads)).set_index("op_type")
            b = op_time_by_type(profile_ops(paths["pruned"], hw, runs=20, threads=args.threads)).set_index("op_type")
            t = pd.DataFrame({"dense_ms": a["ms_per_run"], "pruned_ms": b["ms_per_run"]}).fillna(0.0)
            t["dense_share"] = t["dense_ms"] / t["dense_ms"].sum()
            t["pruned_share"] = t["pruned_ms"] / t["pruned_ms"].sum()
            t["reduction"] = 1 - t["pruned_ms"] / t["dense_ms"].where(t["dense_ms"] > 0)
            with pd.option_context("display.width", 140, "display.max_rows", 40):
                print(t.sort_values("pruned_ms", ascending=False).round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
