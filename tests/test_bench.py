"""Tests of the local benchmark API, the shared timing loop and the device runner (no SSH here)."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from study import bench
from study import device_runner as dr

NANO = ("RAM 2441/3964MB (lfb 117x4MB) SWAP 1030/1982MB (cached 32MB) CPU [23%@1479,18%@1479,12%@1479,9%@1479] "
        "EMC_FREQ 0% GR3D_FREQ 76% PLL@36C CPU@38.5C PMIC@100C GPU@36C AO@44C thermal@37.25C "
        "POM_5V_IN 4831/4526 POM_5V_GPU 1425/1107 POM_5V_CPU 762/815")
ORIN = ("RAM 3245/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) CPU [5%@1510,2%@1510,off,1%@729,0%@729,3%@729] "
        "GR3D_FREQ 45% cpu@47.5C soc2@45.1C VDD_IN 5320mW/5120mW VDD_CPU_GPU_CV 1180mW/1060mW "
        "VDD_SOC 1520mW/1490mW")
# JetPack 6 prints the GPU frequency after the load and a date prefix
ORIN_JP6 = ("11-22-2025 10:15:01 RAM 2900/7620MB (lfb 12x4MB) SWAP 12/3810MB (cached 0MB) "
            "CPU [10%@729,4%@729,2%@729,1%@729,0%@729,0%@729] GR3D_FREQ 12%@[305] cpu@45.2C "
            "VDD_IN 4200mW/4100mW VDD_CPU_GPU_CV 600mW/590mW VDD_SOC 1300mW/1290mW")

FAST = dict(warmup_s=0.01, min_s=0.05, min_runs=5, warmup_runs=2)


def _tiny_onnx(path: Path, fp16: bool = False) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dt = np.float16 if fp16 else np.float32
    et = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    w = numpy_helper.from_array(np.random.RandomState(0).standard_normal((4, 3, 3, 3)).astype(dt), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "tiny", [helper.make_tensor_value_info("x", et, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", et, ["n", 4, "h", "w"])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_onnx(tmp_path_factory.mktemp("m") / "tiny.onnx")


# --------------------------------------------------------------------------- timing loop

def test_time_callable_respects_minimum_runs_time_and_sync():
    calls = {"fn": 0, "sync": 0}

    def fn():
        calls["fn"] += 1
        time.sleep(0.002)

    def sync():
        calls["sync"] += 1

    t = dr.time_callable(fn, warmup_s=0.02, min_s=0.05, min_runs=7, warmup_runs=3, sync=sync)
    assert len(t["latencies_s"]) >= 7 and t["measure_s"] >= 0.05
    assert t["warmup_runs"] >= 3 and t["warmup_s"] >= 0.02
    assert calls["fn"] == calls["sync"] == t["warmup_runs"] + len(t["latencies_s"])
    assert min(t["latencies_s"]) >= 0.002
    # many fast runs: the time floor dominates
    t = dr.time_callable(lambda: None, warmup_s=0, min_s=0.03, min_runs=1, warmup_runs=0)
    assert len(t["latencies_s"]) > 1 and t["measure_s"] >= 0.03
    with pytest.raises(ValueError):
        dr.time_callable(lambda: None, min_runs=0)


def test_summarize_latencies_known_values():
    s = dr.summarize_latencies([0.001, 0.002, 0.003, 0.004], batch=2)
    assert s["latency_ms_p50"] == pytest.approx(2.5)
    assert s["latency_ms_mean"] == pytest.approx(2.5)
    assert s["latency_ms_p99"] == pytest.approx(3.97)
    assert s["latency_ms_std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert s["fps"] == pytest.approx(2 * 1000 / 2.5)
    assert s["runs"] == 4 and s["batch"] == 2


# --------------------------------------------------------------------------- tegrastats / device info

def test_parse_tegrastats_nano():
    d = dr.parse_tegrastats_line(NANO)
    assert (d["ram_used_mb"], d["ram_total_mb"]) == (2441, 3964)
    assert (d["swap_used_mb"], d["swap_total_mb"], d["swap_cached_mb"]) == (1030, 1982, 32)
    assert d["gpu_load_pct"] == 76 and d["emc_freq_pct"] == 0
    assert len(d["cpu"]) == 4 and d["cpu"][0] == {"load_pct": 23, "freq_mhz": 1479}
    assert d["power_rail"] == "POM_5V_IN" and d["power_mw"] == 4831 and d["power_avg_mw"] == 4526
    assert d["rails_mw"]["POM_5V_GPU"] == {"cur": 1425, "avg": 1107}
    assert d["temps_c"]["thermal"] == pytest.approx(37.25) and d["temps_c"]["PMIC"] == 100


def test_parse_tegrastats_orin():
    d = dr.parse_tegrastats_line(ORIN)
    assert (d["ram_used_mb"], d["ram_total_mb"], d["swap_used_mb"], d["swap_total_mb"]) == (3245, 7620, 0, 3810)
    assert d["gpu_load_pct"] == 45
    assert d["cpu"][2] is None and len(d["cpu"]) == 6  # an "off" core
    assert d["power_rail"] == "VDD_IN" and d["power_mw"] == 5320 and d["power_avg_mw"] == 5120
    assert d["rails_mw"]["VDD_SOC"] == {"cur": 1520, "avg": 1490}
    assert d["temps_c"] == {"cpu": 47.5, "soc2": 45.1}
    d6 = dr.parse_tegrastats_line(ORIN_JP6)
    assert d6["gpu_load_pct"] == 12 and d6["power_mw"] == 4200 and d6["swap_used_mb"] == 12
    assert dr.parse_tegrastats_line("nothing to see here") == {}


def test_l4t_nvpmodel_meminfo_parsers(tmp_path):
    assert dr.parse_l4t_release("# R32 (release), REVISION: 6.1, GCID: 27863751, BOARD: t210ref, EABI: aarch64") \
        == "32.6.1"
    assert dr.parse_l4t_release("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref") == "35.4.1"
    assert dr.parse_l4t_release(None) is None
    assert dr.parse_nvpmodel("NV Power Mode: MAXN\n0") == "MAXN"
    assert dr.parse_nvpmodel("NV Power Mode: 15W\n2") == "15W"
    mi = tmp_path / "meminfo"
    mi.write_text("MemTotal:        4059652 kB\nMemFree:          100000 kB\nMemAvailable:     227244 kB\n"
                  "SwapTotal:       2029820 kB\nSwapFree:         975100 kB\n")
    d = dr.read_meminfo(str(mi))
    assert d["ram_total_mb"] == pytest.approx(4059652 / 1024)
    assert d["ram_used_mb"] == pytest.approx((4059652 - 227244) / 1024)
    assert d["swap_used_mb"] == pytest.approx((2029820 - 975100) / 1024)
    assert dr.read_meminfo(str(tmp_path / "nope")) == {}
    info = dr.device_info()
    assert info["model"] and info["cpu_count"] >= 1


def test_sampler_uses_tegrastats_when_present(tmp_path):
    """A stand-in ``tegrastats`` that prints recorded Nano lines: RAM/swap/power come from it."""
    fake = tmp_path / "tegrastats"
    fake.write_text("#!/bin/sh\nwhile true; do echo '%s'; sleep 0.05; done\n" % NANO)
    fake.chmod(0o755)
    with dr.SystemSampler(interval_s=0.05, tegrastats_cmd=str(fake)) as s:
        s.mark("run")
        time.sleep(0.4)
    out = s.summary(phases=("run",))
    assert out["memory_source"] == "tegrastats" and out["memory_samples"] >= 2
    assert out["ram_used_mb"] == 2441 and out["swap_used_mb"] == 1030 and out["swap_total_mb"] == 1982
    assert out["power_w_mean"] == pytest.approx(4.831) and out["power_rail"] == "POM_5V_IN"
    assert out["gpu_load_pct_max"] == 76 and out["peak_rss_mb"] > 0


# --------------------------------------------------------------------------- device runner file

def test_device_runner_is_python36_and_stdlib_only():
    src = Path(dr.__file__).read_text()
    tree = ast.parse(src, feature_version=(3, 6))
    for node in ast.walk(tree):
        assert not isinstance(node, ast.NamedExpr), "walrus needs Python 3.8"
        if isinstance(node, ast.ImportFrom):
            assert node.module not in ("__future__", "dataclasses"), node.module
        if isinstance(node, ast.keyword):
            assert node.arg not in ("capture_output", "text"), "subprocess.run(capture_output/text) is 3.7+"
    assert not re.search(r"\{[A-Za-z_][\w.]*=[!:}]", src), "f-string '=' specifier needs Python 3.8"
    # top-level imports: standard library only (numpy and the runtime are imported lazily)
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top for a in getattr(n, "names", [])
             if isinstance(n, ast.Import)} | {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert not names & {"numpy", "onnxruntime", "tensorrt", "torch", "onnx", "study"}, names


def _run_main(capsys, argv):
    code = dr.main(argv)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, "the runner must print exactly one JSON document on stdout"
    return code, json.loads(lines[0])


def test_runner_success_prints_one_json(tiny, capsys):
    code, doc = _run_main(capsys, ["--model", str(tiny), "--input-hw", "16", "16", "--min-s", "0.05",
                                   "--min-runs", "5", "--warmup-s", "0", "--threads", "1", "--batch", "2"])
    assert code == 0 and doc["ok"] and doc["schema"] == dr.SCHEMA
    assert doc["runs"] >= 5 and doc["batch"] == 2 and doc["threads"] == 1 and doc["input_hw"] == [16, 16]
    assert doc["fps"] == pytest.approx(2000.0 / doc["latency_ms_mean"])
    assert doc["latency_ms_p50"] <= doc["latency_ms_p90"] <= doc["latency_ms_p99"]
    assert doc["peak_rss_mb"] > 10 and doc["ram_used_mb"] > 0 and doc["device"]["model"]
    assert doc["versions"]["onnxruntime"] and doc["runtime_version"] == doc["versions"]["onnxruntime"]


def test_runner_exit_codes(tiny, tmp_path, capsys, monkeypatch):
    if importlib.util.find_spec("tensorrt") is None:
        code, doc = _run_main(capsys, ["--model", str(tiny), "--runtime", "trt"])
        assert code == dr.EXIT_RUNTIME_MISSING and doc["error_kind"] == "runtime_missing"
        assert "tensorrt" in doc["error"]
    code, doc = _run_main(capsys, ["--model", str(tmp_path / "nope.onnx")])
    assert code == dr.EXIT_MODEL_UNREADABLE and "nope.onnx" in doc["error"]
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    code, doc = _run_main(capsys, ["--model", str(garbage), "--min-runs", "1", "--min-s", "0"])
    assert code == dr.EXIT_MODEL_UNREADABLE and not doc["ok"] and "garbage.onnx" in doc["error"]

    def oom(*a, **k):
        raise MemoryError("simulated allocation failure")

    monkeypatch.setitem(dr.LOADERS, "ort", oom)
    code, doc = _run_main(capsys, ["--model", str(tiny)])
    assert code == dr.EXIT_OOM and doc["error_kind"] == "oom"
    assert len({dr.EXIT_RUNTIME_MISSING, dr.EXIT_MODEL_UNREADABLE, dr.EXIT_OOM, dr.EXIT_RUN_FAILED}) == 4


# --------------------------------------------------------------------------- local benchmarks

KEYS = ("latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "latency_ms_mean", "latency_ms_std", "fps", "runs",
        "batch", "threads", "load_s", "peak_rss_mb", "ram_used_mb", "swap_used_mb", "runtime", "precision")


def test_benchmark_onnx(tiny, tmp_path):
    r = bench.benchmark_onnx(tiny, (16, 16), batch=2, threads=1, **FAST)
    for k in KEYS:
        assert k in r, k
    assert r["runtime"] == "ort" and r["precision"] == "fp32" and r["threads"] == 1 and r["batch"] == 2
    assert r["runs"] >= 5 and r["fps"] == pytest.approx(2 * 1000 / r["latency_ms_mean"])
    assert r["peak_rss_mb"] > 10 and r["load_s"] > 0
    half = bench.benchmark_onnx(_tiny_onnx(tmp_path / "half.onnx", fp16=True), (16, 16), threads=1, **FAST)
    assert half["precision"] == "fp16"
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        bench.benchmark_onnx(tmp_path / "missing.onnx", (16, 16))
    with pytest.raises(ValueError):
        bench.benchmark_onnx(tiny, (0, 16))


def test_time_callable_is_the_device_runners():
    # one timer: the host API re-exports the device runner's function, it does not copy it
    assert bench.time_callable is dr.time_callable
    assert bench.summarize_latencies is dr.summarize_latencies


def test_ort_session_settings_and_errors(tiny, tmp_path):
    sess = bench.ort_session(tiny, threads=2)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    opts = sess.get_session_options()
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    x = np.ones((1, 3, 8, 8), np.float32)
    assert sess.run(None, {"x": x})[0].shape == (1, 4, 8, 8)
    # None keeps onnxruntime's default (0 = one thread per physical core)
    assert bench.ort_session(tiny, threads=None).get_session_options().intra_op_num_threads == 0
    with pytest.raises(FileNotFoundError, match="absent.onnx"):
        bench.ort_session(tmp_path / "absent.onnx", threads=1)
    with pytest.raises(ValueError, match="threads"):
        bench.ort_session(tiny, threads=0)


def test_benchmark_onnx_builds_its_session_with_ort_session(tiny, monkeypatch):
    calls = []
    real = bench.ort_session

    def spy(path, threads, providers=None, **kw):
        calls.append((Path(path), threads, list(providers or [])))
        return real(path, threads, providers, **kw)

    monkeypatch.setattr(bench, "ort_session", spy)
    r = bench.benchmark_onnx(tiny, (16, 16), threads=3, **FAST)
    assert calls[-1][:2] == (Path(tiny), 3) and r["threads"] == 3
    assert calls[-1][2][-1] == "CPUExecutionProvider" and r["providers"][-1] == "CPUExecutionProvider"
    r = bench.benchmark_onnx(tiny, (16, 16), providers=["CPUExecutionProvider"], **FAST)
    assert calls[-1][1:] == (None, ["CPUExecutionProvider"]) and r["threads"] == 0


def test_bench_imports_no_private_names_and_no_heavy_modules():
    src = Path(bench.__file__).read_text()
    tree = ast.parse(src)
    private = [f"{n.value.id}.{n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
               and isinstance(n.value, ast.Name) and n.value.id == "dr" and n.attr.startswith("_")
               and not n.attr.startswith("__")]
    assert not private, private
    # the remote CLI needs neither torch, onnxruntime, numpy nor pandas on this machine
    import subprocess
    import sys
    code = ("import sys, study.bench; heavy = {'torch', 'onnxruntime', 'numpy', 'pandas'} & set(sys.modules); "
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(bench.__file__).parent.parent, check=True).stdout.strip()
    assert out == "[]", out


def test_measure_file_on_the_local_runner(tiny):
    target = {"mode": "local", "host": None, "remote_python": None, "device": "here", "reason": "test"}
    res, stored = bench.measure_file(target, tiny, input_hw=(16, 16), threads=1, warmup_s=0.0, min_s=0.05,
                                     min_runs=3, results_dir="/nonexistent/never-written")
    assert stored is None and res["ok"] and res["runs"] >= 3 and res["input_hw"] == [16, 16]
    assert res["provenance"]["host"] == "localhost" and "run_local_runner" in res["provenance"]["measured_by"]


def test_choose_target_with_an_unusable_host_raises(monkeypatch):
    monkeypatch.setattr(bench, "ssh_reachable", lambda host, **kw: (False, "connection refused"))
    with pytest.raises(bench.RemoteBenchError, match="nohost.invalid") as ei:
        bench.choose_target("nohost.invalid")
    assert ei.value.kind == "unreachable"
    monkeypatch.setattr(bench, "ssh_reachable", lambda host, **kw: (True, "ok"))
    t = bench.choose_target("jetson")
    assert t["mode"] == "ssh" and t["host"] == "jetson" and t["remote_python"] == "python3"
    assert "jetson" in t["device"]


def test_benchmark_torch_threads_and_no_mutation():
    import torch

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    before = torch.get_num_threads()
    r = bench.benchmark_torch(m, (16, 16), threads=1, **FAST)
    for k in KEYS:
        assert k in r, k
    assert r["threads"] == 1 and r["runtime"] == "torch" and r["precision"] == "fp32"
    assert torch.get_num_threads() == before
    r16 = bench.benchmark_torch(m, (16, 16), threads=1, dtype=torch.bfloat16, **FAST)
    assert r16["precision"] == "bf16" and next(m.parameters()).dtype == torch.float32


def test_benchmark_tensorrt_unavailable_is_clear(tiny):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if importlib.util.find_spec("tensorrt") is not None and has_cuda:
        pytest.skip("TensorRT and CUDA are present here")
    with pytest.raises(bench.BenchUnavailable, match="tensorrt|CUDA"):
        bench.benchmark_tensorrt(tiny, (16, 16))


# --------------------------------------------------------------------------- storage

def _fake_doc(model="NVIDIA Jetson Nano Developer Kit", date="2025-11-22T10:00:00Z"):
    # a structurally valid document for the storage round trip (not a measurement; never committed)
    return {"schema": dr.SCHEMA, "ok": True, "runtime": "ort", "precision": "fp16", "model_file": "student.onnx",
            "input_hw": [64, 64], "fps": 1.0, "latency_ms_p50": 1.0, "latency_ms_p99": 2.0, "device": {"model": model},
            "provenance": {"date_utc": date, "host": "h"}}


def test_store_and_load_results(tmp_path):
    p1 = bench.store_result(_fake_doc(), tmp_path, "student")
    assert p1.parent.name == "nvidia-jetson-nano-developer-kit"
    assert p1.name == "20251122T100000Z_student_ort_fp16.json"
    p2 = bench.store_result(_fake_doc(), tmp_path, "student")
    assert p2 != p1 and p1.is_file() and p2.is_file()  # never overwrites
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    df = bench.load_device_results(tmp_path)
    assert len(df) == 2 and list(df.columns) == list(bench.RESULT_COLUMNS)
    assert set(df["device"]) == {"NVIDIA Jetson Nano Developer Kit"}
    assert bench.load_device_results(tmp_path / "absent").empty
    bad = tmp_path / "x" / "bad.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        bench.load_device_results(tmp_path)
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="bad.json"):
        bench.load_device_results(tmp_path)


def test_device_slug():
    assert bench.device_slug("NVIDIA Jetson Orin Nano Developer Kit") == "nvidia-jetson-orin-nano-developer-kit"
    assert bench.device_slug("") == "unknown"
    assert bench.device_slug("a b;touch x") == "a-b-touch-x"
    assert os.sep not in bench.device_slug("../../etc/passwd")


def test_save_torch_model_round_trip(tmp_path):
    import torch

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)).train()
    p = bench.save_torch_model(m, tmp_path / "sub" / "m.pt")
    assert p.is_file() and not list(tmp_path.rglob("*.tmp")) and m.training  # the caller's model is untouched
    back = torch.load(p, weights_only=False)
    assert isinstance(back, torch.nn.Sequential) and not back.training
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(back(x), m.eval()(x))
    with pytest.raises(Exception):
        bad = torch.nn.Conv2d(3, 3, 1)
        bad.fn = lambda t: t  # a lambda attribute cannot be pickled
        bench.save_torch_model(bad, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def test_benchmark_onnx_defaults_to_the_cpu_provider(tiny):
    r = bench.benchmark_onnx(tiny, (16, 16), threads=1, **FAST)
    assert r["providers"] == ["CPUExecutionProvider"]
