"""Tests of study.data: generator, layout, validation, atomic preparation, loaders."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from study import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from study import data as D
from study.profiles import PROFILES

SMOKE = PROFILES["smoke"]


def _write_pair(img_dir: Path, gt_dir: Path, name: str, size=(32, 32), value=1):
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(name))
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(img_dir / name)
    m = np.full(size, value, np.uint8)
    m[: size[0] // 2] = 0
    Image.fromarray(np.stack([m] * 3, -1)).save(gt_dir / name)


def _short(root: Path, n_train=3, n_val=2, size=(32, 32)):
    for i in range(n_train):
        _write_pair(root / "IMG/train", root / "GT/train", f"train_{i:04d}.png", size, value=i + 1)
    for i in range(n_val):
        _write_pair(root / "IMG/val", root / "GT/val", f"val_{i:04d}.png", size, value=i + 2)
    return root


def _published(root: Path, size=(32, 32)):
    for i in range(3):
        _write_pair(root / "LPCVC_Train_Updated/IMG/train", root / "LPCVC_Train_Updated/GT_Updated/train",
                    f"train_{i:04d}.png", size, value=i + 1)
    for i in range(2):
        _write_pair(root / "LPCVC_Val/IMG/val", root / "LPCVC_Val/GT/val", f"val_{i:04d}.png", size, value=5)
    return root


# --- generator ------------------------------------------------------------------------

def test_generate_scene_deterministic_and_typed():
    a_img, a_m = D.generate_scene(3, 7, 64)
    b_img, b_m = D.generate_scene(3, 7, 64)
    c_img, _ = D.generate_scene(3, 8, 64)
    assert a_img.dtype == np.uint8 and a_img.shape == (64, 64, 3)
    assert a_m.dtype == np.uint8 and a_m.shape == (64, 64)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_m, b_m)
    assert not np.array_equal(a_img, c_img)
    assert a_m.max() < NUM_CLASSES
    with pytest.raises(ValueError, match="size"):
        D.generate_scene(0, 0, 8)


def test_generated_class_statistics():
    counts = np.zeros(NUM_CLASSES)
    present = np.zeros(NUM_CLASSES, bool)
    for i in range(50):
        _, m = D.generate_scene(0, i, 96)
        c = np.bincount(m.ravel(), minlength=NUM_CLASSES)
        counts += c
        present |= c > 0
    freq = counts / counts.sum()
    missing = [CLASS_NAMES[i] for i in np.nonzero(~present)[0]]
    assert not missing, f"classes never generated: {missing}"
    assert freq[0] == freq.max() and freq[0] > 0.4
    for name in ("person", "vehicle", "cracks"):
        assert 0 < freq[CLASS_NAMES.index(name)] < 0.03, name


def test_vehicles_lie_on_roads():
    """Context cue: every vehicle pixel touches road within a 2-px neighbourhood."""
    import cv2

    seen = 0
    for i in range(40):
        _, m = D.generate_scene(0, i, 128)
        veh = m == CLASS_NAMES.index("vehicle")
        if not veh.any():
            continue
        seen += 1
        road = cv2.dilate((m == CLASS_NAMES.index("road")).astype(np.uint8), np.ones((7, 7), np.uint8))
        n_lab, comp = cv2.connectedComponents(veh.astype(np.uint8))
        for k in range(1, n_lab):
            assert road[comp == k].any(), f"vehicle off road in scene {i}"
    assert seen > 5


# --- writing, layout, preparation --------------------------------------------------------

def test_write_dataset_layout_and_loader(tmp_path):
    root = D.write_dataset(tmp_path / "ds", n_train=4, n_val=2, size=48, seed=1, workers=1)
    lay = D.find_layout(root)
    assert lay["train"] == (root / "IMG/train", root / "GT/train")
    assert sorted(p.name for p in (root / "IMG/val").iterdir()) == ["val_0000.png", "val_0001.png"]
    g = np.asarray(Image.open(root / "GT/train/train_0002.png"))
    assert g.shape == (48, 48, 3) and (g[..., 0] == g[..., 1]).all() and (g[..., 0] == g[..., 2]).all()
    assert np.array_equal(g[..., 0], D.generate_scene(1, 2, 48)[1])
    # val uses a disjoint index range
    v = np.asarray(Image.open(root / "GT/val/val_0000.png"))[..., 0]
    assert np.array_equal(v, D.generate_scene(1, D.VAL_INDEX_OFFSET, 48)[1])
    ds = D.LPCVCDataset(root, "train")
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (3, 48, 48)
    assert y.dtype == torch.int64 and y.shape == (48, 48)
    assert abs(float(x.mean())) < 3
    D.validate_dataset(root)
    f = D.class_frequencies(root, "train")
    assert f.shape == (NUM_CLASSES,) and f.dtype == np.float64 and abs(f.sum() - 1) < 1e-9
    # no test split on disk: val is a held-out part of train, test is the folder's val
    imgs, masks = D.load_split_arrays(root, "test", 32)
    assert imgs.shape == (2, 32, 32, 3) and imgs.dtype == np.uint8 and masks.shape == (2, 32, 32)


def test_embedded_test_split_is_disjoint_and_selection_split_used(tmp_path):
    root = D.write_dataset(tmp_path / "ds", n_train=3, n_val=2, size=40, seed=5, workers=1, n_test=2)
    sp = D.split_pairs(root)
    assert [len(sp[k]) for k in ("train", "val", "test")] == [3, 2, 2]
    t = np.asarray(Image.open(root / "GT/test/test_0001.png"))[..., 0]
    assert np.array_equal(t, D.generate_scene(5, D.TEST_INDEX_OFFSET + 1, 40)[1])
    imgs = {k: {D._read_image(p).tobytes() for p, _ in sp[k]} for k in sp}
    assert not (imgs["train"] & imgs["val"]) and not (imgs["train"] & imgs["test"]) and not (imgs["val"] & imgs["test"])
    assert "three disjoint" in D.split_protocol(root)
    assert len(D.make_eval_loader(root, type("P", (), {"image_size": 32})(), "test").dataset) == 2
    with pytest.raises(D.DataError, match="split must be one of"):
        D.LPCVCDataset(root, "holdout")


def test_lpcvc_layout_holds_out_a_fixed_seeded_part_of_train(tmp_path):
    root = D.write_dataset(tmp_path / "ds", n_train=20, n_val=3, size=32, seed=2, workers=1)
    a, b = D.split_pairs(root), D.split_pairs(root)
    assert a == b  # fixed draw
    assert len(a["val"]) == 2 and len(a["train"]) == 18 and len(a["test"]) == 3
    assert {p for p, _ in a["test"]} == set((root / "IMG/val").iterdir())
    assert not ({p for p, _ in a["val"]} & {p for p, _ in a["train"]})
    assert "held out" in D.split_protocol(root)


def test_both_layouts_accepted(tmp_path):
    short = D.validate_dataset(_short(tmp_path / "a"))
    pub = D.validate_dataset(_published(tmp_path / "b"))
    assert short["val"][1] == tmp_path / "a/GT/val"
    assert pub["train"][1] == tmp_path / "b/LPCVC_Train_Updated/GT_Updated/train"
    ds = D.LPCVCDataset(tmp_path / "b", "train", size=16)
    x, y = ds[1]
    assert x.shape == (3, 16, 16) and set(torch.unique(y).tolist()) <= {0, 2}


@pytest.mark.parametrize("case", ["missing", "no_mask", "no_image", "size", "values", "corrupt", "empty"])
def test_validation_errors_name_the_file(tmp_path, case):
    root = _short(tmp_path / "ds")
    if case == "missing":
        shutil.rmtree(root / "GT/val")
        expect = "GT/val"
    elif case == "no_mask":
        (root / "GT/train/train_0001.png").unlink()
        expect = "train_0001.png"
    elif case == "no_image":
        (root / "IMG/val/val_0001.png").unlink()
        expect = "val_0001.png"
    elif case == "size":
        _write_pair(tmp_path / "o_img", tmp_path / "o_gt", "train_0002.png", size=(20, 20))
        shutil.copy(tmp_path / "o_gt/train_0002.png", root / "GT/train/train_0002.png")
        expect = "train_0002.png"
    elif case == "values":
        m = np.full((32, 32, 3), 17, np.uint8)
        m[0, 0] = IGNORE_INDEX  # allowed
        Image.fromarray(m).save(root / "GT/train/train_0000.png")
        expect = "17"
    elif case == "corrupt":
        (root / "IMG/val/val_0000.png").write_bytes(b"not a png")
        expect = "val_0000.png"
    else:
        for p in (root / "IMG/val").iterdir():
            p.unlink()
        for p in (root / "GT/val").iterdir():
            p.unlink()
        expect = "IMG/val"
    with pytest.raises(D.DataError) as ei:
        D.validate_dataset(root)
    assert expect in str(ei.value)
    if case == "values":
        assert "train_0000.png" in str(ei.value)


def test_prepare_dataset_atomic_and_cached(tmp_path):
    prof = SMOKE.replace(n_train=3, n_val=2, image_size=40)
    cache = tmp_path / "cache"
    # an interrupted earlier run: a half-written temp dir with a dead pid
    info0_key_dir = cache / "data"
    info0_key_dir.mkdir(parents=True)
    first = D.prepare_dataset(prof, seed=5, cache_root=cache, workers=1)
    key = first.fingerprint
    shutil.rmtree(first.root)
    leftover = info0_key_dir / f".tmp-embedded-{key}-999999999-1"
    (leftover / "IMG/train").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(leftover / "IMG/train/train_0000.png")

    info = D.prepare_dataset(prof, seed=5, cache_root=cache, workers=1)
    assert info.generated and info.fingerprint == key and info.root.name == f"embedded-{key}"
    assert not leftover.exists()
    assert [p.name for p in info0_key_dir.iterdir() if p.name.startswith(".tmp")] == []
    assert len(list((info.root / "IMG/train").iterdir())) == 3
    assert len(list((info.root / "GT/val").iterdir())) == 2
    D.validate_dataset(info.root)
    mtime = (info.root / "IMG/train/train_0000.png").stat().st_mtime_ns
    again = D.prepare_dataset(prof, seed=5, cache_root=cache, workers=1)
    assert again.root == info.root
    assert (info.root / "IMG/train/train_0000.png").stat().st_mtime_ns == mtime  # reused
    other = D.prepare_dataset(prof, seed=6, cache_root=cache, workers=1)
    assert other.fingerprint != key


def test_prepare_dataset_with_data_root(tmp_path):
    root = _published(tmp_path / "real")
    info = D.prepare_dataset(SMOKE, seed=0, cache_root=tmp_path / "cache", data_root=root)
    assert not info.generated and info.root == root and len(info.fingerprint) == 16
    assert info.fingerprint == D.prepare_dataset(SMOKE, 0, tmp_path / "cache", data_root=root).fingerprint
    (root / "LPCVC_Val/GT/val/val_0001.png").unlink()
    with pytest.raises(D.DataError, match="val_0001.png"):
        D.prepare_dataset(SMOKE, seed=0, cache_root=tmp_path / "cache", data_root=root)


# --- loaders ------------------------------------------------------------------------------

def test_loader_determinism(tmp_path):
    root = D.write_dataset(tmp_path / "ds", n_train=6, n_val=3, size=48, seed=0, workers=1, n_test=1)
    prof = SMOKE.replace(image_size=48, crop_size=40, batch_size=2)

    def first(seed, workers=0):
        tr, va = D.make_loaders(root, prof, seed=seed, num_workers=workers)
        return next(iter(tr)), next(iter(va))

    (x1, y1), (v1, _) = first(0)
    (x2, y2), (v2, _) = first(0)
    (x3, y3), _ = first(1)
    assert x1.shape == (2, 3, 40, 40) and y1.shape == (2, 40, 40) and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(v1, v2)
    assert not torch.equal(x1, x3)
    assert v1.shape == (3, 3, 48, 48)
    (w1, _), _ = first(0, workers=1)
    (w2, _), _ = first(0, workers=1)
    assert torch.equal(w1, w2)
    tr, _ = D.make_loaders(root, prof, seed=0)
    assert len(tr) == 3  # drop_last


def test_train_transform_pads_with_ignore_index():
    tf = D.train_transform(crop_size=64, image_size=32, seed=0)  # scale <= 2: crop always needs padding
    img = np.full((32, 32, 3), 100, np.uint8)
    mask = np.full((32, 32), 3, np.uint8)
    seen_pad = False
    for _ in range(5):
        out = tf(image=img, mask=mask)
        m = out["mask"]
        assert out["image"].shape == (64, 64, 3) and m.shape == (64, 64)
        assert set(np.unique(m).tolist()) <= {3, IGNORE_INDEX}
        seen_pad |= bool((m == IGNORE_INDEX).any())
    assert seen_pad
    v = D.val_transform(16)(image=img, mask=mask)
    assert v["image"].shape == (16, 16, 3) and set(np.unique(v["mask"]).tolist()) == {3}
