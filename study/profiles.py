"""Experiment profiles: how big every experiment is.

``smoke`` is tiny and exists for tests and CI; ``cpu`` (the default) is sized for the
2-core machines so that trends are meaningful in under 45 minutes; ``paper`` is source
000's setting (LPCVC at 512x512, 384 crops, 20,000 iterations, batch 16) and needs a GPU
and a real dataset.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Profile:
    """Sizes of one profile. Steps are optimizer steps; sizes are pixels.

    Attributes:
        name: profile name.
        image_size: side of the (square) images the dataset is resized to, px.
        crop_size: side of the random training crops, px.
        n_train, n_val: images generated for the embedded dataset (ignored with a data root).
        batch_size: training batch size.
        student_steps: training steps of each student baseline.
        teacher_steps: training steps of the teacher.
        finetune_steps: recovery fine-tune steps after pruning / quantization-aware steps.
        eval_every: evaluate every N steps during training (0: only at the end).
        lr: peak learning rate (AdamW).
        seeds: seeds used when a section repeats an experiment (mean +- std).
        sparsities: structured / unstructured sparsity sweep.
        calib_images: default number of calibration images for INT8 PTQ.
        bench_warmup_s, bench_min_s: benchmark warm-up and measurement time, s.
        bench_min_runs: minimum number of timed runs.
        search_steps: steps of the bi-level search.
        teacher: registry name of the teacher.
        data_seed: seed of the embedded dataset (fixed, so that repeated runs with
            different ``--seed`` train on the same images).
        needs_gpu, needs_data_root: refuse to start without them.
        extra: free-form settings; ``torch_threads`` (int) fixes torch's intra-op threads.
    """

    name: str
    image_size: int
    crop_size: int
    n_train: int
    n_val: int
    batch_size: int
    student_steps: int
    teacher_steps: int
    finetune_steps: int
    eval_every: int
    lr: float
    seeds: tuple = (0,)
    sparsities: tuple = (0.2, 0.45, 0.6, 0.8)
    calib_images: int = 32
    bench_warmup_s: float = 1.0
    bench_min_s: float = 3.0
    bench_min_runs: int = 50
    search_steps: int = 100
    teacher: str = "upernet_swinv2_t"
    data_seed: int = 0
    needs_gpu: bool = False
    needs_data_root: bool = False
    extra: dict = field(default_factory=dict)

    def replace(self, **changes) -> "Profile":
        """Return a copy with ``changes`` applied (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain-dict view, used in cache keys and ``run.json``."""
        return dataclasses.asdict(self)


PROFILES = {
    "smoke": Profile(
        name="smoke", image_size=64, crop_size=64, n_train=24, n_val=8, batch_size=4,
        student_steps=6, teacher_steps=6, finetune_steps=3, eval_every=0, lr=2e-3,
        seeds=(0,), sparsities=(0.5,), calib_images=4,
        bench_warmup_s=0.05, bench_min_s=0.1, bench_min_runs=5, search_steps=4,
        # tiny tensors gain nothing from a second thread, and one thread keeps the smoke
        # run fast when the machine is shared
        extra={"torch_threads": 1},
    ),
    "cpu": Profile(
        name="cpu", image_size=96, crop_size=96, n_train=320, n_val=64, batch_size=8,
        student_steps=300, teacher_steps=600, finetune_steps=60, eval_every=150, lr=2e-3,
        seeds=(0, 1, 2), sparsities=(0.2, 0.45, 0.6, 0.8), calib_images=32,
        bench_warmup_s=1.0, bench_min_s=3.0, bench_min_runs=50, search_steps=120,
    ),
    "paper": Profile(
        name="paper", image_size=512, crop_size=384, n_train=1021, n_val=100, batch_size=16,
        student_steps=20000, teacher_steps=20000, finetune_steps=20000, eval_every=2000,
        lr=1e-3, seeds=(0, 1, 2), sparsities=(0.2, 0.45, 0.6, 0.8), calib_images=100,
        bench_warmup_s=1.0, bench_min_s=3.0, bench_min_runs=50, search_steps=5000,
        needs_gpu=True, needs_data_root=True,
    ),
}


class ProfileError(ValueError):
    """An unknown profile, or a profile whose requirements are not met."""


def get_profile(name: str, *, data_root: str | None = None, has_gpu: bool | None = None) -> Profile:
    """Look up a profile and check its requirements.

    Args:
        name: ``smoke``, ``cpu`` or ``paper``.
        data_root: the ``--data-root`` given, if any.
        has_gpu: whether a CUDA device is present (default: ask torch).

    Raises:
        ProfileError: unknown name, or ``paper`` without a GPU or without ``--data-root``
            (the message says which).
    """
    if name not in PROFILES:
        raise ProfileError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}")
    prof = PROFILES[name]
    if prof.needs_data_root and not data_root:
        raise ProfileError(
            f"profile {name!r} reproduces source 000 on the real LPCVC 2023 data: "
            "pass --data-root DIR (a folder in the LPCVC layout)")
    if prof.needs_gpu:
        if has_gpu is None:
            import torch
            has_gpu = torch.cuda.is_available()
        if not has_gpu:
            raise ProfileError(
                f"profile {name!r} trains 20,000 iterations at 384x384, batch 16: it needs a "
                "CUDA GPU and none was found (use --profile cpu on this machine)")
    return prof
