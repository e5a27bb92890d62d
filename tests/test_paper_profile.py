"""The paper profile for real (issue 17): dry run, pretrained encoders wired into the run, early weight checks."""
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from study import BASE_COLUMNS, models
from study import report as runner
from study.context import Context, check_weights, setup
from study.cache import ArtifactCache
from study.profiles import PROFILES, ProfileError, get_profile

ROOT = Path(__file__).resolve().parent.parent


def _checkpoint(root: Path, ckpt: str, seed: int = 0):
    """A seeded timm encoder saved where `hf download timm/<ckpt> --local-dir root/<ckpt>` puts it."""
    import timm

    torch.manual_seed(seed)
    net = timm.create_model(ckpt.split(".")[0], pretrained=False)
    for p in net.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    (root / ckpt).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / ckpt / "model.safetensors"))
    return net


def _lpcvc(tmp_path, size=64, n_train=8, n_val=20):
    """A small dataset in LPCVC's published folder layout."""
    from study.data import write_dataset

    src = write_dataset(tmp_path / "gen", n_train=n_train, n_val=n_val, size=size, seed=3, workers=1)
    root = tmp_path / "lpcvc"
    for split, top, gt in (("train", "LPCVC_Train_Updated", "GT_Updated"), ("val", "LPCVC_Val", "GT")):
        shutil.copytree(src / "IMG" / split, root / top / "IMG" / split)
        shutil.copytree(src / "GT" / split, root / top / gt / split)
    return root


def test_fast_dev_run_keeps_shapes_and_sweeps_and_shrinks_steps():
    paper = PROFILES["paper"]
    dry = paper.fast_dev_run()
    assert (dry.image_size, dry.crop_size, dry.batch_size, dry.lr) == (512, 384, 16, paper.lr)  # real shapes
    assert dry.sparsities == paper.sparsities and dry.teacher == paper.teacher  # every sweep point
    assert dry.name == "paper" and dry.dry_run and dry.out_name == "paper-dryrun"
    assert (dry.student_steps, dry.teacher_steps, dry.finetune_steps, dry.search_steps) == (2, 2, 2, 2)
    assert dry.extra["kd_steps"] == 2 and dry.extra["iterative_budget_s"] is None
    assert dry.eval_batches == 2 and dry.n_val == 16
    assert (dry.bench_min_runs, dry.bench_warmup_runs, dry.bench_warmup_s, dry.bench_min_s) == (3, 0, 0.0, 0.0)
    assert dry.seeds == (0, 1) and dry.pretrained and not dry.needs_gpu
    assert dry.fast_dev_run() == dry  # idempotent
    assert PROFILES["cpu"].fast_dev_run().extra["kd_steps"] == 2  # not cpu's student_steps // 3 = 0
    assert paper.out_name == "paper" and not paper.dry_run


def test_dry_run_benchmarks_are_three_timed_runs_of_the_same_protocol():
    """Issue #17: "3 runs per benchmark" - 3 interleaved rounds (fresh processes) of one run, no warm-up."""
    from types import SimpleNamespace

    from study.sections import measure, pipeline

    dry = PROFILES["paper"].fast_dev_run()
    kw = measure.protocol(SimpleNamespace(profile=dry))
    assert kw["rounds"] * kw["min_runs"] == 3 and kw["rounds"] >= 2          # an interval over rounds
    assert kw["warmup_runs"] == 0 and kw["warmup_s"] == 0 and kw["min_s"] == 0
    pk = pipeline.protocol_settings(dry)
    assert pk["rounds"] * pk["min_runs"] == 3 and pk["warmup_runs"] == 0 and pk["min_s"] == 0
    cpu = measure.protocol(SimpleNamespace(profile=PROFILES["cpu"]))            # real runs: unchanged
    assert (cpu["rounds"], cpu["min_runs"], cpu["warmup_runs"]) == (5, 10, 3)
    assert pipeline.protocol_settings(PROFILES["cpu"])["min_runs"] == 10 and "warmup_runs" not in pipeline.protocol_settings(PROFILES["cpu"])


def test_paper_is_pretrained_and_runs_on_a_cpu_only_as_a_dry_run():
    assert PROFILES["paper"].pretrained and not PROFILES["cpu"].pretrained and not PROFILES["smoke"].pretrained
    with pytest.raises(ProfileError, match="--fast-dev-run"):
        get_profile("paper", data_root="/x", has_gpu=False)
    assert get_profile("paper", data_root="/x", has_gpu=False, fast_dev_run=True).dry_run
    with pytest.raises(ProfileError, match="--data-root"):
        get_profile("paper", fast_dev_run=True)  # a dry run still needs the data
    smoke = get_profile("smoke", weights_dir="/w")
    assert smoke.pretrained and smoke.weights_dir == "/w"
    assert "weights_dir" not in smoke.to_dict() and smoke.to_dict()["pretrained"] is True  # path not in keys


