"""Embedded UAV disaster dataset generator and the LPCVC 2023 loader.

Entry points:

- :func:`prepare_dataset` - what :func:`study.context.setup` calls: generates the
  embedded dataset once (atomically, cached by a hash of its parameters and of the
  generator's source) or validates and fingerprints a real LPCVC folder.
- :func:`make_loaders` - seeded train / val ``DataLoader`` pair with source 000's
  augmentations (albumentations); :func:`make_eval_loader` - any split, for scoring.
- :func:`split_pairs` - the three splits of the study: ``train`` (weights), ``val``
  (every choice: KD method, schedule, INT8 exclusions, search settings) and ``test`` (every
  number a verdict or headline uses). The embedded dataset has all three; a real LPCVC
  folder has train and val only, so a fixed, seeded 10 % of its train images is held out as
  ``val`` and the official val is ``test`` (:data:`HOLDOUT_FRACTION`, :data:`HOLDOUT_SEED`).

The generator (:func:`generate_scene`) paints procedural top-down scenes of seven types
(town, earthquake, flood, wildfire, volcano, mountain, landslide) with the 14 LPCVC
classes. Colour alone is ambiguous on purpose (fire vs lava glow, smoke vs pyroclastic
flow, snowfield vs avalanche vs ice jam, muddy flood vs debris flow vs rubble); texture,
shape and context (vehicles on roads, people next to buildings and roads, fire under a
smoke plume) decide. All drawing happens at the target size with numpy + OpenCV.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image

from . import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from .cache import atomic_write_text

cv2.setNumThreads(1)  # the generator and the loaders parallelise over processes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_INDEX_OFFSET = 1_000_000
TEST_INDEX_OFFSET = 2_000_000
#: Fraction of a real dataset's train images held out as the selection (``val``) split when
#: the dataset has no test split (LPCVC ships train and val only), and the seed of that draw.
HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 0
SPLITS = ("train", "val", "test")
SCENE_TYPES = ("town", "earthquake", "flood", "wildfire", "volcano", "mountain", "landslide")

(BG, AVALANCHE, BUILDING, BUILDING_DAMAGED, CRACKS, DEBRIS, FIRE, FLOOD, ICE_JAM, LAVA,
 PERSON, PYROCLASTIC, ROAD, VEHICLE) = range(NUM_CLASSES)


class DataError(ValueError):
    """A dataset folder or file is missing, unreadable or malformed (the message names it)."""


# --- generator ----------------------------------------------------------------------
# Everything between this marker and "end generator" is hashed into the cache name of
# the embedded dataset: editing the generator regenerates the data.

_TEXTURES: dict | None = None


def _textures() -> dict:
    """scikit-image's grass / gravel / brick, standardised float32, loaded once.

    Each texture is kept at full (512 px) and half resolution, both tiled 2x2, so that a
    crop can be shrunk or enlarged with a cheap bilinear resize. Also holds a fixed
    sensor-noise tile (N(0,1), 512x512x3).
    """
    global _TEXTURES
    if _TEXTURES is None:
        from skimage import data as skdata
        tex = {}
        for name in ("grass", "gravel", "brick"):
            t = getattr(skdata, name)().astype(np.float32)
            t = (t - t.mean()) / (t.std() + 1e-6)
            half = cv2.resize(t, (t.shape[1] // 2, t.shape[0] // 2), interpolation=cv2.INTER_AREA)
            tex[name] = (np.tile(t, (2, 2)), np.tile(half / half.std(), (2, 2)))
        tex["sensor"] = np.random.default_rng(12345).standard_normal((512, 512, 3), dtype=np.float32)
        _TEXTURES = tex
    return _TEXTURES


def _tex(rng, name: str, size: int, zoom=(1.0, 3.0)) -> np.ndarray:
    """Random crop / rotation / zoom of a texture, (size, size) float32 ~N(0, 1).

    ``zoom`` is the range of (texture px at full resolution) / (output px).
    """
    z = rng.uniform(*zoom)
    level = 1 if z > 1.5 else 0
    t = _textures()[name][level]
    side = int(np.clip(size * z / (1 + level), 8, t.shape[0]))
    y, x = rng.integers(0, t.shape[0] - side + 1, 2)
    out = cv2.resize(t[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_LINEAR)
    k = int(rng.integers(4))
    return out.T if k == 1 else out[::-1] if k == 2 else out[:, ::-1].T if k == 3 else out


def _noise(rng, size: int, cells: int, octaves: int = 3) -> np.ndarray:
    """Fractal value noise in [0, 1], float32 (size, size); ``cells`` = coarsest grid."""
    n0 = max(2, cells)
    out = cv2.resize(rng.random((n0, n0), dtype=np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    amp = 1.0
    for o in range(1, octaves):
        amp *= 0.5
        n = max(2, cells * 2 ** o)
        out += amp * cv2.resize(rng.random((n, n), dtype=np.float32), (size, size),
                                interpolation=cv2.INTER_LINEAR)
    lo, hi = cv2.minMaxLoc(out)[:2]
    out -= lo
    out *= 1.0 / (hi - lo + 1e-6)
    return out


def _ridges(rng, size: int, cells: int) -> np.ndarray:
    """Thin bright network in [0, 1] (1 on ridges): 1 - |2*noise - 1|, sharpened."""
    n = _noise(rng, size, cells, octaves=2)
    return (1.0 - np.abs(2.0 * n - 1.0)) ** 8


def _layer(colour, tex=None, amp=0.0, size=None) -> np.ndarray:
    """A (size, size, 3) float32 colour layer modulated by a texture map."""
    c = np.asarray(colour, np.float32)
    if tex is None:
        return np.broadcast_to(c, (size, size, 3)).astype(np.float32)
    return c * (1.0 + amp * tex[..., None])


def _jitter(rng, colour, s=0.08):
    """Colour with a multiplicative per-channel jitter."""
    return np.clip(np.asarray(colour, np.float32) * (1 + rng.normal(0, s, 3)), 0, 1).astype(np.float32)


def _paint(img, lab, region, layer, label=None):
    """Paint on ``img`` where ``region`` (bool) and set ``lab`` to ``label`` there.

    ``layer`` is a full (H, W, 3) float32 layer, or ``(colour, tex, amp)`` evaluated only
    inside the region (faster).
    """
    if isinstance(layer, tuple):
        colour, tex, amp = layer
        img[region] = np.asarray(colour, np.float32) * (1 + amp * tex[region])[:, None]
    else:
        img[region] = layer[region]
    if label is not None:
        lab[region] = label


def _path(rng, size: int, n: int = 8, start=None, heading=None, turn=0.35, length=1.3):
    """Random-walk polyline (n+1 points, float) starting at an edge or at ``start``."""
    if start is None:
        side = rng.integers(4)
        t = rng.uniform(0.1, 0.9) * size
        start = [(t, -2), (size + 1, t), (t, size + 1), (-2, t)][side]
        heading = [np.pi / 2, np.pi, -np.pi / 2, 0][side] + rng.uniform(-0.5, 0.5)
    step = length * size / n
    pts = [np.asarray(start, np.float64)]
    for _ in range(n):
        heading += rng.normal(0, turn)
        pts.append(pts[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    return np.array(pts)


def _poly_mask(size, pts, thickness=None) -> np.ndarray:
    """Bool mask of a filled polygon (thickness None) or a polyline of ``thickness`` px."""
    m = np.zeros((size, size), np.uint8)
    p = [np.round(pts).astype(np.int32).reshape(-1, 1, 2)]
    if thickness is None:
        cv2.fillPoly(m, p, 1)
    else:
        cv2.polylines(m, p, False, 1, int(max(1, round(thickness))), cv2.LINE_8)
    return m.astype(bool)


def _rough(rng, size, mask, amount=0.35, cells=None) -> np.ndarray:
    """Roughen the outline of a bool mask with noise (blur + noisy threshold)."""
    k = max(3, (size // 40) | 1)
    soft = cv2.GaussianBlur(mask.astype(np.float32), (k, k), 0)
    n = _noise(rng, size, cells or max(4, size // 24), octaves=2)
    return soft + amount * (n - 0.5) > 0.5


def _tongue(rng, size, width, n=10, start=None, heading=None, grow=1.0, turn=0.25) -> tuple:
    """A flow-shaped region (chain of discs along a path), its path and per-point radii."""
    pts = _path(rng, size, n=n, start=start, heading=heading, turn=turn, length=rng.uniform(0.6, 1.1))
    m = np.zeros((size, size), np.uint8)
    radii = width * np.linspace(0.6, 0.6 + grow, n + 1) * rng.uniform(0.8, 1.2, n + 1)
    # dense sampling along the path so that the discs overlap
    for a, b, ra, rb in zip(pts[:-1], pts[1:], radii[:-1], radii[1:]):
        for t in np.linspace(0, 1, 4, endpoint=False):
            p = a + t * (b - a)
            cv2.circle(m, (int(p[0]), int(p[1])), int(max(1, ra + t * (rb - ra))), 1, -1)
    return _rough(rng, size, m.astype(bool), 0.5), pts, radii


def _rot_rect(cx, cy, w, h, angle_deg) -> np.ndarray:
    """Corners (4, 2) of a rotated rectangle."""
    return cv2.boxPoints(((float(cx), float(cy)), (float(w), float(h)), float(angle_deg)))


def _terrain(rng, size, kind) -> np.ndarray:
    """Background ground (float32 (size, size, 3)) of ``kind``: green/dry/soil/snow/ash."""
    base = {"green": (0.30, 0.42, 0.20), "dry": (0.52, 0.48, 0.33), "soil": (0.45, 0.36, 0.26),
            "snow": (0.86, 0.88, 0.92), "ash": (0.30, 0.29, 0.28)}[kind]
    other = {"green": (0.42, 0.45, 0.26), "dry": (0.45, 0.42, 0.30), "soil": (0.38, 0.40, 0.25),
             "snow": (0.50, 0.50, 0.52), "ash": (0.40, 0.37, 0.33)}[kind]
    mix = _noise(rng, size, 3, 3)[..., None]
    if kind == "snow":  # rock outcrops through smooth snow
        mix = (mix > 0.62).astype(np.float32) * 0.9
    img = _jitter(rng, base) * (1 - mix) + _jitter(rng, other) * mix
    amp = 0.06 if kind == "snow" else 0.18
    tex = _tex(rng, "grass", size) if kind in ("green", "dry") else _tex(rng, "gravel", size, (1.5, 3.0))
    img = img * (1 + amp * tex[..., None])
    # fields / patches (agricultural plots) for low-lying terrain
    if kind in ("green", "dry", "soil") and rng.random() < 0.6:
        for _ in range(rng.integers(1, 4)):
            c = rng.uniform(0, size, 2)
            box = _rot_rect(c[0], c[1], rng.uniform(0.15, 0.4) * size, rng.uniform(0.1, 0.3) * size,
                            rng.uniform(0, 180))
            m = _poly_mask(size, box)
            img[m] *= _jitter(rng, (1.0, 1.0, 1.0), 0.15)
    return img


def _river(rng, size, img, lab, label=FLOOD, width=None):
    """A meandering river band; water colours overlap with flood water on purpose."""
    width = width or rng.uniform(0.05, 0.12) * size
    pts = _path(rng, size, n=10, turn=0.25, length=1.5)
    m = _rough(rng, size, _poly_mask(size, pts, width), 0.3)
    colour = _jitter(rng, [(0.20, 0.30, 0.40), (0.25, 0.35, 0.30), (0.42, 0.36, 0.26)][rng.integers(3)])
    ripple = _tex(rng, "grass", size, (1.0, 2.0)) * 0.3 + (_noise(rng, size, 16, 1) - 0.5)
    bank = cv2.dilate(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~m
    img[bank] *= 0.8
    _paint(img, lab, m, (colour, ripple, 0.12), label)
    return m, pts, width


def _flood(rng, size, img, lab, avoid=None):
    """A large irregular flood region (muddy / grey-blue still water) with a soft shoreline."""
    n = _noise(rng, size, 3, 3)
    g = np.linspace(0, 1, size, dtype=np.float32)
    ramp = [g[None, :], g[:, None], 1 - g[None, :], 1 - g[:, None]][rng.integers(4)]
    field_ = 0.6 * n + 0.6 * ramp
    m = field_ > np.quantile(field_, rng.uniform(0.55, 0.8))
    colour = _jitter(rng, [(0.42, 0.36, 0.26), (0.30, 0.34, 0.36), (0.36, 0.35, 0.28)][rng.integers(3)])
    tex = (_noise(rng, size, 12, 2) - 0.5) * 0.6 + 0.1 * _tex(rng, "grass", size, (1.5, 2.5))
    if avoid is not None:
        m &= ~(avoid & (rng.random() < 0.5))  # roofs sometimes stay above water
    _paint(img, lab, m, (colour, tex, 0.25), FLOOD)
    return m


def _road(rng, size, img, lab, width=None):
    """Asphalt/dirt road with optional centre dashes; returns (mask, path, width)."""
    width = width or rng.uniform(0.035, 0.07) * size
    pts = _path(rng, size, n=6, turn=rng.choice([0.02, 0.12]), length=1.6)
    m = _poly_mask(size, pts, width)
    paved = rng.random() < 0.7
    colour = _jitter(rng, (0.36, 0.36, 0.37) if paved else (0.55, 0.47, 0.36), 0.1)
    _paint(img, lab, m, (colour, _tex(rng, "gravel", size, (1.5, 3.0)), 0.12), ROAD)
    if paved and width > 5 and rng.random() < 0.7:
        dash = _poly_mask(size, pts, max(1, width * 0.08))
        period = max(4, int(size / 20))
        yy, xx = np.mgrid[0:size, 0:size]
        on = ((xx + yy) // period) % 2 == 0
        img[dash & on] = _jitter(rng, (0.85, 0.82, 0.55))
    return m, pts, width


def _points_along(rng, pts, k):
    """``k`` random points on a polyline and the unit direction there."""
    seg = rng.integers(0, len(pts) - 1, k)
    t = rng.random(k)[:, None]
    a, b = pts[seg], pts[seg + 1]
    d = b - a
    d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
    return a + t * (b - a), d


def _vehicles(rng, size, img, lab, roads, count):
    """Small rotated boxes on roads, aligned with the road; colour contrasts the asphalt."""
    for m, pts, width in roads:
        if count <= 0:
            break
        k = int(rng.integers(1, count + 1))
        count -= k
        p, d = _points_along(rng, pts, k)
        normal = np.stack([-d[:, 1], d[:, 0]], 1)
        p += normal * rng.uniform(-0.22, 0.22, (k, 1)) * width
        # at least 5 px long (2.5 px wide): at the cpu profile's 96 px LPCVC-sized vehicles
        # would be ~3 px and unlearnable (a labelled departure from LPCVC's proportions;
        # unchanged from 200 px up)
        L = max(5.0, rng.uniform(0.025, 0.035) * size)
        for (cx, cy), (dx, dy) in zip(p, d):
            if not (0 <= cx < size and 0 <= cy < size) or not m[int(cy), int(cx)]:
                continue
            ang = np.degrees(np.arctan2(dy, dx))
            length = L * rng.uniform(0.9, 1.6)
            box = _rot_rect(cx, cy, length, L * 0.5, ang)
            shadow = np.round(box + 1.0).astype(np.int32)
            under = img[int(cy), int(cx)] * 0.55
            cv2.fillPoly(img, [shadow], tuple(float(v) for v in under))
            colour = _jitter(rng, [(0.75, 0.1, 0.1), (0.1, 0.2, 0.6), (0.9, 0.9, 0.9), (0.08, 0.08, 0.08),
                                   (0.85, 0.75, 0.1)][rng.integers(5)])
            poly = np.round(box).astype(np.int32)
            cv2.fillPoly(img, [poly], tuple(float(v) for v in colour))
            cv2.fillPoly(lab, [poly], VEHICLE)
            if length > 6:  # windscreen
                ws = _rot_rect(cx + dx * length * 0.2, cy + dy * length * 0.2, length * 0.15, L * 0.4, ang)
                cv2.fillPoly(img, [np.round(ws).astype(np.int32)], (0.12, 0.14, 0.18))


def _buildings(rng, size, img, lab, roads, n, p_damaged, taken):
    """Clusters of buildings in one or two rows beside the roads.

    Undamaged: rectangles, roof texture (brick) with a darker ridge half, cast shadow.
    Damaged: the same footprint with a broken, jagged outline, rubble (gravel) texture,
    roof fragments and dark holes. Returns the union of building masks.
    """
    all_b = np.zeros((size, size), bool)
    if roads:
        anchors = []
        for m, pts, width in roads:
            p, d = _points_along(rng, pts, n)
            side = rng.choice([-1, 1], (n, 1))
            normal = np.stack([-d[:, 1], d[:, 0]], 1) * side
            anchors += list(zip(p, d, normal, [width] * n))
        idx = rng.permutation(len(anchors))[:n]
        anchors = [anchors[i] for i in idx]
    else:
        c0 = rng.uniform(0.25, 0.75, 2) * size
        anchors = [(c0 + rng.normal(0, 0.2 * size, 2), np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.0)
                   for _ in range(n)]
    shadow_dir = np.array([1.0, 1.0]) * rng.uniform(1, 2.5) * size / 256
    tex_roof = _tex(rng, "brick", size, (0.8, 1.6))
    tex_rubble = _tex(rng, "gravel", size, (0.6, 1.2))
    holes = _noise(rng, size, max(4, size // 10), 1)
    base_ang = rng.uniform(0, 180)
    for p, d, normal, width in anchors:
        for row in range(1 + int(rng.random() < 0.6)):
            w = rng.uniform(0.07, 0.14) * size
            h = w * rng.uniform(0.5, 1.0)
            off = width / 2 + h / 2 + 1 + rng.uniform(0, 0.03) * size + row * (h + 2 + rng.uniform(0, 0.03) * size)
            centre = p + normal * off
            ang = (np.degrees(np.arctan2(d[1], d[0])) if width else base_ang) + rng.normal(0, 4)
            box = _rot_rect(centre[0], centre[1], w, h, ang)
            foot = _poly_mask(size, box)
            if not foot.any() or (foot & (taken | all_b)).sum() > 0.05 * foot.sum():
                continue
            foot &= ~taken
            damaged = rng.random() < p_damaged
            shadow = _poly_mask(size, box + shadow_dir * (0.6 if damaged else 2.0)) & ~foot & ~taken & ~all_b
            img[shadow] *= 0.55
            if not damaged:
                roof = _jitter(rng, [(0.62, 0.28, 0.22), (0.55, 0.55, 0.58), (0.40, 0.33, 0.30),
                                     (0.30, 0.40, 0.52), (0.78, 0.76, 0.72)][rng.integers(5)], 0.06)
                _paint(img, lab, foot, (roof, tex_roof, 0.12), BUILDING)
                half = _poly_mask(size, np.array([box[0], box[1], (box[1] + box[2]) / 2, (box[3] + box[0]) / 2]))
                img[foot & half] *= 0.8
                lab_m = foot
            else:
                per = []
                for a_, b_ in zip(box, np.roll(box, -1, 0)):
                    for t in np.linspace(0, 1, 5, endpoint=False):
                        per.append(a_ + t * (b_ - a_))
                per = np.array(per)
                per += rng.normal(0, 0.12 * h, per.shape)
                per = per + (centre - per) * rng.uniform(0, 0.45, (len(per), 1)) * (rng.random((len(per), 1)) < 0.4)
                lab_m = _rough(rng, size, _poly_mask(size, per), 0.6) & ~taken & ~all_b
                rubble = _jitter(rng, (0.50, 0.46, 0.42), 0.1)
                _paint(img, lab, lab_m, (rubble, tex_rubble, 0.35), BUILDING_DAMAGED)
                frag = (holes > 0.72) & lab_m
                img[frag] = img[frag] * 0.5 + 0.5 * _jitter(rng, (0.62, 0.30, 0.24))
                img[(holes < 0.2) & lab_m] *= 0.45
            all_b |= lab_m
    return all_b


def _persons(rng, size, img, lab, near, count, exclude):
    """Tiny people (2-4 px discs with a shadow), in small groups within a few px of ``near``."""
    if count <= 0 or not near.any():
        return
    r = max(2, size // 40)
    ring = cv2.dilate(near.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)).astype(bool)
    ring &= ~exclude
    ys, xs = np.nonzero(ring)
    if len(ys) == 0:
        return
    pick = rng.integers(0, len(ys), count)
    # radius >= 2 px (5 px discs): 1-px people are below what 96-px models resolve (a
    # labelled departure from LPCVC's proportions; unchanged from 340 px up)
    rad = max(2, int(round(size / 170)))
    for y, x in zip(ys[pick], xs[pick]):
        for _ in range(rng.integers(1, 4)):  # small groups
            yy, xx = int(y + rng.integers(-2, 3) * rad), int(x + rng.integers(-2, 3) * rad)
            if not (0 <= yy < size and 0 <= xx < size) or exclude[yy, xx]:
                continue
            shade = tuple(float(v) for v in img[yy, xx] * 0.55)
            cv2.circle(img, (xx + 1, yy + 1), rad, shade, -1)
            colour = _jitter(rng, [(0.9, 0.2, 0.1), (0.95, 0.85, 0.2), (0.2, 0.5, 0.9),
                                   (0.9, 0.9, 0.9), (0.1, 0.7, 0.3)][rng.integers(5)], 0.1)
            cv2.circle(img, (xx, yy), rad, tuple(float(v) for v in colour), -1)
            cv2.circle(lab, (xx, yy), rad, PERSON, -1)


def _cracks(rng, size, img, lab, k, within=None):
    """Thin dark branching fissures (1-2 px), optionally restricted to ``within``."""
    for _ in range(k):
        start = rng.uniform(0.1, 0.9, 2) * size
        pts = _path(rng, size, n=12, start=start, heading=rng.uniform(0, 2 * np.pi), turn=0.6,
                    length=rng.uniform(0.2, 0.5))
        m = _poly_mask(size, pts, max(1, size / 170))
        for _ in range(rng.integers(0, 3)):  # branches
            j = rng.integers(1, len(pts) - 1)
            b = _path(rng, size, n=5, start=pts[j], heading=rng.uniform(0, 2 * np.pi), turn=0.6,
                      length=rng.uniform(0.05, 0.15))
            m |= _poly_mask(size, b, 1)
        if within is not None:
            m &= within
        img[m] *= rng.uniform(0.25, 0.45)
        lab[m] = CRACKS


def _fire(rng, size, img, lab, k, where=None, wind=None):
    """Fire patches (flickering yellow-red) with a smoke plume (label background where dense)."""
    wind = wind if wind is not None else rng.uniform(0, 2 * np.pi)
    smoke_alpha = np.zeros((size, size), np.float32)
    for _ in range(k):
        if where is not None and where.any():
            ys, xs = np.nonzero(where)
            i = rng.integers(len(ys))
            c = np.array([xs[i], ys[i]], np.float64)
        else:
            c = rng.uniform(0.15, 0.85, 2) * size
        r = rng.uniform(0.03, 0.08) * size
        m = np.zeros((size, size), np.uint8)
        if rng.random() < 0.5:  # a fire front: elongated, curved line of flames
            front = _path(rng, size, n=5, start=c, heading=wind + np.pi / 2, turn=0.3, length=rng.uniform(0.2, 0.5))
            cv2.polylines(m, [np.round(front).astype(np.int32)], False, 1, max(2, int(r * 0.6)))
        else:
            cv2.ellipse(m, (int(c[0]), int(c[1])), (int(r * rng.uniform(1, 2)), int(r)),
                        float(rng.uniform(0, 180)), 0, 360, 1, -1)
        fm = _rough(rng, size, m.astype(bool), 0.7, cells=max(6, size // 16))
        flick = _noise(rng, size, max(8, size // 10), 2)
        layer = np.stack([0.95 + 0.05 * flick, 0.35 + 0.5 * flick, 0.05 + 0.25 * flick ** 3], -1)
        _paint(img, lab, fm, layer, FIRE)
        img[_rough(rng, size, cv2.dilate(fm.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool), 0.5)
            & ~fm] *= 0.35  # charred rim
        # plume: a widening cone downwind of the fire
        plume, _, _ = _tongue(rng, size, r * 0.8, n=8, start=c, heading=wind + rng.normal(0, 0.2),
                              grow=2.5, turn=0.1)
        dens = cv2.GaussianBlur(plume.astype(np.float32), (0, 0), size / 40) * _noise(rng, size, 6, 3)
        smoke_alpha = np.maximum(smoke_alpha, dens * rng.uniform(0.9, 1.4))
    smoke_alpha = np.clip(smoke_alpha, 0, 0.95)
    grey = _jitter(rng, (0.62, 0.62, 0.64), 0.05)
    img[:] = img * (1 - smoke_alpha[..., None]) + grey * smoke_alpha[..., None]
    lab[smoke_alpha > 0.75] = BG  # opaque smoke hides what is under it
    return smoke_alpha


def _lava(rng, size, img, lab, start=None):
    """Lava flow: dark crust with glowing orange veins and a glowing margin."""
    m, pts, _ = _tongue(rng, size, rng.uniform(0.05, 0.1) * size, n=10, start=start, grow=1.2)
    crust = _jitter(rng, (0.12, 0.10, 0.10), 0.15)
    layer = _layer(crust, _tex(rng, "gravel", size, (1.0, 2.0)), 0.3)
    veins = _ridges(rng, size, max(4, size // 32))[..., None]
    glow = _jitter(rng, (1.0, 0.45, 0.08), 0.08)
    layer = layer * (1 - veins) + glow * veins
    edge = m & ~cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    _paint(img, lab, m, layer, LAVA)
    img[edge] = img[edge] * 0.4 + glow * 0.6
    return m, pts


def _pyroclastic(rng, size, img, lab, start=None):
    """Pyroclastic flow: opaque, lumpy grey-brown cloud fanning out from its source."""
    m, pts, _ = _tongue(rng, size, rng.uniform(0.08, 0.14) * size, n=8, start=start, grow=1.8, turn=0.2)
    lumps = _noise(rng, size, max(6, size // 14), 3)
    shade = 0.55 + 0.6 * (lumps - cv2.GaussianBlur(lumps, (0, 0), 2)) * 4 + 0.4 * lumps
    colour = _jitter(rng, (0.50, 0.45, 0.40), 0.06)
    layer = colour * np.clip(shade, 0.3, 1.4)[..., None]
    _paint(img, lab, m, layer, PYROCLASTIC)
    return m


def _debris(rng, size, img, lab, start=None):
    """Debris / mud flow: brown, coarse gravel texture with flow-parallel streaks."""
    m, pts, _ = _tongue(rng, size, rng.uniform(0.05, 0.09) * size, n=10, start=start, grow=1.0)
    colour = _jitter(rng, (0.45, 0.37, 0.27), 0.08)
    layer = _layer(colour, _tex(rng, "gravel", size, (0.7, 1.5)), 0.4)
    streak = _poly_mask(size, pts, max(1, size / 100))
    layer[streak] *= 0.75
    _paint(img, lab, m, layer, DEBRIS)
    return m


def _avalanche(rng, size, img, lab):
    """Avalanche deposit: white-blue, chunky (gravel texture) tongue on a smooth snowfield."""
    m, pts, _ = _tongue(rng, size, rng.uniform(0.06, 0.11) * size, n=9, grow=1.5, turn=0.15)
    colour = _jitter(rng, (0.86, 0.89, 0.95), 0.03)
    layer = (colour, _tex(rng, "gravel", size, (0.5, 1.0)), 0.14)
    _paint(img, lab, m, layer, AVALANCHE)
    edge = m & ~cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    img[edge] *= 0.85
    return m


def _ice_jam(rng, size, img, lab, river):
    """Part of a river filled with white ice floes separated by dark water cracks."""
    m, river_pts, width = river
    cells = _noise(rng, size, max(6, size // 10), 1)
    floes = (cells > 0.35) & m
    n = _noise(rng, size, 2, 1)
    reach = n > np.quantile(n[m], rng.uniform(0.0, 0.5)) if m.any() else n > 0.5
    region = m & reach
    colour = _jitter(rng, (0.84, 0.87, 0.92), 0.03)
    tex = _tex(rng, "gravel", size, (1.0, 2.0))
    fl = region & floes
    img[fl] = colour * (1 + 0.12 * tex[fl])[:, None]
    img[region & ~floes] *= 0.55
    lab[region] = ICE_JAM


def _lighting(rng, img) -> np.ndarray:
    """Illumination / cloud shadows, gain, colour cast, sensor noise, blur, gamma -> uint8."""
    size = img.shape[0]
    illum = 0.8 + 0.35 * _noise(rng, size, 2, 2)
    if rng.random() < 0.3:  # cloud shadows
        illum *= 1 - 0.35 * (_noise(rng, size, 3, 2) > 0.65)
    gain = (rng.uniform(0.75, 1.2) * (1 + rng.normal(0, 0.05, 3))).astype(np.float32) * 255
    img *= illum[..., None]
    img *= gain
    noise = _textures()["sensor"]
    y, x = rng.integers(0, noise.shape[0] - size + 1, 2) if size <= noise.shape[0] else (0, 0)
    img += noise[y:y + size, x:x + size] * 4.0 if size <= noise.shape[0] else \
        rng.standard_normal(img.shape, dtype=np.float32) * 4.0
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), 0)
    out = np.clip(img, 0, 255).astype(np.uint8)
    lut = (255 * (np.arange(256) / 255) ** rng.uniform(0.85, 1.2) + 0.5).astype(np.uint8)
    return cv2.LUT(out, lut)


def generate_scene(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate one synthetic top-down UAV disaster scene.

    Args:
        seed: dataset seed (non-negative int).
        index: image index (non-negative int); the scene depends only on (seed, index, size).
        size: side of the square image, px (>= 32).

    Returns:
        ``(image, mask)``: image uint8 (size, size, 3) RGB; mask uint8 (size, size) with
        class indices 0..13 (see :data:`study.CLASS_NAMES`).

    Raises:
        ValueError: negative seed / index, or size < 32.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"generate_scene: seed and index must be >= 0 (got seed={seed}, index={index})")
    if size < 32:
        raise ValueError(f"generate_scene: size must be >= 32 px (got {size})")
    rng = np.random.default_rng([seed, index])
    kind = SCENE_TYPES[rng.choice(len(SCENE_TYPES), p=[0.2, 0.16, 0.15, 0.13, 0.12, 0.12, 0.12])]
    terrain = {"town": "green", "earthquake": "dry", "flood": "green", "wildfire": "dry",
               "volcano": "ash", "mountain": "snow", "landslide": "green"}[kind]
    if kind in ("town", "earthquake", "flood") and rng.random() < 0.4:
        terrain = rng.choice(["green", "dry", "soil"])
    img = _terrain(rng, size, terrain).astype(np.float32)
    lab = np.zeros((size, size), np.uint8)

    rivers, roads = [], []
    if kind in ("flood", "landslide", "mountain") or (kind == "town" and rng.random() < 0.4):
        rivers.append(_river(rng, size, img, lab))
    if kind == "mountain" and rivers and rng.random() < 0.8:
        _ice_jam(rng, size, img, lab, rivers[0])
    n_roads = {"town": rng.integers(1, 4), "earthquake": rng.integers(1, 3), "flood": rng.integers(1, 3),
               "wildfire": rng.integers(0, 2), "volcano": rng.integers(0, 2), "mountain": rng.integers(0, 2),
               "landslide": rng.integers(1, 2)}[kind]
    for _ in range(n_roads):
        roads.append(_road(rng, size, img, lab))
    road_mask = np.zeros((size, size), bool)
    for m, _, _ in roads:
        road_mask |= m

    n_build = {"town": 14, "earthquake": 14, "flood": 12, "wildfire": 6, "volcano": 3,
               "mountain": 3, "landslide": 6}[kind]
    p_dmg = {"town": 0.1, "earthquake": 0.6, "flood": 0.25, "wildfire": 0.2, "volcano": 0.3,
             "mountain": 0.1, "landslide": 0.35}[kind]
    if kind in ("town", "earthquake", "flood") or rng.random() < 0.5:
        taken = (lab != BG) & ~road_mask | road_mask
        buildings = _buildings(rng, size, img, lab, roads, int(rng.integers(n_build // 2, n_build + 1)),
                               p_dmg, taken)
    else:
        buildings = np.zeros((size, size), bool)

    wind = rng.uniform(0, 2 * np.pi)
    if kind == "flood":
        _flood(rng, size, img, lab, avoid=buildings)
    elif kind == "volcano":
        has_lava = rng.random() < 0.75
        if has_lava:
            lava, _ = _lava(rng, size, img, lab)
            if rng.random() < 0.5:  # vegetation ignited at the lava margin
                rim = cv2.dilate(lava.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~lava
                _fire(rng, size, img, lab, 1, where=rim, wind=wind)
        if not has_lava or rng.random() < 0.45:
            _pyroclastic(rng, size, img, lab)
    elif kind == "mountain":
        for _ in range(rng.integers(1, 3)):
            _avalanche(rng, size, img, lab)
    elif kind == "landslide":
        for _ in range(rng.integers(1, 3)):
            _debris(rng, size, img, lab)
    elif kind == "earthquake" and rng.random() < 0.3:
        _debris(rng, size, img, lab)

    if kind == "earthquake":
        _cracks(rng, size, img, lab, int(rng.integers(2, 6)))
    elif rng.random() < 0.15:
        _cracks(rng, size, img, lab, 1, within=road_mask if road_mask.any() else None)

    free_road = road_mask & (lab == ROAD)
    if roads:
        n_veh = {"town": 10, "earthquake": 5, "flood": 3}.get(kind, 4)
        _vehicles(rng, size, img, lab, [(m & free_road, p, w) for m, p, w in roads], int(rng.integers(0, n_veh + 1)))
    n_pers = {"town": 5, "earthquake": 8, "flood": 4}.get(kind, 2)
    near = buildings | road_mask
    _persons(rng, size, img, lab, near, int(rng.integers(0, n_pers + 1)),
             exclude=(lab == FLOOD) | (lab == VEHICLE) | buildings)

    if kind == "wildfire":
        veg = lab == BG
        where = veg | (buildings & (rng.random() < 0.5))
        _fire(rng, size, img, lab, int(rng.integers(1, 5)), where=where, wind=wind)
    elif kind in ("town", "earthquake") and rng.random() < 0.2:
        _fire(rng, size, img, lab, 1, where=buildings if buildings.any() else None, wind=wind)

    return _lighting(rng, img), lab

# --- end generator ------------------------------------------------------------------


def _generator_source() -> str:
    """Source text of the generator section (hashed into the embedded dataset's name)."""
    src = Path(__file__).read_text(encoding="utf-8")
    a = src.index("# --- generator ---")
    b = src.index("# --- end generator ---")
    return src[a:b]


def _write_pair(args) -> None:
    """Generate one scene and write its image and (i,i,i) mask PNGs (worker function)."""
    seed, index, size, img_path, gt_path = args
    img, mask = generate_scene(seed, index, size)
    Image.fromarray(img).save(img_path, compress_level=1)
    Image.fromarray(np.repeat(mask[..., None], 3, axis=2)).save(gt_path, compress_level=1)


def write_dataset(root, n_train: int, n_val: int, size: int, seed: int, workers: int = 2,
                  n_test: int = 0) -> Path:
    """Generate the embedded dataset into ``root`` in the short LPCVC layout.

    Writes ``IMG/train/train_0000.png`` + ``GT/train/train_0000.png`` (n_train pairs),
    ``IMG/val/val_0000.png`` + ``GT/val/val_0000.png`` (n_val pairs) and, with ``n_test``,
    ``IMG/test/test_0000.png`` + ``GT/test/...`` (n_test pairs). Images are RGB uint8
    PNG (size x size); masks are RGB PNG with the class index in every channel. Train
    scene ``i`` is ``generate_scene(seed, i, size)``; val scene ``i`` uses index
    ``VAL_INDEX_OFFSET + i`` and test scene ``i`` index ``TEST_INDEX_OFFSET + i`` (three
    disjoint sets of scenes).

    This function is not atomic by itself; :func:`prepare_dataset` calls it on a temp dir.

    Args:
        root: output folder (created).
        n_train, n_val: number of pairs (>= 1 each); n_test: test pairs (0: no test split).
        size: image side, px.
        seed: dataset seed.
        workers: processes (1 = in this process).

    Returns:
        ``Path(root)``.

    Raises:
        ValueError: n_train or n_val < 1.
    """
    if n_train < 1 or n_val < 1 or n_test < 0:
        raise ValueError(f"write_dataset: n_train and n_val must be >= 1 and n_test >= 0 "
                         f"(got {n_train}, {n_val}, {n_test})")
    root = Path(root)
    jobs = []
    for split, n, off in (("train", n_train, 0), ("val", n_val, VAL_INDEX_OFFSET),
                          ("test", n_test, TEST_INDEX_OFFSET)):
        if n == 0:
            continue
        (root / "IMG" / split).mkdir(parents=True, exist_ok=True)
        (root / "GT" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"{split}_{i:04d}.png"
            jobs.append((seed, off + i, size, root / "IMG" / split / name, root / "GT" / split / name))
    if workers <= 1:
        for j in jobs:
            _write_pair(j)
    else:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            list(ex.map(_write_pair, jobs, chunksize=8))
    return root


# --- layout, validation, fingerprint ------------------------------------------------

_LAYOUTS = (
    {"train": ("LPCVC_Train_Updated/IMG/train", "LPCVC_Train_Updated/GT_Updated/train"),
     "val": ("LPCVC_Val/IMG/val", "LPCVC_Val/GT/val")},
    {"train": ("IMG/train", "GT/train"), "val": ("IMG/val", "GT/val"), "test": ("IMG/test", "GT/test")},
)
_IMG_EXT = (".png", ".jpg", ".jpeg")


def find_layout(root) -> dict:
    """Locate the image / mask folders of the splits (train and val required, test optional).

    Accepts the published layout (``LPCVC_Train_Updated/IMG/train``,
    ``LPCVC_Train_Updated/GT_Updated/train``, ``LPCVC_Val/IMG/val``, ``LPCVC_Val/GT/val``)
    and the short one (``IMG/{train,val,test}``, ``GT/{train,val,test}``); each split may
    use either. Only the short layout has a test split (the embedded dataset writes one).

    Returns:
        ``{"train": (img_dir: Path, gt_dir: Path), "val": (img_dir, gt_dir)}`` plus
        ``"test"`` when ``IMG/test`` and ``GT/test`` exist.

    Raises:
        DataError: ``root`` is not a folder, or a split's folders are missing (the
            message lists every path looked for).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a folder")
    out = {}
    test = (root / "IMG" / "test", root / "GT" / "test")
    for split in ("train", "val"):
        for lay in _LAYOUTS:
            img, gt = (root / p for p in lay[split])
            if img.is_dir() and gt.is_dir():
                out[split] = (img, gt)
                break
        else:
            looked = "; ".join(f"{root / lay[split][0]} + {root / lay[split][1]}" for lay in _LAYOUTS)
            raise DataError(f"dataset {root}: no {split} split found; looked for {looked}")
    if test[0].is_dir() and test[1].is_dir():
        out["test"] = test
    return out


def split_pairs(root) -> dict:
    """The study's three splits of a dataset folder as matched ``(image, mask)`` path lists.

    With a test split on disk (the embedded dataset): the folders as they are. Without one
    (a real LPCVC folder: train and val only): ``test`` is the official val split and
    ``val`` a fixed part of train - :data:`HOLDOUT_FRACTION` of it (at least one image),
    drawn with ``numpy.random.default_rng(HOLDOUT_SEED)`` from the sorted file list, so it
    is the same on every machine and run; ``train`` is the rest. Selection (KD method,
    schedules, INT8 exclusions, search settings) uses ``val``; reported numbers ``test``.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each a list of ``(Path, Path)``.

    Raises:
        DataError: as :func:`find_layout` / unmatched files; a train split too small to
            hold out one image and keep one.
    """
    lay = find_layout(root)
    if "test" in lay:
        return {k: _pairs(*lay[k]) for k in SPLITS}
    train = _pairs(*lay["train"])
    if len(train) < 2:
        raise DataError(f"dataset {root}: its train split has {len(train)} image(s); holding out a selection "
                        "split (no test split on disk) needs at least 2")
    n_hold = max(1, int(round(HOLDOUT_FRACTION * len(train))))
    hold = set(np.random.default_rng(HOLDOUT_SEED).permutation(len(train))[:n_hold].tolist())
    return {"train": [p for i, p in enumerate(train) if i not in hold],
            "val": [p for i, p in enumerate(train) if i in hold],
            "test": _pairs(*lay["val"])}


def split_protocol(root) -> str:
    """One sentence saying where the val and test splits of ``root`` come from (for notebooks)."""
    if "test" in find_layout(root):
        return ("train / val / test are three disjoint generated sets; choices are made on val, "
                "reported numbers are on test")
    return (f"the official LPCVC val split is the test split; a fixed {HOLDOUT_FRACTION:.0%} of the train images "
            f"(seed {HOLDOUT_SEED}) is held out as val for every choice, and the rest trains")


def _list_images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix.lower() in _IMG_EXT and not p.name.startswith("."))


def _read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); DataError naming the file if unreadable."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - reported with the file name
        raise DataError(f"cannot read image {path}: {exc}") from exc


def _read_mask(path: Path) -> np.ndarray:
    """Mask channel 0 as uint8 (H, W); DataError naming the file if unreadable."""
    try:
        with Image.open(path) as im:
            a = np.asarray(im)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read mask {path}: {exc}") from exc
    if a.ndim == 3:
        a = a[..., 0]
    if a.dtype != np.uint8:
        raise DataError(f"mask {path} has dtype {a.dtype}; expected 8-bit PNG")
    return a


def _pairs(img_dir: Path, gt_dir: Path) -> list[tuple[Path, Path]]:
    """Matched (image, mask) files; DataError for unmatched files or an empty split."""
    imgs = _list_images(img_dir)
    masks = {p.stem: p for p in _list_images(gt_dir)}
    if not imgs:
        raise DataError(f"split folder {img_dir} holds no images (.png/.jpg)")
    pairs = []
    for p in imgs:
        if p.stem not in masks:
            raise DataError(f"image {p} has no mask (expected {gt_dir / (p.stem + '.png')})")
        pairs.append((p, masks.pop(p.stem)))
    if masks:
        extra = sorted(masks.values())[0]
        raise DataError(f"mask {extra} has no image in {img_dir} ({len(masks)} unmatched mask(s))")
    return pairs


def validate_dataset(root, check_values: bool = True) -> dict:
    """Check a dataset folder thoroughly and return its layout (see :func:`find_layout`).

    Checks: folders exist; every image has a mask and vice versa; splits are non-empty;
    files are readable; image and mask sizes match; mask values are in 0..13 or the
    ignore index 255 (with ``check_values``; otherwise only PNG headers are read).

    Raises:
        DataError: the first problem found; the message names the file or folder.
    """
    layout = find_layout(root)
    for split, (img_dir, gt_dir) in layout.items():
        for ip, mp in _pairs(img_dir, gt_dir):
            if check_values:
                img, mask = _read_image(ip), _read_mask(mp)
                isz, msz = img.shape[:2], mask.shape
                vals = np.unique(mask)
                bad = vals[(vals >= NUM_CLASSES) & (vals != IGNORE_INDEX)]
                if bad.size:
                    raise DataError(f"mask {mp} has values {bad.tolist()} outside 0..{NUM_CLASSES - 1} "
                                    f"(and the ignore index {IGNORE_INDEX})")
            else:
                try:
                    with Image.open(ip) as a, Image.open(mp) as b:
                        isz, msz = a.size[::-1], b.size[::-1]
                except Exception as exc:  # noqa: BLE001
                    raise DataError(f"cannot read {ip} or {mp}: {exc}") from exc
            if tuple(isz) != tuple(msz):
                raise DataError(f"image {ip} is {isz[1]}x{isz[0]} but its mask {mp} is {msz[1]}x{msz[0]}")
    return layout


def fingerprint_dataset(root) -> str:
    """Cheap fingerprint (16 hex chars): hash of relative file names, sizes and mtimes."""
    root = Path(root)
    h = hashlib.sha256()
    for split, dirs in sorted(find_layout(root).items()):
        for d in dirs:
            for p in sorted(d.iterdir()):
                st = p.stat()
                h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class DatasetInfo:
    """Result of :func:`prepare_dataset`.

    Attributes:
        root: dataset folder (LPCVC layout).
        fingerprint: 16 hex chars identifying its content (part of cache keys).
        generated: True for the embedded generated dataset.
        layout: ``{"train": (img_dir, gt_dir), "val": (img_dir, gt_dir)}``.
    """

    root: Path
    fingerprint: str
    generated: bool
    layout: dict = field(default_factory=dict)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_dataset(profile, seed: int, cache_root, data_root=None, workers: int = 2) -> DatasetInfo:
    """Return the dataset a run uses, generating the embedded one if needed.

    Without ``data_root``: the embedded dataset ``<cache_root>/data/embedded-<hash>``
    (hash of ``profile.image_size``, ``profile.n_train``, ``profile.n_val``, ``profile.n_test``, ``seed`` and
    the generator source). It is generated into ``.tmp-embedded-<hash>-<pid>`` beside it
    and renamed into place (atomic); leftovers of killed runs are removed; an existing
    dataset is reused.

    With ``data_root``: validates it (:func:`validate_dataset`, full value check once per
    fingerprint; the verdict is remembered under ``<cache_root>/data/``) and fingerprints
    it. Images whose size differs from ``profile.image_size`` are resized by the loaders.

    Args:
        profile: a :class:`study.profiles.Profile`.
        seed: dataset seed.
        cache_root: cache folder (``build/cache``).
        data_root: a folder in the LPCVC layout, or None.
        workers: generator processes.

    Raises:
        DataError: a malformed ``data_root`` (message names the file / folder).
    """
    data_dir = Path(cache_root) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    if data_root:
        root = Path(data_root)
        fp = fingerprint_dataset(root)
        ok = data_dir / f"validated-{fp}.ok"
        layout = validate_dataset(root, check_values=not ok.exists())
        atomic_write_text(ok, str(root.resolve()))
        return DatasetInfo(root=root, fingerprint=fp, generated=False, layout=layout)

    n_test = int(getattr(profile, "n_test", 0))
    key = hashlib.sha256(repr((int(profile.image_size), int(profile.n_train), int(profile.n_val), n_test,
                               int(seed), _generator_source())).encode()).hexdigest()[:16]
    final = data_dir / f"embedded-{key}"
    for tmp in data_dir.glob(f".tmp-embedded-{key}-*"):
        try:
            pid = int(tmp.name.rsplit("-", 2)[-2])
        except ValueError:
            pid = -1
        if pid < 0 or pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
    if not final.is_dir():
        tmp = data_dir / f".tmp-embedded-{key}-{os.getpid()}-{time.time_ns()}"
        try:
            write_dataset(tmp, profile.n_train, profile.n_val, profile.image_size, seed, workers=workers,
                          n_test=n_test)
            atomic_write_text(tmp / "meta.json",
                              f'{{"image_size": {profile.image_size}, "n_train": {profile.n_train}, '
                              f'"n_val": {profile.n_val}, "n_test": {n_test}, "seed": {seed}, "key": "{key}"}}\n')
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():  # a concurrent run finished first otherwise
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return DatasetInfo(root=final, fingerprint=key, generated=True, layout=find_layout(final))


# --- loaders ------------------------------------------------------------------------

def _resize_pair(img: np.ndarray, mask: np.ndarray, size: int | None):
    """Resize image (area when shrinking, bilinear when growing) and mask (nearest)."""
    if size is None or img.shape[:2] == (size, size):
        return img, mask
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    return (cv2.resize(img, (size, size), interpolation=interp),
            cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST))


def train_transform(crop_size: int, image_size: int, seed: int | None = None):
    """Source 000's training augmentation (albumentations ``Compose``).

    Resize to ``image_size`` -> random scale 0.5-2 -> pad to ``crop_size`` (image 0, mask
    255) -> random crop ``crop_size`` -> horizontal flip (p 0.5) -> rotation +-5 deg
    (mask fill 255) -> colour jitter (brightness / contrast / saturation 0.5, p 0.5).
    Input / output: image uint8 (H, W, 3), mask uint8 (H, W).
    """
    return A.Compose([
        A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                 area_for_downscale="image"),
        A.RandomScale(scale_limit=(-0.5, 1.0), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, p=1.0),
        A.PadIfNeeded(crop_size, crop_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX),
        A.RandomCrop(crop_size, crop_size),
        A.HorizontalFlip(p=0.5),
        A.Rotate(limit=5, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX,
                 mask_interpolation=cv2.INTER_NEAREST, p=0.5),
        A.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.0, p=0.5),
    ], seed=seed)


def val_transform(image_size: int):
    """Validation transform: resize to ``image_size`` (image area/bilinear, mask nearest)."""
    return A.Compose([A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR,
                               mask_interpolation=cv2.INTER_NEAREST, area_for_downscale="image")], seed=0)


class LPCVCDataset(torch.utils.data.Dataset):
    """One split of a dataset in the LPCVC layout.

    Items are ``(image, mask)``: image float32 tensor (3, H, W), ImageNet-normalised;
    mask int64 tensor (H, W) with 0..13 and 255 (ignore). Masks are read from channel 0.

    Args:
        root: dataset folder (either layout, see :func:`find_layout`).
        split: ``"train"``, ``"val"`` or ``"test"`` (as :func:`split_pairs` defines them).
        transform: albumentations-style callable ``(image=, mask=) -> dict``, or None.
        size: resize files to (size, size) before ``transform`` (None: keep).

    Raises:
        DataError: bad split name, missing folders, unmatched files.
    """

    def __init__(self, root, split: str, transform=None, size: int | None = None):
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        self.root = Path(root)
        self.split = split
        self.pairs = split_pairs(self.root)[split]
        self.transform = transform
        self.size = size
        self._mean = np.array(IMAGENET_MEAN, np.float32) * 255
        self._std = np.array(IMAGENET_STD, np.float32) * 255

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw pair ``i`` (resized to ``size`` if set): uint8 (H, W, 3), uint8 (H, W)."""
        ip, mp = self.pairs[i]
        img, mask = _read_image(ip), _read_mask(mp)
        if img.shape[:2] != mask.shape:
            raise DataError(f"image {ip} is {img.shape[1]}x{img.shape[0]} but its mask {mp} is "
                            f"{mask.shape[1]}x{mask.shape[0]}")
        return _resize_pair(img, mask, self.size)

    def __getitem__(self, i: int):
        img, mask = self.load(i)
        if self.transform is not None:
            out = self.transform(image=img, mask=mask)
            img, mask = out["image"], out["mask"]
        x = (img.astype(np.float32) - self._mean) / self._std
        return (torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)))


