"""ONNX export time with and without onnxslim, per model, at a profile's input size.

    python benchmarks/bench_onnx_export.py [--profile smoke] [--repeats 2] [--out FILE]

For each model of the profile's zoo (student, teacher, CNN baseline) exports a seeded,
untrained instance with :func:`study.quant.export_onnx` ``simplify=True`` and ``False``
(alternating, ``--repeats`` times each, one thread as the smoke profile uses) and prints
the median wall time and the node count of each graph. This is the measurement behind
``smoke``'s ``extra["onnx_simplify"] = False`` (:func:`study.sections.measure.onnx_simplify`).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import onnx
    import torch

    from study import bench, models, quant
    from study.profiles import PROFILES
    from study.sections.common import model_kwargs

    torch.set_num_threads(args.threads)
    prof = PROFILES[args.profile]
    hw = (prof.image_size, prof.image_size)
    g = bench.git_commit()
    commit = f"{g['commit'] or '?'}{' (study/ modified)' if g['dirty'] else ''}"
    lines = [f"# ONNX export time, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, commit {commit}, "
             f"torch threads {args.threads}, profile {args.profile} ({hw[0]} px), median of {args.repeats}",
             "model                      simplify  seconds  nodes"]
    names = ["upernet_mobilevit_s", prof.teacher, "upernet_resnet18"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in dict.fromkeys(names):
            torch.manual_seed(0)
            m = models.create_model(name, **model_kwargs(name, prof)).eval()
            times = {True: [], False: []}
            nodes = {}
            for r in range(args.repeats):
                for simp in (True, False):
                    t = time.perf_counter()
                    p = quant.export_onnx(m, Path(tmp) / f"{simp}{r}.onnx", hw, simplify=simp)
                    times[simp].append(time.perf_counter() - t)
                    nodes[simp] = len(onnx.load(str(p), load_external_data=False).graph.node)
            for simp in (True, False):
                lines.append(f"{name:<26} {str(simp):<8} {statistics.median(times[simp]):>8.1f}  {nodes[simp]:>5}")
            print("\n".join(lines[-2:]), flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
