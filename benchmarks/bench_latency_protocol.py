"""Stability of the study's latency protocol (issue #15 points 1 and 6): p50, CI and CV, run to run.

Times 2-3 models with :func:`study.bench.compare_latency` (fresh process per measurement,
interleaved rounds, the study's thread policy) ``--repeats`` times and prints, per run and
model, the p50 with its 95 % interval over rounds and the round-to-round CV, then per model
the coefficient of variation of p50 ACROSS the runs, CV = std(p50, ddof=1) / mean(p50).
Target: CV <= 3 % on an idle machine. It also prints the ratio of each model's p50 to the
first model's, per run (the quantity the study's tables compare), and the
:func:`study.bench.latency_verdict` of each model against the first.

Models (random weights: latency depends on shapes, not values): the study's student
UPerNet + MobileViT-S, the same physically pruned with DepGraph at ``--sparsity``, and the
UPerNet + ResNet-18 student; exported to ONNX at ``--hw`` (ORT) and saved with
:func:`study.bench.save_torch_model` (torch).

``--denormals`` adds the check behind issue #15's "subnormal weights slow a convolution
~100x": a conv whose weights are subnormal floats, timed in this process with flushing off
and through the protocol (flushing on).

    .venv/bin/python benchmarks/bench_latency_protocol.py [--runtime ort|torch|both] [--hw 96]
        [--rounds 5] [--repeats 3] [--min-s 1] [--warmup-s 0.5] [--threads N] [--denormals]

The numbers are only meaningful on an otherwise idle machine: the 1-minute load average is
printed before and after each run.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from study import bench, models, prune  # noqa: E402
from study.quant import export_onnx  # noqa: E402


def build(hw, sparsity: float) -> dict:
    """name -> model (eval, random weights, seed 0)."""
    torch.manual_seed(0)
    dense = models.create_model("upernet_mobilevit_s").eval()
    pruned = prune.prune_structured(copy.deepcopy(dense), hw, sparsity, importance="magnitude").eval()
    torch.manual_seed(0)
    resnet = models.create_model("upernet_resnet18").eval()
    return {"mobilevit_s": dense, f"mobilevit_s_pruned{sparsity}": pruned, "resnet18": resnet}


def denormal_check(hw, threads: int, tmp: Path) -> None:
    """p50 of a conv with subnormal weights: in-process without flushing vs the protocol (flushing on)."""
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.Conv2d(64, 64, 3, padding=1)).eval()
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn_like(p) * 1e-39)       # subnormal float32 (< 1.18e-38)
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)
    x = torch.randn(1, 3, *hw)
    with torch.inference_mode():
        t = bench.time_callable(lambda: conv(x), warmup_s=0.2, min_s=1.0, min_runs=5, warmup_runs=2)
    off = statistics.median(t["latencies_s"]) * 1000
    f = bench.save_torch_model(conv, tmp / "subnormal_conv.pt")
    on = bench.compare_latency({"subnormal": f}, hw, runtime="torch", threads=threads, rounds=3, min_s=1.0,
                               preload=["torch"]).latency_ms_p50.iloc[0]
    print(f"subnormal-weight conv @ {hw[0]}x{hw[1]}: in-process, flush OFF p50 {off:.2f} ms; protocol (flush ON) "
          f"p50 {on:.2f} ms; ratio {off / on:.1f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", choices=("ort", "torch", "both"), default="ort")
    ap.add_argument("--hw", type=int, default=96, help="input side, px (default: the cpu profile's 96)")
    ap.add_argument("--sparsity", type=float, default=0.45, help="channel pruning ratio of the pruned model")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per run")
    ap.add_argument("--repeats", type=int, default=3, help="independent protocol runs")
    ap.add_argument("--min-s", type=float, default=1.0, help="timed seconds per model per round, s")
    ap.add_argument("--warmup-s", type=float, default=0.5, help="warm-up seconds per model per round, s")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    ap.add_argument("--denormals", action="store_true", help="also run the subnormal-weight check")
    a = ap.parse_args(argv)
    hw = (a.hw, a.hw)
    threads = a.threads or bench.default_threads()
    runtimes = ("ort", "torch") if a.runtime == "both" else (a.runtime,)
    print(f"protocol: {a.rounds} rounds x {a.min_s} s timed per model, {threads} threads "
          f"(physical cores: {bench.default_threads()}), input {hw[0]}x{hw[1]}, {a.repeats} runs")
    with tempfile.TemporaryDirectory(prefix="bench_protocol_") as td:
        tmp = Path(td)
        nets = build(hw, a.sparsity)
        files = {rt: {} for rt in runtimes}
        for name, m in nets.items():
            if "ort" in runtimes:
                files["ort"][name] = export_onnx(m, tmp / f"{name}.onnx", hw)
            if "torch" in runtimes:
                files["torch"][name] = bench.save_torch_model(m, tmp / f"{name}.pt")
        gm = {name: models.gmacs(m, hw) for name, m in nets.items()}
        for rt in runtimes:
            p50s = {n: [] for n in nets}
            ratios = {n: [] for n in nets}
            for i in range(a.repeats):
                load0 = os.getloadavg()[0]
                t0 = time.time()
                df = bench.compare_latency(files[rt], hw, runtime=rt, threads=threads, rounds=a.rounds,
                                           min_s=a.min_s, warmup_s=a.warmup_s, gmacs=gm).set_index("name")
                ref = df.iloc[0]
                print(f"\n[{rt}] run {i + 1}/{a.repeats} ({time.time() - t0:.0f} s, load average "
                      f"{load0:.2f} -> {os.getloadavg()[0]:.2f}, GEMM peak {df.peak_gmacs_per_s.iloc[0]:.1f} GMAC/s)")
                for n, r in df.iterrows():
                    p50s[n].append(r.latency_ms_p50)
                    ratios[n].append(r.latency_ms_p50 / ref.latency_ms_p50)
                    print(f"  {n:24s} p50 {r.latency_ms_p50:8.2f} ms  95% CI [{r.latency_ms_p50_ci95_low:8.2f}, "
                          f"{r.latency_ms_p50_ci95_high:8.2f}]  round CV {100 * r.cv_p50:5.1f} %  p99 "
                          f"{r.latency_ms_p99:8.2f}  RSS {r.peak_rss_mb:5.0f} MB  load {r.load_s:5.2f} s  "
                          f"{r.gmacs_per_s:6.1f} GMAC/s ({r.pct_of_peak:4.1f} % of peak)  "
                          f"vs {df.index[0]}: {ratios[n][-1]:.3f}x, {bench.latency_verdict(r, ref)}")
            print(f"\n[{rt}] across {a.repeats} runs (target: CV of p50 <= 3 % on an idle machine):")
            for n in nets:
                m = statistics.mean(p50s[n])
                cv = statistics.stdev(p50s[n]) / m * 100 if len(p50s[n]) > 1 else float("nan")
                rcv = (statistics.stdev(ratios[n]) / statistics.mean(ratios[n]) * 100 if len(ratios[n]) > 1
                       else float("nan"))
                print(f"  {n:24s} p50 mean {m:8.2f} ms  CV {cv:5.2f} % ({'met' if cv <= 3 else 'NOT met'})  "
                      f"ratio to {list(nets)[0]}: mean {statistics.mean(ratios[n]):.3f}, CV {rcv:5.2f} %")
        if a.denormals:
            denormal_check(hw, threads, tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
