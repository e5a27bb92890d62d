"""The study's one latency protocol (issue #15): ``study.bench.compare_latency`` and its parts.

Fast tests: the interleaving order is checked with a mocked runner call; a few real runs on
a one-conv ONNX model and a one-conv torch module check the fresh process per measurement,
the static input shape, the thread policy and the statistics. No timing target is asserted
(speed is checked by ``benchmarks/bench_latency_protocol.py``, which prints numbers).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from study import bench
from study import device_runner as dr

REPO = Path(__file__).resolve().parent.parent
FAST = dict(warmup_s=0.0, min_s=0.02, min_runs=3, warmup_runs=1)


def _conv_onnx(path: Path, dims) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.RandomState(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("protocol")
    return {"static": _conv_onnx(d / "static64.onnx", [1, 3, 64, 64]),
            "dynamic": _conv_onnx(d / "dynamic.onnx", ["n", 3, "h", "w"]), "dir": d}


def _fake_result(name, p50, threads, pid=1):
    return {"ok": True, "latency_ms_p50": p50, "latencies_ms": [p50 * 0.9, p50, p50 * 1.1], "peak_rss_mb": 50.0,
            "load_s": 0.1, "runs": 3, "input_hw": [8, 8], "threads": threads, "pid": pid, "model_file": name}


# --------------------------------------------------------------------------- order (mocked runner)

@pytest.mark.parametrize("rotate", [True, False])
def test_rounds_are_interleaved_and_rotated(models, monkeypatch, rotate):
    calls = []

    def fake(model, **kw):
        calls.append((kw["model_name"], kw["fork_server"], kw["threads"], kw["latencies"]))
        return _fake_result(kw["model_name"], {"A": 10.0, "B": 20.0, "C": 30.0}[kw["model_name"]], kw["threads"])

    monkeypatch.setattr(bench, "run_local_runner", fake)
    p = models["static"]
    df = bench.compare_latency({"A": p, "B": p, "C": p}, None, rounds=4, threads=3, rotate=rotate, **FAST)
    order = [c[0] for c in calls]
    if rotate:
        assert order == list("ABC" "BCA" "CAB" "ABC")
    else:
        assert order == list("ABC" * 4)
    assert df.attrs["protocol"]["orders"] == [order[i:i + 3] for i in range(0, 12, 3)]
    # ORT runs exec a fresh runner (no fork server), asks for every latency, with the given threads
    assert all(c[1] is None and c[2] == 3 and c[3] for c in calls)
    assert list(df.name) == ["A", "B", "C"] and (df.rounds == 4).all() and (df.threads == 3).all()
    assert list(df.latency_ms_p50) == [10.0, 20.0, 30.0]
    assert set(df.order) == {"rotated" if rotate else "fixed"}


def test_default_threads_is_the_physical_core_count_and_is_recorded(models, monkeypatch):
    psutil = pytest.importorskip("psutil")
    assert bench.default_threads() == psutil.cpu_count(logical=False) == dr.physical_cores()
    seen = []

    def fake(model, **kw):
        seen.append(kw["threads"])
        return _fake_result(kw["model_name"], 5.0, kw["threads"])

    monkeypatch.setattr(bench, "run_local_runner", fake)
    df = bench.compare_latency({"A": models["static"]}, None, rounds=2, **FAST)
    assert seen == [bench.default_threads()] * 2 and list(df.threads) == [bench.default_threads()]
    # a runner that used other threads than asked is an error, not a silent row
    monkeypatch.setattr(bench, "run_local_runner", lambda model, **kw: _fake_result("A", 5.0, kw["threads"] + 1))
    with pytest.raises(bench.RemoteBenchError, match="threads"):
        bench.compare_latency({"A": models["static"]}, None, rounds=1, threads=2, **FAST)


def test_failures_raise_or_are_recorded(models, monkeypatch):
    def fake(model, **kw):
        if kw["model_name"] == "bad":
            raise bench.RemoteBenchError("boom", "remote_failed", "localhost")
        return _fake_result(kw["model_name"], 5.0, kw["threads"])

    monkeypatch.setattr(bench, "run_local_runner", fake)
    items = {"good": models["static"], "bad": models["static"]}
    with pytest.raises(bench.RemoteBenchError, match="'bad'"):
        bench.compare_latency(items, None, rounds=2, **FAST)
    df = bench.compare_latency(items, None, rounds=2, errors="record", **FAST).set_index("name")
    assert df.loc["good", "error"] == "" and df.loc["good", "rounds"] == 2
    assert "boom" in df.loc["bad", "error"] and np.isnan(df.loc["bad", "latency_ms_p50"])
    with pytest.raises(FileNotFoundError, match="nope"):
        bench.compare_latency({"x": models["dir"] / "nope.onnx"}, None)
    with pytest.raises(ValueError, match="input_hw"):
        bench.compare_latency({"x": models["static"]}, None, runtime="torch")


# --------------------------------------------------------------------------- statistics

def test_summarize_rounds_known_values():
    res = [_fake_result("m", v, 2) for v in (10.0, 12.0, 11.0, 30.0, 11.5)]
    row = bench.summarize_rounds("m", res, runtime="ort", threads=2, batch=2)
    assert tuple(k for k in bench.PROTOCOL_COLUMNS if k in row) == bench.PROTOCOL_COLUMNS
    assert row["latency_ms_p50"] == 11.5                     # median of the round p50s, not the mean
    assert row["latency_ms_p50_ci95_low"] == 10.0 and row["latency_ms_p50_ci95_high"] == 30.0  # 5 rounds: min..max
    pooled = np.concatenate([[v * 0.9, v, v * 1.1] for v in (10.0, 12.0, 11.0, 30.0, 11.5)])
    assert row["latency_ms_p99"] == pytest.approx(np.percentile(pooled, 99))
    assert row["latency_ms_p90"] == pytest.approx(np.percentile(pooled, 90))
    p50s = np.array([10.0, 12.0, 11.0, 30.0, 11.5])
    assert row["cv_p50"] == pytest.approx(p50s.std(ddof=1) / p50s.mean())
    assert row["fps"] == pytest.approx(2 * 1000 / 11.5) and row["runs"] == 15 and row["rounds"] == 5
    assert row["round_p50s_ms"] == "10;12;11;30;11.5"


def test_median_ci_bootstrap():
    lo, hi = bench.median_ci([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (lo, hi) == (1.0, 5.0)                             # few rounds: the order statistics
    lo, hi = bench.median_ci(np.random.RandomState(0).normal(10, 1, 200))
    assert 9.5 < lo < 10 < hi < 10.5 and hi - lo < 0.6        # many rounds: a tight interval around the median
    assert all(np.isnan(v) for v in bench.median_ci([3.0]))
    assert bench.median_ci([1, 2, 3, 9], seed=1) == bench.median_ci([1, 2, 3, 9], seed=1)


def test_latency_verdict_from_intervals():
    def row(lo, hi):
        return {"latency_ms_p50_ci95_low": lo, "latency_ms_p50_ci95_high": hi}

    assert bench.latency_verdict(row(1, 2), row(3, 4)) == "faster"
    assert bench.latency_verdict(row(3, 4), row(1, 2)) == "slower"
    assert bench.latency_verdict(row(1, 3), row(2, 4)) == "no detectable difference"
    assert bench.latency_verdict(row(1, 2), row(2, 3)) == "no detectable difference"   # touching = overlap
    assert bench.latency_verdict(row(float("nan"), 2), row(3, 4)) == "not measured"
    import pandas as pd
    assert bench.latency_verdict(pd.Series(row(1, 2)), pd.Series(row(5, 6))) == "faster"


def test_gemm_peak_is_measured_once_per_thread_count():
    a = bench.gemm_peak_gmacs_per_s(1, sizes=(64,), min_s=0.01)
    assert a > 0
    assert bench.gemm_peak_gmacs_per_s(1, sizes=(64,), min_s=0.01) is a   # cached, not re-measured


# --------------------------------------------------------------------------- real runs

def test_fresh_process_per_measurement_ort(models):
    df = bench.compare_latency({"a": models["static"], "b": models["static"]}, None, rounds=2, threads=1,
                               gmacs={"a": 0.002, "b": 0.002}, **FAST)
    proto = df.attrs["protocol"]
    assert proto["spawn"] == "exec" and proto["threads"] == 1 and proto["measured_by"] == "study.bench.compare_latency"
    assert (df.input_hw == "64x64").all() and (df.peak_rss_mb > 10).all() and (df.load_s > 0).all()
    assert (df.latency_ms_p50_ci95_low <= df.latency_ms_p50).all() and (df.latency_ms_p50 <= df.latency_ms_p50_ci95_high).all()
    assert (df.gmacs_per_s > 0).all() and (df.pct_of_peak > 0).all()
    assert df.gmacs_per_s.iloc[0] == pytest.approx(0.002 / (df.latency_ms_p50.iloc[0] / 1000))


def test_each_measurement_is_its_own_process(models, monkeypatch):
    pids = []
    real = bench.run_local_runner

    def spy(model, **kw):
        res = real(model, **kw)
        pids.append(res["pid"])
        return res

    monkeypatch.setattr(bench, "run_local_runner", spy)
    bench.compare_latency({"a": models["static"], "b": models["static"]}, None, rounds=2, threads=1, **FAST)
    assert len(pids) == 4 and len(set(pids)) == 4 and os.getpid() not in pids


def test_torch_runtime_forks_a_fresh_process_per_measurement(models, monkeypatch):
    import torch

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    f = bench.save_torch_model(m, models["dir"] / "conv.pt")
    res = bench.run_local_runner(f, runtime="torch", input_hw=(8, 8), threads=1, **FAST)
    assert res["runtime_info"]["flush_denormal"] is True and res["runtime_info"]["torch_file"] == "pickled nn.Module"
    assert res["threads"] == 1 and res["input_hw"] == [8, 8]
    pids = []
    real = bench.run_local_runner

    def spy(model, **kw):
        assert kw["fork_server"] is not None          # torch: forked from the preloaded server
        res = real(model, **kw)
        pids.append(res["pid"])
        return res

    monkeypatch.setattr(bench, "run_local_runner", spy)
    df = bench.compare_latency({"x": f, "y": f}, (8, 8), runtime="torch", rounds=2, threads=1, preload=["torch"],
                               **FAST)
    assert len(set(pids)) == 4 and os.getpid() not in pids
    assert df.attrs["protocol"]["spawn"] == "fork" and (df.threads == 1).all() and (df.peak_rss_mb > 10).all()


def test_same_seeded_input_for_every_runtime():
    a, b = dr.seeded_input((1, 3, 4, 4)), dr.seeded_input((1, 3, 4, 4))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, np.random.RandomState(0).standard_normal((1, 3, 4, 4)).astype(np.float32))


def test_runner_ort_session_mirrors_the_host_factory(models):
    host = bench.ort_session(models["static"], threads=2)
    dev, _ = dr.make_ort_session(models["static"], threads=2, providers=["CPUExecutionProvider"])
    for s in (host, dev):
        o = s.get_session_options()
        assert (o.intra_op_num_threads, o.inter_op_num_threads) == (2, 1)
        assert o.get_session_config_entry("session.set_denormal_as_zero") == "1"
    assert host.get_session_options().execution_mode == dev.get_session_options().execution_mode


# --------------------------------------------------------------------------- static input shapes

def test_resolve_input_shape():
    assert dr.resolve_input_shape([1, 3, 64, 64]) == ((1, 3, 64, 64), "model")
    assert dr.resolve_input_shape([1, 3, 64, 64], (64, 64), 1) == ((1, 3, 64, 64), "model")
    assert dr.resolve_input_shape(["n", 3, "h", "w"], (32, 48), 2) == ((2, 3, 32, 48), "--input-hw")
    assert dr.resolve_input_shape(["n", 3, 64, "w"], (64, 48)) == ((1, 3, 64, 48), "model + --input-hw")
    with pytest.raises(dr.RunnerError, match="dynamic.*--input-hw") as ei:
        dr.resolve_input_shape(["n", 3, "h", "w"])
    assert ei.value.code == dr.EXIT_BAD_ARGS and ei.value.kind == "bad_argument"
    with pytest.raises(dr.RunnerError, match="static shape.*512 512"):
        dr.resolve_input_shape([1, 3, 64, 64], (512, 512))
    with pytest.raises(dr.RunnerError, match="static batch"):
        dr.resolve_input_shape([1, 3, 64, 64], None, 4)
    with pytest.raises(dr.RunnerError, match="--input-hw"):
        dr.resolve_input_shape(None)                       # torch files: nothing declared


def test_runner_reads_the_static_shape_and_defaults_to_physical_cores(models, capsys):
    code = dr.main(["--model", str(models["static"]), "--min-s", "0.01", "--min-runs", "2", "--warmup-s", "0"])
    out = capsys.readouterr().out
    import json
    doc = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and doc["input_shape"] == [1, 3, 64, 64] and doc["input_shape_source"] == "model"
    assert doc["threads"] == dr.physical_cores() and "physical cores" in doc["threads_source"]
    assert doc["pid"] == os.getpid()


def test_cli_local_runs_a_fixed_64px_model_without_input_hw(models):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "study.bench", "local", *args, "--min-s", "0.01",
                               "--min-runs", "2", "--warmup-s", "0", "--warmup-runs", "0", "--threads", "1"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)

    r = cli("--model", str(models["static"]))
    assert r.returncode == 0, r.stderr
    assert "[1, 3, 64, 64] (model)" in r.stderr
    # a dynamic model without --input-hw: a bad-argument error that names the option
    r = cli("--model", str(models["dynamic"]))
    assert r.returncode == 2 and "--input-hw" in r.stderr and "dynamic" in r.stderr
    # a contradicting --input-hw (the 512 vs 64): refused with both sizes named
    r = cli("--model", str(models["static"]), "--input-hw", "512", "512")
    assert r.returncode == 2 and "64" in r.stderr and "512" in r.stderr
    r = cli("--model", str(models["dynamic"]), "--input-hw", "16", "16")
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- CLI help (issue #16 point 5)

def _options(parser: argparse.ArgumentParser, cmd: str):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    return [a for a in sub._actions if a.option_strings and "-h" not in a.option_strings]


@pytest.mark.parametrize("cmd", ["remote", "local"])
def test_every_cli_option_has_help_with_its_default(cmd):
    opts = _options(bench.build_parser(), cmd)
    names = {a.option_strings[0] for a in opts}
    if cmd == "remote":
        assert {"--host", "--port", "--user", "--runtime", "--precision", "--input-hw", "--batch", "--threads",
                "--remote-python"} <= names
    for a in opts:
        assert a.help and len(a.help) > 15, a.option_strings
        if not a.required:
            assert "default" in a.help.lower(), (a.option_strings, a.help)
    units = {a.option_strings[0]: a.help for a in opts}
    assert "pixels" in units["--input-hw"] and " s" in units["--min-s"] and "physical cores" in units["--threads"]
    text = subprocess.run([sys.executable, "-m", "study.bench", cmd, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120).stdout
    assert "--input-hw" in text and "default" in text


def test_runner_cli_options_have_help():
    for a in dr.build_parser()._actions:
        if a.option_strings and "-h" not in a.option_strings:
            assert a.help, a.option_strings


def test_fork_path_reports_runner_failures(models):
    bad = models["dir"] / "garbage.pt"
    bad.write_bytes(b"not a torch file")
    df = bench.compare_latency({"bad": bad}, (8, 8), runtime="torch", rounds=2, threads=1, preload=["torch"],
                               errors="record", **FAST)
    assert "model_unreadable" in df.error.iloc[0] and "garbage.pt" in df.error.iloc[0]
    assert df.rounds.iloc[0] == 0 and np.isnan(df.latency_ms_p50.iloc[0])
