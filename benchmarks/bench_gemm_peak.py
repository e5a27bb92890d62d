"""This machine's attainable fp32 compute: square GEMM throughput with torch (issue #15 point 5).

The study reports every model's achieved GMAC/s (GMACs / p50 latency) against this peak
(``pct_of_peak`` columns), so a reader sees which models are bound by arithmetic and which by
memory traffic or per-op overhead (the roofline view, Williams et al., CACM 2009). The peak
the tables use is :func:`study.bench.gemm_peak_gmacs_per_s` at the study's thread policy
(:func:`study.bench.default_threads` = physical cores); this script prints it and, for
context, the rate of each matrix size at 1 .. that many threads.

    .venv/bin/python benchmarks/bench_gemm_peak.py [--sizes 128 256 512 1024 2048] [--min-s 0.5]

A GEMM of two (n, n) float32 matrices is n**3 multiply-accumulates; rate = n**3 / median time.
The number is only meaningful on an otherwise idle machine: the 1-minute load average is
printed before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from study import bench, device_runner  # noqa: E402


def rate(n: int, threads: int, min_s: float) -> float:
    """GMAC/s of ``torch.mm`` on (n, n) float32 at ``threads`` intra-op threads (median of timed calls)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a, b, out = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g), torch.empty(n, n)
    t = bench.time_callable(lambda: torch.mm(a, b, out=out), warmup_s=0.1, min_s=min_s, min_runs=5, warmup_runs=2)
    return n ** 3 / statistics.median(t["latencies_s"]) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048], help="matrix sides n")
    ap.add_argument("--min-s", type=float, default=0.5, help="timed seconds per (size, threads), s")
    a = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    policy = bench.default_threads()
    print(f"CPU: {device_runner.device_info()['model']}; physical cores (the study's threads) {policy}, "
          f"logical {os.cpu_count()}; torch {torch.__version__}; load average before {os.getloadavg()[0]:.2f}")
    print(f"{'n':>6} " + " ".join(f"{f'{t} thr GMAC/s':>14}" for t in range(1, policy + 1)))
    for n in a.sizes:
        print(f"{n:>6} " + " ".join(f"{rate(n, t, a.min_s):>14.1f}" for t in range(1, policy + 1)), flush=True)
    peak = bench.gemm_peak_gmacs_per_s(policy)
    print(f"peak used by the study's tables: gemm_peak_gmacs_per_s({policy}) = {peak:.1f} GMAC/s "
          f"(= {2 * peak:.1f} GFLOP/s); load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
