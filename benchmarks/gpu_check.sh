#!/usr/bin/env bash
# GPU check of the study (issue 17): does every GPU code path of the package work on this machine?
#
#   ./run_all.sh --setup-only --gpu          # once: the GPU extra (onnxruntime-gpu, TensorRT)
#   benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: build/gpu_check
#
# Steps (each prints what it measured; the JSON summary goes to OUT_DIR/gpu_check.json):
#   1. the machine: GPU, driver, torch / CUDA, onnxruntime providers, tensorrt version;
#   2. the smoke profile on CUDA (every notebook; training uses AMP on CUDA, study.train) -
#      and, with two or more GPUs, the baselines section as a 2-process NCCL torchrun job;
#   3. PyTorch CUDA latency of the student and the teacher at 512x512, fp32 and fp16
#      (study.bench.benchmark_torch: torch.cuda.synchronize after every timed call);
#   4. ONNX Runtime CUDA latency, fp32 and fp16 (study.bench.benchmark_onnx with the CUDA
#      execution provider; sess.run returns host arrays, so each call is synchronous) - it
#      fails if ORT silently fell back to the CPU provider;
#   5. where the 'tensorrt' module imports: fp16 and INT8 engine builds
#      (study.quant.build_tensorrt_engine, INT8 with the entropy calibrator), their latency
#      (study.bench.benchmark_tensorrt), and the device runner's TensorRT path
#      (python -m study.device_runner --runtime trt, what a Jetson runs).
# Exit: 0 every step passed, 1 a step failed, 3 no CUDA GPU here (nothing was measured).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
export PYTHONHASHSEED=0 MPLBACKEND=Agg
fail=0
step() { echo; echo "=== $*"; }

step "1. machine"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"; then
  echo "gpu_check: no CUDA GPU is available to torch on this machine: the check did not run" >&2
  exit 3
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" - <<'EOF'
import json, torch, onnxruntime as ort
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
        "gpu": torch.cuda.get_device_name(0), "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers()}
try:
    import tensorrt
    info["tensorrt"] = tensorrt.__version__
except ImportError as e:
    info["tensorrt"] = f"not installed ({e})"
print(json.dumps(info, indent=1))
EOF

step "2. smoke profile on CUDA (AMP)"
t0=$SECONDS
if ./run_all.sh --profile smoke --build-dir "$OUT/build" --fresh; then
  echo "smoke on CUDA: ok in $((SECONDS - t0)) s (per notebook: $OUT/build/smoke/run.json)"
else
  echo "smoke on CUDA: FAILED (see $OUT/build/smoke/run.json)"; fail=1
fi
if [[ $("$PY" -c "import torch; print(torch.cuda.device_count())") -ge 2 ]]; then
  ./run_all.sh --profile smoke --only baselines --nproc 2 --build-dir "$OUT/build-nccl" --fresh \
    || { echo "2-process NCCL training: FAILED"; fail=1; }
fi

step "3-5. latency: torch CUDA, ORT CUDA, TensorRT"
"$PY" - "$OUT" <<'EOF' || fail=1
import json, subprocess, sys, traceback
from pathlib import Path

import numpy as np
import torch

from study import bench, quant
from study.data import IMAGENET_MEAN, IMAGENET_STD, generate_scene
from study.models import create_model

out = Path(sys.argv[1])
HW = (512, 512)
KW = dict(warmup_s=1.0, min_s=3.0, min_runs=50)
res, failed = {}, []


def record(name, fn):
    try:
        r = fn()
        res[name] = {k: r.get(k) for k in ("latency_ms_p50", "latency_ms_p99", "fps", "providers", "precision",
                                           "torch_device", "load_s") if k in r}
        print(f"{name:34s} p50 {r['latency_ms_p50']:8.2f} ms  p99 {r['latency_ms_p99']:8.2f} ms  "
              f"{r.get('providers', r.get('torch_device', ''))}", flush=True)
    except Exception as exc:  # noqa: BLE001 - reported, the other steps still run
        failed.append(name)
        res[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"{name:34s} FAILED: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc()


torch.manual_seed(0)
student = create_model("upernet_mobilevit_s").eval()
teacher = create_model("upernet_swinv2_t", img_size=384).eval()  # built for the crops, run at 512
for name, m in (("student", student), ("teacher", teacher)):
    for dt in (torch.float32, torch.float16):
        record(f"torch cuda {name} {str(dt)[6:]}",
               lambda m=m, dt=dt: bench.benchmark_torch(m, HW, device="cuda", dtype=dt, **KW))

fp32 = quant.export_onnx(student, out / "student.fp32.onnx", HW)
fp16 = quant.convert_fp16(fp32, out / "student.fp16.onnx")
cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
for name, p in (("ort cuda student fp32", fp32), ("ort cuda student fp16", fp16)):
    def run(p=p):
        r = bench.benchmark_onnx(p, HW, providers=cuda, **KW)
        if r["providers"][0] != "CUDAExecutionProvider":
            raise RuntimeError(f"onnxruntime fell back to {r['providers']}: the CUDA provider did not load "
                               "(onnxruntime-gpu not the installed build, or CUDA / cuDNN libraries missing)")
        return r
    record(name, run)

ok, why = quant.trt_available()
if not ok:
    print(f"TensorRT steps skipped: {why}")
    res["tensorrt"] = f"skipped: {why}"
else:
    mean = np.asarray(IMAGENET_MEAN, np.float32) * 255
    std = np.asarray(IMAGENET_STD, np.float32) * 255
    calib = np.stack([((generate_scene(0, i, HW[0])[0] - mean) / std).transpose(2, 0, 1)
                      for i in range(16)]).astype(np.float32)
    engines = {}
    for prec in ("fp16", "int8"):
        try:
            engines[prec] = quant.build_tensorrt_engine(fp32, prec, calib_images=calib if prec == "int8" else None,
                                                        out_path=out / f"student.{prec}.engine")
            print(f"TensorRT {prec} engine: {engines[prec]}")
        except Exception as exc:  # noqa: BLE001
            failed.append(f"trt build {prec}")
            res[f"trt build {prec}"] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
    for prec, eng in engines.items():
        record(f"tensorrt student {prec}", lambda eng=eng, prec=prec: bench.benchmark_tensorrt(eng, HW, precision=prec, **KW))
    for prec in ("fp32", "fp16"):  # the device runner's own TensorRT path (what a Jetson runs)
        cmd = [sys.executable, "-m", "study.device_runner", "--model", str(fp32), "--runtime", "trt",
               "--precision", prec, "--min-runs", "50", "--min-s", "3"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        try:
            doc = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            doc = {"ok": False, "error": r.stderr[-1000:]}
        res[f"device_runner trt {prec}"] = doc
        if r.returncode != 0 or not doc.get("ok", True):
            failed.append(f"device_runner trt {prec}")
        print(f"device_runner --runtime trt --precision {prec}: exit {r.returncode}, "
              f"p50 {doc.get('latency_ms_p50')} ms {doc.get('error', '')}")

res["failed"] = failed
(out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
print(f"\nsummary: {out / 'gpu_check.json'}; failed: {failed or 'none'}")
sys.exit(1 if failed else 0)
EOF

echo
[[ $fail == 0 ]] && echo "gpu_check: every step passed" || echo "gpu_check: a step FAILED (see above)"
exit $fail
