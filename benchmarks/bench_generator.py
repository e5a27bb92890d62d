"""Measure the embedded dataset generator: images/s (1 process and N workers) and class mix.

Usage::

    .venv/bin/python benchmarks/bench_generator.py [--size 256] [--n 120] [--workers 2] [--seed 0]

Prints measured numbers only (target: >= 50 images/s at 256 px on 2 cores).
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study import CLASS_NAMES, NUM_CLASSES  # noqa: E402
from study.data import SCENE_TYPES, generate_scene  # noqa: E402


def _counts(args):
    seed, lo, hi, size = args
    c = np.zeros(NUM_CLASSES, np.int64)
    present = np.zeros(NUM_CLASSES, np.int64)
    for i in range(lo, hi):
        _, m = generate_scene(seed, i, size)
        b = np.bincount(m.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
        c += b
        present += b > 0
    return c, present


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--n", type=int, default=120, help="images per measurement")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    generate_scene(a.seed, 0, a.size)  # load textures, warm caches
    t0 = time.perf_counter()
    c1, p1 = _counts((a.seed, 0, a.n, a.size))
    single = a.n / (time.perf_counter() - t0)

    chunks = [(a.seed, a.n + lo, a.n + min(lo + 10, a.n), a.size) for lo in range(0, a.n, 10)]
    with ProcessPoolExecutor(a.workers) as ex:
        list(ex.map(_counts, [(a.seed, 0, 1, a.size)] * a.workers))  # start + warm the workers
        t0 = time.perf_counter()
        res = list(ex.map(_counts, chunks))
        multi = a.n / (time.perf_counter() - t0)
    counts = c1 + sum(r[0] for r in res)
    present = p1 + sum(r[1] for r in res)

    print(f"generator at {a.size} px: {single:.1f} images/s (1 process), "
          f"{multi:.1f} images/s ({a.workers} workers); scene types: {', '.join(SCENE_TYPES)}")
    freq = counts / counts.sum()
    n_img = 2 * a.n
    print(f"\nclass pixel frequencies over {n_img} images (seed {a.seed}):")
    print(f"{'id':>3} {'class':<20} {'pixels %':>9} {'images %':>9}")
    for i, name in enumerate(CLASS_NAMES):
        print(f"{i:>3} {name:<20} {100 * freq[i]:9.3f} {100 * present[i] / n_img:9.1f}")


if __name__ == "__main__":
    main()
