"""Profiles, artifact cache (atomicity, resumption), context tables, runner arguments."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from study import BASE_COLUMNS
from study.cache import ArtifactCache, make_key
from study.context import Context, TableError
from study.profiles import ProfileError, get_profile

ROOT = Path(__file__).resolve().parent.parent


def test_profiles_and_paper_requirements():
    assert get_profile("smoke").image_size < get_profile("cpu").image_size
    with pytest.raises(ProfileError, match="unknown profile 'tiny'"):
        get_profile("tiny")
    with pytest.raises(ProfileError, match="--data-root"):
        get_profile("paper", has_gpu=True)
    with pytest.raises(ProfileError, match="GPU"):
        get_profile("paper", data_root="/x", has_gpu=False)
    assert get_profile("paper", data_root="/x", has_gpu=True).student_steps == 20000
    # issue 17: a dry run of paper needs no GPU; paper starts pretrained, --weights-dir makes any profile so
    dry = get_profile("paper", data_root="/x", has_gpu=False, fast_dev_run=True)
    assert dry.dry_run and dry.student_steps == 2 and (dry.image_size, dry.crop_size, dry.batch_size) == (512, 384, 16)
    assert get_profile("paper", data_root="/x", has_gpu=True).pretrained and not get_profile("cpu").pretrained
    assert get_profile("cpu", weights_dir="/w").pretrained


def test_cache_memo_computes_once_and_keys_change_with_config(tmp_path):
    cache = ArtifactCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"w": torch.arange(3.0), "score": 0.5}

    a = cache.memo("m", {"lr": 1}, compute, seed=0)
    b = cache.memo("m", {"lr": 1}, compute, seed=0)
    assert len(calls) == 1 and torch.equal(a["w"], b["w"])
    cache.memo("m", {"lr": 2}, compute, seed=0)
    cache.memo("m", {"lr": 1}, compute, seed=1)
    assert len(calls) == 3
    assert make_key({"a": 1}, 0, "fp1") != make_key({"a": 1}, 0, "fp2")
    fresh = ArtifactCache(tmp_path, fresh=True)
    fresh.memo("m", {"lr": 1}, compute, seed=0)
    assert len(calls) == 4


def test_cache_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    cache = ArtifactCache(tmp_path)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cache.memo("m", {"x": 1}, lambda: {"v": 1})
    monkeypatch.setattr(torch, "save", real_save)
    assert list(tmp_path.iterdir()) == []  # no final entry, temp removed
    assert cache.memo("m", {"x": 1}, lambda: {"v": 2})["v"] == 2  # resumes


_WRITER = """
import sys, torch
from study.cache import ArtifactCache
c = ArtifactCache(sys.argv[1])
i = 0
while True:
    c.memo(f"e{i}", {"i": i}, lambda: {"t": torch.randn(400_000)})
    print(i, flush=True)
    i += 1