def _worker_init(worker_id: int) -> None:
    """Seed numpy / random / the dataset's albumentations pipeline from torch's worker seed."""
    s = torch.initial_seed() % (2**32)  # = loader base seed (from its generator) + worker id
    np.random.seed(s)
    random.seed(s)
    info = torch.utils.data.get_worker_info()
    tf = getattr(info.dataset, "transform", None)
    if tf is not None and hasattr(tf, "set_random_seed"):
        tf.set_random_seed(s)


def make_loaders(root, profile, seed: int, batch_size: int | None = None, num_workers: int = 0,
                 val_batch_size: int = 8):
    """Seeded train / val loaders for a dataset folder.

    Train: :func:`train_transform` (crop ``profile.crop_size`` from images resized to
    ``profile.image_size``), shuffled by a ``torch.Generator`` seeded with ``seed``,
    ``drop_last=True``; augmentation randomness comes from ``seed`` too (and, with
    workers, from per-worker seeds derived from the generator), so two loaders built
    with the same arguments yield identical batches. Val: resize to
    ``profile.image_size``, fixed order.

    Returns:
        ``(train_loader, val_loader)``; batches are ``(x float32 (B,3,H,W), y int64 (B,H,W))``.

    Raises:
        DataError: malformed dataset; ``ValueError`` when the train split has fewer
            images than one batch.
    """
    bs = int(batch_size or profile.batch_size)
    train_ds = LPCVCDataset(root, "train", transform=train_transform(profile.crop_size, profile.image_size, seed))
    val_ds = LPCVCDataset(root, "val", transform=val_transform(profile.image_size))
    if len(train_ds) < bs:
        raise ValueError(f"train split of {root} has {len(train_ds)} images, fewer than batch_size={bs}")
    g = torch.Generator()
    g.manual_seed(int(seed))
    kw = dict(num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None,
              persistent_workers=False)
    train = torch.utils.data.DataLoader(train_ds, batch_size=bs, shuffle=True, drop_last=True, generator=g, **kw)
    val = torch.utils.data.DataLoader(val_ds, batch_size=val_batch_size, shuffle=False, drop_last=False, **kw)
    return train, val


