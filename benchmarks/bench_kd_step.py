"""Cost of one KD training step against a plain student step (issue #13 point 4: target <= 1.25x).

Three step kinds of the cpu profile's shapes (96 px, batch 8, UPerNet + MobileViT-S student in
its measured training mode, :data:`study.sections.common.TRAIN_MODES`), timed INTERLEAVED in
rounds in one process (torch threads = physical cores, denormals flushed):

- ``plain``: forward, OHEM loss, backward, AdamW step of the student;
- ``kd-stored``: the same plus the logit-MSE KD term against teacher logits REPLAYED from
  :func:`study.distill.teacher_targets` (what notebook 01 does: the teacher runs once per seed);
- ``kd-live``: the same with the Swin-V2-T teacher's forward pass run inside the step (the
  old way, once per KD run).

It also times the one-off teacher pass that produces the stored targets (per batch) and
prints the amortised cost per KD step when ``k`` KD configurations share one seed's targets.
Random weights and inputs (speed does not depend on training). Prints ms/step, ratios vs
``plain`` and the load average before and after.

    .venv/bin/python benchmarks/bench_kd_step.py [--steps 4] [--rounds 3]
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
from study.distill import KDConfig, make_kd_loss, teacher_targets  # noqa: E402
from study.models import create_model  # noqa: E402
from study.sections.common import TRAIN_MODES  # noqa: E402
from study.train import TrainConfig, segmentation_loss  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per kind and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--hw", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--share", type=int, default=1,
                    help="KD configurations sharing one seed's stored targets (core cpu grid: 1; full grid: 4)")
    a = ap.parse_args(argv)
    threads = psutil.cpu_count(logical=False) or 1
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}; threads {threads}; {a.hw}x{a.hw}, batch {a.batch}; "
          f"load average {psutil.getloadavg()[0]:.2f}")
    mode = TRAIN_MODES["upernet_mobilevit_s"]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n = a.steps * a.rounds + 2
    batches = [(torch.randn(a.batch, 3, a.hw, a.hw, generator=g),
                torch.randint(0, NUM_CLASSES, (a.batch, a.hw, a.hw), generator=g)) for _ in range(n)]
    teacher = create_model("upernet_swinv2_t", num_classes=NUM_CLASSES, img_size=a.hw).eval()
    t0 = time.perf_counter()
    targets = teacher_targets(teacher, iter(batches), n, bf16=mode["bf16"])
    per_batch_targets = (time.perf_counter() - t0) / n
    cfg = TrainConfig(steps=1, ohem_min_kept=a.batch * a.hw * a.hw // 16, **mode)
    kd = KDConfig("mse", 1.0, 1.0)
    kinds = {"plain": None, "kd-stored": "stored", "kd-live": "live"}
    state = {}
    for k, how in kinds.items():
        torch.manual_seed(0)
        model = create_model("upernet_mobilevit_s", num_classes=NUM_CLASSES).train()
        if mode["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_fn = None if how is None else make_kd_loss(teacher, kd, train_cfg=cfg,
                                                        targets=targets if how == "stored" else None)
        state[k] = (model, opt, loss_fn)
    pos = {k: 0 for k in kinds}

    def step(k):
        model, opt, loss_fn = state[k]
        x, y = batches[pos[k]]
        pos[k] += 1
        if mode["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode["bf16"]):
            loss = segmentation_loss(model(x), y, cfg) if loss_fn is None else loss_fn(model, x, y)[0]
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()

    for k in kinds:  # warm-up (batch 0 of each stream)
        step(k)
    times = {k: [] for k in kinds}
    order = list(kinds)
    for r in range(a.rounds):
        for k in order[r % 3:] + order[:r % 3]:
            t1 = time.perf_counter()
            for _ in range(a.steps):
                step(k)
            times[k].append((time.perf_counter() - t1) / a.steps)
    base = statistics.median(times["plain"])
    for k in kinds:
        med = statistics.median(times[k])
        print(f"{k:<10} {med * 1e3:8.1f} ms/step  x{med / base:5.2f} vs plain  "
              f"(rounds: {', '.join(f'{t * 1e3:.0f}' for t in times[k])} ms)")
    stored = statistics.median(times["kd-stored"])
    amort = stored + per_batch_targets / a.share
    print(f"teacher pass for stored targets: {per_batch_targets * 1e3:.1f} ms/batch (once per seed); "
          f"kd-stored incl. that pass shared by {a.share} KD config(s): {amort * 1e3:.1f} ms/step = "
          f"x{amort / base:.2f} vs plain")
    print(f"stored logits: {targets['logits'][0].numel() * 2 / 1e3:.1f} kB/batch (float16, decoder resolution)")
    print(f"load average after: {psutil.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
