"""Does structured pruning turn MACs into latency, monotonically? (issue #5 speed target, issue #15 point 4)

Builds the study's student (UPerNet + MobileViT-S, random weights: latency depends on the
shapes, not on the values), prunes it physically with :func:`study.prune.prune_structured`
(DepGraph, L1 magnitude) at each of ``--sparsity`` (default: the ``cpu`` profile's
sparsities), exports every model to ONNX (and saves it for torch) and times them all
together with the study's protocol (:func:`study.bench.compare_latency`: batch 1, a fresh
process per measurement, interleaved rounds, the study's thread policy = physical cores,
ORT on the CPU provider / torch eager with denormals flushed).

Prints, per runtime: each model's p50 with its 95 % interval, round CV, GMAC/s and % of the
GEMM peak; the latency / MACs reduction ratio of each pruned model (target >= 0.8 at the
largest sparsity); and whether latency falls monotonically with MACs (a pair where the model
with fewer MACs is detectably SLOWER, :func:`study.bench.latency_verdict`, is a violation).
When the ORT target is missed, prints where the time goes (ORT per-op-type time of the dense
and the most pruned model).

Usage::

    .venv/bin/python benchmarks/bench_prune_latency.py [--hw 96] [--sparsity 0.2 0.45 0.6 0.8]
        [--runtime ort|torch|both] [--rounds 5] [--min-s 1] [--threads N]
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


def monotonic(df: pd.DataFrame) -> list:
    """Pairs (more MACs, fewer MACs) where the model with fewer MACs is detectably slower."""
    rows = df.sort_values("gmacs", ascending=False).to_dict("records")
    return [(a["name"], b["name"]) for i, a in enumerate(rows) for b in rows[i + 1:]
            if b["gmacs"] < a["gmacs"] and bench.latency_verdict(b, a) == "slower"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="upernet_mobilevit_s")
    ap.add_argument("--hw", type=int, default=PROFILES["cpu"].image_size, help="input side, px (default: cpu profile)")
    ap.add_argument("--sparsity", type=float, nargs="+", default=list(PROFILES["cpu"].sparsities),
                    help="channel pruning ratios (default: the cpu profile's)")
    ap.add_argument("--importance", default="magnitude", choices=[i for i in prune.IMPORTANCES if i != "taylor"],
                    help="channel importance (Taylor needs training data, which this benchmark has none of)")
    ap.add_argument("--runtime", choices=("ort", "torch", "both"), default="both")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved protocol rounds")
    ap.add_argument("--min-s", type=float, default=1.0, help="seconds of timed runs per model per round")
    ap.add_argument("--min-runs", type=int, default=10)
    ap.add_argument("--round-to", type=int, default=None)
    args = ap.parse_args(argv)
    threads = args.threads or bench.default_threads()
    runtimes = ("ort", "torch") if args.runtime == "both" else (args.runtime,)

    torch.manual_seed(0)
    hw = (args.hw, args.hw)
    nets = {"dense": models.create_model(args.model).eval()}
    for s in sorted(args.sparsity):
        nets[f"s{s}"] = prune.prune_structured(copy.deepcopy(nets["dense"]), hw, s, importance=args.importance,
                                               round_to=args.round_to).eval()
    cx = {k: models.model_complexity(m, hw) for k, m in nets.items()}
    print(f"model {args.model} @ {args.hw}px, structured {args.importance}, {threads} threads, batch 1, "
          f"{args.rounds} interleaved rounds x {args.min_s} s")
    for k, c in cx.items():
        print(f"  {k:7s} params {c['params_m']:.3f} M, GMACs {c['gmacs']:.4f} (torch-pruning counter {c['gmacs_tp']:.4f})")
    with tempfile.TemporaryDirectory(prefix="bench_prune_") as tmp:
        files = {"ort": {k: export_onnx(m, Path(tmp) / f"{k}.onnx", hw) for k, m in nets.items()} if "ort" in runtimes
                 else {},
                 "torch": {k: bench.save_torch_model(m, Path(tmp) / f"{k}.pt") for k, m in nets.items()}
                 if "torch" in runtimes else {}}
        missed = False
        for rt in runtimes:
            df = bench.compare_latency(files[rt], hw, runtime=rt, threads=threads, rounds=args.rounds,
                                       min_s=args.min_s, min_runs=args.min_runs,
                                       gmacs={k: c["gmacs"] for k, c in cx.items()})
            d = df.set_index("name")
            print(f"\n[{rt}] GEMM peak {d.peak_gmacs_per_s.iloc[0]:.1f} GMAC/s")
            for k, r in d.iterrows():
                macs_red = 1 - cx[k]["gmacs"] / cx["dense"]["gmacs"]
                lat_red = 1 - r.latency_ms_p50 / d.loc["dense", "latency_ms_p50"]
                ratio = lat_red / macs_red if macs_red > 0 else float("nan")
                print(f"  {k:7s} p50 {r.latency_ms_p50:8.2f} ms [{r.latency_ms_p50_ci95_low:8.2f}, "
                      f"{r.latency_ms_p50_ci95_high:8.2f}]  CV {100 * r.cv_p50:5.1f} %  p99 {r.latency_ms_p99:8.2f}  "
                      f"RSS {r.peak_rss_mb:4.0f} MB  {r.gmacs_per_s:6.2f} GMAC/s ({r.pct_of_peak:4.1f} %)  "
                      f"MACs red {macs_red:5.3f}  latency red {lat_red:6.3f}  ratio {ratio:6.3f}  "
                      f"vs dense: {bench.latency_verdict(r, d.loc['dense'])}")
            last = f"s{max(args.sparsity)}"
            ratio = (1 - d.loc[last, "latency_ms_p50"] / d.loc["dense", "latency_ms_p50"]) / \
                (1 - cx[last]["gmacs"] / cx["dense"]["gmacs"])
            viol = monotonic(df)
            print(f"[{rt}] ratio (latency / MACs reduction) at {last}: {ratio:.3f}, target >= {TARGET}: "
                  f"{'MET' if ratio >= TARGET else 'MISSED'}; latency monotonic in MACs: "
                  + ("yes (no pair where fewer MACs is detectably slower)" if not viol else f"NO: {viol}"))
            missed |= rt == "ort" and not ratio >= TARGET
        if missed:
            last = f"s{max(args.sparsity)}"
            print("\nwhere the time goes (ORT kernel time per op type, ms per run):")
            a = op_time_by_type(profile_ops(files["ort"]["dense"], hw, runs=20, threads=threads)).set_index("op_type")
            b = op_time_by_type(profile_ops(files["ort"][last], hw, runs=20, threads=threads)).set_index("op_type")
            t = pd.DataFrame({"dense_ms": a["ms_per_run"], "pruned_ms": b["ms_per_run"]}).fillna(0.0)
            t["dense_share"] = t["dense_ms"] / t["dense_ms"].sum()
            t["pruned_share"] = t["pruned_ms"] / t["pruned_ms"].sum()
            t["reduction"] = 1 - t["pruned_ms"] / t["dense_ms"].where(t["dense_ms"] > 0)
            with pd.option_context("display.width", 140, "display.max_rows", 40):
                print(t.sort_values("pruned_ms", ascending=False).round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
