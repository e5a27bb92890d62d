"""End-to-end tests of ``study.bench.run_remote`` against a REAL OpenSSH server on 127.0.0.1.

A session-scoped fixture generates a host key and user keys with ``ssh-keygen``, writes a
minimal ``sshd_config`` in a temporary folder and starts ``/usr/sbin/sshd -D`` on a free port.
The client uses the system ``ssh``/``scp`` with a dedicated ``known_hosts`` file. Skipped (with
the reason) when ``sshd``/``ssh``/``ssh-keygen`` are not installed; CI installs
``openssh-server`` and ``openssh-client``.
"""
from __future__ import annotations

import getpass
import importlib.util
import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from study import bench
from study.bench import RemoteBenchError, run_remote

SSHD = "/usr/sbin/sshd"
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("scp") and shutil.which("ssh-keygen")),
    reason="needs OpenSSH: /usr/sbin/sshd (apt-get install openssh-server) and ssh/scp/ssh-keygen "
           "(openssh-client)")

FAST = dict(input_hw=(16, 16), min_s=0.2, min_runs=5, warmup_s=0.02, warmup_runs=2, threads=1)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True,
                   stdin=subprocess.DEVNULL, capture_output=True)


def _tiny_onnx(path: Path) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.RandomState(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, "h", "w"])],
                              initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


