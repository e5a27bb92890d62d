"""Stability of the local latency benchmark: repeat it and report the spread of p50.

Runs ``study.bench.benchmark_onnx`` (or ``benchmark_torch``) ``--repeats`` times on the same
model (UPerNet-MobileViT-S, random weights, exported to ONNX at ``--input-hw``; a stand-in
conv net when ``study.models`` is missing) and prints each run's p50 / p99 / FPS and the
coefficient of variation of p50 across runs, CV = std(p50, ddof=1) / mean(p50). Target:
CV <= 3 %. The number is only meaningful on an otherwise idle machine; the script prints the
1-minute load average before and after so that a noisy measurement is recognisable.

    .venv/bin/python benchmarks/bench_stability.py [--runtime ort|torch] [--input-hw 128 128]
        [--repeats 3] [--threads 2] [--min-s 3] [--warmup-s 1] [--min-runs 50]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from study import bench  # noqa: E402


def build_model():
    """(model, description): UPerNet-MobileViT-S if study.models exists, else a stand-in."""
    try:
        from study.models import create_model
        return create_model("upernet_mobilevit_s").eval(), "upernet_mobilevit_s (random init)"
    except ImportError as e:
        print(f"note: study.models unavailable ({e}); using a stand-in conv net", file=sys.stderr)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, 2, 1),
                                torch.nn.ReLU(), torch.nn.Conv2d(64, 14, 1))
        return m.eval(), "stand-in 3-conv net"


def export(model, path: Path, hw) -> Path:
    try:
        from study.quant import export_onnx
        return export_onnx(model, path, hw)
    except ImportError:
        torch.onnx.export(model, torch.randn(1, 3, *hw), str(path), opset_version=17, input_names=["image"],
                          output_names=["logits"], dynamo=False)
        return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runtime", choices=("ort", "torch"), default="ort")
    p.add_argument("--input-hw", nargs=2, type=int, default=[128, 128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-s", type=float, default=3.0)
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--min-runs", type=int, default=50)
    a = p.parse_args(argv)
    hw = tuple(a.input_hw)
    model, desc = build_model()
    print(f"model: {desc}; runtime {a.runtime}; input {hw[0]}x{hw[1]}; threads {a.threads}; "
          f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    p50s = []
    with tempfile.TemporaryDirectory() as td:
        onnx_path = export(model, Path(td) / "model.onnx", hw) if a.runtime == "ort" else None
        for i in range(a.repeats):
            kw = dict(threads=a.threads, warmup_s=a.warmup_s, min_s=a.min_s, min_runs=a.min_runs)
            r = bench.benchmark_onnx(onnx_path, hw, **kw) if onnx_path else bench.benchmark_torch(model, hw, **kw)
            p50s.append(r["latency_ms_p50"])
            print(f"run {i + 1}: p50 {r['latency_ms_p50']:.3f} ms  p99 {r['latency_ms_p99']:.3f} ms  "
                  f"FPS {r['fps']:.2f}  runs {r['runs']}  peak RSS {r['peak_rss_mb']:.0f} MB")
    mean = statistics.mean(p50s)
    cv = statistics.stdev(p50s) / mean * 100 if len(p50s) > 1 else 0.0
    print(f"p50 mean {mean:.3f} ms; CV of p50 over {len(p50s)} runs: {cv:.2f} % (target <= 3 %: "
          f"{'met' if cv <= 3 else 'NOT met'}); load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