def test_dry_run_context_truncates_evaluation_and_marks_rows(tmp_path):
    from study.sections import common, rows

    ctx = setup(profile="smoke", build_dir=str(tmp_path / "b"), fast_dev_run=True)
    assert ctx.dry_run and ctx.out_dir == tmp_path / "b" / "smoke-dryrun"
    full = setup(profile="smoke", build_dir=str(tmp_path / "b"))
    assert full.data_root == ctx.data_root  # the profile's own dataset
    ctx.profile = ctx.profile.replace(eval_batches=1)  # smoke's 8 val images are one batch of 8
    _, va = common.loaders(ctx)
    _, va_full = common.loaders(full)
    assert len(va) == 1 and len(va.dataset) == 8 and len(va_full.dataset) == 8
    ctx.profile = ctx.profile.replace(eval_batches=2)
    ctx2 = Context(profile=ctx.profile, seed=0, out_dir=tmp_path / "o", cache=ArtifactCache(tmp_path / "c"),
                   data_root=_lpcvc(tmp_path), data_fp="x")
    va = common.eval_loader(ctx2, "test")  # LPCVC layout: the official val split is the test split
    assert len(va) == 2 and len(va.dataset) == 16  # 20 test images, 2 batches of 8 kept, in order
    first = next(iter(common.eval_loader(Context(**{**ctx2.__dict__, "profile": ctx.profile.replace(eval_batches=0)}),
                                         "test")))
    assert torch.equal(next(iter(va))[0], first[0])
    row = rows.table_row(ctx, "baselines", "upernet_resnet18", "x", {"miou": 0.5, "mdice": 0.6},
                           complexity={"params_m": 1.0, "gmacs": 2.0})
    assert tuple(row)[: len(BASE_COLUMNS)] == BASE_COLUMNS and row["dry_run"] is True and row["pretrained"] is False
    assert rows.table_row(full, "baselines", "m", "x", {}, pretrained=True)["dry_run"] is False
    # a table without the columns gets them from the context
    base = {c: 0 for c in BASE_COLUMNS} | {"section": "baselines"}
    df = pd.read_csv(ctx.save_table("baselines", pd.DataFrame([base])))
    assert bool(df.loc[0, "dry_run"]) is True and bool(df.loc[0, "pretrained"]) is False


def test_pretrained_column_and_start_follow_the_weights(tmp_path):
    from study.sections import common, rows

    wd = tmp_path / "w"
    src = _checkpoint(wd, "resnet18.a1_in1k")
    prof = get_profile("smoke", weights_dir=str(wd)).fast_dev_run()
    assert common.uses_pretrained("upernet_resnet18", prof)
    assert not common.uses_pretrained("topformer_t", prof)  # no official file: from scratch, labelled
    assert common.start_label("upernet_resnet18", prof) == "ImageNet encoder (resnet18.a1_in1k)"
    m = common.build("upernet_resnet18", prof)
    assert m.pretrained and torch.equal(m.backbone.body.state_dict()["conv1.weight"], src.state_dict()["conv1.weight"])
    assert not common.build("upernet_resnet18", prof, pretrained=False).pretrained
    ctx = Context(profile=prof, seed=0, out_dir=tmp_path / "o", cache=ArtifactCache(tmp_path / "c"),
                  data_root=tmp_path, data_fp="x")
    row = rows.table_row(ctx, "bilevel_search", "topformer_t", "dense", {}, complexity={})
    assert row["pretrained"] is False  # registry name: its own start, not the profile's
    assert rows.table_row(ctx, "baselines", "mobilevit_s (KD)", "kd", {}, complexity={})["pretrained"] is True
    assert rows.table_row(ctx, "baselines", "x", "y", {}, model=m, input_hw=(32, 32))["pretrained"] is True


def test_trained_model_from_pretrained_encoder_in_a_dry_run(tmp_path):
    from study.sections import common, rows

    wd = tmp_path / "w"
    _checkpoint(wd, "resnet18.a1_in1k")
    ctx = setup(profile="smoke", build_dir=str(tmp_path / "b"), fast_dev_run=True)
    ctx.profile = ctx.profile.replace(pretrained=True, weights_dir=str(wd))  # only resnet18's file here
    model, scores = common.trained_model(ctx, "upernet_resnet18")
    assert scores["pretrained"] is True and model.pretrained
    entry = next((tmp_path / "b" / "cache").glob("baseline-upernet_resnet18-*.pt"))
    assert len(torch.load(entry, weights_only=True)["history"]["loss"]) == 2  # 2 optimizer steps


