"""Measuring models: latency, throughput and memory, in this process or on an edge device.

(Not to be confused with ``benchmarks/``, which times the study's own code.)

THE protocol (every latency in a table of the study)::

    df = compare_latency({"dense": "dense.onnx", "pruned": "pruned.onnx"}, input_hw=None, rounds=5)
    df = compare_latency({"dense": save_torch_model(m, "dense.pt")}, (96, 96), runtime="torch")
    latency_verdict(row_a, row_b)   # "faster" / "slower" / "no detectable difference"

:func:`compare_latency` runs each (round, model) in a FRESH process with the device runner
(so ``peak_rss_mb`` and ``load_s`` are that model's alone), interleaves the models in rounds
(A B C, B C A, C A B, ...), feeds every model the same seeded input, fixes the intra-op
threads to :func:`default_threads` (the physical cores; recorded in every row), flushes
denormals (torch and ORT), and reports p50 (median of round p50s) with a 95 % bootstrap
interval over rounds, pooled p90 / p99, FPS, the round-to-round CV, and optionally the
compute efficiency against :func:`gemm_peak_gmacs_per_s`.

In-process quick timers (not for tables)::

    benchmark_torch(model, (128, 128))          # nn.Module, eager, inference_mode
    benchmark_onnx("model.onnx", (128, 128))    # onnxruntime session from ort_session()
    benchmark_tensorrt("model.onnx", (128, 128), precision="fp16")   # needs tensorrt + CUDA
    sess = ort_session("model.onnx", threads=2) # THE host-side onnxruntime session factory

All share :func:`time_callable` (THE latency timer of the study; it is
:func:`study.device_runner.time_callable` re-exported: warm-up >= ``warmup_runs`` and
>= ``warmup_s``, then >= ``min_runs`` and >= ``min_s`` timed runs) and
:class:`study.device_runner.SystemSampler` (process RSS, system RAM / swap, tegrastats when
present). They return one dict with the same keys as the device runner's JSON:
``latency_ms_p50, latency_ms_p90, latency_ms_p99, latency_ms_mean, latency_ms_std`` (ms),
``fps`` (images/s = batch * 1000 / mean ms), ``runs, batch, threads``, ``load_s`` (s),
``peak_rss_mb`` (max sampled RSS of this process during load + run, MB), ``ram_used_mb,
swap_used_mb`` (system, max during the run, MB), ``runtime, precision`` and more.

Remote API (on an edge device over OpenSSH)::

    result, path = run_remote("jetson", "build/model.onnx", runtime="trt", precision="fp16")
    python -m study.bench remote --host jetson --model build/model.onnx --runtime trt --precision fp16

copies ``study/device_runner.py`` and the model into a ``mktemp -d`` folder on the host, runs
it, removes the folder (always), and stores the JSON with provenance under
``results/devices/<device-slug>/<UTC date>_<model-stem>_<runtime>_<precision>.json``.
The runner reads the input shape from the model when it is static (``--input-hw`` only
for dynamic dimensions) and uses the DEVICE's physical cores unless ``--threads`` is given.
:func:`load_device_results` reads those files back into a DataFrame.

Measurement targets::

    target = choose_target("")                  # SSH host, 127.0.0.1 over SSH, or local runner
    result, stored = measure_file(target, "model.onnx")

torch, onnxruntime, numpy and pandas are imported inside the functions that use them: they are
heavy, and ``python -m study.bench remote`` needs none of them on the measuring host.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .cache import atomic_write_text
from . import device_runner as dr
from .device_runner import SystemSampler, parse_tegrastats_line, summarize_latencies, time_callable

__all__ = [
    "BenchUnavailable", "RemoteBenchError", "time_callable", "summarize_latencies", "ort_session",
    "benchmark_callable", "benchmark_torch", "benchmark_onnx", "benchmark_tensorrt",
    "run_remote", "run_local_runner", "ssh_reachable", "choose_target", "measure_file",
    "store_result", "load_device_results", "device_slug", "parse_tegrastats_line", "main",
    "RUNNER_PATH", "DEFAULT_RESULTS_DIR", "RESULT_COLUMNS", "compare_latency", "latency_verdict",
    "summarize_rounds", "median_ci", "default_threads", "save_torch_model", "gemm_peak_gmacs_per_s",
    "PROTOCOL_COLUMNS", "VERDICTS",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNNER_PATH = Path(dr.__file__).resolve()
DEFAULT_RESULTS_DIR = REPO_ROOT / "results" / "devices"


class BenchUnavailable(RuntimeError):
    """A benchmark backend cannot run here (e.g. TensorRT or CUDA missing); the message says why."""


class RemoteBenchError(RuntimeError):
    """A remote benchmark failed. ``kind`` is one of ``unreachable, auth, host_key_unknown,
    host_key_mismatch, timeout, runtime_missing, model_unreadable, oom, bad_json,
    remote_failed, copy_failed, bad_argument``; ``host`` names the host; the message says what
    to do."""

    def __init__(self, message: str, kind: str = "remote_failed", host: str = ""):
        super().__init__(message)
        self.kind = kind
        self.host = host


# --------------------------------------------------------------------------- local benchmarks

def ort_session(path: str | os.PathLike, threads: int | None, providers: Sequence[str] | None = None,
                optimized_model_path: str | os.PathLike | None = None, enable_profiling: bool = False,
                profile_prefix: str | None = None, session_options=None):
    """The study's one ONNX Runtime session factory (host side).

    Sequential execution, ``intra_op_num_threads = threads``, ``inter_op_num_threads = 1``,
    warnings off, denormals flushed to zero in ORT's threads (session config
    ``session.set_denormal_as_zero``, ORT documentation "Session options / config keys"). (:func:`study.device_runner.make_ort_session` is a deliberate copy: the
    device runner must stay a single self-contained file.)

    Example::

        sess = ort_session("model.onnx", threads=2)
        logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]   # x float32 (1, 3, H, W)

    Args:
        path: ``.onnx`` file.
        threads: intra-op threads (int >= 1; the study's thread policy is
            :func:`default_threads`), or None to keep onnxruntime's default (one per physical
            core) and the inter-op setting of ``session_options``.
        providers: execution providers (default ``["CPUExecutionProvider"]``, on every host,
            so that timings and accuracy come from the same provider).
        optimized_model_path: if given, ORT writes its optimised graph there (what really runs).
        enable_profiling: turn on ORT's JSON profiler (``profile_prefix`` names the file).
        session_options: an ``ort.SessionOptions`` to start from (the fields above override it).

    Returns:
        ``onnxruntime.InferenceSession``.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        ValueError: ``threads`` < 1.
        onnxruntime errors: the file is not a model onnxruntime can load.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"ort_session: threads must be >= 1 (or None), got {threads!r}")
    so = session_options if session_options is not None else ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    if enable_profiling:
        so.enable_profiling = True
        if profile_prefix:
            so.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), sess_options=so, providers=list(providers or ["CPUExecutionProvider"]))


def benchmark_callable(fn: Callable[[], Any], *, batch: int = 1, sync: Callable[[], Any] | None = None,
                       warmup_s: float = 1.0, min_s: float = 3.0, min_runs: int = 50,
                       warmup_runs: int = 10, sampler: SystemSampler | None = None) -> dict:
    """Time ``fn`` with the shared loop and attach memory statistics of the timed phase.

    Args:
        fn: zero-argument callable running one inference of ``batch`` images.
        batch: images per call (for FPS).
        sync: called after every ``fn()`` (e.g. ``torch.cuda.synchronize``).
        warmup_s, min_s: s; min_runs, warmup_runs: counts (see :func:`time_callable`).
        sampler: a running :class:`SystemSampler` (one is started and stopped here when None).

    Returns:
        dict of :func:`summarize_latencies` plus ``peak_rss_mb, ram_used_mb, swap_used_mb,
        ram_total_mb, swap_total_mb, gpu_load_pct_mean, power_w_mean, memory_source,
        warmup_runs_done, warmup_s_done, measure_s``.
    """
    own = sampler is None
    if own:
        sampler = SystemSampler(interval_s=0.05)
        sampler.start()
    try:
        sampler.mark("run")
        timing = time_callable(fn, warmup_s=warmup_s, min_s=min_s, min_runs=min_runs,
                               warmup_runs=warmup_runs, sync=sync)
        sampler.mark("end")
    finally:
        if own:
            sampler.stop()
    res = summarize_latencies(timing["latencies_s"], batch)
    res.update({"warmup_runs_done": timing["warmup_runs"], "warmup_s_done": timing["warmup_s"],
                "measure_s": timing["measure_s"],
                "settings": {"warmup_s": warmup_s, "min_s": min_s, "min_runs": min_runs,
                             "warmup_runs": warmup_runs}})
    return res


def _finish(res: dict, sampler: SystemSampler, before: dict, **extra) -> dict:
    mem = sampler.summary(phases=("load", "run", "end"))
    res.update(mem)
    res["ram_used_mb_before"] = before.get("ram_used_mb")
    res["swap_used_mb_before"] = before.get("swap_used_mb")
    res["peak_rss_lifetime_mb"] = dr.lifetime_peak_rss_mb()
    res["rss_note"] = ("peak_rss_mb: max VmRSS of this process sampled every 50 ms during load + run; "
                       "peak_rss_lifetime_mb: VmHWM (peak RSS) since the process started")
    res.update(extra)
    res["device"] = "this machine (in-process, %s)" % dr.device_info()["model"]
    return res


