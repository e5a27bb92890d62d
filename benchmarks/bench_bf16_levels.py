"""Does bfloat16 autocast change what a model learns? fp32 vs bf16 training, same seeds (issue #13 point 3).

Trains one model of the study (default the Swin-V2-T teacher) on the cpu profile's embedded
data with the study's loop (:func:`study.train.train`) twice per seed - fp32 contiguous and
the mode of :data:`study.sections.common.TRAIN_MODES` (channels-last + bf16 autocast) - for
``--steps`` steps, and prints the test mIoU of every run, the paired difference bf16 - fp32
per seed and the seed-to-seed spread of fp32. bf16 is acceptable when the mean paired
difference is within the fp32 seed spread (the rule the study applies; otherwise train fp32).
Also prints seconds per step of each mode.

    .venv/bin/python benchmarks/bench_bf16_levels.py [--model upernet_swinv2_t] [--steps 600] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import torch  # noqa: E402

from study import NUM_CLASSES  # noqa: E402
from study.data import make_eval_loader, make_loaders, prepare_dataset  # noqa: E402
from study.models import create_model  # noqa: E402
from study.profiles import PROFILES  # noqa: E402
from study.sections.common import TRAIN_MODES  # noqa: E402
from study.train import TrainConfig, evaluate, seed_everything, train  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="upernet_swinv2_t")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--cache", default="build/cache", help="cache root of the embedded dataset")
    a = ap.parse_args(argv)
    torch.set_num_threads(psutil.cpu_count(logical=False) or 1)
    torch.set_flush_denormal(True)
    prof = PROFILES["cpu"]
    info = prepare_dataset(prof, prof.data_seed, a.cache)
    test = make_eval_loader(info.root, prof, "test")
    fast = TRAIN_MODES.get(a.model, {})
    print(f"{a.model}: {a.steps} steps, seeds {a.seeds}, fast mode {fast or 'none'}; "
          f"load average {psutil.getloadavg()[0]:.2f}")
    res = {}
    for seed in a.seeds:
        for mode, kw in (("fp32", {}), ("fast", fast)):
            seed_everything(seed)
            model = create_model(a.model, num_classes=NUM_CLASSES, **({"img_size": prof.crop_size} if "swin" in a.model else {}))
            tr, _ = make_loaders(info.root, prof, seed)
            cfg = TrainConfig(steps=a.steps, lr=prof.lr, ohem_min_kept=max(256, prof.batch_size * prof.crop_size ** 2 // 16),
                              **kw)
            t0 = time.perf_counter()
            train(model, tr, None, cfg, progress=False)
            sec = (time.perf_counter() - t0) / a.steps
            res[(seed, mode)] = evaluate(model, test, progress=False)["miou"]
            print(f"seed {seed} {mode:<5} test mIoU {res[(seed, mode)]:.4f}  {sec:.3f} s/step", flush=True)
    diffs = [res[(s, "fast")] - res[(s, "fp32")] for s in a.seeds]
    fp32 = [res[(s, "fp32")] for s in a.seeds]
    spread = statistics.stdev(fp32) if len(fp32) > 1 else float("nan")
    mean = statistics.mean(diffs)
    print(f"paired bf16 - fp32: {', '.join(f'{d:+.4f}' for d in diffs)} (mean {mean:+.4f}); fp32 seed std {spread:.4f}")
    print("verdict:", "within seed noise: keep bf16" if abs(mean) <= spread else
          "outside seed noise: train this model in fp32" if spread == spread else "one seed: no noise estimate")
    print(f"load average after: {psutil.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
