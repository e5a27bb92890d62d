#!/usr/bin/env python3
"""Device-side benchmark runner: one self-contained file for edge devices (Jetson Nano / Orin).

It runs on Python >= 3.6 with the standard library, numpy and ONE runtime, imported lazily
according to ``--runtime`` (``ort``: onnxruntime, ``trt``: tensorrt + pycuda or torch for
device buffers, ``torch``: a TorchScript file or a pickled module written by
:func:`study.bench.save_torch_model`, run eagerly). :mod:`study.bench` copies it to the device
over SSH and runs it; it also imports its timing loop, memory sampler and tegrastats parser,
so the local and the on-device numbers come from the same code.

Why this file has its own copies. It must stay ONE self-contained file (no ``study``
imports, Python 3.6 syntax) because it is copied alone to devices that have neither the
repository nor its dependencies. So it keeps its own

- timer, :func:`time_callable`: this IS the study's one latency timer; the host code uses it
  as :func:`study.bench.time_callable` (the same function, re-exported), on which
  ``study.bench.benchmark_callable / benchmark_torch / benchmark_onnx`` are built;
- ONNX Runtime session factory, :func:`make_ort_session`: a copy; the host code uses
  :func:`study.bench.ort_session`;
- TensorRT engine builder, :func:`load_trt_engine` (deserialize an engine file or build one
  in memory from ONNX, no calibrator): host-side engine files with INT8 calibration come
  from :func:`study.quant.build_trt_engine`.

The runtime loaders :func:`ort_runner`, :func:`torch_runner` and :func:`trt_runner` (one
per ``--runtime``, see :data:`LOADERS`) return ``(fn, sync, info)``: one inference, the
synchronisation to call after it (or None) and version facts.

Usage::

    python3 device_runner.py --model model.onnx --runtime ort --precision fp32 \
        --warmup-s 1 --min-s 3 --min-runs 50
    python3 device_runner.py --model dynamic.onnx --input-hw 512 512 --batch 1 --threads 4

Input shape: the model's own when its first input is static (every model the study
exports is); ``--input-hw`` / ``--batch`` only fill dynamic dimensions, and a dynamic H / W
without ``--input-hw`` is an error that says so (:func:`resolve_input_shape`). The input
is the same seeded array for every model (:func:`seeded_input`). Threads: ``--threads``,
else the physical cores of the machine the runner runs on (:func:`physical_cores`; the
study's thread policy). Denormals are flushed to zero (torch: ``set_flush_denormal``;
ORT: ``session.set_denormal_as_zero``). ``--latencies`` adds every timed latency to the
JSON. ``device_runner.py --serve-fork --preload torch ...`` is the fork server of
:func:`serve_fork` (local torch measurements of :func:`study.bench.compare_latency`).

What it does: loads the model (timed: ``load_s``), warms up (>= ``--warmup-runs`` and
>= ``--warmup-s``), then times >= ``--min-runs`` runs and >= ``--min-s`` seconds of single
inferences (``time.perf_counter``; synchronised when on CUDA). Meanwhile a sampler thread
records the process RSS (``/proc/self/status``), system RAM / swap (``tegrastats`` when it
is on the PATH, else ``/proc/meminfo``), GPU load (``GR3D_FREQ``) and the input power rail
(``POM_5V_IN`` on Nano, ``VDD_IN`` on Orin).

Output: exactly ONE JSON document on stdout (everything else goes to stderr). On failure the
document has ``"ok": false`` with ``error_kind`` and ``error``, and the exit code says why:

====  =====================================================================
0     success
2     bad arguments (argparse)
3     the runtime named by ``--runtime`` is not installed (message names it)
4     the model file is missing or unreadable (message names it)
5     out of memory (MemoryError or the runtime's allocation failure)
6     any other failure while loading or running the model
====  =====================================================================

Latencies are in milliseconds, memory in MB (2**20 bytes), power in W, FPS = batch * 1000 /
mean latency.
"""
import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import threading
import time

SCHEMA = "segcompress.device_result/1"

EXIT_OK = 0
EXIT_BAD_ARGS = 2
EXIT_RUNTIME_MISSING = 3
EXIT_MODEL_UNREADABLE = 4
EXIT_OOM = 5
EXIT_RUN_FAILED = 6

RUNTIMES = ("ort", "trt", "torch")
PRECISIONS = ("fp32", "fp16", "int8")
RUNTIME_MODULES = {"ort": "onnxruntime", "trt": "tensorrt", "torch": "torch"}

#: Input power rails of Jetson boards, in order of preference (mW in tegrastats).
INPUT_RAILS = ("POM_5V_IN", "VDD_IN", "VIN_SYS_5V0", "VDD_5V0_IN")


class RunnerError(Exception):
    """A failure with an exit code and a kind (``runtime_missing``, ``model_unreadable``,
    ``oom``, ``run_failed``)."""

    def __init__(self, kind, message, code):
        Exception.__init__(self, message)
        self.kind = kind
        self.code = code


def log(*args):
    """Print to stderr (stdout is reserved for the single JSON document)."""
    print(*args, file=sys.stderr)
    sys.stderr.flush()


# --------------------------------------------------------------------------- timing

def time_callable(fn, warmup_s=1.0, min_s=3.0, min_runs=50, warmup_runs=10, sync=None):
    """Warm up, then time repeated calls of ``fn`` (the loop shared by every runner).

    Warm-up runs until at least ``warmup_runs`` calls AND ``warmup_s`` seconds are done; the
    timed phase until at least ``min_runs`` calls AND ``min_s`` seconds. Each timed call is
    ``fn()`` followed by ``sync()`` when given (e.g. ``torch.cuda.synchronize``), measured with
    ``time.perf_counter``.

    Args:
        fn: zero-argument callable running one inference.
        warmup_s, min_s: seconds (float >= 0).
        min_runs, warmup_runs: counts (int; ``min_runs`` >= 1).
        sync: optional zero-argument callable that waits for asynchronous work.

    Returns:
        dict with ``latencies_s`` (list of float seconds, one per timed call),
        ``warmup_runs`` and ``warmup_s`` (done), ``measure_s`` (wall time of the timed phase).

    Raises:
        ValueError: ``min_runs`` < 1 or a negative duration.
    """
    if min_runs < 1:
        raise ValueError("min_runs must be >= 1, got %r" % (min_runs,))
    if warmup_s < 0 or min_s < 0 or warmup_runs < 0:
        raise ValueError("warmup_s, min_s and warmup_runs must be >= 0")
    clock = time.perf_counter
    t0 = clock()
    n_warm = 0
    while n_warm < warmup_runs or clock() - t0 < warmup_s:
        fn()
        if sync is not None:
            sync()
        n_warm += 1
    warm_done = clock() - t0
    lat = []
    t1 = clock()
    while len(lat) < min_runs or clock() - t1 < min_s:
        s = clock()
        fn()
        if sync is not None:
            sync()
        lat.append(clock() - s)
    return {"latencies_s": lat, "warmup_runs": n_warm, "warmup_s": warm_done,
            "measure_s": clock() - t1}


