"""Stability of the study's latency measurement for ONE model: repeat the protocol, report the spread of p50.

Runs :func:`study.bench.compare_latency` (THE protocol: a fresh process per measurement,
``--rounds`` rounds, the study's thread policy) ``--repeats`` times on the same model
(UPerNet-MobileViT-S, random weights, exported to ONNX at ``--input-hw`` for ``ort``, saved
with :func:`study.bench.save_torch_model` for ``torch``) and prints each run's p50 with its
95 % interval, the round-to-round CV, p99, FPS and peak RSS, then the coefficient of
variation of p50 across runs, CV = std(p50, ddof=1) / mean(p50). Target: CV <= 3 %. The
number is only meaningful on an otherwise idle machine; the 1-minute load average is
printed before and after. Several models at once: ``benchmarks/bench_latency_protocol.py``.

    .venv/bin/python benchmarks/bench_stability.py [--runtime ort|torch] [--input-hw 128 128]
        [--repeats 3] [--rounds 5] [--threads N] [--min-s 1] [--warmup-s 0.5] [--min-runs 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study import bench  # noqa: E402
from study.models import create_model  # noqa: E402
from study.quant import export_onnx  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runtime", choices=("ort", "torch"), default="ort")
    p.add_argument("--input-hw", nargs=2, type=int, default=[128, 128], help="input H W, px")
    p.add_argument("--repeats", type=int, default=3, help="independent protocol runs")
    p.add_argument("--rounds", type=int, default=5, help="rounds per protocol run")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--min-s", type=float, default=1.0, help="timed seconds per round, s")
    p.add_argument("--warmup-s", type=float, default=0.5, help="warm-up seconds per round, s")
    p.add_argument("--min-runs", type=int, default=10, help="timed runs per round, at least")
    a = p.parse_args(argv)
    hw = tuple(a.input_hw)
    threads = a.threads or bench.default_threads()
    model = create_model("upernet_mobilevit_s").eval()
    print(f"model: upernet_mobilevit_s (random init); runtime {a.runtime}; input {hw[0]}x{hw[1]}; threads {threads}; "
          f"{a.rounds} rounds per run; load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    p50s = []
    with tempfile.TemporaryDirectory() as td:
        f = (export_onnx(model, Path(td) / "model.onnx", hw) if a.runtime == "ort"
             else bench.save_torch_model(model, Path(td) / "model.pt"))
        for i in range(a.repeats):
            r = bench.compare_latency({"model": f}, hw, runtime=a.runtime, threads=threads, rounds=a.rounds,
                                      warmup_s=a.warmup_s, min_s=a.min_s, min_runs=a.min_runs).iloc[0]
            p50s.append(r.latency_ms_p50)
            print(f"run {i + 1}: p50 {r.latency_ms_p50:.3f} ms [{r.latency_ms_p50_ci95_low:.3f}, "
                  f"{r.latency_ms_p50_ci95_high:.3f}]  round CV {100 * r.cv_p50:.1f} %  p99 {r.latency_ms_p99:.3f} ms  "
                  f"FPS {r.fps:.2f}  runs {r.runs}  peak RSS {r.peak_rss_mb:.0f} MB")
    mean = statistics.mean(p50s)
    cv = statistics.stdev(p50s) / mean * 100 if len(p50s) > 1 else 0.0
    print(f"p50 mean {mean:.3f} ms; CV of p50 over {len(p50s)} runs: {cv:.2f} % (target <= 3 %: "
          f"{'met' if cv <= 3 else 'NOT met'}); load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
