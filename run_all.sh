#!/usr/bin/env bash
# Regenerate every table, figure and the HTML report of the study (or run the tests).
#
#   ./run_all.sh [options]              set up .venv if needed, run the notebooks, build the report
#   ./run_all.sh --test [pytest args]   set up .venv if needed, run the test suite (what CI runs)
#   ./run_all.sh --setup-only [--gpu]   only create / refresh .venv and the Jupyter kernel
#
# Options (run mode):
#   --profile smoke|cpu|paper  experiment size (default: cpu). smoke: CI, a few minutes;
#                              cpu: this 2-core machine; paper: source 000's setting (GPU + LPCVC data)
#   --seed N                   base seed of every training, a non-negative integer (default: 0)
#   --data-root DIR            a dataset in the LPCVC layout (default: the embedded generated dataset)
#   --only SECTION             run only this section; repeatable (default: all sections)
#   --bench-host HOST          SSH host for the deployment section (default: this machine)
#   --fresh                    ignore the cache and recompute everything (default: off)
#   --build-dir DIR            output root (default: build): DIR/<profile>/ and DIR/cache/
#   --weights-dir DIR          ImageNet encoder checkpoints, DIR/<timm name>.<tag>/model.safetensors
#                              (+ DIR/topformer/); every profile then starts pretrained (default:
#                              paper pretrained from the Hugging Face hub / cache, smoke and cpu from scratch)
#   --fast-dev-run             dry run of the profile: 2 optimizer steps per training, 2 validation
#                              batches per evaluation, 3 runs per benchmark, every sweep point, the
#                              real shapes; paper runs on a CPU; outputs in DIR/<profile>-dryrun/
#   --nproc N                  run every cached training as a torchrun job of N processes per node
#                              (gloo on CPU, NCCL on GPU; N must divide the batch size) (default: 1)
#   --nnodes N                 nodes of those jobs (default: 1); needs --rdzv-endpoint
#   --rdzv-endpoint HOST:PORT  torchrun rendezvous endpoint of a multi-node job
#   --full-grid                also run the exhaustive sweeps (every KD temperature x weight and
#                              method, every importance x schedule...); rows merged into the tables
#   --retime                   re-measure latencies even when the same models were measured before
#   --jobs N                   notebooks executed at once after 00 and 01 (default: 1; more finishes
#                              sooner, but per-notebook times then come from a shared machine)
#   --cache-dir DIR            read trained models / measurements from another build's cache too
#                              (used as is, never written; new entries go to BUILD_DIR/cache)
#   --gpu                      set-up switch: also install the GPU extra (onnxruntime-gpu, TensorRT)
#   -h, --help                 print this help
#
# Set-up is automatic: .venv is created (or reused) with Python 3.11, the package is
# installed with its pinned dependencies, and a Jupyter kernel "segcompress" is added.
# Outputs: build/<profile>/{notebooks,tables,figures}/, build/<profile>/run.json,
# build/<profile>/report.html and report-screenshot.png (where Chromium is installed).
# Exit: 0 ok, 1 a notebook (or test) failed, 2 bad arguments or missing pretrained weights.
set -euo pipefail
cd "$(dirname "$0")"

SECTIONS="baselines distillation structured_pruning head_pruning iterative_pruning quantization bilevel_search deployment pipeline"
die() { echo "run_all.sh: $*" >&2; echo "usage: see the header of run_all.sh or README.md" >&2; exit 2; }

