"""Speed target of issue #7: ORT INT8 vs fp32 for the KD student, batch 1, 128 and 256 px.

Budget: INT8 >= 1.5x faster than ORT fp32 with <= 1 mIoU point lost. Prints measured
numbers only (median batch-1 latency over ``--runs`` runs, 2 intra-op threads), never
asserts. Variants: fp32, whole-model INT8 QDQ (MinMax, per-channel), QOperator, and the
selective INT8 model whose float op types are chosen by ``study.quant.node_sensitivity``.
Latencies come from ``study.quant.latency_ms`` (``study.bench.time_callable``).
The mIoU change is printed when a trained KD student is cached (``--build-dir``);
otherwise a random-initialised student is timed and argmax agreement with fp32 is shown.

Usage: .venv/bin/python benchmarks/bench_int8.py [--sizes 128 256] [--runs 50] [--build-dir build]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study import quant  # noqa: E402
from study.context import setup  # noqa: E402
from study.models import create_model  # noqa: E402
from study.sections import quantization as sec  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=quant.DEFAULT_THREADS)
    ap.add_argument("--calib", type=int, default=16, help="calibration images")
    ap.add_argument("--build-dir", default="", help="use the cached trained KD student of this build folder (cpu profile)")
    ap.add_argument("--sensitivity-runs", type=int, default=10)
    a = ap.parse_args(argv)

    ctx, model, trained = None, None, False
    if a.build_dir:
        ctx = setup(profile="cpu", build_dir=a.build_dir)
        model, trained = sec.kd_student(ctx)[0], True
    else:
        torch.manual_seed(0)
        model = create_model("upernet_mobilevit_s")
    model.eval()
    print(f"model: upernet_mobilevit_s ({'trained KD student' if trained else 'random init'}), "
          f"ORT CPU, batch 1, {a.threads} threads, median of {a.runs}")
    with tempfile.TemporaryDirectory(prefix="bench_int8_") as d:
        d = Path(d)
        for s in a.sizes:
            rng = np.random.default_rng(0)
            if trained and s == ctx.profile.image_size:
                calib, _ = sec.split_arrays(ctx, "train", limit=a.calib)
                val, masks = sec.split_arrays(ctx, "val")
            else:
                calib = rng.standard_normal((a.calib, 3, s, s)).astype(np.float32)
                val, masks = rng.standard_normal((4, 3, s, s)).astype(np.float32), None
            fp = quant.export_onnx(model, d / f"m{s}.onnx", s)
            tab = quant.calibration_table(fp, calib, d / f"cal{s}.json")
            sens = quant.node_sensitivity(fp, calib, val[:4], val_masks=None if masks is None else masks[:4],
                                          work_dir=d / f"sens{s}", timing_runs=a.sensitivity_runs, threads=a.threads)
            excl, dec = quant.select_nodes_to_exclude(sens)
            types = sorted(dec.loc[dec.excluded, "group"])
            variants = {"fp32": fp,
                        "int8 QDQ all": quant.quantize_int8(fp, d / f"qdq{s}.onnx", calibration_cache=tab),
                        "int8 QOperator all": quant.quantize_int8(fp, d / f"qop{s}.onnx", calibration_cache=tab,
                                                                  quant_format="qoperator"),
                        f"int8 QDQ selective (float: {','.join(types) or 'none'})":
                            quant.quantize_int8(fp, d / f"sel{s}.onnx", calibration_cache=tab, nodes_to_exclude=excl)}
            ref = quant.ort_predict(fp, val, a.threads)
            f_ms = None
            for k, p in variants.items():
                ms = quant.latency_ms(p, s, a.runs, threads=a.threads)
                f_ms = f_ms or ms
                out = quant.ort_predict(p, val, a.threads)
                acc = (f"mIoU change {100 * (quant.scores_from_logits(out, masks)['miou'] - quant.scores_from_logits(ref, masks)['miou']):+.2f} pts"
                       if masks is not None else f"argmax agreement with fp32 {(out.argmax(1) == ref.argmax(1)).mean():.3f}")
                print(f"{s:4d} px  {k:45s} {ms:8.2f} ms  fp32/this {f_ms / ms:5.2f}x  {acc}")
    print("budget: >= 1.5x with <= 1 mIoU point lost")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
