"""Does ORT's ``max_intermediate_outputs`` keep every calibration image's range? (issue #17)

    python benchmarks/check_ort_max_intermediate_outputs.py

``create_calibrator(extra_options={"max_intermediate_outputs": k})`` (``CalibMaxIntermediateOutputs``
for ``quantize_static``) was the proposed bound on calibration memory. This script calibrates a
seeded 3-layer conv net with MinMax on 5 images whose first image is scaled x10, once in one
pass and once with ``max_intermediate_outputs=2``, and prints both ranges of two tensors. If
the option merged ranges every k images, both would be equal (min of mins, max of maxes).
Whatever the answer, the study does not use the option: its passes are
:func:`study.quant.calibration_chunk` (``collect_data`` once per pass, which merges).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import torch.nn as nn

from study import quant


def main() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 14, 1)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        pre = quant.prepare_graph(quant.export_onnx(net, Path(tmp) / "m.onnx", (32, 32)), "quant_pre_process")
        x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype("float32")
        x[0] *= 10
        print(f"onnxruntime {onnxruntime.__version__}; MinMax on 5 images, image 0 scaled x10")
        for label, opts in (("one pass", {}), ("max_intermediate_outputs=2", {"max_intermediate_outputs": 2})):
            cal = quant.create_calibrator(pre, None, augmented_model_path=str(Path(tmp) / f"aug{len(opts)}.onnx"),
                                          calibrate_method=quant._calib_method("minmax"), extra_options=opts)
            cal.collect_data(quant.calibration_reader(x))
            ranges = cal.compute_data().data
            shown = ", ".join(f"{k}: [{float(np.min(v.range_value[0])):.3f}, {float(np.max(v.range_value[1])):.3f}]"
                              for k, v in sorted(ranges.items())[:2])
            print(f"{label:<28} {shown}")


if __name__ == "__main__":
    main()