def summarize_latencies(latencies_s, batch):
    """Latency statistics of timed runs.

    Args:
        latencies_s: sequence of per-call latencies, seconds (non-empty).
        batch: images per call (FPS counts images).

    Returns:
        dict: ``latency_ms_p50, latency_ms_p90, latency_ms_p99, latency_ms_mean,
        latency_ms_std, latency_ms_min, latency_ms_max`` (ms, linear-interpolated
        percentiles), ``fps`` (= batch * 1000 / mean ms), ``runs``, ``batch``.
    """
    import numpy as np
    a = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    if a.size == 0:
        raise ValueError("no latencies to summarize")
    mean = float(a.mean())
    return {
        "latency_ms_p50": float(np.percentile(a, 50)),
        "latency_ms_p90": float(np.percentile(a, 90)),
        "latency_ms_p99": float(np.percentile(a, 99)),
        "latency_ms_mean": mean,
        "latency_ms_std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "latency_ms_min": float(a.min()),
        "latency_ms_max": float(a.max()),
        "fps": float(batch) * 1000.0 / mean if mean > 0 else float("inf"),
        "runs": int(a.size),
        "batch": int(batch),
    }


# --------------------------------------------------------------------------- memory / tegrastats

_NUM = r"(\d+(?:\.\d+)?)"


