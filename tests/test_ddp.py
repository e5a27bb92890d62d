"""--nproc: a cached training runs as a torchrun job (gloo on CPU) and the notebook reads its checkpoint."""
import copy
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from study import train as strain

ROOT = Path(__file__).resolve().parent.parent


def _make_closure(scale):
    offset = torch.tensor(2.0)

    def fn(x):
        return x * scale + offset

    return fn


def test_job_pickler_carries_closures_and_lambdas(tmp_path):
    """Loss functions are closures (study.distill.make_kd_loss): a job file stores them by value."""
    teacher = nn.Linear(3, 3)
    fn = _make_closure(3.0)
    lam = lambda x: teacher(x) + 1  # noqa: E731 - what a section's builder looks like
    path = tmp_path / "objs.pt"
    torch.save({"fn": fn, "lam": lam}, path, pickle_module=strain._JOB_PICKLE)
    with pytest.raises(Exception):
        pickle.dumps(fn)  # the standard pickle refuses a closure
    # load in a fresh interpreter: nothing of this process is reused
    code = (f"import torch; d = torch.load({str(path)!r}, weights_only=False); x = torch.ones(1, 3); "
            "print(float(d['fn'](torch.tensor(1.0))), d['lam'](x).shape == (1, 3))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["5.0", "True"]


def test_job_pickler_refuses_functions_of_main_with_a_clear_error(tmp_path):
    def f(x):
        return x
    f.__module__ = "__main__"
    f.__qualname__ = "g.<locals>.f"
    with pytest.raises(pickle.PicklingError, match="__main__"):
        torch.save({"f": f}, tmp_path / "x.pt", pickle_module=strain._JOB_PICKLE)


def test_torchrun_command_single_and_multi_node():
    cmd = strain.torchrun_command("/c/jobs/a.job.pt", nproc=2)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[-4:] == ["-m", "study.train", "job", "/c/jobs/a.job.pt"]
    multi = strain.torchrun_command("/c/a.job.pt", nproc=4, nnodes=2, rdzv_endpoint="head:29400", rdzv_id="k")
    i = multi.index("--rdzv-endpoint")
    assert multi[i + 1] == "head:29400" and "--standalone" not in multi and multi[multi.index("--nnodes") + 1] == "2"
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        strain.torchrun_command("/c/a.job.pt", nproc=1, nnodes=2)


def test_smoke_training_with_nproc_2_on_cpu(tmp_path, capsys):
    """One cached smoke training as a 2-process torchrun job (gloo): both ranks end with identical
    weights, the checkpoint lands in the cache, and the notebook-side call returns that model."""
    from study.context import setup
    from study.sections import common

    ctx = setup(profile="smoke", build_dir=str(tmp_path / "build"), nproc=2)
    assert common.distributed(ctx)
    model, scores = common.trained_model(ctx, "topformer_t", steps=3)
    out = capsys.readouterr().out
    assert "[2 processes, gloo]" in out  # rank 0's summary line came back through torchrun
    entries = [p for p in (tmp_path / "build" / "cache").glob("baseline-topformer_t-*.pt")]
    assert len(entries) == 1
    rec = torch.load(entries[0], weights_only=True)
    ddp = rec["history"]["ddp"]
    assert ddp["world"] == 2 and ddp["backend"] == "gloo"
    assert ddp["max_abs_diff"] == 0.0  # parameters of rank 0 and rank 1 are equal, bit for bit
    assert len(ddp["rank_digests"]) == 2 and ddp["rank_digests"][0] == ddp["rank_digests"][1]
    # what the notebook got is the checkpoint rank 0 wrote
    assert strain._weights_digest(model) == ddp["rank_digests"][0]
    for k, v in model.state_dict().items():
        assert torch.equal(v.cpu(), rec["state_dict"][k]), k
    assert len(rec["history"]["loss"]) == 3 and 0.0 <= scores["miou"] <= 1.0
    # and training moved the weights away from the initial model
    torch.manual_seed(ctx.seed)
    init = common.build("topformer_t", ctx.profile)
    assert not torch.equal(init.classifier.weight, model.classifier.weight.cpu())
    # a second call is a cache hit: no new job, the same weights
    again, _ = common.trained_model(ctx, "topformer_t", steps=3)
    assert "processes, gloo" not in capsys.readouterr().out
    assert strain._weights_digest(again) == ddp["rank_digests"][0]
    assert not list((tmp_path / "build" / "cache" / "jobs").glob("*.job.pt"))  # job file removed


def test_nproc_must_divide_the_global_batch(tmp_path):
    from study.context import setup
    from study.sections import common

    ctx = setup(profile="smoke", build_dir=str(tmp_path / "build"), nproc=3)  # smoke batch 4
    with pytest.raises(ValueError, match="divide"):
        common.trained_model(ctx, "topformer_t", steps=1)
