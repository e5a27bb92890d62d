"""Peak memory of INT8 calibration at the paper's 512-px shape, one pass vs passes (issue #17).

    python benchmarks/bench_calibration_memory.py [--size 512] [--images 16] [--out FILE]

Exports a seeded, untrained ``upernet_mobilevit_s`` at ``--size`` px (the graph's shapes,
not its weights, set the memory), then for each calibration method and pass size runs
:func:`study.quant.calibration_table` in a fresh process and prints its peak RSS (MB,
``ru_maxrss``) and wall time. "auto" is the study's rule (:func:`study.quant.calibration_chunk`
under :data:`study.quant.CALIB_MAX_MB`); "one pass" hands every image to ORT at once (what
the study did before issue #17's dry run found the OOM). One-pass runs whose estimated
tensors exceed ``--max-one-pass-gb`` are skipped rather than run into the OOM killer.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
import numpy as np
from study import quant
path, n, method, max_mb, out, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5], int(sys.argv[6])
x = np.random.default_rng(0).standard_normal((n, 3, size, size)).astype("float32")
t = time.perf_counter()
quant.calibration_table(path, x, out, method=method, max_mb=max_mb)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="square input, px")
    ap.add_argument("--images", type=int, default=16, help="calibration images")
    ap.add_argument("--max-one-pass-gb", type=float, default=12.0, help="skip one-pass runs estimated above this")
    ap.add_argument("--out", default="", help="also write the lines to this file")
    args = ap.parse_args()

    import torch

    from study import bench, models, quant

    lines = [f"# calibration peak RSS, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
             f"commit {(g := bench.git_commit())['commit'] or '?'}{' (study/ modified)' if g['dirty'] else ''}",
             f"# upernet_mobilevit_s (seeded, untrained) at {args.size} px, {args.images} images, CALIB_MAX_MB {quant.CALIB_MAX_MB:g}"]
    with tempfile.TemporaryDirectory(prefix="calmem_") as tmp:
        torch.manual_seed(0)
        fp32 = quant.export_onnx(models.create_model("upernet_mobilevit_s").eval(), Path(tmp) / "m.onnx",
                                 (args.size, args.size))
        pre = quant.prepare_graph(fp32, "quant_pre_process")
        per = quant.activation_mb(pre)
        lines.append(f"# float tensors per image (from the graph's shapes): {per:.0f} MB")
        lines.append("method      passes           images/pass  peak RSS MB  seconds")
        for method in ("minmax", "entropy", "percentile"):
            for label, max_mb in (("auto", quant.CALIB_MAX_MB), ("one pass", 1e12)):
                step = quant.calibration_chunk(pre, args.images, method, max_mb)
                if label == "one pass" and method != "minmax" and per * args.images > args.max_one_pass_gb * 1024:
                    lines.append(f"{method:<11} {label:<16} {step:>11}  skipped: ~{per * args.images / 1024:.0f} GB "
                                 f"of tensors estimated")
                    continue
                r = subprocess.run([sys.executable, "-c", CHILD, str(fp32), str(args.images), method, str(max_mb),
                                    str(Path(tmp) / f"{method}.json"), str(args.size)], capture_output=True, text=True, cwd=ROOT)
                if r.returncode:
                    lines.append(f"{method:<11} {label:<16} {step:>11}  FAILED (exit {r.returncode}) {r.stderr[-200:]!r}")
                    continue
                m = json.loads(r.stdout.strip().splitlines()[-1])
                lines.append(f"{method:<11} {label:<16} {step:>11}  {m['peak_rss_mb']:>11.0f}  {m['seconds']:>7.1f}")
            print("\n".join(lines[-2:]), flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