def parse_tegrastats_line(line):
    """Parse one ``tegrastats`` line (Jetson Nano / TX2 / Xavier / Orin formats).

    Args:
        line: one line of tegrastats output (str).

    Returns:
        dict with whatever the line holds: ``ram_used_mb, ram_total_mb`` (int MB),
        ``swap_used_mb, swap_total_mb, swap_cached_mb`` (int MB), ``cpu`` (list of
        ``{"load_pct", "freq_mhz"}``, None for cores that are off), ``emc_freq_pct``,
        ``gpu_load_pct`` (GR3D_FREQ, %), ``temps_c`` ({sensor: float °C}), ``rails_mw``
        ({rail: {"cur": mW, "avg": mW}}), and for the input rail (``POM_5V_IN`` on Nano,
        ``VDD_IN`` on Orin) ``power_rail``, ``power_mw``, ``power_avg_mw``.
        An unrecognised line gives ``{}``.
    """
    out = {}
    m = re.search(r"\bRAM (\d+)/(\d+)MB", line)
    if m:
        out["ram_used_mb"] = int(m.group(1))
        out["ram_total_mb"] = int(m.group(2))
    m = re.search(r"\bSWAP (\d+)/(\d+)MB(?: \(cached (\d+)MB\))?", line)
    if m:
        out["swap_used_mb"] = int(m.group(1))
        out["swap_total_mb"] = int(m.group(2))
        if m.group(3) is not None:
            out["swap_cached_mb"] = int(m.group(3))
    m = re.search(r"\bCPU \[([^\]]*)\]", line)
    if m:
        cpus = []
        for part in m.group(1).split(","):
            part = part.strip()
            cm = re.match(r"(\d+)%@(\d+)", part)
            if cm:
                cpus.append({"load_pct": int(cm.group(1)), "freq_mhz": int(cm.group(2))})
            else:
                cm = re.match(r"(\d+)%", part)
                cpus.append({"load_pct": int(cm.group(1)), "freq_mhz": None} if cm else None)
        out["cpu"] = cpus
    m = re.search(r"\bEMC_FREQ (\d+)%", line)
    if m:
        out["emc_freq_pct"] = int(m.group(1))
    m = re.search(r"\bGR3D_FREQ (\d+)%", line)
    if m:
        out["gpu_load_pct"] = int(m.group(1))
    temps = {}
    for tm in re.finditer(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b", line):
        temps[tm.group(1)] = float(tm.group(2))
    if temps:
        out["temps_c"] = temps
    rails = {}
    for rm in re.finditer(r"\b((?:POM|VDD|VIN)_[A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?", line):
        rails[rm.group(1)] = {"cur": int(rm.group(2)), "avg": int(rm.group(3))}
    if rails:
        out["rails_mw"] = rails
        for name in INPUT_RAILS:
            if name in rails:
                out["power_rail"] = name
                out["power_mw"] = rails[name]["cur"]
                out["power_avg_mw"] = rails[name]["avg"]
                break
    return out


def read_meminfo(path="/proc/meminfo"):
    """System memory from ``/proc/meminfo``.

    Returns:
        dict ``ram_used_mb`` (MemTotal - MemAvailable), ``ram_total_mb``, ``swap_used_mb``
        (SwapTotal - SwapFree), ``swap_total_mb`` (float MB), or ``{}`` when unreadable.
    """
    vals = {}
    try:
        with open(path) as fh:
            for ln in fh:
                parts = ln.split()
                if len(parts) >= 2:
                    vals[parts[0].rstrip(":")] = int(parts[1])  # kB
    except (OSError, ValueError):
        return {}
    if "MemTotal" not in vals:
        return {}
    avail = vals.get("MemAvailable", vals.get("MemFree", 0) + vals.get("Cached", 0))
    return {
        "ram_used_mb": (vals["MemTotal"] - avail) / 1024.0,
        "ram_total_mb": vals["MemTotal"] / 1024.0,
        "swap_used_mb": (vals.get("SwapTotal", 0) - vals.get("SwapFree", 0)) / 1024.0,
        "swap_total_mb": vals.get("SwapTotal", 0) / 1024.0,
    }


def process_rss_mb(pid="self"):
    """Current resident set size of a process in MB (``/proc/<pid>/status`` VmRSS), or None."""
    try:
        with open("/proc/%s/status" % pid) as fh:
            for ln in fh:
                if ln.startswith("VmRSS:"):
                    return int(ln.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def lifetime_peak_rss_mb():
    """Peak RSS of this process since it started (exec), MB.

    ``VmHWM`` of ``/proc/self/status`` (the high-water mark of this program's address space);
    where /proc is missing, ``getrusage`` ``ru_maxrss`` (which on Linux also carries the
    parent's peak across fork + exec, hence not preferred).
    """
    try:
        with open("/proc/self/status") as fh:
            for ln in fh:
                if ln.startswith("VmHWM:"):
                    return int(ln.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


class SystemSampler(object):
    """Background sampler of process RSS, system RAM / swap, GPU load and power.

    ``tegrastats --interval <ms>`` is used when on the PATH (and ``use_tegrastats``), else
    ``/proc/meminfo`` every ``interval_s``. The process RSS is always read from
    ``/proc/self/status``. Use as a context manager; :meth:`mark` starts a named phase
    (e.g. ``"run"``) so that summaries can be restricted to it.
    """

    def __init__(self, interval_s=0.2, use_tegrastats=True, tegrastats_cmd="tegrastats"):
        self.interval_s = max(0.05, float(interval_s))
        self.samples = []  # (t, phase, dict)
        self.rss = []  # (t, phase, rss_mb)
        self.phase = "start"
        self._stop = threading.Event()
        self._threads = []
        self._proc = None
        self.source = "/proc/meminfo"
        self.tegrastats_error = None
        self._teg_cmd = shutil.which(tegrastats_cmd) if use_tegrastats else None

    def mark(self, phase):
        """Start phase ``phase`` (str); later samples are tagged with it."""
        self.phase = phase

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        """Start the sampling threads (and ``tegrastats`` when available)."""
        if self._teg_cmd:
            try:
                ms = int(min(500, max(100, self.interval_s * 1000)))
                self._proc = subprocess.Popen([self._teg_cmd, "--interval", str(ms)],
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              universal_newlines=True)
                self.source = "tegrastats"
                t = threading.Thread(target=self._read_tegrastats)
                t.daemon = True
                t.start()
                self._threads.append(t)
            except OSError as e:
                self.tegrastats_error = str(e)
                self._proc = None
        t = threading.Thread(target=self._poll)
        t.daemon = True
        t.start()
        self._threads.append(t)
        # one immediate sample so that short runs are never empty
        self._sample_once()

    def _sample_once(self):
        now = time.time()
        r = process_rss_mb()
        if r is not None:
            self.rss.append((now, self.phase, r))
        if self._proc is None:
            mi = read_meminfo()
            if mi:
                self.samples.append((now, self.phase, mi))

    def _poll(self):
        while not self._stop.wait(self.interval_s):
            self._sample_once()

    def _read_tegrastats(self):
        proc = self._proc
        for ln in proc.stdout:
            d = parse_tegrastats_line(ln)
            if d:
                self.samples.append((time.time(), self.phase, d))
            if self._stop.is_set():
                break

    def stop(self):
        """Stop sampling (terminates ``tegrastats``)."""
        self._sample_once()
        self._stop.set()
        if self._proc is not None:
            try:
                self._proc.terminate()
                self._proc.wait(timeout=2)
            except Exception:  # noqa: BLE001 - best effort
                try:
                    self._proc.kill()
                except Exception:  # noqa: BLE001
                    pass
            if not self.samples:
                self.source = "/proc/meminfo (tegrastats gave no lines)"
                mi = read_meminfo()
                if mi:
                    self.samples.append((time.time(), self.phase, mi))
        for t in self._threads:
            t.join(timeout=2)

    def summary(self, phases=None):
        """Maxima / means over the samples of ``phases`` (all when None).

        Returns:
            dict ``peak_rss_mb`` (max sampled RSS, MB), ``ram_used_mb, swap_used_mb`` (max, MB),
            ``ram_total_mb, swap_total_mb``, ``gpu_load_pct_mean/max``, ``power_w_mean/max``
            and ``power_rail`` (when tegrastats reports them; W = mW / 1000),
            ``memory_source``, ``memory_samples``. Missing quantities are None.
        """
        def keep(ph):
            return phases is None or ph in phases

        rss = [r for (_, ph, r) in self.rss if keep(ph)]
        smp = [d for (_, ph, d) in self.samples if keep(ph)]

        def mx(key):
            v = [d[key] for d in smp if d.get(key) is not None]
            return float(max(v)) if v else None

        def mean(vals):
            return float(sum(vals)) / len(vals) if vals else None

        gpu = [d["gpu_load_pct"] for d in smp if "gpu_load_pct" in d]
        pw = [d["power_mw"] / 1000.0 for d in smp if "power_mw" in d]
        rails = [d["power_rail"] for d in smp if "power_rail" in d]
        return {
            "peak_rss_mb": float(max(rss)) if rss else None,
            "ram_used_mb": mx("ram_used_mb"),
            "ram_total_mb": mx("ram_total_mb"),
            "swap_used_mb": mx("swap_used_mb"),
            "swap_total_mb": mx("swap_total_mb"),
            "gpu_load_pct_mean": mean(gpu),
            "gpu_load_pct_max": float(max(gpu)) if gpu else None,
            "power_w_mean": mean(pw),
            "power_w_max": float(max(pw)) if pw else None,
            "power_rail": rails[0] if rails else None,
            "memory_source": self.source,
            "memory_samples": len(smp),
        }


# --------------------------------------------------------------------------- device info

def _run_cmd(args, timeout=5):
    """Output of a command (str, stripped), or None when absent or failing."""
    if shutil.which(args[0]) is None:
        return None
    try:
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True)
        out, _ = p.communicate(timeout=timeout)
        return out.strip() if p.returncode == 0 else None
    except Exception:  # noqa: BLE001 - informational only
        return None


def _read_text(path):
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None


def parse_l4t_release(text):
    """L4T version from ``/etc/nv_tegra_release`` text, e.g. ``"# R32 (release), REVISION: 6.1"``
    -> ``"32.6.1"``; None when not recognised."""
    if not text:
        return None
    m = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", text)
    return "%s.%s" % (m.group(1), m.group(2)) if m else None


def parse_nvpmodel(text):
    """Power mode name from ``nvpmodel -q`` output (``"NV Power Mode: MAXN"`` -> ``"MAXN"``)."""
    if not text:
        return None
    m = re.search(r"NV Power Mode:\s*(\S+)", text)
    return m.group(1) if m else None


def device_info():
    """What this machine is: model, hostname, L4T / JetPack, power mode, OS, CPU.

    Returns:
        dict ``model`` (``/proc/device-tree/model`` on Jetson, else ``"<cpu model> (<arch>)"``),
        ``is_jetson`` (bool), ``hostname``, ``l4t``, ``jetpack``, ``power_mode`` (None when
        unknown), ``kernel``, ``machine``, ``cpu_count`` (logical), ``physical_cores``
        (:func:`physical_cores`), ``os``.
    """
    dt_model = _read_text("/proc/device-tree/model")
    l4t = parse_l4t_release(_read_text("/etc/nv_tegra_release"))
    jetpack = _run_cmd(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"])
    power_mode = parse_nvpmodel(_run_cmd(["nvpmodel", "-q"]))
    cpu_model = None
    text = _read_text("/proc/cpuinfo") or ""
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    if m:
        cpu_model = m.group(1).strip()
    os_name = None
    osr = _read_text("/etc/os-release") or ""
    m = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', osr, re.M)
    if m:
        os_name = m.group(1)
    is_jetson = bool(l4t) or bool(dt_model and ("jetson" in dt_model.lower() or "nvidia" in dt_model.lower()))
    model = dt_model if dt_model else "%s (%s)" % (cpu_model or platform.processor() or "unknown CPU",
                                                     platform.machine())
    return {
        "model": model,
        "is_jetson": is_jetson,
        "hostname": platform.node(),
        "l4t": l4t,
        "jetpack": jetpack or None,
        "power_mode": power_mode,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "physical_cores": physical_cores(),
        "os": os_name,
    }


def _module_version(name):
    mod = sys.modules.get(name)
    return getattr(mod, "__version__", None) if mod is not None else None


# --------------------------------------------------------------------------- runtimes

def _import_runtime(runtime):
    mod = RUNTIME_MODULES[runtime]
    try:
        return __import__(mod)
    except ImportError as e:
        raise RunnerError("runtime_missing",
                          "runtime %r needs the Python module %r, which is not installed for %s "
                          "(%s): %s" % (runtime, mod, sys.executable, platform.node(), e),
                          EXIT_RUNTIME_MISSING)


def _check_model_file(path):
    if not os.path.isfile(path):
        raise RunnerError("model_unreadable", "model file %r does not exist on %s"
                          % (path, platform.node()), EXIT_MODEL_UNREADABLE)
    try:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest(), os.path.getsize(path)
    except OSError as e:
        raise RunnerError("model_unreadable", "model file %r is not readable: %s" % (path, e),
                          EXIT_MODEL_UNREADABLE)


def onnx_precision(path):
    """Guess the precision of an ONNX file from its first input's type and its ops.

    Returns ``"int8"`` (QuantizeLinear / QLinear* / *Integer ops), ``"fp16"`` (float16 input,
    or mostly float16 initializers behind float32 I/O) or ``"fp32"``; None when the ``onnx``
    package is missing.
    """
    try:
        import onnx
    except ImportError:
        return None
    m = onnx.load(path, load_external_data=False)
    ops = set(n.op_type for n in m.graph.node)
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
              "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}:
        return "int8"
    inits = set(i.name for i in m.graph.initializer)
    for i in m.graph.input:
        if i.name not in inits:
            if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
                return "fp16"
            break
    # fp16 weights behind float32 I/O (converters that keep the I/O types insert Casts)
    n16 = sum(1 for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    n32 = sum(1 for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    return "fp16" if n16 > n32 else "fp32"


# --------------------------------------------------------------------------- threads, input shape

def physical_cores():
    """Physical CPU cores of THIS machine (the study's thread policy: one intra-op thread per core).

    ``psutil.cpu_count(logical=False)`` when psutil is installed; else the distinct
    (package, core) pairs of ``/sys/devices/system/cpu/cpu*/topology`` among the CPUs this
    process may run on; else ``/proc/cpuinfo`` (``physical id``, ``core id``); else
    ``os.cpu_count()``. Decided on the machine that runs the model (a device run never
    uses the host's count).

    Returns:
        int >= 1.
    """
    try:
        import psutil
        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except Exception:  # noqa: BLE001 - psutil is optional on devices
        pass
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cpus = list(range(os.cpu_count() or 1))
    pairs = set()
    for c in cpus:
        base = "/sys/devices/system/cpu/cpu%d/topology/" % c
        pkg, core = _read_text(base + "physical_package_id"), _read_text(base + "core_id")
        if pkg is None or core is None:
            pairs = set()
            break
        pairs.add((pkg, core))
    if pairs:
        return len(pairs)
    for block in (_read_text("/proc/cpuinfo") or "").split("\n\n"):
        pm = re.search(r"^physical id\s*:\s*(\d+)", block, re.M)
        cm = re.search(r"^core id\s*:\s*(\d+)", block, re.M)
        if pm and cm:
            pairs.add((pm.group(1), cm.group(1)))
    if pairs:
        return len(pairs)
    return max(1, len(cpus))


def resolve_input_shape(dims, input_hw=None, batch=None, input_name="input"):
    """The NCHW shape to feed: the model's static dimensions, the given ones where it has none.

    Args:
        dims: the model input's dimensions (ints for static ones; str / None / negative for
            dynamic ones), length 4 (N, C, H, W); None when the runtime does not say
            (TorchScript, pickled modules): everything must then be given.
        input_hw: ``(H, W)`` px from ``--input-hw`` or None.
        batch: N from ``--batch`` or None (1 when the model's N is dynamic).
        input_name: named in error messages.

    Returns:
        ``((N, C, H, W) ints, source)`` with ``source`` ``"model"`` (every dim static),
        ``"--input-hw"`` (H, W given for dynamic dims) or ``"model + --input-hw"``.

    Raises:
        RunnerError(kind ``bad_argument``, exit 2): H or W dynamic and ``input_hw`` not given
            (the message says to pass ``--input-hw H W``), or a given value that contradicts a
            static dimension of the model, or a model input that is not 4-D.
    """
    def static(d):
        return isinstance(d, int) and d > 0

    if dims is None:
        dims = [None, 3, None, None]
    dims = list(dims)
    if len(dims) != 4:
        raise RunnerError("bad_argument", "model input %r has shape %r; the runner feeds NCHW images "
                          "(4 dimensions)" % (input_name, dims), EXIT_BAD_ARGS)
    n, c, h, w = dims
    if input_hw is not None:
        gh, gw = int(input_hw[0]), int(input_hw[1])
        for name, d, g in (("height", h, gh), ("width", w, gw)):
            if static(d) and d != g:
                raise RunnerError("bad_argument", "model input %r has a static shape %r (fixed %s %d px) "
                                  "but --input-hw %d %d was given; omit --input-hw (the model's own "
                                  "shape is used) or pass %s %s" % (input_name, dims, name, d, gh, gw, h, w),
                                  EXIT_BAD_ARGS)
    if not (static(h) and static(w)):
        if input_hw is None:
            raise RunnerError("bad_argument", "model input %r has dynamic dimensions %r: its height / "
                              "width are not fixed in the file, so pass --input-hw H W" % (input_name, dims),
                              EXIT_BAD_ARGS)
        h2, w2 = int(input_hw[0]), int(input_hw[1])
    else:
        h2, w2 = h, w
    if batch is not None and static(n) and int(batch) != n:
        raise RunnerError("bad_argument", "model input %r has a static batch of %d (shape %r) but "
                          "--batch %d was given; omit --batch" % (input_name, n, dims, int(batch)),
                          EXIT_BAD_ARGS)
    n2 = n if static(n) else int(batch or 1)
    c2 = c if static(c) else 3
    if all(static(d) for d in (h, w)):
        source = "model"
    elif any(static(d) for d in (h, w)):
        source = "model + --input-hw"
    else:
        source = "--input-hw"
    return (int(n2), int(c2), int(h2), int(w2)), source


def seeded_input(shape, dtype="float32"):
    """The one benchmark input: ``numpy.random.RandomState(0).standard_normal(shape)`` cast to
    ``dtype`` (the same array for every model and runtime of the same shape)."""
    import numpy as np
    return np.random.RandomState(0).standard_normal(tuple(int(s) for s in shape)).astype(dtype)


def make_ort_session(path, threads=None, providers=None, session_options=None):
    """Create an onnxruntime ``InferenceSession`` (a copy of :func:`study.bench.ort_session`).

    Same settings as the host factory: ``intra_op_num_threads = threads``,
    ``inter_op_num_threads = 1``, sequential execution, warnings off, and denormals
    flushed to zero in ORT's threads (``session.set_denormal_as_zero = 1``, ORT's
    documented session config key).

    Args:
        path: ONNX file.
        threads: ``intra_op_num_threads`` (None: onnxruntime's default).
        providers: list of execution providers (None: CUDA then CPU when available, else CPU:
            on a device, the GPU when it has one).
        session_options: an ``onnxruntime.SessionOptions`` to start from.

    Returns:
        (session, feed_dtype) with ``feed_dtype`` the numpy dtype of the first input.
    """
    import numpy as np
    ort = __import__("onnxruntime")
    so = session_options if session_options is not None else ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    if providers is None:
        avail = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail] or avail
    sess = ort.InferenceSession(str(path), sess_options=so, providers=list(providers))
    t = sess.get_inputs()[0].type
    dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(t, np.float32)
    return sess, dtype


def ort_runner(path, hw, batch, threads, precision, providers=None):
    """``(fn, None, info)`` running ONNX file ``path`` once on the seeded input.

    The input shape is the model's own where its first input is static; ``hw`` / ``batch``
    (None allowed) fill dynamic dimensions (:func:`resolve_input_shape`).
    """
    import numpy as np
    sess, dtype = make_ort_session(path, threads, providers)
    inp = sess.get_inputs()[0]
    shape, source = resolve_input_shape(inp.shape, hw, batch, inp.name)
    x = seeded_input(shape, dtype)
    feed = {inp.name: x}
    fn = lambda: sess.run(None, feed)  # noqa: E731
    info = {"providers": sess.get_providers(), "onnxruntime": _module_version("onnxruntime"),
            "input_dtype": np.dtype(dtype).name, "input_shape": list(shape), "input_shape_source": source,
            "model_input_dims": [d if isinstance(d, int) else str(d) for d in inp.shape],
            "ort_intra_op_threads": sess.get_session_options().intra_op_num_threads}
    actual = onnx_precision(path)
    if actual is not None and actual != precision:
        info["precision_in_file"] = actual
    return fn, None, info


def _is_torchscript(path):
    """Whether ``path`` is a TorchScript archive (a zip holding ``code/``) rather than a pickle."""
    import zipfile
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())


def torch_runner(path, hw, batch, threads, precision, providers=None):
    """``(fn, sync, info)`` running a torch model file once, eager, under ``inference_mode``.

    The file is TorchScript (``torch.jit.load``) or a whole pickled ``nn.Module`` written by
    :func:`study.bench.save_torch_model` (``torch.save(model)``), loaded with
    ``torch.load(weights_only=False)``: unpickling runs code from the file, so only load
    files you wrote yourself (the study writes them on the same machine just before). Its
    classes must be importable here. ``torch.set_flush_denormal(True)`` is set before
    anything runs (subnormal floats slow x86 kernels ~100x), then ``threads`` intra-op
    threads. The input is :func:`seeded_input` of (batch or 1, 3, H, W) with ``hw``
    required (a torch module does not declare its input shape). CUDA when available.
    """
    torch = __import__("torch")
    flushed = bool(torch.set_flush_denormal(True))
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape, source = resolve_input_shape(None, hw, batch, "image")
    try:
        if _is_torchscript(path):
            model = torch.jit.load(path, map_location=dev)
            kind = "torchscript"
        else:
            model = torch.load(path, map_location=dev, weights_only=False)
            kind = "pickled nn.Module"
            if isinstance(model, dict) and "model" in model:
                model = model["model"]
            if not isinstance(model, torch.nn.Module):
                raise TypeError("the file holds a %s, not an nn.Module" % type(model).__name__)
    except Exception as e:  # noqa: BLE001
        raise RunnerError("model_unreadable", "model file %r is neither a TorchScript file nor a pickled "
                          "nn.Module torch.load can read: %s: %s" % (path, type(e).__name__, e),
                          EXIT_MODEL_UNREADABLE)
    model.eval()
    dtype = torch.float32
    if precision == "fp16":
        model = model.half()
        dtype = torch.float16
    elif precision == "int8":
        raise RunnerError("run_failed", "runtime 'torch' takes int8 only as a TorchScript file that is "
                          "already quantized; pass --precision fp32 for such a file", EXIT_RUN_FAILED)
    x = torch.from_numpy(seeded_input(shape)).to(dev, dtype)

    def fn():
        with torch.inference_mode():
            model(x)

    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    return fn, sync, {"torch": torch.__version__, "torch_device": str(dev), "torch_file": kind,
                      "torch_threads": torch.get_num_threads(), "flush_denormal": flushed,
                      "input_shape": list(shape), "input_shape_source": source}


def load_trt_engine(path, precision, workspace_mb=1024):
    """Deserialize a TensorRT engine (``.engine``/``.plan``/``.trt``) or build one from ONNX.

    fp16 sets ``BuilderFlag.FP16``; int8 sets ``BuilderFlag.INT8`` and needs an ONNX with Q/DQ
    nodes (explicit quantization; no calibrator is run here). Works with TensorRT 8.x and 10.x.

    Returns:
        a ``tensorrt.ICudaEngine``. Raises RunnerError on parse / build failure.
    """
    trt = __import__("tensorrt")
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if os.path.splitext(path)[1].lower() in (".engine", ".plan", ".trt"):
        with open(path, "rb") as fh:
            engine = runtime.deserialize_cuda_engine(fh.read())
        if engine is None:
            raise RunnerError("model_unreadable", "TensorRT could not deserialize %r" % path,
                              EXIT_MODEL_UNREADABLE)
        return engine
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt, "NetworkDefinitionCreationFlag") and \
            hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with open(path, "rb") as fh:
        ok = parser.parse(fh.read())
    if not ok:
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RunnerError("model_unreadable", "TensorRT's ONNX parser rejected %r: %s" % (path, errs),
                          EXIT_MODEL_UNREADABLE)
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    else:
        config.max_workspace_size = workspace_mb << 20
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    if hasattr(builder, "build_serialized_network"):
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RunnerError("run_failed", "TensorRT failed to build an engine from %r" % path,
                              EXIT_RUN_FAILED)
        engine = runtime.deserialize_cuda_engine(plan)
    else:
        engine = builder.build_engine(network, config)
    if engine is None:
        raise RunnerError("run_failed", "TensorRT failed to build an engine from %r" % path, EXIT_RUN_FAILED)
    return engine


def trt_runner(path, hw, batch, threads, precision, providers=None):
    """``(fn, sync, info)`` running a TensorRT engine (from :func:`load_trt_engine`) once.

    Static input dimensions of the engine are used as they are; ``hw`` / ``batch`` fill the
    dynamic ones (``hw`` None with a dynamic H / W raises RunnerError ``bad_argument``).
    ``threads`` and ``providers`` are unused.
    """
    import numpy as np
    trt = __import__("tensorrt")
    engine = load_trt_engine(path, precision)
    context = engine.create_execution_context()
    # device buffers: pycuda if present, else torch
    alloc = None
    sync = None
    try:
        import pycuda.autoinit  # noqa: F401
        import pycuda.driver as cuda

        def alloc(shape, np_dtype):
            n = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
            return cuda.mem_alloc(max(n, 1))

        def ptr(buf):
            return int(buf)

        sync = cuda.Context.synchronize
        backend = "pycuda"
    except ImportError:
        try:
            import torch
        except ImportError:
            raise RunnerError("runtime_missing", "runtime 'trt' needs pycuda or torch (CUDA) for device "
                              "buffers on %s; neither is installed" % platform.node(), EXIT_RUNTIME_MISSING)
        if not torch.cuda.is_available():
            raise RunnerError("runtime_missing", "runtime 'trt' needs CUDA; torch sees no CUDA device on %s"
                              % platform.node(), EXIT_RUNTIME_MISSING)

        def alloc(shape, np_dtype):
            return torch.empty(tuple(int(s) for s in shape), dtype={
                np.float16: torch.float16, np.float32: torch.float32, np.int32: torch.int32,
                np.int8: torch.int8, np.int64: torch.int64}.get(np.dtype(np_dtype).type, torch.float32),
                device="cuda")

        def ptr(buf):
            return int(buf.data_ptr())

        sync = torch.cuda.synchronize
        backend = "torch"
    if hasattr(engine, "num_io_tensors"):  # TensorRT >= 8.5 / 10
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        bufs = {}
        for n in names:
            is_in = engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
            shape = list(engine.get_tensor_shape(n))
            if is_in:
                if len(shape) == 4:
                    shape, _ = resolve_input_shape([d if d >= 0 else None for d in shape], hw, batch, n)
                else:
                    shape = [int(batch or 1) if (i == 0 and s < 0) else s for i, s in enumerate(shape)]
                context.set_input_shape(n, list(shape))
        for n in names:
            shape = list(context.get_tensor_shape(n))
            bufs[n] = alloc(shape, trt.nptype(engine.get_tensor_dtype(n)))
            context.set_tensor_address(n, ptr(bufs[n]))
        stream = 0
        if backend == "torch":
            import torch
            stream = torch.cuda.current_stream().cuda_stream

        def fn():
            context.execute_async_v3(stream)
    else:  # TensorRT 7 / 8.x binding API (JetPack 4.6: TRT 8.2)
        bindings = []
        bufs = []
        for i in range(engine.num_bindings):
            shape = list(engine.get_binding_shape(i))
            if engine.binding_is_input(i) and any(s < 0 for s in shape):
                shape, _ = resolve_input_shape([d if d >= 0 else None for d in shape], hw, batch,
                                               engine.get_binding_name(i))
                context.set_binding_shape(i, list(shape))
            shape = list(context.get_binding_shape(i))
            b = alloc(shape, trt.nptype(engine.get_binding_dtype(i)))
            bufs.append(b)
            bindings.append(ptr(b))

        def fn():
            context.execute_v2(bindings)
    return fn, sync, {"tensorrt": trt.__version__, "trt_buffers": backend}


LOADERS = {"ort": ort_runner, "torch": torch_runner, "trt": trt_runner}


def _is_oom(exc):
    if isinstance(exc, MemoryError):
        return True
    s = str(exc).lower()
    return any(k in s for k in ("out of memory", "failed to allocate memory", "bad_alloc",
                                "cannot allocate memory", "std::bad_alloc", "outofmemory"))


def run_benchmark(model, runtime="ort", precision="fp32", input_hw=None, batch=None, threads=None,
                  warmup_s=1.0, min_s=3.0, min_runs=50, warmup_runs=10, sample_interval_s=0.2,
                  use_tegrastats=True, model_name=None, providers=None, keep_latencies=False):
    """Load ``model`` with ``runtime``, time it and sample memory / power (what ``main`` runs).

    Args:
        model: model file path (ONNX for ort / trt, TorchScript or a
            :func:`study.bench.save_torch_model` file for torch, or a TRT engine).
        runtime: ``ort``, ``trt`` or ``torch``. precision: ``fp32``, ``fp16`` or ``int8`` (for
            ort the file's own precision is used; a mismatch is recorded in
            ``precision_in_file``).
        input_hw: (H, W) px, or None: the model's static input shape is used (ONNX / TRT);
            needed only for dynamic dimensions and for torch files
            (:func:`resolve_input_shape`). batch: N, or None (the model's static N, else 1).
        threads: intra-op CPU threads; None or 0: :func:`physical_cores` of THIS machine
            (the study's thread policy, decided where the model runs).
        warmup_s, min_s, min_runs, warmup_runs: see :func:`time_callable`.
        model_name: name recorded for the file (default its basename).
        providers: ORT execution providers (None: CUDA then CPU when available).
        keep_latencies: also return every timed latency (``latencies_ms``, list of ms).

    Returns:
        the result dict (see module docstring; ``ok`` is True) with ``threads`` (the count
        used) and ``threads_source``, ``input_hw`` / ``input_shape`` (what was fed) and
        ``input_shape_source``, ``pid`` (this process) and ``load_s`` (s).

    Raises:
        RunnerError: bad argument (code 2: e.g. dynamic input and no ``input_hw``), runtime
            missing (3), model unreadable (4), out of memory (5), other (6).
    """
    if runtime not in LOADERS:
        raise RunnerError("run_failed", "unknown runtime %r (choose %s)" % (runtime, ", ".join(RUNTIMES)),
                          EXIT_RUN_FAILED)
    sha, nbytes = _check_model_file(model)
    _import_runtime(runtime)
    import numpy as np
    hw = None if input_hw is None else (int(input_hw[0]), int(input_hw[1]))
    if threads:
        threads, threads_source = int(threads), "--threads"
    else:
        threads, threads_source = physical_cores(), "physical cores of this machine (default)"
    with SystemSampler(interval_s=sample_interval_s, use_tegrastats=use_tegrastats) as sampler:
        before = sampler.summary()
        sampler.mark("load")
        t0 = time.perf_counter()
        try:
            fn, sync, info = LOADERS[runtime](model, hw, None if batch is None else int(batch), threads,
                                              precision, providers=providers)
        except RunnerError:
            raise
        except Exception as e:  # noqa: BLE001
            if _is_oom(e):
                raise RunnerError("oom", "out of memory while loading %r with %s on %s: %s"
                                  % (model, runtime, platform.node(), e), EXIT_OOM)
            raise RunnerError("model_unreadable" if runtime == "ort" and "load" in str(e).lower()
                              else "run_failed",
                              "%s could not load %r: %s: %s" % (runtime, model, type(e).__name__, e),
                              EXIT_MODEL_UNREADABLE if runtime == "ort" and "load" in str(e).lower()
                              else EXIT_RUN_FAILED)
        load_s = time.perf_counter() - t0
        sampler.mark("run")
        try:
            timing = time_callable(fn, warmup_s=warmup_s, min_s=min_s, min_runs=min_runs,
                                   warmup_runs=warmup_runs, sync=sync)
        except Exception as e:  # noqa: BLE001
            if _is_oom(e):
                raise RunnerError("oom", "out of memory while running %r with %s on %s: %s"
                                  % (model, runtime, platform.node(), e), EXIT_OOM)
            raise RunnerError("run_failed", "%s failed running %r: %s: %s"
                              % (runtime, model, type(e).__name__, e), EXIT_RUN_FAILED)
        sampler.mark("end")
    mem = sampler.summary(phases=("load", "run", "end"))
    shape = info.get("input_shape") or [batch or 1, 3, hw[0] if hw else None, hw[1] if hw else None]
    res = {"schema": SCHEMA, "ok": True, "runtime": runtime, "precision": precision,
           "model_file": model_name or os.path.basename(model), "model_sha256": sha,
           "model_bytes": nbytes, "input_hw": list(shape[2:]), "input_shape": list(shape),
           "input_shape_source": info.get("input_shape_source", "--input-hw"),
           "threads": threads, "threads_source": threads_source, "load_s": load_s, "pid": os.getpid()}
    res.update(summarize_latencies(timing["latencies_s"], int(shape[0])))
    if keep_latencies:
        res["latencies_ms"] = [v * 1000.0 for v in timing["latencies_s"]]
    res.update(mem)
    res["peak_rss_mb"] = max(mem["peak_rss_mb"] or 0.0, lifetime_peak_rss_mb())
    res["rss_note"] = "max of sampled VmRSS and VmHWM (peak since exec) of the runner process"
    res["ram_used_mb_before"] = before.get("ram_used_mb")
    res["swap_used_mb_before"] = before.get("swap_used_mb")
    res["warmup_runs_done"] = timing["warmup_runs"]
    res["warmup_s_done"] = timing["warmup_s"]
    res["measure_s"] = timing["measure_s"]
    res["settings"] = {"warmup_s": warmup_s, "min_s": min_s, "min_runs": min_runs,
                       "warmup_runs": warmup_runs, "sample_interval_s": sample_interval_s}
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for k in ("onnxruntime", "tensorrt", "torch"):
        v = _module_version(k)
        if v:
            versions[k] = v
    res["runtime_version"] = versions.get(RUNTIME_MODULES[runtime])
    res["versions"] = versions
    res["runtime_info"] = info
    res["device"] = device_info()
    res["python_executable"] = sys.executable
    return res


def build_parser():
    """argparse parser of the runner's command line (every option says its unit and default)."""
    p = argparse.ArgumentParser(description="segcompress device-side benchmark runner: loads one model, "
                                "times single inferences, prints ONE JSON document on stdout")
    p.add_argument("--model", required=True,
                   help="model file: ONNX (--runtime ort/trt), TensorRT engine (.engine/.plan/.trt), "
                        "TorchScript or a study.bench.save_torch_model file (--runtime torch)")
    p.add_argument("--model-name", default=None, help="name to record for the model (default: the file's basename)")
    p.add_argument("--runtime", choices=RUNTIMES, default="ort",
                   help="ort = onnxruntime, trt = TensorRT, torch = PyTorch eager (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="precision label; trt builds fp16/int8 engines from it, ort records the file's own "
                        "(default: %(default)s)")
    p.add_argument("--input-hw", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="input height and width in px; default: read from the model's static input shape. "
                        "Needed only when the model's H/W are dynamic, and for torch files")
    p.add_argument("--batch", type=int, default=None,
                   help="images per inference (N); default: the model's static N, else 1")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op CPU threads; 0 (default) = the physical cores of the machine running "
                        "the model (the study's thread policy)")
    p.add_argument("--providers", default=None,
                   help="comma-separated ORT execution providers, e.g. CPUExecutionProvider "
                        "(default: CUDA then CPU, of those installed)")
    p.add_argument("--warmup-s", type=float, default=1.0,
                   help="seconds of untimed warm-up, at least (default: %(default)s s)")
    p.add_argument("--min-s", type=float, default=3.0,
                   help="seconds of timed inferences, at least (default: %(default)s s)")
    p.add_argument("--min-runs", type=int, default=50,
                   help="timed inferences, at least (default: %(default)s)")
    p.add_argument("--warmup-runs", type=int, default=10,
                   help="untimed warm-up inferences, at least (default: %(default)s)")
    p.add_argument("--sample-interval-s", type=float, default=0.2,
                   help="memory / power sampling period in s (default: %(default)s s)")
    p.add_argument("--no-tegrastats", action="store_true", help="read /proc/meminfo even on a Jetson")
    p.add_argument("--latencies", action="store_true",
                   help="also print every timed latency (latencies_ms, ms) in the JSON")
    return p


def main(argv=None):
    """Entry point: parse ``argv``, run, print one JSON document; returns the exit code."""
    args = build_parser().parse_args(argv)
    if (args.batch is not None and args.batch < 1) or args.min_runs < 1 or \
            (args.input_hw is not None and min(args.input_hw) < 1):
        log("error: --batch, --min-runs and --input-hw must be >= 1")
        return EXIT_BAD_ARGS
    try:
        res = run_benchmark(args.model, runtime=args.runtime, precision=args.precision,
                            input_hw=args.input_hw, batch=args.batch, threads=args.threads or None,
                            warmup_s=args.warmup_s, min_s=args.min_s, min_runs=args.min_runs,
                            warmup_runs=args.warmup_runs, sample_interval_s=args.sample_interval_s,
                            use_tegrastats=not args.no_tegrastats, model_name=args.model_name,
                            providers=args.providers.split(",") if args.providers else None,
                            keep_latencies=args.latencies)
        code = EXIT_OK
    except RunnerError as e:
        log("error: %s" % e)
        res = {"schema": SCHEMA, "ok": False, "error_kind": e.kind, "error": str(e),
               "runtime": args.runtime, "precision": args.precision, "exit_code": e.code}
        code = e.code
    except MemoryError as e:
        res = {"schema": SCHEMA, "ok": False, "error_kind": "oom", "exit_code": EXIT_OOM,
               "error": "out of memory on %s: %s" % (platform.node(), e)}
        code = EXIT_OOM
    sys.stdout.write(json.dumps(res, sort_keys=True) + "\n")
    sys.stdout.flush()
    return code


def serve_fork(preload=(), requests=None, replies=None):
    """Fork server: import ``preload`` once, then run each request in a FRESH forked process.

    Importing torch (and the modules a pickled model needs) takes seconds; a forked child
    starts with them imported but has run nothing: no model, no thread pool, its own
    memory (its ``peak_rss_mb`` counts the imported libraries it touches, as an exec'd
    runner's does). Each request is one JSON line on ``requests`` (stdin)
    ``{"argv": [runner arguments], "out": path}``: the child runs :func:`main` with ``argv``
    and its stdout (the one JSON document) redirected to ``out``; the server answers one
    JSON line ``{"pid": child pid, "code": exit code}`` on ``replies`` (stdout) when the
    child has exited. The first line it writes is ``{"ready": true, "pid": ...,
    "preloaded": [...]}``. Ends at end of input. Run as ``device_runner.py --serve-fork
    [--preload MOD ...]``.
    """
    requests = requests or sys.stdin
    replies = replies or sys.stdout
    loaded = []
    for mod in preload:
        try:
            __import__(mod)
            loaded.append(mod)
        except Exception as e:  # noqa: BLE001 - a missing module is imported (and fails) in the child
            log("fork server: preloading %s failed: %s: %s" % (mod, type(e).__name__, e))
    replies.write(json.dumps({"ready": True, "pid": os.getpid(), "preloaded": loaded}) + "\n")
    replies.flush()
    for line in requests:
        if not line.strip():
            continue
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: run the benchmark, never return into the server loop
            code = EXIT_RUN_FAILED
            try:
                fd = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(fd, 1)
                os.close(fd)
                fd = os.open(os.devnull, os.O_RDONLY)  # the request pipe is the server's alone
                os.dup2(fd, 0)
                os.close(fd)
                code = main(req["argv"])
            except SystemExit as e:  # argparse errors
                code = e.code if isinstance(e.code, int) else EXIT_BAD_ARGS
            except BaseException as e:  # noqa: BLE001 - reported by the exit code and stderr
                log("fork child failed: %s: %s" % (type(e).__name__, e))
            finally:
                try:
                    sys.stdout.flush()
                finally:
                    os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
        replies.write(json.dumps({"pid": pid, "code": code}) + "\n")
        replies.flush()
    return EXIT_OK


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-fork":
        mods = sys.argv[3:] if len(sys.argv) > 2 and sys.argv[2] == "--preload" else []
        sys.exit(serve_fork(mods))
    sys.exit(main())