def make_eval_loader(root, profile, split: str, batch_size: int = 8):
    """A fixed-order loader of one split resized to ``profile.image_size`` (for scoring).

    Returns:
        ``DataLoader`` of ``(x float32 (B,3,H,W), y int64 (B,H,W))``.

    Raises:
        DataError: unknown split or malformed dataset.
    """
    ds = LPCVCDataset(root, split, transform=val_transform(profile.image_size))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=False)


class BatchStream:
    """One endless, continuing stream of a loader's batches (the study's one batch stream).

    ``iter(stream)`` always returns the same generator, so successive consumers (two
    ``train`` calls, a search's weight and mask steps) continue where the previous one
    stopped instead of restarting the epoch. The loader is re-iterated at the end of each
    epoch (a shuffled loader reshuffles). Under data parallelism rank ``r`` of ``world``
    keeps every ``world``-th batch.

    Raises:
        ValueError: (on the first ``next``) the loader yields no batch.
    """

    def __init__(self, loader, rank: int = 0, world: int = 1):
        self._gen = self._endless(loader, int(rank), int(world))

    @staticmethod
    def _endless(loader, rank: int, world: int):
        while True:
            n = 0
            for i, batch in enumerate(loader):
                n += 1
                if i % world == rank:
                    yield batch
            if n == 0:
                raise ValueError("batch stream: the loader yielded no batch")

    def __iter__(self):
        return self._gen

    def __next__(self):
        return next(self._gen)

    def take(self, n: int) -> list:
        """The next ``n`` batches as a list."""
        return list(itertools.islice(self._gen, int(n)))