_PREC = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def _start_sampler() -> tuple:
    """Start a 50 ms memory sampler in its "load" phase; returns (sampler, system summary before)."""
    sampler = SystemSampler(interval_s=0.05)
    sampler.start()
    before = sampler.summary()
    sampler.mark("load")
    return sampler, before


def benchmark_torch(model, input_hw: Sequence[int], batch: int = 1, threads: int | None = None,
                    warmup_s: float = 1.0, min_s: float = 3.0, min_runs: int = 50,
                    warmup_runs: int = 10, dtype=None, device=None) -> dict:
    """Latency / memory of a PyTorch module in eager mode, under ``torch.inference_mode``, IN THIS PROCESS.

    A quick in-process timer; numbers that go into a table come from :func:`compare_latency`
    (fresh process per model, interleaved rounds). Sets ``torch.set_flush_denormal(True)``.

    Args:
        model: ``torch.nn.Module`` taking a float NCHW tensor. It is not modified: when
            ``dtype``/``device`` differ from its own, a deep copy is converted.
        input_hw: (H, W) of the random input, px; input shape (batch, 3, H, W).
        batch: images per call. threads: ``torch.set_num_threads`` value during the run (None:
            keep the current one); the previous value is restored afterwards.
        warmup_s, min_s (s), min_runs, warmup_runs: see :func:`time_callable`.
        dtype: ``torch.float32`` (default when None), ``torch.float16`` or ``torch.bfloat16``.
        device: torch device (default: the model's parameters' device).

    Returns:
        dict (see module docstring); ``runtime="torch"``, ``precision`` from ``dtype``,
        ``load_s`` = time to copy/convert/move the model (0 when nothing to do) plus nothing else.

    Raises:
        ValueError: bad ``input_hw``/``batch``. Errors of the model's forward propagate.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    h, w = _check_hw(input_hw, batch)
    params = list(model.parameters())
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    torch.set_flush_denormal(True)  # subnormal floats slow x86 kernels ~100x (issue #15)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    sampler, before = _start_sampler()
    try:
        t0 = time.perf_counter()
        m = model
        if params and (params[0].dtype != dtype or params[0].device != device):
            m = copy.deepcopy(model).to(device=device, dtype=dtype)
        m.eval()
        x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        load_s = time.perf_counter() - t0

        def fn():
            with torch.inference_mode():
                m(x)

        sync = torch.cuda.synchronize if device.type == "cuda" else None
        res = benchmark_callable(fn, batch=batch, sync=sync, warmup_s=warmup_s, min_s=min_s,
                                 min_runs=min_runs, warmup_runs=warmup_runs, sampler=sampler)
        used_threads = torch.get_num_threads()
    finally:
        sampler.stop()
        torch.set_num_threads(old_threads)
    return _finish(res, sampler, before, runtime="torch", precision=_PREC.get(str(dtype).replace("torch.", ""),
                                                                              str(dtype)),
                   threads=used_threads, load_s=load_s, input_hw=[h, w], torch_device=str(device),
                   runtime_version=torch.__version__)


def benchmark_onnx(path, input_hw: Sequence[int], batch: int = 1, threads: int | None = None,
                   providers: Sequence[str] | None = None, warmup_s: float = 1.0, min_s: float = 3.0,
                   min_runs: int = 50, warmup_runs: int = 10, session_options=None,
                   precision: str | None = None) -> dict:
    """Latency / memory of an ONNX model with onnxruntime, IN THIS PROCESS.

    A quick in-process timer; numbers that go into a table come from :func:`compare_latency`.

    Args:
        path: ONNX file whose first input is NCHW (float32 or float16).
        input_hw: (H, W), px. batch: N (the model must accept it).
        threads: ``SessionOptions.intra_op_num_threads`` (None: onnxruntime's default = one per
            physical core; recorded as 0).
        providers: execution providers (None: CPU only, as :func:`ort_session` and the
            study's accuracy evaluation; pass ``["CUDAExecutionProvider", ...]`` for a GPU).
        warmup_s, min_s (s), min_runs, warmup_runs: see :func:`time_callable`.
        session_options: an ``onnxruntime.SessionOptions`` to start from.
        precision: label to record (None: guessed from the file: int8 when it has Q/DQ or
            integer ops, fp16 when its input is float16, else fp32).

    Returns:
        dict (see module docstring) with ``runtime="ort"``, ``providers``, ``load_s`` = session
        creation time (:func:`ort_session`), s.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        ValueError: bad ``input_hw``/``batch``.
        onnxruntime errors: the model cannot be loaded or run (re-raised as RuntimeError naming
            the file).
    """
    import numpy as np
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {str(path)!r} does not exist")
    h, w = _check_hw(input_hw, batch)
    sampler, before = _start_sampler()
    try:
        t0 = time.perf_counter()
        try:
            sess = ort_session(path, threads or None, providers or ["CPUExecutionProvider"],
                               session_options=session_options)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise RuntimeError(f"onnxruntime could not load {str(path)!r}: {e}") from e
        load_s = time.perf_counter() - t0
        inp = sess.get_inputs()[0]
        in_dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(inp.type, np.float32)
        x = np.random.RandomState(0).standard_normal((batch, 3, h, w)).astype(in_dtype)
        feed = {inp.name: x}
        try:
            sess.run(None, feed)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"onnxruntime could not run {str(path)!r} on input {x.shape} "
                               f"{x.dtype}: {e}") from e
        res = benchmark_callable(lambda: sess.run(None, feed), batch=batch, warmup_s=warmup_s,
                                 min_s=min_s, min_runs=min_runs, warmup_runs=warmup_runs,
                                 sampler=sampler)
    finally:
        sampler.stop()
    prec = precision or dr.onnx_precision(str(path)) or "fp32"
    so_threads = int(threads) if threads else 0
    return _finish(res, sampler, before, runtime="ort", precision=prec, threads=so_threads,
                   load_s=load_s, input_hw=[h, w], providers=sess.get_providers(),
                   runtime_version=ort.__version__, model_file=str(path),
                   model_bytes=path.stat().st_size)


def benchmark_tensorrt(path, input_hw: Sequence[int], batch: int = 1, precision: str = "fp32",
                       warmup_s: float = 1.0, min_s: float = 3.0, min_runs: int = 50,
                       warmup_runs: int = 10) -> dict:
    """Latency / memory of a TensorRT engine built from an ONNX file (or a serialized engine).

    Args:
        path: ONNX file, or ``.engine``/``.plan``/``.trt``.
        input_hw: (H, W), px. batch: N. precision: ``fp32``, ``fp16`` or ``int8`` (int8 needs
            Q/DQ nodes in the ONNX; no calibration is run).
        warmup_s, min_s (s), min_runs, warmup_runs: see :func:`time_callable`.

    Returns:
        dict (see module docstring) with ``runtime="trt"``; ``load_s`` includes the engine build.

    Raises:
        BenchUnavailable: the ``tensorrt`` module is not installed, or CUDA is not available
            (the message says which).
        FileNotFoundError: ``path`` does not exist.
    """
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        raise BenchUnavailable(f"TensorRT benchmark unavailable: the Python module 'tensorrt' is not "
                               f"installed ({e})") from e
    try:
        import torch
        cuda_ok = torch.cuda.is_available()
    except ImportError:
        cuda_ok = False
    if not cuda_ok:
        raise BenchUnavailable("TensorRT benchmark unavailable: no CUDA device is available")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model {str(path)!r} does not exist")
    h, w = _check_hw(input_hw, batch)
    sampler, before = _start_sampler()
    try:
        t0 = time.perf_counter()
        fn, sync, info = dr.trt_runner(str(path), (h, w), batch, None, precision)
        load_s = time.perf_counter() - t0
        res = benchmark_callable(fn, batch=batch, sync=sync, warmup_s=warmup_s, min_s=min_s,
                                 min_runs=min_runs, warmup_runs=warmup_runs, sampler=sampler)
    finally:
        sampler.stop()
    return _finish(res, sampler, before, runtime="trt", precision=precision, threads=0, load_s=load_s,
                   input_hw=[h, w], runtime_version=info.get("tensorrt"), runtime_info=info)


def _check_hw(input_hw, batch) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in input_hw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"input_hw must be (H, W) positive ints, got {input_hw!r}") from e
    if h < 1 or w < 1 or int(batch) < 1:
        raise ValueError(f"input_hw and batch must be >= 1, got input_hw={input_hw!r} batch={batch!r}")
    return h, w


# --------------------------------------------------------------------------- the protocol

#: Columns of :func:`compare_latency` (``gmacs, gmacs_per_s, pct_of_peak`` only when ``gmacs`` is given).
PROTOCOL_COLUMNS = ("name", "runtime", "threads", "rounds", "latency_ms_p50", "latency_ms_p50_ci95_low",
                    "latency_ms_p50_ci95_high", "latency_ms_p90", "latency_ms_p99", "fps", "cv_p50",
                    "peak_rss_mb", "load_s", "runs", "round_p50s_ms", "input_hw", "batch", "error")
VERDICTS = ("faster", "slower", "no detectable difference")


def default_threads() -> int:
    """The study's one thread policy: intra-op threads = physical cores of this machine.

    ``psutil.cpu_count(logical=False)`` (fallbacks: sysfs topology, ``/proc/cpuinfo``,
    ``os.cpu_count()``; :func:`study.device_runner.physical_cores`). Every local latency of
    the study runs with this many threads and records it in a ``threads`` column; a device
    run uses the DEVICE's physical cores (the runner decides there, see :func:`run_remote`).
    """
    return dr.physical_cores()


def save_torch_model(model, path: str | os.PathLike) -> Path:
    """Write ``model`` as a file the device runner's ``torch`` runtime loads: ``torch.save(model)``.

    The whole ``nn.Module`` is pickled (architecture + weights; physically pruned models keep
    their new shapes), on the CPU and in eval mode (``model`` itself is not changed; a copy
    is moved when it is on another device). The runner loads it with
    ``torch.load(path, weights_only=False)``: unpickling executes code named in the file,
    which is acceptable only because the study writes these files itself, on this machine,
    just before measuring them. Never load such a file from elsewhere. The model's classes
    must be importable by the loading process (the local runner gets the repository on its
    ``PYTHONPATH``).

    Args:
        model: ``torch.nn.Module``.
        path: output file (``.pt``); parent folders are created; written atomically.

    Returns:
        ``Path`` written.

    Raises:
        pickle.PicklingError / AttributeError / TypeError: the module holds something that
            cannot be pickled (e.g. a lambda or a local function as an attribute or hook).
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = next(iter(model.parameters()), None)
    m = copy.deepcopy(model).cpu() if p is not None and p.device.type != "cpu" else model
    was_training = m.training
    m.eval()
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(m, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
        if m is model:
            model.train(was_training)
    return path


class _ForkServer:
    """Host side of :func:`study.device_runner.serve_fork`: one server, a fresh fork per measurement."""

    def __init__(self, python: str, preload: Sequence[str], env: dict, start_timeout: float = 600.0):
        import tempfile

        self.python, self.preload, self.env, self.start_timeout = python, list(preload), env, start_timeout
        self.tmp = Path(tempfile.mkdtemp(prefix="segbench-fork-"))
        self.n = 0
        self.proc = None
        self._start()

    def _start(self):
        self.err_path = self.tmp / "server.err"
        self.err = open(self.err_path, "a+")
        self.proc = subprocess.Popen([self.python] + _py_flags(self.python) +
                                     [str(RUNNER_PATH), "--serve-fork", "--preload"] + self.preload,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     env=self.env, cwd=str(REPO_ROOT), start_new_session=True)
        ready = json.loads(self._readline(self.start_timeout, "starting the fork server"))
        self.preloaded = ready.get("preloaded", [])

    def _err_tail(self, since: int = 0) -> str:
        self.err.flush()
        with open(self.err_path) as fh:
            fh.seek(since)
            return fh.read()

    def _readline(self, timeout: float, what: str) -> str:
        import select

        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            self._kill()
            raise RemoteBenchError(f"{what} on localhost timed out after {timeout:g} s", "timeout", "localhost")
        line = self.proc.stdout.readline()
        if not line:
            tail = " | ".join(self._err_tail().strip().splitlines()[-3:])
            self._kill()
            raise RemoteBenchError(f"the local fork server exited while {what}: {tail}", "remote_failed",
                                   "localhost")
        return line

    def run(self, argv: list, timeout: float) -> tuple[subprocess.CompletedProcess, int]:
        """Run the device runner's ``main(argv)`` in a fresh fork; returns (completed process, pid)."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.n += 1
        out = self.tmp / f"result-{self.n}.json"
        pos = self.err_path.stat().st_size
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self._readline(timeout, "the benchmark"))
        stdout = out.read_text() if out.exists() else ""
        if out.exists():
            out.unlink()
        return subprocess.CompletedProcess(argv, reply["code"], stdout, self._err_tail(pos)), reply["pid"]

    def _kill(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)  # the server's own process group (start_new_session)
            except OSError:
                pass
            self.proc.wait(timeout=10)

    def close(self):
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._kill()
        self.err.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _py_flags(python: str) -> list:
    """``-P`` (do not put the runner's folder, ``study/``, first on ``sys.path``) for this Python >= 3.11."""
    return ["-P"] if python == sys.executable and sys.version_info >= (3, 11) else []


def _runner_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def median_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``values`` (Efron & Tibshirani 1993, ch. 13).

    ``n_boot`` resamples of the values with replacement (``numpy.random.default_rng(seed)``),
    the median of each, and the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those
    medians. With few values the interval collapses onto order statistics: for 3 to 5
    rounds it is [min, max] of the rounds (for 5 rounds its exact coverage as an interval
    for the population median is 1 - 2 / 2**5 = 93.75 %).

    Returns:
        ``(low, high)``; ``(nan, nan)`` for fewer than 2 values.
    """
    import numpy as np

    a = np.asarray([v for v in values if v == v], dtype=float)
    if a.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    meds = np.median(a[rng.integers(0, a.size, size=(int(n_boot), a.size))], axis=1)
    lo, hi = np.quantile(meds, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summarize_rounds(name: str, results: Sequence[dict], *, runtime: str, threads: int, batch: int,
                     n_boot: int = 2000, seed: int = 0) -> dict:
    """One :func:`compare_latency` row from the runner results of one model's rounds.

    Args:
        results: one device-runner result per round (keys ``latency_ms_p50``,
            ``latencies_ms`` (ms, every timed run), ``peak_rss_mb``, ``load_s``, ``runs``,
            ``input_hw``).

    Returns:
        dict with :data:`PROTOCOL_COLUMNS`: ``latency_ms_p50`` = median over rounds of the
        round p50s (ms); ``latency_ms_p50_ci95_low/high`` = :func:`median_ci` of the round
        p50s; ``latency_ms_p90/p99`` = percentiles of all timed runs of all rounds pooled;
        ``fps`` = batch * 1000 / p50; ``cv_p50`` = std(round p50s, ddof=1) / mean (NaN for
        one round); ``peak_rss_mb`` = max over rounds of each runner process's peak RSS
        (MB); ``load_s`` = median model load time (s); ``runs`` = timed runs in all. Also
        ``ram_used_mb`` / ``swap_used_mb`` (max over rounds of the system's use while the
        runner ran, MB), ``power_w_mean`` (W, mean over rounds; NaN where not sampled),
        ``runtime_version``, ``memory_source`` and ``device`` of the first round.
    """
    import numpy as np

    p50s = [float(r["latency_ms_p50"]) for r in results]
    nan = float("nan")
    row = {"name": name, "runtime": runtime, "threads": int(threads), "rounds": len(p50s)}
    if not p50s:
        row.update({k: nan for k in PROTOCOL_COLUMNS if k not in row})
        row.update(runs=0, round_p50s_ms="", input_hw="", batch=int(batch), error="no round measured")
        return row
    pooled = np.concatenate([np.asarray(r.get("latencies_ms") or [r["latency_ms_p50"]], float) for r in results])
    med = float(np.median(p50s))
    lo, hi = median_ci(p50s, n_boot=n_boot, seed=seed)
    mean = float(np.mean(p50s))
    row.update({
        "latency_ms_p50": med, "latency_ms_p50_ci95_low": lo, "latency_ms_p50_ci95_high": hi,
        "latency_ms_p90": float(np.percentile(pooled, 90)), "latency_ms_p99": float(np.percentile(pooled, 99)),
        "fps": float(batch) * 1000.0 / med if med > 0 else nan,
        "cv_p50": float(np.std(p50s, ddof=1) / mean) if len(p50s) > 1 and mean > 0 else nan,
        "peak_rss_mb": float(max(r.get("peak_rss_mb") or nan for r in results)),
        "load_s": float(np.median([r.get("load_s", nan) for r in results])),
        "runs": int(sum(int(r.get("runs", 0)) for r in results)),
        "round_p50s_ms": ";".join(f"{v:.6g}" for v in p50s),
        "input_hw": "x".join(str(v) for v in (results[0].get("input_hw") or [])),
        "batch": int(batch), "error": "",
    })
    # system memory and power as the runner's sampler saw them (max / mean over rounds), and
    # what the runner reported about itself (first round): kept for device tables
    for key, agg in (("ram_used_mb", max), ("swap_used_mb", max), ("power_w_mean", statistics.fmean)):
        vals = [float(r[key]) for r in results if r.get(key) is not None]
        row[key] = agg(vals) if vals else nan
    for key in ("runtime_version", "memory_source"):
        row[key] = results[0].get(key)
    row["device"] = (results[0].get("device") or {}).get("model") if isinstance(results[0].get("device"), dict) \
        else results[0].get("device")
    return row


def compare_latency(items, input_hw: Sequence[int] | None, *, runtime: str = "ort", threads: int | None = None,
                    rounds: int = 5, batch: int = 1, warmup_s: float = 0.5, min_s: float = 1.0,
                    min_runs: int = 10, warmup_runs: int = 3, rotate: bool = True,
                    providers: Sequence[str] | None = ("CPUExecutionProvider",), gmacs=None,
                    spawn: str = "auto", preload: Sequence[str] | None = None, errors: str = "raise",
                    timeout: float = 900.0, python: str | None = None, n_boot: int = 2000, seed: int = 0,
                    verbose: bool = False, target: dict | None = None, results_dir=None, ssh: dict | None = None):
    """THE latency protocol of the study: model files timed in fresh processes, interleaved in rounds.

    Every measurement of the study that ends in a table goes through this function: local
    ORT and local torch, and devices over SSH (``target`` from :func:`choose_target` with
    ``mode = "ssh"``: each (round, model) is one :func:`run_remote` call, the same runner in
    a fresh process on the device).

    Protocol:

    - **fresh process per measurement**: each (round, model) runs the device runner
      (:mod:`study.device_runner`, the same code as on a device) in a new process, so
      ``peak_rss_mb`` is that model's process alone and the load time is measured.
      ``spawn="exec"`` starts ``python device_runner.py`` each time; ``spawn="fork"`` forks
      each measurement from a server that imported ``preload`` once
      (:func:`study.device_runner.serve_fork`; the child has run nothing before: no model,
      no thread pool) - the default for ``torch``, whose import alone takes 3-15 s here.
    - **interleaved rounds**: round 1 runs A B C, round 2 B C A, round 3 C A B, ... (the
      order is rotated by one each round when ``rotate``, so no model always runs first or
      right after a given other one); noise that lasts a while hits every model alike.
    - **same input** for every model: ``numpy.random.RandomState(0).standard_normal`` of
      ``(batch, 3, H, W)`` (:func:`study.device_runner.seeded_input`).
    - **fixed threads**: ``threads`` intra-op threads (default :func:`default_threads`,
      the physical cores), recorded in every row; ORT: one inter-op thread, sequential
      execution, denormals as zero; torch: ``torch.set_flush_denormal(True)``, eager,
      ``inference_mode``.
    - per round: warm-up (>= ``warmup_runs`` and >= ``warmup_s``) then >= ``min_runs`` and
      >= ``min_s`` timed single inferences (:func:`time_callable`).

    Statistics per model (:func:`summarize_rounds`): p50 = median of the round p50s with a
    95 % percentile-bootstrap interval over rounds (:func:`median_ci`), p90 / p99 of all
    runs pooled, FPS from p50, the round-to-round CV of p50. Two rows compare with
    :func:`latency_verdict`.

    Example::

        df = compare_latency({"dense": "dense.onnx", "pruned": "pruned.onnx"}, None, rounds=5)
        latency_verdict(df.set_index("name").loc["pruned"], df.set_index("name").loc["dense"])

    Args:
        items: ``{name: model file}``; ONNX for ``runtime="ort"``; for ``"torch"`` a
            :func:`save_torch_model` file (or TorchScript). Insertion order = round-1 order.
        input_hw: ``(H, W)`` px of the input, or None to use each ONNX model's static input
            shape (a dynamic one is then an error naming ``--input-hw``); required for torch.
        runtime: ``"ort"``, ``"torch"`` (or ``"trt"``). threads: intra-op threads (None:
            :func:`default_threads`). rounds: >= 1 (>= 2 for an interval). batch: images per
            inference.
        warmup_s, min_s (s per round), min_runs, warmup_runs (per round).
        rotate: rotate the order each round (else A B C every round).
        providers: ORT execution providers (default CPU only; None: the runner's default).
        gmacs: optional ``{name: GMACs per image}``; adds ``gmacs``, ``gmacs_per_s`` (=
            gmacs * batch / p50 in s) and ``pct_of_peak`` (100 * gmacs_per_s /
            :func:`gemm_peak_gmacs_per_s` at the same threads).
        spawn: ``"auto"`` (fork for torch, exec otherwise), ``"exec"`` or ``"fork"``.
        preload: modules the fork server imports (default ``torch`` and ``study.models``).
        errors: ``"raise"`` (a failing measurement raises) or ``"record"`` (the model's row
            gets NaN latencies and the message in ``error``; it is not retried).
        timeout: s per measurement. python: interpreter (default ``sys.executable``).
        n_boot, seed: of the bootstrap. verbose: print one line per round.
        target: :func:`choose_target`'s dict; ``mode = "ssh"`` measures on that host (threads
            None: the device's own physical cores, as its runner decides; ``spawn`` is then
            ``"ssh"``; ``gmacs`` efficiency columns are left out, the GEMM peak being this
            host's). None or ``mode = "local"``: this machine.
        results_dir: SSH only: store every round's result there (:func:`store_result`).
        ssh: SSH only: further :func:`run_remote` keywords (``port``, ``user``, ``identity``...).

    Returns:
        ``pandas.DataFrame``, one row per item in ``items`` order, columns
        :data:`PROTOCOL_COLUMNS` (ms, MB, s; ``round_p50s_ms`` the round p50s joined by
        ``;``) plus ``order`` (``"rotated"``/``"fixed"``) and ``spawn``, and the efficiency
        columns when ``gmacs`` is given. ``df.attrs["protocol"]`` holds the settings, the
        per-round order actually run and the provenance (date, git commit, device).

    Raises:
        ValueError: empty ``items``, bad ``rounds``/``runtime``/``spawn``/``errors``, or torch
            without ``input_hw``.
        FileNotFoundError: a model file is missing (named).
        RemoteBenchError: a measurement failed and ``errors="raise"`` (the message names the
            model and the reason, e.g. a dynamic input without ``input_hw``).
    """
    import pandas as pd

    items = {str(k): Path(v) for k, v in dict(items).items()}
    if not items:
        raise ValueError("compare_latency: no items")
    if int(rounds) < 1:
        raise ValueError(f"compare_latency: rounds must be >= 1, got {rounds!r}")
    if runtime not in dr.RUNTIMES:
        raise ValueError(f"compare_latency: runtime must be one of {dr.RUNTIMES}, got {runtime!r}")
    if errors not in ("raise", "record"):
        raise ValueError(f"compare_latency: errors must be 'raise' or 'record', got {errors!r}")
    if spawn == "auto":
        spawn = "fork" if runtime == "torch" and hasattr(os, "fork") else "exec"
    if spawn not in ("exec", "fork"):
        raise ValueError(f"compare_latency: spawn must be 'auto', 'exec' or 'fork', got {spawn!r}")
    if runtime == "torch" and input_hw is None:
        raise ValueError("compare_latency: runtime 'torch' needs input_hw (a torch module does not declare "
                         "its input shape)")
    for name, p in items.items():
        if not p.is_file():
            raise FileNotFoundError(f"compare_latency: model file of {name!r} does not exist: {p}")
    hw = None if input_hw is None else _check_hw(input_hw, batch)
    remote = bool(target) and target.get("mode") == "ssh"
    threads = int(threads) if threads else (None if remote else default_threads())
    if remote:
        spawn = "ssh"
    python = python or sys.executable
    names = list(items)
    per: dict = {n: [] for n in names}
    failed: dict = {}
    orders = []
    server = None
    if spawn == "fork":
        server = _ForkServer(python, list(preload) if preload is not None else ["torch", "study.models"],
                             _runner_env())
    t_start = time.time()
    try:
        for r in range(int(rounds)):
            k = r % len(names) if rotate else 0
            order = names[k:] + names[:k]
            orders.append(order)
            for name in order:
                if name in failed:
                    continue
                try:
                    if remote:
                        res, _ = run_remote(target["host"], items[name], **{
                            "remote_python": target.get("remote_python") or "python3", **(ssh or {})},
                            runtime=runtime, input_hw=hw, batch=batch, threads=threads, warmup_s=warmup_s,
                            min_s=min_s, min_runs=min_runs, warmup_runs=warmup_runs, timeout=timeout,
                            results_dir=results_dir)
                        per[name].append(res)
                        continue
                    res = run_local_runner(items[name], runtime=runtime, input_hw=hw, batch=batch,
                                           threads=threads, warmup_s=warmup_s, min_s=min_s, min_runs=min_runs,
                                           warmup_runs=warmup_runs, python=python, timeout=timeout,
                                           providers=providers, latencies=True, model_name=name,
                                           fork_server=server, provenance=False)
                except RemoteBenchError as e:
                    if errors == "raise":
                        raise RemoteBenchError(f"measuring {name!r} ({items[name]}) failed: {e}", e.kind,
                                               e.host) from e
                    failed[name] = f"{e.kind}: {e}"
                    continue
                per[name].append(res)
            if verbose:
                print(f"round {r + 1}/{rounds}: " + ", ".join(
                    f"{n} {per[n][-1]['latency_ms_p50']:.2f} ms" for n in order if n not in failed and per[n]),
                    flush=True)
    finally:
        if server is not None:
            server.close()
    rows = []
    host = target["host"] if remote else "localhost"
    for name in names:
        used = {res.get("threads") for res in per[name]}
        if remote and threads is None and len(used) == 1:
            row_threads = next(iter(used))  # the device's own choice, the same every round
        elif used and used != {threads}:
            raise RemoteBenchError(f"the runner used {sorted(used)} threads for {name!r}, not {threads}",
                                   "remote_failed", host)
        else:
            row_threads = threads
        row = summarize_rounds(name, per[name], runtime=runtime, threads=row_threads if row_threads else 0,
                               batch=batch, n_boot=n_boot, seed=seed)
        if name in failed:
            row["error"] = failed[name][:300]
        row["order"] = "rotated" if rotate else "fixed"
        row["spawn"] = spawn
        rows.append(row)
    df = pd.DataFrame(rows)
    if gmacs is not None and not remote:
        peak = gemm_peak_gmacs_per_s(threads)
        g = [float(gmacs.get(n, float("nan"))) for n in names]
        df["gmacs"] = g
        df["gmacs_per_s"] = [gv * batch / (p / 1000.0) if p == p and p > 0 else float("nan")
                             for gv, p in zip(g, df["latency_ms_p50"])]
        df["pct_of_peak"] = 100.0 * df["gmacs_per_s"] / peak
        df["peak_gmacs_per_s"] = peak
    gc = git_commit()
    df.attrs["protocol"] = {
        "runtime": runtime, "threads": threads, "rounds": int(rounds), "batch": int(batch),
        "input_hw": list(hw) if hw else None, "warmup_s": warmup_s, "min_s": min_s, "min_runs": min_runs,
        "warmup_runs": warmup_runs, "rotate": bool(rotate), "spawn": spawn, "orders": orders,
        "providers": list(providers) if providers else None, "elapsed_s": round(time.time() - t_start, 2),
        "date_utc": _utc_now(), "git_commit": gc["commit"], "git_dirty": gc["dirty"],
        "device": (target.get("device") if remote else dr.device_info()["model"]), "host": host,
        "measured_by": "study.bench.compare_latency",
    }
    return df


def latency_verdict(row_a, row_b) -> str:
    """Is model A faster than model B? From the 95 % intervals of :func:`compare_latency` rows.

    ``"faster"`` when A's interval lies entirely below B's (``a_high < b_low``),
    ``"slower"`` when entirely above, ``"no detectable difference"`` when they overlap;
    ``"not measured"`` when an interval is missing (NaN: fewer than 2 rounds or a failed
    measurement). Non-overlap of two 95 % intervals is a conservative test (it implies a
    difference at well below 5 %); the overlap rule is the one the study states.

    Args:
        row_a, row_b: mappings (dict, ``pandas.Series``) with ``latency_ms_p50_ci95_low`` and
            ``latency_ms_p50_ci95_high`` (ms).
    """
    a_lo, a_hi = float(row_a["latency_ms_p50_ci95_low"]), float(row_a["latency_ms_p50_ci95_high"])
    b_lo, b_hi = float(row_b["latency_ms_p50_ci95_low"]), float(row_b["latency_ms_p50_ci95_high"])
    if any(v != v for v in (a_lo, a_hi, b_lo, b_hi)):
        return "not measured"
    if a_hi < b_lo:
        return "faster"
    if a_lo > b_hi:
        return "slower"
    return "no detectable difference"


_GEMM_PEAK: dict = {}


def gemm_peak_gmacs_per_s(threads: int | None = None, sizes: Sequence[int] = (256, 512, 1024),
                          min_s: float = 0.3) -> float:
    """This machine's attainable fp32 compute, GMAC/s: square GEMMs with torch (cached per process).

    For each ``n`` in ``sizes``: ``torch.mm`` of two float32 ``(n, n)`` matrices (``n**3``
    MACs) timed with :func:`time_callable` (>= ``min_s`` s after a short warm-up) on
    ``threads`` intra-op threads (default :func:`default_threads`), denormals flushed;
    rate = ``n**3 / median time``. The peak is the best rate over ``sizes`` (a dense GEMM
    is the most compute-bound kernel a CPU runs, so a model's ``gmacs_per_s`` far below it
    means its time goes to memory traffic or per-op overhead; Williams et al., "Roofline",
    CACM 2009). Measured once per (process, threads); ``benchmarks/bench_gemm_peak.py``
    prints it.

    Returns:
        GMAC/s (float > 0).
    """

    import torch

    threads = int(threads) if threads else default_threads()
    key = (threads, tuple(int(n) for n in sizes), float(min_s))
    if key in _GEMM_PEAK:
        return _GEMM_PEAK[key]
    old = torch.get_num_threads()
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    best = 0.0
    try:
        g = torch.Generator().manual_seed(0)
        for n in key[1]:
            a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
            out = torch.empty(n, n)
            t = time_callable(lambda: torch.mm(a, b, out=out), warmup_s=0.05, min_s=min_s, min_runs=5,
                              warmup_runs=2)
            best = max(best, n ** 3 / statistics.median(t["latencies_s"]) / 1e9)
    finally:
        torch.set_num_threads(old)
    _GEMM_PEAK[key] = best
    return best


# --------------------------------------------------------------------------- storage

def device_slug(text: str) -> str:
    """Lower-case file-name-safe slug: ``"NVIDIA Jetson Nano Developer Kit"`` ->
    ``"nvidia-jetson-nano-developer-kit"`` (at most 64 chars; ``"unknown"`` when empty)."""
    s = re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-")
    return s[:64].strip("-") or "unknown"


def git_commit(repo: Path = REPO_ROOT) -> dict:
    """Commit of this repository and whether the measuring code differs from it (``git`` CLI).

    Returns:
        ``{"commit": sha or None, "dirty": bool or None, "dirty_paths": [...]}`` where ``dirty``
        means modified or untracked files under ``study/`` (the code that measured), listed
        in ``dirty_paths`` (at most 20).
    """
    out = {"commit": None, "dirty": None, "dirty_paths": []}
    if shutil.which("git") is None:
        return out
    try:
        r = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        if r.returncode == 0:
            out["commit"] = r.stdout.strip()
        r = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=all", "--",
                            "study"], capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            paths = [ln[3:] for ln in r.stdout.splitlines() if ln.strip()]
            out["dirty"] = bool(paths)
            out["dirty_paths"] = paths[:20]
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def store_result(result: dict, results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR,
                 model_stem: str | None = None) -> Path:
    """Write ``result`` atomically as
    ``<results_dir>/<device-slug>/<YYYYmmddTHHMMSSZ>_<model-stem>_<runtime>_<precision>.json``.

    The device slug comes from ``result["device"]["model"]``; the date from
    ``result["provenance"]["date_utc"]`` (now when absent). An existing file is never
    overwritten (a ``-2``, ``-3``... suffix is added).

    Returns:
        the path written.
    """
    dev = result.get("device") or {}
    slug = device_slug(dev.get("model") if isinstance(dev, dict) else str(dev))
    date = (result.get("provenance") or {}).get("date_utc") or _utc_now()
    stamp = re.sub(r"[^0-9TZ]", "", date.split(".")[0]) + ("" if date.endswith("Z") else "Z")
    stem = device_slug(model_stem or Path(result.get("model_file") or "model").stem)
    base = f"{stamp}_{stem}_{result.get('runtime', 'x')}_{result.get('precision', 'x')}"
    d = Path(results_dir) / slug
    path = d / f"{base}.json"
    i = 2
    while path.exists():
        path = d / f"{base}-{i}.json"
        i += 1
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- SSH

def _ssh_common(port, identity, accept_new_host_key, known_hosts, connect_timeout, ssh_options):
    opts = ["-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=" + ("accept-new" if accept_new_host_key else "yes"),
            "-o", f"ConnectTimeout={int(connect_timeout)}"]
    if identity:
        opts += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
    if known_hosts:
        opts += ["-o", f"UserKnownHostsFile={known_hosts}"]
    for o in ssh_options or ():
        opts += ["-o", str(o)]
    return opts


def _classify_ssh_failure(host: str, rc: int, stderr: str) -> RemoteBenchError | None:
    """Map an ssh/scp failure (exit 255 or ssh-ish stderr) to a RemoteBenchError; None if not ssh's."""
    s = stderr or ""
    low = s.lower()
    tail = s.strip().splitlines()[-3:]
    detail = " | ".join(tail)
    if "remote host identification has changed" in low or "host key for" in low and "has changed" in low:
        return RemoteBenchError(f"host key of {host} does not match the one in known_hosts (possible "
                                f"man-in-the-middle, or the device was reinstalled); check it and fix "
                                f"known_hosts with ssh-keygen -R: {detail}", "host_key_mismatch", host)
    if "host key verification failed" in low or "no ecdsa host key is known" in low or \
            "host key is known" in low:
        return RemoteBenchError(f"host key of {host} is not known: add it to known_hosts (ssh {host} once "
                                f"interactively) or pass --accept-new-host-key: {detail}",
                                "host_key_unknown", host)
    if "permission denied" in low or "too many authentication failures" in low:
        return RemoteBenchError(f"authentication refused by {host}: the key was not accepted (check "
                                f"--user / --identity and the device's authorized_keys): {detail}",
                                "auth", host)
    if "connection refused" in low:
        return RemoteBenchError(f"cannot reach {host}: connection refused (is sshd running there / the "
                                f"port right?): {detail}", "unreachable", host)
    if "could not resolve hostname" in low or "name or service not known" in low:
        return RemoteBenchError(f"cannot resolve host {host}: {detail}", "unreachable", host)
    if "timed out" in low:
        return RemoteBenchError(f"connection to {host} timed out: {detail}", "timeout", host)
    if "no route to host" in low or "network is unreachable" in low or "connection closed" in low \
            or "connection reset" in low or "kex_exchange_identification" in low:
        return RemoteBenchError(f"cannot reach {host}: {detail}", "unreachable", host)
    if rc == 255:
        return RemoteBenchError(f"ssh to {host} failed (exit 255): {detail}", "unreachable", host)
    return None


def _run(cmd: list, host: str, timeout: float, what: str) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RemoteBenchError(f"{what} on {host} timed out after {timeout:g} s", "timeout", host) from e
    except FileNotFoundError as e:
        raise RemoteBenchError(f"{cmd[0]!r} is not installed on this machine (install openssh-client)",
                               "remote_failed", host) from e
    return r


def run_remote(host: str, model, *, port: int | None = None, user: str | None = None,
               identity: str | None = None, runtime: str = "ort", precision: str = "fp32",
               input_hw: Sequence[int] | None = None, batch: int | None = None, threads: int | None = None,
               warmup_s: float = 1.0, min_s: float = 3.0, min_runs: int = 50, warmup_runs: int = 10,
               results_dir: str | os.PathLike | None = DEFAULT_RESULTS_DIR, timeout: float = 900.0,
               accept_new_host_key: bool = False, remote_python: str = "python3",
               known_hosts: str | None = None, ssh_options: Sequence[str] = (),
               connect_timeout: int = 10, command: str | None = None) -> tuple[dict, Path | None]:
    """Benchmark ``model`` on ``host`` over SSH with the device runner and store the result.

    Steps: ``mktemp -d`` on the host; ``scp`` :data:`RUNNER_PATH` and the model there (the model
    is renamed ``model<suffix>`` remotely); run ``<remote_python> runner.py ...`` with every
    value ``shlex.quote``-d; parse its JSON; ``rm -rf`` the folder (always); store the result
    with provenance (see :func:`store_result`). Uses the system OpenSSH client with
    ``BatchMode=yes``, ``StrictHostKeyChecking=yes`` (``accept-new`` with
    ``accept_new_host_key``) and ``ConnectTimeout``, so ``~/.ssh/config`` applies.

    Args:
        host: host name / alias / IP. model: local model file. port, user, identity: ssh's
            ``-p``, ``user@``, ``-i`` (identity adds ``IdentitiesOnly=yes``).
        runtime: ``ort``, ``trt`` or ``torch``. precision: ``fp32``, ``fp16``, ``int8``.
        input_hw: (H, W) px, or None (default): the runner reads the model's static input
            shape; needed only for dynamic dimensions (the runner then says so) and torch files.
        batch: N (None: the model's static N, else 1).
        threads: intra-op CPU threads (None/0, default: the DEVICE's physical cores, decided
            by the runner on the device; never this host's count).
        warmup_s, min_s (s), min_runs, warmup_runs: timing settings of the runner.
        results_dir: where to store (None: do not store).
        timeout: seconds allowed for the benchmark command (copying: the same).
        remote_python: interpreter on the host (>= 3.6 with numpy and the runtime).
        known_hosts: a ``UserKnownHostsFile`` to use. ssh_options: extra ``-o`` options.
        connect_timeout: ssh ``ConnectTimeout``, s.
        command: the command line to record in the provenance (default: reconstructed).

    Returns:
        (result dict with ``provenance``, stored path or None).

    Raises:
        RemoteBenchError: with ``kind`` and a message naming the host (unreachable, auth,
            host_key_unknown / host_key_mismatch, timeout, runtime_missing, model_unreadable,
            oom, bad_json, remote_failed, copy_failed, bad_argument). Nothing is stored then.
    """
    model = Path(model)
    if not model.is_file():
        raise RemoteBenchError(f"model file {str(model)!r} does not exist (or is not a file)",
                               "bad_argument", host)
    if runtime not in dr.RUNTIMES:
        raise RemoteBenchError(f"unknown runtime {runtime!r}; choose {', '.join(dr.RUNTIMES)}",
                               "bad_argument", host)
    if precision not in dr.PRECISIONS:
        raise RemoteBenchError(f"unknown precision {precision!r}; choose {', '.join(dr.PRECISIONS)}",
                               "bad_argument", host)
    hw = None if input_hw is None else _check_hw(input_hw, batch or 1)
    common = _ssh_common(port, identity, accept_new_host_key, known_hosts, connect_timeout, ssh_options)
    target = f"{user}@{host}" if user else host
    ssh = ["ssh"] + common + (["-p", str(int(port))] if port else []) + ["--", target]
    scp = ["scp", "-q"] + common + (["-P", str(int(port))] if port else [])
    remote_tmp = None
    t_start = time.time()
    try:
        r = _run(ssh + ["mktemp -d \"${TMPDIR:-/tmp}/segbench.XXXXXXXX\""], host, connect_timeout + 30,
                 "creating a temporary folder")
        if r.returncode != 0:
            raise _classify_ssh_failure(host, r.returncode, r.stderr) or RemoteBenchError(
                f"mktemp -d failed on {host} (exit {r.returncode}): {r.stderr.strip()}", "remote_failed", host)
        lines = r.stdout.strip().splitlines()
        remote_tmp = lines[-1].strip() if lines else ""
        if not re.fullmatch(r"/[A-Za-z0-9_./-]+/segbench\.[A-Za-z0-9]+", remote_tmp):
            bad, remote_tmp = remote_tmp, None
            raise RemoteBenchError(f"unexpected output of mktemp on {host}: {bad!r}", "remote_failed", host)
        suffix = re.sub(r"[^A-Za-z0-9.]", "", model.suffix)[:16] or ".bin"
        r_runner = f"{remote_tmp}/device_runner.py"
        r_model = f"{remote_tmp}/model{suffix}"
        for src, dst in ((RUNNER_PATH, r_runner), (model, r_model)):
            r = _run(scp + ["--", str(src), f"{target}:{dst}"], host, timeout, f"copying {src.name}")
            if r.returncode != 0:
                raise _classify_ssh_failure(host, r.returncode, r.stderr) or RemoteBenchError(
                    f"copying {str(src)!r} to {host} failed (exit {r.returncode}): {r.stderr.strip()}",
                    "copy_failed", host)
        args = [remote_python, r_runner] + _runner_argv(r_model, runtime, precision, hw, batch, threads,
                                                         warmup_s, min_s, min_runs, warmup_runs,
                                                         model_name=model.name)
        # "; exit $?" keeps the shell as parent, so a runner killed by a signal (OOM killer:
        # SIGKILL) comes back as exit status 128 + 9 instead of a bare dropped session
        remote_cmd = " ".join(shlex.quote(a) for a in args) + "; exit $?"
        r = _run(ssh + [remote_cmd], host, timeout, "the benchmark")
        result = _parse_runner_output(host, r)
    finally:
        if remote_tmp:
            try:
                subprocess.run(ssh + ["rm -rf -- " + shlex.quote(remote_tmp)], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=connect_timeout + 30)
            except (OSError, subprocess.SubprocessError):
                print(f"warning: could not remove {remote_tmp} on {host}", file=sys.stderr)
    dev = result.get("device") or {}
    gc = git_commit()
    if command is None:
        command = " ".join(shlex.quote(a) for a in _cli_args(host, model, port, user, identity, runtime,
                                                               precision, hw, batch, threads,
                                                               accept_new_host_key, remote_python))
    result["provenance"] = {
        "measured_by": "study.bench.run_remote (study/device_runner.py over OpenSSH)",
        "host": host, "port": port, "user": user or None,
        "device_model": dev.get("model"), "l4t": dev.get("l4t"), "jetpack": dev.get("jetpack"),
        "power_mode": dev.get("power_mode"), "runtime_versions": result.get("versions"),
        "date_utc": _utc_now(), "elapsed_s": round(time.time() - t_start, 3),
        "git_commit": gc["commit"] or "none (repository has no commit yet)", "git_dirty": gc["dirty"],
        "git_dirty_paths": gc["dirty_paths"], "command": command, "remote_command": remote_cmd,
        "remote_tmp": remote_tmp, "runner_sha256": _sha256(RUNNER_PATH), "local_model_path": str(model),
        "local_model_sha256": _sha256(model),
    }
    path = store_result(result, results_dir, model.stem) if results_dir is not None else None
    return result, path


def _parse_runner_output(host: str, r: subprocess.CompletedProcess) -> dict:
    if r.returncode == 255:
        err = _classify_ssh_failure(host, r.returncode, r.stderr) if r.stderr.strip() else None
        raise err or RemoteBenchError(
            f"the ssh session to {host} ended without an exit status: the remote command was killed "
            f"by a signal (e.g. the out-of-memory killer) or the connection dropped", "remote_failed", host)
    doc = None
    out = r.stdout.strip()
    if out:
        try:
            doc = json.loads(out.splitlines()[-1])
        except json.JSONDecodeError:
            doc = None
    stderr_tail = " | ".join(r.stderr.strip().splitlines()[-3:])
    if r.returncode in (137, -9) or (r.returncode == 0 and doc is None and "killed" in r.stderr.lower()):
        raise RemoteBenchError(f"the benchmark on {host} was killed (exit {r.returncode}), most likely by "
                               f"the out-of-memory killer; try a smaller input or batch: {stderr_tail}",
                               "oom", host)
    kinds = {dr.EXIT_BAD_ARGS: "bad_argument", dr.EXIT_RUNTIME_MISSING: "runtime_missing", dr.EXIT_MODEL_UNREADABLE: "model_unreadable",
             dr.EXIT_OOM: "oom", dr.EXIT_RUN_FAILED: "remote_failed"}
    if r.returncode != 0:
        msg = doc.get("error") if isinstance(doc, dict) and doc.get("error") else stderr_tail
        kind = kinds.get(r.returncode, "remote_failed")
        if r.returncode == 127 or "no such file or directory" in r.stderr.lower() and doc is None:
            kind = "runtime_missing"
            msg = f"the remote Python interpreter could not be started: {stderr_tail}"
        raise RemoteBenchError(f"benchmark on {host} failed ({kind}, exit {r.returncode}): {msg}", kind, host)
    if not isinstance(doc, dict) or not doc.get("ok"):
        raise RemoteBenchError(f"the runner on {host} did not print a valid result JSON document: "
                               f"stdout={out[-300:]!r} stderr={stderr_tail!r}", "bad_json", host)
    return doc


def _cli_args(host, model, port, user, identity, runtime, precision, hw, batch, threads,
              accept_new, remote_python) -> list:
    a = ["python", "-m", "study.bench", "remote", "--host", host, "--model", str(model)]
    if port:
        a += ["--port", str(port)]
    if user:
        a += ["--user", user]
    if identity:
        a += ["--identity", str(identity)]
    a += ["--runtime", runtime, "--precision", precision]
    if hw is not None:
        a += ["--input-hw", str(hw[0]), str(hw[1])]
    if batch is not None:
        a += ["--batch", str(batch)]
    if threads:
        a += ["--threads", str(threads)]
    if accept_new:
        a += ["--accept-new-host-key"]
    if remote_python != "python3":
        a += ["--remote-python", remote_python]
    return a


def run_local_runner(model, *, runtime: str = "ort", precision: str = "fp32",
                     input_hw: Sequence[int] | None = None, batch: int | None = None, threads: int | None = None,
                     warmup_s: float = 1.0, min_s: float = 3.0, min_runs: int = 50, warmup_runs: int = 10,
                     python: str | None = None, timeout: float = 900.0, providers: Sequence[str] | None = None,
                     latencies: bool = False, model_name: str | None = None, fork_server=None,
                     provenance: bool = True) -> dict:
    """Run :mod:`study.device_runner` on ONE model in a fresh local process (same JSON as on a device).

    The process is ``python device_runner.py ...`` (or, with ``fork_server``, a fork of a
    server that has imported torch once; see :func:`compare_latency`). Its memory numbers
    belong to that process alone. The repository is put on the child's ``PYTHONPATH`` so
    that pickled study models (:func:`save_torch_model`) load.

    Args:
        model: model file. runtime, precision: as :func:`run_remote`.
        input_hw: (H, W) px, or None: the model's static input shape (ONNX); needed for
            dynamic dims and torch files. batch: N (None: the model's, else 1).
        threads: intra-op threads (None: the runner uses this machine's physical cores).
        warmup_s, min_s (s), min_runs, warmup_runs: the runner's timing settings.
        python: interpreter (default ``sys.executable``). timeout: s.
        providers: ORT execution providers (None: the runner's default, CUDA then CPU).
        latencies: include every timed latency (``latencies_ms``). model_name: recorded name.
        fork_server: internal (:func:`compare_latency`). provenance: add ``provenance``
            (git commit and state: two ``git`` calls).

    Returns:
        the runner's result dict (``pid`` = the measuring process) with ``provenance``
        (``measured_by`` says local runner) when asked.

    Raises:
        RemoteBenchError: (host ``localhost``) the runner failed; kinds as in
            :func:`run_remote` plus ``bad_argument`` (e.g. a dynamic input without
            ``input_hw``: the message says so).
    """
    model = Path(model)
    if not model.is_file():
        raise RemoteBenchError(f"model file {str(model)!r} does not exist", "bad_argument", "localhost")
    python = python or sys.executable
    argv = _runner_argv(str(model), runtime, precision, input_hw, batch, threads, warmup_s, min_s, min_runs,
                        warmup_runs, model_name=model_name, providers=providers, latencies=latencies)
    if fork_server is not None:
        r, _ = fork_server.run(argv, timeout)
        args = ["<fork of>", str(RUNNER_PATH)] + argv
    else:
        args = [python] + _py_flags(python) + [str(RUNNER_PATH)] + argv
        try:
            r = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                               env=_runner_env(), cwd=str(REPO_ROOT))
        except subprocess.TimeoutExpired as e:
            raise RemoteBenchError(f"the local runner on {model.name} timed out after {timeout:g} s", "timeout",
                                   "localhost") from e
    res = _parse_runner_output("localhost", r)
    if provenance:
        gc = git_commit()
        res["provenance"] = {"measured_by": "study.bench.run_local_runner (study/device_runner.py, local "
                                            "subprocess, no SSH)", "host": "localhost",
                             "device_model": res["device"].get("model"), "date_utc": _utc_now(),
                             "git_commit": gc["commit"] or "none (repository has no commit yet)",
                             "git_dirty": gc["dirty"], "git_dirty_paths": gc["dirty_paths"],
                             "command": " ".join(shlex.quote(a) for a in args),
                             "runtime_versions": res.get("versions")}
    return res


def _runner_argv(model: str, runtime, precision, input_hw, batch, threads, warmup_s, min_s, min_runs,
                 warmup_runs, model_name=None, providers=None, latencies=False) -> list:
    """The device runner's arguments (``--input-hw`` / ``--batch`` / ``--threads`` only when given)."""
    a = ["--model", model, "--runtime", runtime, "--precision", precision]
    if model_name:
        a += ["--model-name", model_name]
    if input_hw is not None:
        h, w = _check_hw(input_hw, batch or 1)
        a += ["--input-hw", str(h), str(w)]
    if batch is not None:
        a += ["--batch", str(int(batch))]
    a += ["--threads", str(int(threads or 0)), "--warmup-s", repr(float(warmup_s)), "--min-s", repr(float(min_s)),
          "--min-runs", str(int(min_runs)), "--warmup-runs", str(int(warmup_runs))]
    if providers:
        a += ["--providers", ",".join(providers)]
    if latencies:
        a += ["--latencies"]
    return a


def ssh_reachable(host: str, *, port: int | None = None, user: str | None = None,
                  identity: str | None = None, known_hosts: str | None = None,
                  ssh_options: Sequence[str] = (), connect_timeout: int = 5,
                  accept_new_host_key: bool = False) -> tuple[bool, str]:
    """Whether ``ssh host true`` succeeds non-interactively. Returns (ok, reason)."""
    if shutil.which("ssh") is None:
        return False, "no ssh client on this machine"
    common = _ssh_common(port, identity, accept_new_host_key, known_hosts, connect_timeout, ssh_options)
    target = f"{user}@{host}" if user else host
    cmd = ["ssh"] + common + (["-p", str(int(port))] if port else []) + ["--", target, "true"]
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=connect_timeout + 10)
    except (OSError, subprocess.SubprocessError) as e:
        return False, str(e)
    if r.returncode == 0:
        return True, "ok"
    err = _classify_ssh_failure(host, r.returncode, r.stderr)
    return False, str(err) if err else r.stderr.strip()


# --------------------------------------------------------------------------- reading results

#: Columns of :func:`load_device_results`.
RESULT_COLUMNS = ("device", "model_file", "runtime", "precision", "input_hw", "batch", "threads", "fps",
                  "latency_ms_p50", "latency_ms_p99", "peak_rss_mb", "ram_used_mb", "swap_used_mb",
                  "power_w", "memory_source", "l4t", "jetpack", "power_mode", "runtime_version", "host",
                  "date_utc", "git_commit", "source")


def load_device_results(results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR):
    """Read every ``<results_dir>/**/*.json`` device result into a DataFrame.

    Args:
        results_dir: folder (missing folder -> empty frame).

    Returns:
        ``pandas.DataFrame`` with :data:`RESULT_COLUMNS` (``power_w`` = mean input-rail power
        during the run, W, NaN without tegrastats; ``source`` = the file path relative to the
        repository when possible), sorted by device and date.

    Raises:
        ValueError: a file is not JSON or not a device result (the message names the file).
    """
    import pandas as pd

    d = Path(results_dir)
    rows = []
    for p in sorted(d.rglob("*.json")) if d.is_dir() else []:
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"device result {p} is not valid JSON: {e}") from e
        if not isinstance(doc, dict) or doc.get("schema") != dr.SCHEMA or not doc.get("ok"):
            raise ValueError(f"{p} is not a segcompress device result (expected schema {dr.SCHEMA!r} "
                             f"and ok=true)")
        prov = doc.get("provenance") or {}
        dev = doc.get("device") or {}
        try:
            src = str(p.resolve().relative_to(REPO_ROOT))
        except ValueError:
            src = str(p)
        rows.append({
            "device": dev.get("model"), "model_file": doc.get("model_file"), "runtime": doc.get("runtime"),
            "precision": doc.get("precision"), "input_hw": "x".join(str(v) for v in doc.get("input_hw", [])),
            "batch": doc.get("batch"), "threads": doc.get("threads"), "fps": doc.get("fps"),
            "latency_ms_p50": doc.get("latency_ms_p50"), "latency_ms_p99": doc.get("latency_ms_p99"),
            "peak_rss_mb": doc.get("peak_rss_mb"), "ram_used_mb": doc.get("ram_used_mb"),
            "swap_used_mb": doc.get("swap_used_mb"), "power_w": doc.get("power_w_mean"),
            "memory_source": doc.get("memory_source"), "l4t": dev.get("l4t"), "jetpack": dev.get("jetpack"),
            "power_mode": dev.get("power_mode"), "runtime_version": doc.get("runtime_version"),
            "host": prov.get("host"), "date_utc": prov.get("date_utc"), "git_commit": prov.get("git_commit"),
            "source": src,
        })
    df = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    return df.sort_values(["device", "date_utc"], kind="stable").reset_index(drop=True) if len(df) else df


# --------------------------------------------------------------------------- measurement targets

def choose_target(bench_host: str = "", remote_python: str | None = None, connect_timeout: int = 5) -> dict:
    """Where to measure model files: an SSH host, this machine over SSH, or a local runner.

    Example::

        target = choose_target("jetson")        # or "" for this machine
        result, stored = measure_file(target, "model.onnx", input_hw=(512, 512))

    ``bench_host`` given: that SSH host (alias from ``~/.ssh/config`` allowed), interpreter
    ``remote_python`` (default ``python3``); it must be reachable (no silent fallback).
    ``bench_host == ""``: 127.0.0.1 over the same SSH path when an sshd listens on port 22 and
    accepts the user's keys non-interactively with a known host key (interpreter: this
    ``sys.executable``), else the local runner (a subprocess of this machine).

    Returns:
        dict ``mode`` (``"ssh"``/``"local"``), ``host``, ``remote_python``, ``device`` (a label
        saying plainly which path was used) and ``reason``.

    Raises:
        RemoteBenchError: ``bench_host`` given but not reachable (the message names it).
    """
    cpu = dr.device_info()["model"]
    if bench_host:
        ok, why = ssh_reachable(bench_host, connect_timeout=connect_timeout)
        if not ok:
            raise RemoteBenchError(f"bench_host {bench_host!r} is not usable: {why}", "unreachable", bench_host)
        return {"mode": "ssh", "host": bench_host, "remote_python": remote_python or "python3",
                "device": f"{bench_host} (over SSH)", "reason": "bench_host parameter"}
    try:
        socket.create_connection(("127.0.0.1", 22), timeout=1).close()
        ok, why = ssh_reachable("127.0.0.1", connect_timeout=connect_timeout)
    except OSError as e:
        ok, why = False, f"no SSH server on 127.0.0.1:22 ({e.strerror or e})"
    if ok:
        return {"mode": "ssh", "host": "127.0.0.1", "remote_python": remote_python or sys.executable,
                "device": f"this machine via SSH to 127.0.0.1 ({cpu})", "reason": "sshd on 127.0.0.1 accepted our key"}
    return {"mode": "local", "host": None, "remote_python": None,
            "device": f"this machine (local runner, no SSH server; {cpu})", "reason": why}


def measure_file(target: dict, path, *, runtime: str = "ort", precision: str = "fp32",
                 input_hw: Sequence[int] | None = None, threads: int | None = None, warmup_s: float = 1.0,
                 min_s: float = 3.0, min_runs: int = 50, results_dir=None, **ssh) -> tuple[dict, Path | None]:
    """Measure one model file on ``target`` (from :func:`choose_target`) with the device runner.

    SSH targets go through :func:`run_remote` (stored under ``results_dir`` when given); the local
    target through :func:`run_local_runner` (not stored). Arguments as :func:`run_remote`
    (``input_hw`` px, ``warmup_s``/``min_s`` s); ``ssh``: further :func:`run_remote` keywords
    for SSH targets (``port``, ``user``, ``identity``, ``known_hosts``, ``ssh_options``...).

    Returns:
        (the runner's result dict, stored path or None).

    Raises:
        RemoteBenchError: the measurement failed (message names the host and the reason).
    """
    kw = dict(runtime=runtime, precision=precision, input_hw=input_hw, threads=threads, warmup_s=warmup_s,
              min_s=min_s, min_runs=min_runs)
    if target["mode"] == "ssh":
        return run_remote(target["host"], path, **{"remote_python": target["remote_python"], **ssh},
                          results_dir=results_dir, **kw)
    return run_local_runner(path, **kw), None


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    """``python -m study.bench`` argument parser (sub-commands ``remote`` and ``local``).

    Every option's help names its unit and default (``--help`` prints them).
    """
    p = argparse.ArgumentParser(prog="python -m study.bench",
                                description="segcompress benchmarks: one model file timed by the device runner "
                                            "(study/device_runner.py), on a device over SSH or here in a "
                                            "fresh local process")
    sub = p.add_subparsers(dest="cmd")
    sub.required = True

    def common(sp):
        sp.add_argument("--model", required=True,
                        help="model file: ONNX (--runtime ort/trt); TensorRT engine (.engine/.plan/.trt); "
                             "TorchScript or a study.bench.save_torch_model file (--runtime torch)")
        sp.add_argument("--runtime", choices=dr.RUNTIMES, default="ort",
                        help="ort = onnxruntime, trt = TensorRT, torch = PyTorch eager (default: %(default)s)")
        sp.add_argument("--precision", choices=dr.PRECISIONS, default="fp32",
                        help="precision label; trt builds an fp16 / int8 (Q/DQ) engine from it, ort records "
                             "the file's own precision (default: %(default)s)")
        sp.add_argument("--input-hw", nargs=2, type=int, default=None, metavar=("H", "W"),
                        help="input height and width in pixels. Default: read from the model's static input "
                             "shape; needed only when the model's H/W are dynamic (the runner then says so) "
                             "and for torch files")
        sp.add_argument("--batch", type=int, default=None,
                        help="images per inference, N (default: the model's static N, else 1)")
        sp.add_argument("--threads", type=int, default=0,
                        help="intra-op CPU threads (default 0 = the physical cores of the machine that runs "
                             "the model, decided there: the study's thread policy)")
        sp.add_argument("--warmup-s", type=float, default=1.0,
                        help="untimed warm-up, seconds at least (default: %(default)s s)")
        sp.add_argument("--min-s", type=float, default=3.0,
                        help="timed inferences, seconds at least (default: %(default)s s)")
        sp.add_argument("--min-runs", type=int, default=50,
                        help="timed inferences, count at least (default: %(default)s)")
        sp.add_argument("--warmup-runs", type=int, default=10,
                        help="untimed warm-up inferences, count at least (default: %(default)s)")
        sp.add_argument("--timeout", type=float, default=900.0,
                        help="seconds allowed for the benchmark command, and for each copy (default: %(default)s s)")

    r = sub.add_parser("remote", help="benchmark on a device over SSH and store the result",
                       description="Copy the runner and the model to HOST over SSH (OpenSSH client, "
                                   "~/.ssh/config applies, host keys checked), run it there, remove the "
                                   "files, store the JSON with provenance under --results.")
    r.add_argument("--host", required=True, help="SSH host name, ~/.ssh/config alias or IP address")
    r.add_argument("--port", type=int, default=None, help="SSH port (default: ssh's, normally 22)")
    r.add_argument("--user", default=None, help="SSH user name (default: ssh's: ~/.ssh/config or your login)")
    r.add_argument("--identity", default=None, help="private key file, ssh -i (default: ssh's keys)")
    r.add_argument("--known-hosts", default=None,
                   help="UserKnownHostsFile to check the host key against (default: ~/.ssh/known_hosts)")
    r.add_argument("--ssh-option", action="append", default=[], metavar="OPT",
                   help="extra ssh -o option, repeatable (default: none)")
    r.add_argument("--accept-new-host-key", action="store_true",
                   help="StrictHostKeyChecking=accept-new instead of yes (default: off; unknown hosts refused)")
    r.add_argument("--remote-python", default="python3",
                   help="Python interpreter on the device, >= 3.6 with numpy and the runtime "
                        "(default: %(default)s)")
    r.add_argument("--connect-timeout", type=int, default=10,
                   help="SSH ConnectTimeout in seconds (default: %(default)s s)")
    r.add_argument("--results", default=str(DEFAULT_RESULTS_DIR),
                   help="folder the result JSON is stored under, per device (default: results/devices)")
    r.add_argument("--no-store", action="store_true", help="print only, store nothing (default: store)")
    common(r)
    lo = sub.add_parser("local", help="run the device runner here in a fresh process (prints JSON)",
                        description="Run study/device_runner.py on this machine as a separate process.")
    common(lo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point. Returns 0 on success, 1 on a benchmark failure, 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not Path(args.model).is_file():
        print(f"error: --model {args.model!r}: no such file", file=sys.stderr)
        return 2
    if (args.batch is not None and args.batch < 1) or args.min_runs < 1 or \
            (args.input_hw is not None and min(args.input_hw) < 1):
        print("error: --batch, --min-runs and --input-hw must be >= 1", file=sys.stderr)
        return 2
    kw = dict(runtime=args.runtime, precision=args.precision, input_hw=args.input_hw, batch=args.batch,
              threads=args.threads or None, warmup_s=args.warmup_s, min_s=args.min_s,
              min_runs=args.min_runs, warmup_runs=args.warmup_runs, timeout=args.timeout)
    try:
        if args.cmd == "remote":
            if args.identity and not Path(args.identity).is_file():
                print(f"error: --identity {args.identity!r}: no such file", file=sys.stderr)
                return 2
            cmdline = " ".join(shlex.quote(a) for a in ["python", "-m", "study.bench"] +
                               list(argv if argv is not None else sys.argv[1:]))
            res, path = run_remote(args.host, args.model, port=args.port, user=args.user,
                                   identity=args.identity, known_hosts=args.known_hosts,
                                   ssh_options=args.ssh_option, accept_new_host_key=args.accept_new_host_key,
                                   remote_python=args.remote_python, connect_timeout=args.connect_timeout,
                                   results_dir=None if args.no_store else args.results, command=cmdline, **kw)
        else:
            res, path = run_local_runner(args.model, **kw), None
    except RemoteBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if e.kind == "bad_argument" else 1
    print(json.dumps(res, indent=2, sort_keys=True))
    print(f"{res['device'].get('model')}: input {res.get('input_shape')} ({res.get('input_shape_source')}), "
          f"{res.get('threads')} threads: p50 {res['latency_ms_p50']:.2f} ms, p99 {res['latency_ms_p99']:.2f} ms, "
          f"{res['fps']:.2f} FPS, peak RSS {res['peak_rss_mb']:.0f} MB"
          + (f"; stored {path}" if path else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