class SSHServer:
    """Handle on the test sshd: ``port``, ``user``, ``key``, ``wrong_key``, ``known_hosts``,
    ``host_pub`` and a kwargs dict for :func:`run_remote`."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.user = getpass.getuser()
        self.host_key = root / "ssh_host_ed25519_key"
        self.key = root / "id_user"
        self.wrong_key = root / "id_wrong"
        for k in (self.host_key, self.key, self.wrong_key):
            _keygen(k)
        self.host_pub = (root / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        auth = root / "authorized_keys"
        auth.write_text((root / "id_user.pub").read_text())
        os.chmod(auth, 0o600)
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {' '.join(self.host_pub)}\n")
        self.cfg = root / "sshd_config"
        self.cfg.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {auth}", f"PidFile {root / 'sshd.pid'}", "StrictModes no", "UsePAM no",
            "PermitRootLogin yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", "Subsystem sftp internal-sftp", "LogLevel ERROR", ""]))
        os.makedirs("/run/sshd", exist_ok=True)
        self.log = open(root / "sshd.log", "wb")
        self.proc = subprocess.Popen([SSHD, "-D", "-f", str(self.cfg), "-e"], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 15
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited ({self.proc.returncode}): "
                                   f"{(root / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("sshd did not start listening within 15 s")

    def kwargs(self, **over) -> dict:
        kw = dict(port=self.port, user=self.user, identity=str(self.key), known_hosts=str(self.known_hosts),
                  ssh_options=["GlobalKnownHostsFile=/dev/null"], remote_python=sys.executable,
                  connect_timeout=5, timeout=60)
        kw.update(FAST)
        kw.update(over)
        return kw

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sshd")
    try:
        srv = SSHServer(root)
    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"could not start a test sshd on 127.0.0.1: {e}")
    ok, why = bench.ssh_reachable("127.0.0.1", port=srv.port, user=srv.user, identity=str(srv.key),
                                  known_hosts=str(srv.known_hosts), ssh_options=["GlobalKnownHostsFile=/dev/null"])
    if not ok:
        srv.stop()
        pytest.skip(f"test sshd started but login failed: {why}")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return _tiny_onnx(tmp_path_factory.mktemp("model") / "tiny_conv.onnx")


def _segbench_dirs() -> set:
    return set(glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), "segbench.*")))


def _snapshot(d: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def first_result(sshd, tiny_model, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    before = _segbench_dirs()
    res, path = run_remote("127.0.0.1", tiny_model, results_dir=results, **sshd.kwargs())
    return res, path, results, before


def test_success_stores_result_with_provenance(first_result, sshd):
    res, path, results, before = first_result
    assert path is not None and path.is_file() and path.parent.parent == results
    assert path.name.endswith("_tiny-conv_ort_fp32.json")
    doc = json.loads(path.read_text())
    assert doc == json.loads(json.dumps(res))
    assert doc["ok"] and doc["runtime"] == "ort" and doc["precision"] == "fp32" and doc["runs"] >= 5
    assert doc["latency_ms_p50"] <= doc["latency_ms_p99"] and doc["fps"] > 0
    assert doc["peak_rss_mb"] > 10 and doc["ram_used_mb"] > 0 and doc["swap_used_mb"] >= 0
    prov = doc["provenance"]
    for key in ("host", "user", "device_model", "l4t", "jetpack", "runtime_versions", "power_mode", "date_utc",
                "git_commit", "command", "remote_command"):
        assert key in prov, key
    assert prov["host"] == "127.0.0.1" and prov["user"] == sshd.user
    assert prov["runtime_versions"]["onnxruntime"]
    assert prov["date_utc"].endswith("Z")
    # the remote temporary folder is gone
    assert prov["remote_tmp"].startswith("/") and not os.path.exists(prov["remote_tmp"])
    assert _segbench_dirs() <= before
    # and the stored file reads back
    df = bench.load_device_results(results)
    assert len(df) == 1 and df.loc[0, "runtime"] == "ort" and df.loc[0, "source"].endswith(path.name)


def test_measure_file_over_ssh_stores_like_run_remote(sshd, tiny_model, tmp_path):
    """An SSH target from ``choose_target`` measures through ``run_remote`` and stores the result."""
    kw = sshd.kwargs()
    target = {"mode": "ssh", "host": "127.0.0.1", "remote_python": kw.pop("remote_python"),
              "device": "test sshd", "reason": "test"}
    for k in ("input_hw", "min_s", "min_runs", "warmup_s", "threads", "timeout", "warmup_runs"):
        kw.pop(k)
    res, path = bench.measure_file(target, tiny_model, input_hw=(16, 16), threads=1, warmup_s=0.0, min_s=0.1,
                                   min_runs=3, results_dir=tmp_path / "res", **kw)
    assert res["ok"] and res["runs"] >= 3 and res["provenance"]["host"] == "127.0.0.1"
    assert path is not None and path.parent.parent == tmp_path / "res"
    assert json.loads(path.read_text())["latency_ms_p50"] == res["latency_ms_p50"]


def test_compare_latency_over_ssh_interleaves_rounds_on_the_device(sshd, tiny_model, tmp_path):
    """The one protocol also runs on an SSH target: every (round, model) is a run_remote call
    in rotated order, each round's result is stored, the row carries the device's threads."""
    kw = sshd.kwargs()
    target = {"mode": "ssh", "host": "127.0.0.1", "remote_python": kw.pop("remote_python"),
              "device": "test sshd", "reason": "test"}
    for k in ("input_hw", "min_s", "min_runs", "warmup_s", "threads", "timeout", "warmup_runs"):
        kw.pop(k)
    other = tmp_path / "copy.onnx"
    other.write_bytes(Path(tiny_model).read_bytes())
    df = bench.compare_latency({"a": tiny_model, "b": other}, (16, 16), target=target, threads=1, rounds=2,
                               warmup_s=0.0, min_s=0.05, min_runs=3, warmup_runs=1,
                               results_dir=tmp_path / "res", ssh=kw)
    assert list(df["name"]) == ["a", "b"] and (df["rounds"] == 2).all() and (df["threads"] == 1).all()
    assert (df["spawn"] == "ssh").all() and df.attrs["protocol"]["orders"] == [["a", "b"], ["b", "a"]]
    assert df.attrs["protocol"]["host"] == "127.0.0.1" and df.attrs["protocol"]["device"] == "test sshd"
    assert (df["latency_ms_p50_ci95_low"] <= df["latency_ms_p50"]).all()
    assert "gmacs_per_s" not in df  # no efficiency against this host's GEMM peak for a remote device
    assert len(list((tmp_path / "res").rglob("*.json"))) == 4  # 2 models x 2 rounds, stored
    assert df["ram_used_mb"].notna().all() and df["runtime_version"].notna().all()


def _expect_failure(kind, results, sshd_kwargs, host="127.0.0.1", model=None, tiny=None):
    snap = _snapshot(results)
    before = _segbench_dirs()
    with pytest.raises(RemoteBenchError) as ei:
        run_remote(host, model or tiny, results_dir=results, **sshd_kwargs)
    assert ei.value.kind == kind, str(ei.value)
    assert host in str(ei.value)
    assert _snapshot(results) == snap, "a failure must not write or alter result files"
    assert _segbench_dirs() <= before, "the remote temporary folder must be removed on failure"
    return ei.value


def test_unreachable_port(first_result, sshd, tiny_model):
    results = first_result[2]
    err = _expect_failure("unreachable", results, sshd.kwargs(port=_free_port()), tiny=tiny_model)
    assert "refused" in str(err)


def test_wrong_key_is_authentication_error(first_result, sshd, tiny_model):
    err = _expect_failure("auth", first_result[2], sshd.kwargs(identity=str(sshd.wrong_key)), tiny=tiny_model)
    assert "authentication" in str(err)


def test_unknown_host_key_needs_accept_new(first_result, sshd, tiny_model, tmp_path):
    kh = tmp_path / "known_hosts_empty"
    kh.write_text("")
    _expect_failure("host_key_unknown", first_result[2], sshd.kwargs(known_hosts=str(kh)), tiny=tiny_model)
    assert kh.read_text() == ""
    # with --accept-new-host-key the key is recorded and the run succeeds
    res, path = run_remote("127.0.0.1", tiny_model, results_dir=tmp_path / "res",
                           **sshd.kwargs(known_hosts=str(kh), accept_new_host_key=True))
    assert res["ok"] and path.is_file()
    assert sshd.host_pub[1] in kh.read_text()


def test_changed_host_key_is_mismatch(first_result, sshd, tiny_model, tmp_path):
    other = tmp_path / "other_key"
    _keygen(other)
    kh = tmp_path / "known_hosts_other"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {' '.join((tmp_path / 'other_key.pub').read_text().split()[:2])}\n")
    _expect_failure("host_key_mismatch", first_result[2],
                    sshd.kwargs(known_hosts=str(kh), accept_new_host_key=True), tiny=tiny_model)


def test_missing_runtime_on_device(first_result, sshd, tiny_model):
    pytest.importorskip("onnxruntime")
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here, so it is not missing on the 'device'")
    err = _expect_failure("runtime_missing", first_result[2], sshd.kwargs(runtime="trt"), tiny=tiny_model)
    assert "tensorrt" in str(err)


def _wrapper(tmp_path, name, body) -> str:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return str(p)


def test_killed_runner_reported_as_oom(first_result, sshd, tiny_model, tmp_path):
    # the kernel's OOM killer sends SIGKILL: emulate exactly that exit on the device
    py = _wrapper(tmp_path, "py_killed", "kill -9 $$")
    err = _expect_failure("oom", first_result[2], sshd.kwargs(remote_python=py), tiny=tiny_model)
    assert "out-of-memory" in str(err)


def test_garbage_output_is_bad_json(first_result, sshd, tiny_model, tmp_path):
    py = _wrapper(tmp_path, "py_garbage", "echo 'hello, not json'")
    _expect_failure("bad_json", first_result[2], sshd.kwargs(remote_python=py), tiny=tiny_model)


def test_timeout(first_result, sshd, tiny_model, tmp_path):
    py = _wrapper(tmp_path, "py_slow", "sleep 20")
    t0 = time.time()
    _expect_failure("timeout", first_result[2], sshd.kwargs(remote_python=py, timeout=2), tiny=tiny_model)
    assert time.time() - t0 < 15


def _cli_base(sshd, results):
    return [sys.executable, "-m", "study.bench", "remote", "--host", "127.0.0.1", "--port", str(sshd.port),
            "--user", sshd.user, "--identity", str(sshd.key), "--known-hosts", str(sshd.known_hosts),
            "--ssh-option", "GlobalKnownHostsFile=/dev/null", "--remote-python", sys.executable,
            "--input-hw", "16", "16", "--min-s", "0.1", "--min-runs", "3", "--warmup-s", "0", "--threads", "1",
            "--results", str(results)]


def test_cli_shell_metacharacters_are_quoted(sshd, tiny_model, tmp_path):
    """CLI success path, with a model file name full of shell metacharacters."""
    marker = "segbench_pwned_%d" % os.getpid()
    evil = tmp_path / f"a b;touch {marker}.onnx"
    shutil.copy(tiny_model, evil)
    home = Path(os.path.expanduser("~"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(_cli_base(sshd, tmp_path / "res") + ["--model", str(evil)], capture_output=True,
                       text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["model_file"] == evil.name  # passed through intact, as one argument
    assert not (home / marker).exists() and not (home / f"{marker}.onnx").exists()
    assert not list(home.glob("segbench_pwned_*"))
    stored = list((tmp_path / "res").rglob("*.json"))
    assert len(stored) == 1 and stored[0].name.endswith("_a-b-touch-%s_ort_fp32.json" % marker.replace("_", "-"))
    assert json.loads(stored[0].read_text())["model_sha256"] == res["model_sha256"]
    assert res["provenance"]["command"].startswith("python -m study.bench remote")


def test_cli_exit_codes(sshd, tiny_model, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = _cli_base(sshd, tmp_path / "res")
    r = subprocess.run(base[:4] + ["--host", "127.0.0.1", "--model", str(tmp_path / "missing.onnx")],
                       capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 2 and "missing.onnx" in r.stderr
    r = subprocess.run(base + ["--model", str(tiny_model), "--runtime", "trt"], capture_output=True, text=True,
                       env=env, cwd=REPO)
    if importlib.util.find_spec("tensorrt") is None:
        assert r.returncode == 1 and "127.0.0.1" in r.stderr and "error" in r.stderr
        assert not (tmp_path / "res").exists()


def _static_onnx(path: Path, hw=(64, 64)) -> Path:
    """A one-conv model exported at a FIXED 1x3xHxW input (as study.quant.export_onnx writes them)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.RandomState(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "fixed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, *hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, *hw])],
                              initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _without_input_hw_and_threads(args: list) -> list:
    out, skip = [], 0
    for a in args:
        if skip:
            skip -= 1
            continue
        if a == "--input-hw":
            skip = 2
            continue
        if a == "--threads":
            skip = 1
            continue
        out.append(a)
    return out


def test_cli_remote_runs_a_fixed_64px_model_without_input_hw(sshd, tmp_path):
    """Issue #15: "Got invalid dimensions ... Got: 512 Expected: 64" - the runner reads the static shape."""
    from study import device_runner as dr

    model = _static_onnx(tmp_path / "fixed64.onnx")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = _without_input_hw_and_threads(_cli_base(sshd, tmp_path / "res"))
    assert "--input-hw" not in base and "--threads" not in base
    r = subprocess.run(base + ["--model", str(model)], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["input_hw"] == [64, 64] and res["input_shape"] == [1, 3, 64, 64]
    assert res["input_shape_source"] == "model"
    # no --threads: the DEVICE decides (its physical cores), not this host's os.cpu_count()
    assert res["threads"] == res["device"]["physical_cores"] == dr.physical_cores()
    assert "physical cores" in res["threads_source"]
    assert "--input-hw" not in res["provenance"]["remote_command"]
    # a dynamic model without --input-hw: a bad-argument error that names the option; nothing stored
    r = subprocess.run(base + ["--model", str(_tiny_onnx(tmp_path / "dyn.onnx"))], capture_output=True, text=True,
                       env=env, cwd=REPO)
    assert r.returncode == 2 and "--input-hw" in r.stderr and "dynamic" in r.stderr
    assert len(list((tmp_path / "res").rglob("*.json"))) == 1