def batch_stream(loader, rank: int = 0, world: int = 1) -> BatchStream:
    """``loader`` as a :class:`BatchStream` (returned unchanged if it already is one)."""
    return loader if isinstance(loader, BatchStream) else BatchStream(loader, rank, world)


def class_frequencies(root, split: str) -> np.ndarray:
    """Pixel fraction of each class in a split (ignore-index pixels excluded).

    Returns:
        float64 array (14,), sums to 1.
    """
    counts = np.zeros(256, np.int64)
    for _, mp in split_pairs(root)[split]:
        counts += np.bincount(_read_mask(mp).ravel(), minlength=256)
    valid = counts[:NUM_CLASSES]
    return valid / max(1, valid.sum())


def load_split_arrays(root, split: str, size: int, limit: int | None = None):
    """All (or the first ``limit``) pairs of a split, resized to (size, size).

    Returns:
        ``(images uint8 (N, size, size, 3), masks uint8 (N, size, size))``.
    """
    ds = LPCVCDataset(root, split, size=size)
    n = len(ds) if limit is None else min(limit, len(ds))
    imgs = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    for i in range(n):
        imgs[i], masks[i] = ds.load(i)
    return imgs, masks


__all__ = ["DataError", "DatasetInfo", "generate_scene", "write_dataset", "prepare_dataset",
           "find_layout", "split_pairs", "split_protocol", "make_eval_loader", "SPLITS", "validate_dataset", "fingerprint_dataset", "LPCVCDataset",
           "train_transform", "val_transform", "make_loaders", "class_frequencies",
           "load_split_arrays", "BatchStream", "batch_stream", "CLASS_NAMES", "IMAGENET_MEAN", "IMAGENET_STD"]
