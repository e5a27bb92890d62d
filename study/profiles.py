"""Experiment profiles: how big every experiment is.

``smoke`` is tiny and exists for tests and CI; ``cpu`` (the default) is sized for the
2-core machines so that trends are meaningful in under 45 minutes; ``paper`` is source
000's setting (LPCVC at 512x512, 384 crops, 20,000 iterations, batch 16, ImageNet-pretrained
encoders) and needs a GPU and a real dataset.

Two transformations of a profile (both applied by :func:`get_profile`):

- :meth:`Profile.fast_dev_run` - the *dry run* of a profile (``--fast-dev-run``): every
  training 2 optimizer steps, every evaluation 2 validation batches, every benchmark 3
  timed runs, every sweep point kept, the real shapes (image, crop and batch sizes) and
  the real code paths. ``paper`` is then allowed on a CPU. The idea is Lightning's
  ``Trainer(fast_dev_run=...)``: run everything once, cheaply, to find the crash before
  the expensive run does.
- ``weights_dir`` / ``pretrained`` - start the encoders from their ImageNet checkpoints
  (:data:`study.models.PRETRAINED_ENCODERS`), as sources 000 and 002 do.
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
        n_test: test images generated for the embedded dataset (ignored with a data root,
            whose official val split is the test split; see :func:`study.data.split_pairs`).
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
        extra: free-form settings; ``torch_threads`` (int) fixes torch's intra-op threads,
            ``latency_rounds`` (int, default 5) the rounds of every latency comparison
            (:func:`study.sections.measure.protocol`),
            ``onnx_simplify`` (bool, default True) whether ONNX exports run onnxslim
            (:func:`study.sections.measure.onnx_simplify`; ``smoke`` skips it),
            ``kd_steps`` and ``iterative_budget_s`` override section plans (see
            :mod:`study.sections.distillation`, :mod:`study.sections.iterative_pruning`).
        pretrained: start every encoder from its ImageNet checkpoint
            (:func:`study.models.create_model` ``pretrained=True``); TopFormer only when its
            official file is in ``weights_dir`` (otherwise from scratch, labelled).
        weights_dir: folder of local checkpoints in the layout of
            :func:`study.models.pretrained_weights_file` ("" = the Hugging Face hub / its
            cache). Where the files lie is not part of what the experiment is, so it is left
            out of :meth:`to_dict` (and so of every cache key); ``pretrained`` is in it.
        bench_warmup_runs: minimum warm-up calls of every benchmark (see
            :func:`study.bench.time_callable`).
        eval_batches: evaluate on the first N validation batches only (0 = the whole split).
        dry_run: this profile is a :meth:`fast_dev_run`; its numbers are not results.
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
    pretrained: bool = False
    weights_dir: str = ""
    bench_warmup_runs: int = 10
    eval_batches: int = 0
    dry_run: bool = False
    n_test: int = 0

    def replace(self, **changes) -> "Profile":
        """Return a copy with ``changes`` applied (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain-dict view, used in cache keys and ``run.json`` (without ``weights_dir``:
        a path is not part of the experiment)."""
        d = dataclasses.asdict(self)
        d.pop("weights_dir")
        return d

    @property
    def out_name(self) -> str:
        """Folder name of the run's outputs under the build dir: the profile's name, with
        ``-dryrun`` for a :meth:`fast_dev_run` (so a dry run never overwrites real tables,
        figures or the recorded KD choice)."""
        return f"{self.name}-dryrun" if self.dry_run else self.name

    def fast_dev_run(self) -> "Profile":
        """The dry run of this profile (``--fast-dev-run``).

        Kept: the name (so every section takes the profile's own code path and plan), the
        image, crop and batch sizes (the real shapes), the learning rate, every sweep point
        (``sparsities`` and the sections' own sweeps), ``pretrained`` and ``weights_dir``.
        Changed:

        - every training, fine-tune and search: 2 optimizer steps (``student_steps``,
          ``teacher_steps``, ``finetune_steps``, ``search_steps``, ``extra["kd_steps"]``);
          evaluation only at the end (``eval_every`` 0);
        - every evaluation: 2 validation batches (``eval_batches`` 2, applied by
          :func:`study.sections.common.loaders`; ``n_val`` = the 16 images of those two
          batches of 8, for sections that read the split as arrays);
        - every benchmark: 3 timed runs, no warm-up (``bench_min_runs`` 3,
          ``bench_warmup_runs`` 0, ``bench_warmup_s`` = ``bench_min_s`` = 0);
        - INT8 calibration: at most 16 images (keeps the 1, N/8, N/2, N calibration sweep
          distinct);
        - seeds: the first two (the multi-seed code paths - standard deviations, paired
          intervals - still run);
        - no grid trimmed to a time budget (``extra["iterative_budget_s"]`` None);
        - ``needs_gpu`` False: ``paper`` runs on a CPU.

        Returns:
            a new :class:`Profile` with ``dry_run=True`` (idempotent).
        """
        extra = {**self.extra, "kd_steps": 2, "iterative_budget_s": None}
        return self.replace(
            student_steps=2, teacher_steps=2, finetune_steps=2, search_steps=2, eval_every=0,
            eval_batches=2, n_val=min(self.n_val, 2 * 8), n_test=min(self.n_test, 2 * 8), calib_images=min(self.calib_images, 16),
            bench_warmup_s=0.0, bench_min_s=0.0, bench_min_runs=3, bench_warmup_runs=0,
            seeds=tuple(self.seeds)[:2], needs_gpu=False, dry_run=True, extra=extra)


PROFILES = {
    "smoke": Profile(
        name="smoke", image_size=64, crop_size=64, n_train=24, n_val=8, batch_size=4,
        student_steps=6, teacher_steps=6, finetune_steps=3, eval_every=2, lr=2e-3,
        seeds=(0,), sparsities=(0.5,), calib_images=4,
        bench_warmup_s=0.05, bench_min_s=0.1, bench_min_runs=5, search_steps=4,
        # tiny tensors gain nothing from a second thread, and one thread keeps the smoke
        # run fast when the machine is shared
        extra={"torch_threads": 1, "latency_rounds": 2, "onnx_simplify": False}, n_test=8,
    ),
    "cpu": Profile(
        name="cpu", image_size=96, crop_size=96, n_train=320, n_val=64, batch_size=8,
        # budgets from the learning curves (issue #13): MobileViT-S reaches ~0.30 test mIoU
        # near 1,600 steps (still gaining ~0.02 in the last quarter): 2,000 steps; the Swin
        # teacher reaches 0.36 at 2,000 steps and still gains 0.05: 3,000 steps
        student_steps=2000, teacher_steps=3000, finetune_steps=150, eval_every=250, lr=2e-3,
        seeds=(0, 1, 2), sparsities=(0.2, 0.45, 0.6, 0.8), calib_images=32,
        bench_warmup_s=1.0, bench_min_s=3.0, bench_min_runs=50, search_steps=120, n_test=128,
    ),
    "paper": Profile(
        name="paper", image_size=512, crop_size=384, n_train=1021, n_val=100, batch_size=16,
        student_steps=20000, teacher_steps=20000, finetune_steps=20000, eval_every=2000,
        lr=1e-3, seeds=(0, 1, 2), sparsities=(0.2, 0.45, 0.6, 0.8), calib_images=100,
        bench_warmup_s=1.0, bench_min_s=3.0, bench_min_runs=50, search_steps=5000,
        needs_gpu=True, needs_data_root=True, pretrained=True,
    ),
}


class ProfileError(ValueError):
    """An unknown profile, or a profile whose requirements are not met."""


def get_profile(name: str, *, data_root: str | None = None, has_gpu: bool | None = None,
                fast_dev_run: bool = False, weights_dir: str | None = None) -> Profile:
    """Look up a profile, check its requirements, apply the run's options.

    Args:
        name: ``smoke``, ``cpu`` or ``paper``.
        data_root: the ``--data-root`` given, if any.
        has_gpu: whether a CUDA device is present (default: ask torch).
        fast_dev_run: return :meth:`Profile.fast_dev_run` of the profile; a dry run does not
            need a GPU.
        weights_dir: ``--weights-dir``: encoders start from the ImageNet checkpoints in this
            folder (``pretrained=True``, for every profile). Without it, ``paper`` still
            starts pretrained (from the Hugging Face hub / cache), ``smoke`` and ``cpu`` from
            scratch.

    Raises:
        ProfileError: unknown name, or ``paper`` without a GPU (unless ``fast_dev_run``) or
            without ``--data-root`` (the message says which).
    """
    if name not in PROFILES:
        raise ProfileError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}")
    prof = PROFILES[name]
    if prof.needs_data_root and not data_root:
        raise ProfileError(
            f"profile {name!r} reproduces source 000 on the real LPCVC 2023 data: "
            "pass --data-root DIR (a folder in the LPCVC layout)")
    if prof.needs_gpu and not fast_dev_run:
        if has_gpu is None:
            import torch
            has_gpu = torch.cuda.is_available()
        if not has_gpu:
            raise ProfileError(
                f"profile {name!r} trains 20,000 iterations at 384x384, batch 16: it needs a "
                "CUDA GPU and none was found (use --profile cpu on this machine, or "
                "--fast-dev-run for a dry run of every notebook at the paper's shapes)")
    if weights_dir:
        prof = prof.replace(pretrained=True, weights_dir=str(weights_dir))
    return prof.fast_dev_run() if fast_dev_run else prof
