"""Training loop (study.train): losses, schedule, learning on a toy task, DDP weight sync,
batch-stream continuation; and the cached baselines built on it (study.sections.common)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from study.train import TrainConfig, evaluate, lr_at, ohem_cross_entropy, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ohem_keeps_hard_pixels_and_ignores_255():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0, 0, 0] = 10.0  # easy, correct pixel
    target = torch.tensor([[[0, 1], [1, 255]]])
    loss = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=1)
    # hard pixels: the three non-ignored minus the easy one -> each CE = log 2
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    # with min_kept larger than the hard set, the easy pixel enters the mean
    full = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=3)
    ref = F.cross_entropy(logits, target, ignore_index=255)
    assert full.item() == pytest.approx(ref.item(), rel=1e-5)


def test_lr_schedule_warmup_then_poly():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) < 0.05
    assert all(lr_at(i, cfg) >= lr_at(i + 1, cfg) for i in range(10, 99))


def _toy_data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, 3, 16, 16, generator=g)
        y = (x[:, 0] > 0).long() * 3  # class 3 where channel 0 is positive, else 0
        out.append((x, y))
    return out


def test_train_learns_toy_task_and_is_deterministic():
    data = _toy_data()
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 14, 1))
        before = evaluate(m, data, progress=False)["miou"]
        h = train(m, data, data, TrainConfig(steps=60, lr=2e-2, loss="ce"), progress=False)
        results.append((before, h["evals"][-1]["miou"], h["loss"]))
    (b, a, l1), (_, _, l2) = results
    assert a > 0.8 > b
    assert l1 == l2  # same seed, same losses


def test_bad_loss_name():
    m = nn.Conv2d(3, 14, 1)
    with pytest.raises(ValueError, match="loss"):
        train(m, _toy_data(1), None, TrainConfig(steps=1, loss="focal"), progress=False)


def test_ddp_two_cpu_processes_stay_in_sync(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "study.train", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    w0 = torch.load(tmp_path / "rank0.pt")
    w1 = torch.load(tmp_path / "rank1.pt")
    assert torch.equal(w0, w1)
    # and training moved the weights away from the common initialisation
    torch.manual_seed(0)
    init = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 14, 1))
    flat = torch.cat([p.detach().flatten() for p in init.parameters()])
    assert not torch.allclose(w0, flat)


def test_trained_model_uses_a_user_data_root_in_the_published_layout(tmp_path):
    """--data-root: a dataset in LPCVC's published folder names is trained on and evaluated."""
    import shutil

    from study.context import setup
    from study.data import write_dataset
    from study.sections.common import trained_model

    src = write_dataset(tmp_path / "gen", n_train=8, n_val=4, size=64, seed=3, workers=1)
    root = tmp_path / "lpcvc"
    for split, top, gt in (("train", "LPCVC_Train_Updated", "GT_Updated"), ("val", "LPCVC_Val", "GT")):
        shutil.copytree(src / "IMG" / split, root / top / "IMG" / split)
        shutil.copytree(src / "GT" / split, root / top / gt / split)
    ctx = setup(profile="smoke", data_root=str(root), build_dir=str(tmp_path / "build"))
    assert not ctx.generated_data and ctx.data_root == root
    model, scores = trained_model(ctx, "topformer_t", steps=2)
    assert 0.0 <= scores["miou"] <= 1.0 and len(scores["per_class_iou"]) == 14
    # the cache entry is keyed by this dataset's fingerprint, not the embedded one
    assert any(p.name.startswith("baseline-topformer_t-") for p in (tmp_path / "build" / "cache").iterdir())


def test_cache_key_covers_the_training_code(tmp_path, monkeypatch):
    """trained_model keys its entries on the import closure of the code that trains (study.train,
    study.models, study.data, study.sections.common), on the training config and on the profile."""
    from study.cache import code_closure
    from study.context import setup
    from study.sections.common import trained_model

    seen = {}

    def fake_memo(self, name, config, compute, *, seed=None, data_fp="", modules=()):
        seen.update(name=name, config=config, seed=seed, data_fp=data_fp, modules=list(modules))
        raise RuntimeError("stop")

    monkeypatch.setattr("study.cache.ArtifactCache.memo", fake_memo)
    ctx = setup(profile="smoke", build_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="stop"):
        trained_model(ctx, "topformer_t", steps=1, seed=5)
    closure = set(code_closure(*seen["modules"]))
    assert {"study.train", "study.models", "study.data", "study.sections.common"} <= closure
    assert seen["name"] == "baseline-topformer_t" and seen["seed"] == 5 and seen["data_fp"] == ctx.data_fp
    assert seen["config"]["train"]["steps"] == 1 and seen["config"]["profile"] == ctx.profile.to_dict()


def test_train_accepts_a_batch_stream_and_continues_it():
    """Two train() calls on one BatchStream see consecutive batches, not the first ones again."""
    from study.data import batch_stream

    data = _toy_data(4)
    seen = []

    def loss_fn(model, images, masks):
        seen.append(float(images[0, 0, 0, 0]))
        return F.cross_entropy(model(images), masks), {}

    stream = batch_stream(data)
    m = nn.Conv2d(3, 14, 1)
    for _ in range(2):
        train(m, stream, None, TrainConfig(steps=3, lr=1e-3, loss="ce", amp=False), loss_fn=loss_fn, progress=False)
    assert seen == [float(data[i % 4][0][0, 0, 0, 0]) for i in range(6)]
