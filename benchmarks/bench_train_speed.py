"""Training-step speed on this CPU per model and mode, as ratios against fp32 contiguous.

Issue #13 point 3: choose channels_last / bf16 autocast per model by measurement. For each
model (UPerNet + MobileViT-S, UPerNet + ResNet-18, UPerNet + Swin-V2-T) and each mode
(``fp32`` contiguous, ``channels_last``, ``bf16`` autocast, ``channels_last+bf16``) one
process times ``--steps`` full optimizer steps (forward, OHEM loss, backward, AdamW) on the
cpu profile's shapes (96 px, batch 8), after ``--warmup`` steps. Modes of one model are
INTERLEAVED in rounds (fp32, cl, bf16, cl+bf16, fp32, ...) so machine noise hits all alike;
the per-mode time is the median over rounds. ``torch.set_flush_denormal(True)`` is on and the
intra-op threads are the physical cores (the study's thread policy) unless ``--threads``.

Prints images/s per model and mode and the speed-up over fp32 contiguous; the CPU's bf16
support (AVX-512 BF16 / AMX flags in /proc/cpuinfo) is printed first.

    .venv/bin/python benchmarks/bench_train_speed.py [--steps 6] [--rounds 3] [--hw 96] [--batch 8]
        [--models upernet_mobilevit_s upernet_swinv2_t] [--threads N]
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
from study.models import create_model  # noqa: E402
from study.train import TrainConfig, segmentation_loss  # noqa: E402

MODES = ("fp32", "channels_last", "bf16", "channels_last+bf16")


def cpu_flags() -> str:
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx512f") if f in flags) or "none"


def make_step(name: str, mode: str, hw: int, batch: int):
    """A zero-argument callable running one training step of ``name`` in ``mode``."""
    torch.manual_seed(0)
    kw = {"img_size": hw} if "swin" in name else {}
    model = create_model(name, num_classes=NUM_CLASSES, **kw).train()
    cl = "channels_last" in mode
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = TrainConfig(steps=1, ohem_min_kept=batch * hw * hw // 16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, hw, hw, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch, hw, hw), generator=g)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    bf16 = "bf16" in mode

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = segmentation_loss(model(x), y, cfg)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["upernet_mobilevit_s", "upernet_resnet18", "upernet_swinv2_t"],
                    help="registry names")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="modes to compare")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per mode before the rounds")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--hw", type=int, default=96, help="square input side, px (cpu profile: 96)")
    ap.add_argument("--batch", type=int, default=8, help="batch size (cpu profile: 8)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    a = ap.parse_args(argv)
    threads = a.threads or psutil.cpu_count(logical=False) or 1
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    print(f"CPU bf16-related flags: {cpu_flags()}; torch {torch.__version__}; threads {threads}; "
          f"{a.hw}x{a.hw}, batch {a.batch}; load average {psutil.getloadavg()[0]:.2f}")
    for name in a.models:
        steps = {m: make_step(name, m, a.hw, a.batch) for m in a.modes}
        for m, fn in steps.items():
            for _ in range(a.warmup):
                fn()
        times = {m: [] for m in a.modes}
        for r in range(a.rounds):
            order = a.modes[r % len(a.modes):] + a.modes[:r % len(a.modes)]  # rotate the start
            for m in order:
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    steps[m]()
                times[m].append((time.perf_counter() - t0) / a.steps)
        base = statistics.median(times[a.modes[0]])
        for m in a.modes:
            med = statistics.median(times[m])
            print(f"{name:<22} {m:<20} {a.batch / med:7.1f} img/s  {med * 1e3:8.1f} ms/step  "
                  f"x{base / med:5.2f} vs {a.modes[0]}  (rounds: {', '.join(f'{t * 1e3:.0f}' for t in times[m])} ms)")
    print(f"load average after: {psutil.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