"""


def test_cache_survives_sigkill_mid_run(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for _ in range(3):
        p.stdout.readline()
    time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    cache = ArtifactCache(tmp_path)
    finished = [f for f in tmp_path.iterdir() if f.suffix == ".pt"]
    assert len(finished) >= 3
    for f in finished:  # every finished entry is whole
        assert torch.load(f, weights_only=True)["t"].numel() == 400_000
    assert not list(tmp_path.glob("*.corrupt"))
    assert cache.memo("e0", {"i": 0}, lambda: {"t": torch.zeros(1)})["t"].numel() == 400_000


def _ctx(tmp_path, profile="smoke"):
    return Context(profile=get_profile(profile), seed=0, out_dir=tmp_path / profile,
                   cache=ArtifactCache(tmp_path / "cache"), data_root=tmp_path, data_fp="x")


def test_save_table_validates_columns(tmp_path):
    ctx = _ctx(tmp_path)
    row = {c: 0 for c in BASE_COLUMNS}
    row.update(section="baselines", model="m", method="x", extra=1.5)
    path = ctx.save_table("baselines", pd.DataFrame([row]))
    assert path.exists() and (path.parent / "baselines.md").exists()
    assert list(pd.read_csv(path).columns[: len(BASE_COLUMNS)]) == list(BASE_COLUMNS)
    with pytest.raises(TableError, match="lacks required columns"):
        ctx.save_table("baselines", pd.DataFrame([{"section": "baselines", "model": "m"}]))
    with pytest.raises(TableError, match="unknown section"):
        ctx.save_table("nonsense", pd.DataFrame([row]))


def _run_all(*args, cwd=ROOT):
    return subprocess.run(["bash", str(ROOT / "run_all.sh"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["--profile", "tiny"], "--profile: unknown profile 'tiny'"),
    (["--only", "pruning"], "--only: unknown section 'pruning'"),
    (["--seed", "-3"], "--seed needs a non-negative integer"),
    (["--data-root", "/nonexistent/lpcvc"], "--data-root: '/nonexistent/lpcvc' is not a directory"),
    (["--frobnicate"], "unknown option '--frobnicate'"),
    (["--weights-dir", "/nonexistent/w"], "--weights-dir: '/nonexistent/w' is not a directory"),
    (["--nproc", "0"], "--nproc needs a positive integer"),
    (["--nnodes", "two"], "--nnodes needs a positive integer"),
    (["--rdzv-endpoint", "head"], "--rdzv-endpoint needs HOST:PORT"),
])
def test_run_all_rejects_bad_arguments(tmp_path, args, needle):
    r = _run_all(*args, "--build-dir", str(tmp_path / "b"))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert not (tmp_path / "b").exists()


def test_runner_rejects_malformed_data_root_and_paper_without_gpu(tmp_path):
    bad = tmp_path / "lpcvc"
    (bad / "IMG" / "train").mkdir(parents=True)
    cmd = [sys.executable, "-m", "study.report", "run", "--profile", "smoke", "--data-root", str(bad),
           "--build-dir", str(tmp_path / "b")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--data-root" in r.stderr and "GT" in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()
    if not torch.cuda.is_available():
        cmd = [sys.executable, "-m", "study.report", "run", "--profile", "paper", "--data-root", str(bad),
               "--build-dir", str(tmp_path / "b")]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "GPU" in r.stderr
        assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args,needle", [
    (["--profile", "smoke", "--nproc", "3"], "must divide the profile's batch size 4"),
    (["--profile", "smoke", "--nnodes", "2"], "--nnodes > 1 needs --rdzv-endpoint"),
])
def test_runner_rejects_bad_launch_options(tmp_path, capsys, args, needle):
    from study import report as runner

    with pytest.raises(SystemExit) as e:
        runner.main(["run", *args, "--build-dir", str(tmp_path / "b")])
    assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_code_closure_follows_imports_transitively():
    from study.cache import code_closure

    names = code_closure("study.sections.common")
    # common imports train, which imports data and metrics: all of them are in the key
    for m in ("study.sections.common", "study.train", "study.models", "study.data", "study.metrics"):
        assert m in names, m
    # ...but not the method modules it does not import (editing them keeps trained baselines)
    assert "study.prune" not in names and "study.quant" not in names


def test_closure_fingerprint_changes_when_an_imported_module_changes(tmp_path, monkeypatch):
    import study.cache as cache_mod

    before = cache_mod.closure_fingerprint("study.sections.common")
    real = cache_mod._module_file
    edited = tmp_path / "metrics.py"
    edited.write_text(real("study.metrics").read_text() + "\n# an edit\n")
    monkeypatch.setattr(cache_mod, "_module_file", lambda n: edited if n == "study.metrics" else real(n))
    after = cache_mod.closure_fingerprint("study.sections.common")
    assert before != after
    assert make_key({"a": 1}, 0, "fp", ["study.sections.common"]) != make_key({"a": 1}, 0, "fp", ["study.models"])


def test_model_fingerprint_sees_weights_shapes_and_pruning_record():
    from study.models import model_fingerprint

    torch.manual_seed(0)
    a = torch.nn.Conv2d(3, 4, 3)
    b = torch.nn.Conv2d(3, 4, 3)
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.weight[0, 0, 0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
    b.load_state_dict(a.state_dict())
    b.segcompress_prune = [{"op": "structured", "sparsity": 0.5}]
    assert model_fingerprint(a) != model_fingerprint(b)


def test_batch_stream_continues_across_consumers_and_rejects_empty_loaders():
    from study.data import batch_stream

    s = batch_stream([1, 2, 3])
    assert s.take(2) == [1, 2]
    assert [next(iter(s)) for _ in range(3)] == [3, 1, 2]  # continues, then restarts the epoch
    assert batch_stream(s) is s
    assert batch_stream(range(6), rank=1, world=2).take(4) == [1, 3, 5, 1]
    with pytest.raises(ValueError, match="no batch"):
        next(batch_stream([]))