def test_setup_reads_the_notebook_parameters(monkeypatch, tmp_path):
    import IPython

    class FakeShell:
        user_ns = {"fast_dev_run": True, "weights_dir": ""}

    monkeypatch.setattr(IPython, "get_ipython", lambda: FakeShell())
    ctx = setup(profile="smoke", build_dir=str(tmp_path / "b"))
    assert ctx.dry_run and ctx.out_dir.name == "smoke-dryrun"
    assert not setup(profile="smoke", build_dir=str(tmp_path / "b"), fast_dev_run=False).dry_run  # explicit wins


def test_missing_weights_stop_the_run_before_any_notebook(tmp_path, capsys):
    wd = tmp_path / "weights"
    wd.mkdir()
    rc = runner.main(["run", "--profile", "smoke", "--weights-dir", str(wd), "--build-dir", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "b").exists()
    for ck in models.PRETRAINED_ENCODERS.values():  # every file named, with its download command
        assert str(wd / ck / "model.safetensors") in err and f"download timm/{ck}" in err
    with pytest.raises(models.WeightsError, match="resnet18.a1_in1k"):
        setup(profile="smoke", build_dir=str(tmp_path / "b"), weights_dir=str(wd))  # the notebooks check too


def test_paper_without_weights_and_without_the_hub_stops_early(tmp_path, monkeypatch, capsys):
    """The issue's case: paper dry run, no --weights-dir, no network: one message, no notebook run."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf"))
    data = _lpcvc(tmp_path, n_val=4)
    rc = runner.main(["run", "--profile", "paper", "--fast-dev-run", "--data-root", str(data),
                      "--build-dir", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "b").exists()
    assert "HF_HUB_OFFLINE" in err and "--weights-dir" in err
    for ck in models.PRETRAINED_ENCODERS.values():
        assert f"DIR/{ck}/model.safetensors" in err and f"hf download timm/{ck} --local-dir DIR/{ck}" in err
    prof = get_profile("paper", data_root=str(data), fast_dev_run=True)
    with pytest.raises(models.WeightsError):
        check_weights(prof)
    assert check_weights(get_profile("cpu")) == {}  # from scratch: nothing to check


def test_gpu_extra_pins_the_cuda13_builds_and_environment_yml_mirrors_it():
    import re
    import tomllib

    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    gpu = dict(d.split("==") for d in proj["optional-dependencies"]["gpu"])
    cpu = dict(d.split("==") for d in proj["dependencies"])
    assert gpu["onnxruntime-gpu"] == cpu["onnxruntime"]  # the GPU build of the same version
    assert "tensorrt-cu13" in gpu and cpu["torch"].startswith("2.14")  # TensorRT for torch's CUDA 13
    env = (ROOT / "environment.yml").read_text()
    commented = dict(m.split("==") for m in re.findall(r"^#\s+- ([A-Za-z0-9_.\-]+==[^\s#]+)", env, re.M))
    assert commented == gpu
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert "CUDAExecutionProvider" in script and "--runtime trt" in script


def test_profile_breakdown_counts_each_sample_once_under_the_root(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("profile_breakdown", ROOT / "benchmarks" / "profile_breakdown.py")
    pb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb)
    cell = "InteractiveShell.run_code (IPython/core/interactiveshell.py:3601)"
    lines = [
        f"{cell};finetune (study/sections/common.py:10);train (study/train.py:5) 30\n",
        # an evaluation inside a training is training time (first category wins)
        f"{cell};finetune (study/sections/common.py:10);evaluate (study/train.py:321) 10\n",
        f"{cell};test_confusions (study/sections/common.py:113) 20\n",
        f"{cell};prune_iteratively (study/prune.py:1002) 20\n",
        f"{cell};deepcopy (copy.py:1) 20\n",
        "Thread.run (threading.py:1);Event.wait (threading.py:2) 500\n",  # idle kernel thread: not counted
    ]
    total, cats = pb.breakdown(lines, "run_code", rate=10.0)
    got = dict(cats)
    assert total == pytest.approx(10.0)
    assert got["training steps (finetune / train)"] == pytest.approx(4.0)
    assert got["evaluation at the profile's shapes"] == pytest.approx(2.0)
    assert got["pruning (importance, graph, surgery)"] == pytest.approx(2.0)
    assert got["other (copies, data set-up, Python)"] == pytest.approx(2.0)
    assert sum(got.values()) == pytest.approx(total)
    with pytest.raises(ValueError, match="line 2"):
        pb.breakdown([lines[0], "not a stack\n"], "run_code", 20.0)
    with pytest.raises(ValueError, match="run_study"):
        pb.breakdown(lines, "run_study", 20.0)