mode=run; args=(); gpu=0
if [[ "${1:-}" == "--test" ]]; then mode=test; shift
elif [[ "${1:-}" == "--setup-only" ]]; then mode=setup; shift
  [[ "${1:-}" == "--gpu" ]] && { gpu=1; shift; }
  [[ $# -eq 0 ]] || die "--setup-only takes only --gpu"
fi
posint() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
if [[ $mode == run ]]; then
  # Check the options before anything is written (python re-checks them, and the data root).
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --profile) [[ $# -ge 2 ]] || die "--profile needs a value"
                 [[ "$2" =~ ^(smoke|cpu|paper)$ ]] || die "--profile: unknown profile '$2' (smoke, cpu or paper)"
                 args+=("$1" "$2"); shift 2 ;;
      --seed) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "--seed needs a non-negative integer, got '${2:-}'"
              args+=("$1" "$2"); shift 2 ;;
      --data-root) [[ $# -ge 2 ]] || die "--data-root needs a directory"
                   [[ -d "$2" ]] || die "--data-root: '$2' is not a directory"
                   args+=("$1" "$2"); shift 2 ;;
      --only) [[ $# -ge 2 ]] || die "--only needs a section"
              [[ " $SECTIONS " == *" $2 "* ]] || die "--only: unknown section '$2' (one of: $SECTIONS)"
              args+=("$1" "$2"); shift 2 ;;
      --bench-host) [[ $# -ge 2 && -n "$2" ]] || die "--bench-host needs a host name"
                    args+=("$1" "$2"); shift 2 ;;
      --build-dir) [[ $# -ge 2 ]] || die "--build-dir needs a directory"; args+=("$1" "$2"); shift 2 ;;
      --fresh) args+=("$1"); shift ;;
      --weights-dir) [[ $# -ge 2 ]] || die "--weights-dir needs a directory"
                     [[ -d "$2" ]] || die "--weights-dir: '$2' is not a directory"
                     args+=("$1" "$2"); shift 2 ;;
      --fast-dev-run|--full-grid|--retime) args+=("$1"); shift ;;
      --cache-dir) [[ $# -ge 2 ]] || die "--cache-dir needs a directory"
                   [[ -d "$2" ]] || die "--cache-dir: '$2' is not a directory"
                   args+=("$1" "$2"); shift 2 ;;
      --nproc|--nnodes|--jobs) [[ $# -ge 2 ]] && posint "$2" || die "$1 needs a positive integer, got '${2:-}'"
                        args+=("$1" "$2"); shift 2 ;;
      --rdzv-endpoint) [[ $# -ge 2 && "$2" =~ ^[^:]+:[0-9]+$ ]] || die "--rdzv-endpoint needs HOST:PORT, got '${2:-}'"
                       args+=("$1" "$2"); shift 2 ;;
      --gpu) gpu=1; shift ;;
      -h|--help) sed -n '2,41p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
      *) die "unknown option '$1'" ;;
    esac
  done
fi

# ---------------------------------------------------------------- set-up (idempotent)
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $($PY --version 2>&1)"
  "$PY" -m venv .venv
fi
stamp=.venv/.segcompress-installed
want_cpu=$(cat pyproject.toml | sha256sum | cut -c1-16)
want_gpu=$( (cat pyproject.toml; echo gpu) | sha256sum | cut -c1-16)
have=$(cat $stamp 2>/dev/null || true)
want=$want_cpu
# --gpu installs the GPU extra; it stays until the next --gpu-less change of pyproject.toml
[[ $gpu == 1 || "$have" == "$want_gpu" ]] && want=$want_gpu && gpu=1
if [[ "$have" != "$want" ]]; then
  extras="test"; [[ $gpu == 1 ]] && extras="test,gpu"
  echo "setup: installing the study package and its pinned dependencies [$extras] (first time: a few minutes)"
  t0=$SECONDS
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
  if [[ $gpu == 1 ]]; then
    # onnxruntime (CPU) and onnxruntime-gpu install the same 'onnxruntime' module: make the GPU
    # build's files the ones in place, whatever order pip installed the two in
    ort=$(grep -o '"onnxruntime-gpu==[^"]*"' pyproject.toml | head -1 | tr -d '"')
    .venv/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$ort"
  fi
  .venv/bin/python -m ipykernel install --sys-prefix --name segcompress --display-name "segcompress (study)" >/dev/null
  echo "$want" > $stamp
  echo "setup: done in $((SECONDS - t0)) s"
fi
export PYTHONHASHSEED=0 MPLBACKEND=Agg SEGCOMPRESS_KERNEL=${SEGCOMPRESS_KERNEL:-segcompress}

case $mode in
  setup) exit 0 ;;
  test) exec .venv/bin/python -m pytest -q "$@" ;;
  run) exec .venv/bin/python -m study.report run "${args[@]}" ;;
esac
