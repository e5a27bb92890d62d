"""Section ``structured_pruning`` (notebook ``02_structured_pruning``): which pruning makes the student faster?

The pruning methods are in :mod:`study.prune` (no context there); this module applies them
to the study's trained models, fine-tunes and caches the results (:func:`pruned_variant`),
runs the "dense + same fine-tune" control (:func:`control_variant`), and builds the
section's rows, verdicts and table. :func:`pruned_variant`, :func:`control_variant`,
:func:`dense_info` and the row helpers are shared with notebook 03 (:mod:`.head_pruning`).

Fair comparisons (issue #14):

- every arm and its control get the same recovery fine-tune (steps, learning rate, seeded
  data stream: :func:`study.sections.common.finetune`), so ``train_steps`` /
  ``train_images`` (base model's + fine-tune's, :func:`budget`) are equal;
- every mIoU delta is ``arm - control`` on the **test** split with a paired bootstrap over
  test images of the one training seed (:func:`verdict_columns`,
  :func:`study.metrics.bootstrap_miou_diff`): data noise only, labelled as such;
- the axes are the fractions of the dense model's parameters and MACs removed, measured
  on the model after the shapes changed (:func:`removed`); the method's own amount is a
  secondary column. Masked methods zero weights and remove nothing (``params_removed`` 0);
- choices (which channel importance is best) are made on the val split
  (:func:`best_importance`) and reported on test.

Notebook 02's path to the methods::

    from study.sections import structured_pruning as sec
    ctl, cinfo = sec.control_variant(ctx, student, builder, base_tag=..., ft_steps=...)   # dense + same ft
    m, info = sec.pruned_variant(ctx, student, builder, "structured_magnitude", sparsity=0.45, ...)
        -> sec.apply_method -> study.prune.prune_structured
    plan = measure.LatencyPlan(ctx, hw, onnx_dir)        # study.sections.measure (kept out of the
    plan.add(tag, m, base=base_tag)                       # cache key of the variants: not imported here)
    meas = plan.measure()    # every model of the table, interleaved: study.bench.compare_latency
    row = sec.variant_row(ctx, ..., info=info, control=cinfo, budget_base=...)   # verdict vs the control
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .. import prune
from ..metrics import bootstrap_miou_diff, verdict
from ..train import evaluate, last_quarter_gain, seed_everything
from . import distillation
from .common import cached, finetune, finetune_config, loaders, model_fingerprint, test_confusions, test_scores
from .rows import table_row

SECTION = "structured_pruning"
#: The student pruned by notebooks 02-04.
STUDENT = "upernet_mobilevit_s"
#: ``method`` of the control rows: the unpruned model given exactly the pruned arms'
#: recovery fine-tune (same steps, learning rate, data stream).
CONTROL = "dense+ft"
#: ``method`` of the unpruned, not fine-tuned model (a reference, not a verdict's control).
DENSE = "dense"

#: Methods of the pruning sections (02, 03) and what they do to the tensors.
METHOD_KIND = {
    DENSE: "dense baseline (no fine-tune)",
    CONTROL: "control: dense + the same fine-tune",
    "unstructured": "masked: weights zeroed, shapes unchanged (no real shrink)",
    "filter_norm_masks": "masked: filters zeroed, shapes unchanged (no real shrink)",
    "structured_magnitude": "physical (DepGraph channels)",
    "structured_taylor": "physical (DepGraph channels)",
    "structured_random": "physical (DepGraph channels)",
    "mlp_hidden": "physical (MLP hidden units)",
    "heads": "physical (heads removed)",
    "head_dim": "physical (head dims removed)",
    "repartition": "re-partition (width unchanged)",
}
#: The one amount parameter each method takes: ``sparsity`` = fraction removed,
#: ``keep_heads`` = heads kept per block, ``keep_ratio`` = fraction of each head's dims
#: kept, ``num_heads`` = new head count (same width).
METHOD_PARAM = {
    "unstructured": "sparsity", "filter_norm_masks": "sparsity", "structured_magnitude": "sparsity",
    "structured_taylor": "sparsity", "structured_random": "sparsity", "mlp_hidden": "sparsity",
    "heads": "keep_heads", "head_dim": "keep_ratio", "repartition": "num_heads",
}
MASKED = ("unstructured", "filter_norm_masks")

#: Student methods of notebook 02's full grid (``--full-grid``), each at every ``profile.sparsities``.
STUDENT_METHODS = ("unstructured", "filter_norm_masks", "structured_magnitude", "structured_taylor")
#: The core comparison, always run: method -> the sparsities it is run at (the profile's
#: sparsity nearest to each). Unstructured 0.6 and structured 0.45 are source 001's two
#: points; structured 0.2 is where source 000 sees MobileViT drop; magnitude and Taylor at
#: the same sparsities make the importance choice (on val).
STUDENT_CORE = {"unstructured": (0.6,), "structured_magnitude": (0.2, 0.45), "structured_taylor": (0.2, 0.45)}
#: Sparsity at which source 000 reports that Swin breaks down; always in the teacher sweep.
SWIN_REPORTED_SPARSITY = 0.7
#: Core sparsities of the teacher's MLP-hidden sweep (the full grid adds the profile's).
TEACHER_CORE = (0.45, SWIN_REPORTED_SPARSITY)
#: Val-curve points of every recovery fine-tune (:func:`study.sections.common.finetune`).
CURVE_POINTS = 4
_KEEP = ("miou", "mdice", "pixel_acc", "per_class_iou")
NAN = float("nan")


# --------------------------------------------------------------------------- methods
def method_setting(method: str, *, sparsity: float | None = None, keep_heads: int | None = None,
                   keep_ratio: float | None = None, num_heads: int | None = None) -> tuple[str, float]:
    """``(parameter name, value)`` of ``method``'s one amount, checking that exactly it is given.

    Raises:
        ValueError: unknown ``method``, its parameter missing, or another one given.
    """
    if method not in METHOD_PARAM:
        raise ValueError(f"method must be one of {tuple(METHOD_PARAM)}, got {method!r}")
    given = {k: v for k, v in (("sparsity", sparsity), ("keep_heads", keep_heads), ("keep_ratio", keep_ratio),
                                ("num_heads", num_heads)) if v is not None}
    want = METHOD_PARAM[method]
    if set(given) != {want}:
        raise ValueError(f"method {method!r} takes {want}= (only), got {sorted(given) or 'nothing'}")
    return want, given[want]


def apply_method(model: nn.Module, method: str, *, sparsity: float | None = None, keep_heads: int | None = None,
                 keep_ratio: float | None = None, num_heads: int | None = None,
                 input_hw: Sequence[int] | None = None, calib_batches: list | None = None) -> nn.Module:
    """Apply one pruning method of :data:`METHOD_PARAM` to ``model`` in place.

    ``unstructured`` / ``filter_norm_masks`` / ``structured_<importance>`` / ``mlp_hidden``
    take ``sparsity`` (fraction removed, :func:`study.prune.prune_unstructured`,
    :func:`~study.prune.prune_filter_norm_masks`, :func:`~study.prune.prune_structured`
    traced at ``input_hw``, :func:`~study.prune.prune_mlp_hidden`); ``heads`` takes
    ``keep_heads`` (:func:`~study.prune.prune_heads` with Michel importance from
    ``calib_batches``, else the data-free weight norm); ``head_dim`` takes ``keep_ratio``
    (:func:`~study.prune.prune_head_dim`); ``repartition`` takes ``num_heads``
    (:func:`~study.prune.repartition_heads`).

    Raises:
        ValueError: unknown ``method``, a wrong / missing amount parameter, or a bad value
            (see the called function).
    """
    _, value = method_setting(method, sparsity=sparsity, keep_heads=keep_heads, keep_ratio=keep_ratio,
                              num_heads=num_heads)
    if method == "unstructured":
        return prune.prune_unstructured(model, value)
    if method == "filter_norm_masks":
        return prune.prune_filter_norm_masks(model, value)
    if method.startswith("structured_"):
        imp = method.split("_", 1)[1]
        return prune.prune_structured(model, tuple(input_hw), value, importance=imp,
                                      calib_batches=calib_batches if imp == "taylor" else None)
    if method == "mlp_hidden":
        return prune.prune_mlp_hidden(model, value)
    if method == "heads":
        imp = prune.head_importance(model, calib_batches) if calib_batches else None
        return prune.prune_heads(model, int(value), imp)
    if method == "head_dim":
        return prune.prune_head_dim(model, value)
    return prune.repartition_heads(model, int(value))


# --------------------------------------------------------------------------- data, models, plans
def calib_from_loader(loader, n_batches: int) -> list:
    """The first ``n_batches`` (images, masks) batches of ``loader`` as a list (CPU tensors)."""
    out = []
    for i, (x, y) in enumerate(loader):
        if i >= n_batches:
            break
        out.append((x, y))
    if not out:
        raise ValueError("loader yielded no batch")
    return out


def calibration_batches(ctx) -> list:
    """``profile.calib_images // batch_size`` (at least 1) training batches: Taylor and Michel importance."""
    prof = ctx.profile
    return calib_from_loader(loaders(ctx)[0], max(1, prof.calib_images // prof.batch_size))


def student(ctx) -> tuple[nn.Module, str, dict]:
    """The model notebooks 02 and 03 prune: the KD student (:func:`.distillation.kd_student`).

    Returns:
        ``(model on CPU in eval mode, base tag "kd_student", training record)``; the record
        holds ``train_steps`` / ``train_images`` of the KD training (:func:`budget` adds the
        fine-tune's).
    """
    model, rec = distillation.kd_student(ctx)
    return model.cpu().eval(), "kd_student", rec


def _nearest(values: Sequence[float], wanted: Sequence[float]) -> list[float]:
    return sorted({min(values, key=lambda v: abs(float(v) - w)) for w in wanted})


def student_plan(profile, full_grid: bool = False) -> list[tuple[str, float]]:
    """``[(method, sparsity)]`` of notebook 02's student arms.

    The core comparison (:data:`STUDENT_CORE`: each method at the profile's sparsities
    nearest to its core values) always; with ``full_grid`` (``--full-grid``) every
    :data:`STUDENT_METHODS` x ``profile.sparsities``.
    """
    if full_grid:
        return [(m, float(s)) for m in STUDENT_METHODS for s in profile.sparsities]
    return [(m, float(s)) for m, core in STUDENT_CORE.items() for s in _nearest(profile.sparsities, core)]


def teacher_plan(profile, full_grid: bool = False) -> dict:
    """Teacher sweep of notebook 02: ``sparsities`` and ``ft_steps``.

    ``sparsities``: with ``full_grid`` the profile's plus 0.7 (:data:`SWIN_REPORTED_SPARSITY`),
    else the ones of them nearest to :data:`TEACHER_CORE`. ``ft_steps``: the teacher is ~5x
    slower to train than the student, so its arms and its control get a third of the
    student's recovery fine-tune steps (at least 1).
    """
    allv = sorted(set(float(s) for s in profile.sparsities) | {SWIN_REPORTED_SPARSITY})
    return {"sparsities": allv if full_grid else _nearest(allv, TEACHER_CORE),
            "ft_steps": max(1, profile.finetune_steps // 3), "full_grid": bool(full_grid)}


# --------------------------------------------------------------------------- cached variants
def masked_finetune(ctx, model: nn.Module, steps: int, curve_points: int = 0) -> dict:
    """Recovery fine-tune of a masked model whose zeros stay zero (:func:`study.prune.keep_pruned_zeros`).

    Returns the :func:`study.sections.common.finetune` history (``evals``: the val curve
    when ``curve_points`` > 0).
    """
    with prune.keep_pruned_zeros(model):
        return finetune(ctx, model, steps, progress=False, curve_points=curve_points)


def _keep(scores: dict) -> dict:
    return {k: scores[k] for k in _KEEP}


def _numpy(cms) -> np.ndarray:
    # stored as a torch tensor: cache entries load with weights_only=True (no numpy pickles)
    return cms.numpy() if isinstance(cms, torch.Tensor) else np.asarray(cms, dtype=np.int64)


def _info(rec: dict, ft_steps: int) -> dict:
    curve = list(rec.get("curve", []))
    return {"scores": rec["after"], "val_miou": rec["after"]["miou"],
            "test_scores": {**rec["test_after"], "split": "test"}, "test_cms": _numpy(rec["test_cms"]),
            "miou_before_ft": rec["test_before"]["miou"], "mdice_before_ft": rec["test_before"]["mdice"],
            "val_miou_before_ft": rec["before"]["miou"], "curve": curve, "ft_steps": int(ft_steps),
            "ft_lr": float(rec.get("ft_lr", NAN)), "ft_seconds": float(rec["ft_seconds"]),
            "ft_last_quarter_gain": last_quarter_gain(curve, ft_steps) if ft_steps > 0 else NAN}


def _variant(ctx, base: nn.Module, builder: Callable[[], nn.Module], method: str, param: str | None, value, *,
             base_tag: str, input_hw: Sequence[int], ft_steps: int, val_loader, calib_batches,
             curve_points: int) -> tuple[nn.Module, dict]:
    cfg = {"method": method, "ft_steps": int(ft_steps), "base": base_tag, "base_fp": model_fingerprint(base),
           "input_hw": list(input_hw), "curve_points": int(curve_points)}
    if param is not None:
        cfg[param] = value
    fresh: dict = {}

    def compute():
        # fine-tuning draws dropout / drop-path noise: seed it, so the entry does not depend
        # on whatever the notebook ran before (the same profile and seed give the same table)
        seed_everything(ctx.seed)
        m = copy.deepcopy(base).to(ctx.device)
        fresh["model"] = m
        if method != CONTROL:
            apply_method(m, method, **{param: value}, input_hw=input_hw, calib_batches=calib_batches)
        before = evaluate(m, val_loader, progress=False)
        test_before = test_scores(ctx, m)
        # re-seed right before the fine-tune: every arm and the control start it from the same
        # RNG state, whatever the pruning step and the evaluations above consumed
        seed_everything(ctx.seed)
        t0 = time.perf_counter()
        hist = {"evals": []}
        if ft_steps > 0:
            if method in MASKED:
                hist = masked_finetune(ctx, m, ft_steps, curve_points=curve_points)
            else:
                hist = finetune(ctx, m, ft_steps, progress=False, curve_points=curve_points)
        ft_s = time.perf_counter() - t0
        m.eval()
        after = evaluate(m, val_loader, progress=False)
        curve = [{"step": 0, "miou": before["miou"], "mdice": before["mdice"]}, *hist.get("evals", [])]
        return {"payload": prune.pruned_payload(m), "before": _keep(before), "after": _keep(after),
                "test_before": _keep(test_before), "test_after": _keep(test_scores(ctx, m)),
                "test_cms": torch.from_numpy(test_confusions(ctx, m)), "curve": curve, "ft_seconds": ft_s,
                "ft_lr": finetune_config(ctx, ft_steps).lr if ft_steps > 0 else NAN}

    name = f"control-{base_tag}" if method == CONTROL else f"pruned-{base_tag}-{method}-{value}"
    rec = cached(ctx, name, cfg, compute, modules=[__name__])
    # just computed: use it (saves a second dependency-graph trace); else rebuild from the cache
    if "model" in fresh:
        model = fresh["model"].eval()
    else:
        model = prune.rebuild_pruned(builder, rec["payload"]).to(ctx.device).eval()
    return model, _info(rec, ft_steps)


def pruned_variant(ctx, base: nn.Module, builder: Callable[[], nn.Module], method: str, *,
                   sparsity: float | None = None, keep_heads: int | None = None, keep_ratio: float | None = None,
                   num_heads: int | None = None, base_tag: str, input_hw: Sequence[int], ft_steps: int,
                   val_loader, calib_batches=None, curve_points: int = CURVE_POINTS) -> tuple[nn.Module, dict]:
    """Prune a copy of ``base`` with ``method``, evaluate, fine-tune, evaluate (cached).

    The amount is the one parameter of :data:`METHOD_PARAM` (see :func:`apply_method`).
    Masked methods are fine-tuned with their zeros kept (:func:`masked_finetune`), the
    others with :func:`study.sections.common.finetune`: the same steps, learning rate and
    seeded data stream as :func:`control_variant`. The cache key holds the method, its
    amount, ``ft_steps``, ``curve_points``, ``input_hw``, the base model's
    :func:`~study.models.model_fingerprint` and the import closure of this module; the
    entry stores the pruning history + state_dict (:func:`study.prune.pruned_payload`), the
    scores and the per-image test confusions, so a cache hit rebuilds the model with
    :func:`study.prune.rebuild_pruned` from ``builder()`` (the dense architecture).

    Args:
        val_loader: the val split (choices and the curve's step 0).
        curve_points: val evaluations during the fine-tune (its learning curve).

    Returns:
        ``(model in eval mode, info)`` with ``scores`` (after fine-tuning, on ``val_loader``:
        ``miou, mdice, pixel_acc, per_class_iou``; for choices), ``val_miou``,
        ``test_scores`` (the same on the test split, ``split = "test"``: for reports),
        ``test_cms`` (int64 ``(N, C, C)`` per-image test confusions:
        :func:`study.sections.common.test_confusions`), ``miou_before_ft`` /
        ``mdice_before_ft`` (test, before the fine-tune), ``val_miou_before_ft``, ``curve``
        (val ``[{step, miou, mdice}]``, step 0 = before the fine-tune), ``ft_steps``,
        ``ft_lr``, ``ft_seconds`` (s) and ``ft_last_quarter_gain``
        (:func:`study.train.last_quarter_gain` of the curve).

    Raises:
        ValueError: see :func:`method_setting` / :func:`apply_method`.
    """
    param, value = method_setting(method, sparsity=sparsity, keep_heads=keep_heads, keep_ratio=keep_ratio,
                                  num_heads=num_heads)
    return _variant(ctx, base, builder, method, param, value, base_tag=base_tag, input_hw=input_hw,
                    ft_steps=ft_steps, val_loader=val_loader, calib_batches=calib_batches, curve_points=curve_points)


def control_variant(ctx, base: nn.Module, builder: Callable[[], nn.Module], *, base_tag: str,
                    input_hw: Sequence[int], ft_steps: int, val_loader,
                    curve_points: int = CURVE_POINTS) -> tuple[nn.Module, dict]:
    """The "dense + same fine-tune" control: ``base`` unpruned, fine-tuned like every arm (cached).

    Exactly :func:`pruned_variant`'s runner without the pruning step: the same fine-tune
    steps, learning rate (:func:`study.sections.common.finetune_config`), data stream (a
    freshly seeded train loader) and RNG state at the fine-tune's start (re-seeded with
    ``ctx.seed``). Every pruning delta of notebooks 02 and 03 is taken
    against it; notebook 03 reuses notebook 02's entry (same key).

    Returns:
        ``(model in eval mode, info)`` as :func:`pruned_variant` returns them.
    """
    return _variant(ctx, base, builder, CONTROL, None, None, base_tag=base_tag, input_hw=input_hw,
                    ft_steps=ft_steps, val_loader=val_loader, calib_batches=None, curve_points=curve_points)


def dense_info(ctx, model: nn.Module, *, base_tag: str, val_loader) -> dict:
    """The unpruned, not fine-tuned model's scores in :func:`pruned_variant`'s ``info`` format (cached).

    Keyed by the model's fingerprint. ``ft_steps`` 0, ``curve`` empty; ``miou_before_ft`` =
    the test mIoU.
    """
    def compute():
        val = evaluate(model, val_loader, progress=False)
        test = test_scores(ctx, model)
        return {"before": _keep(val), "after": _keep(val), "test_before": _keep(test), "test_after": _keep(test),
                "test_cms": torch.from_numpy(test_confusions(ctx, model)), "curve": [], "ft_seconds": 0.0, "ft_lr": NAN}

    rec = cached(ctx, f"dense-eval-{base_tag}", {"base": base_tag, "base_fp": model_fingerprint(model)}, compute,
                 modules=[__name__])
    return _info(rec, 0)


# --------------------------------------------------------------------------- budgets, axes, verdicts
def budget(record: dict, ft_steps: int, batch_size: int) -> dict:
    """``train_steps`` / ``train_images`` of a model trained as ``record`` says, then fine-tuned.

    Args:
        record: the base model's training record (``train_steps``, optional ``train_images``).
        ft_steps: recovery fine-tune steps (0 for the dense row).
        batch_size: the fine-tune's batch (``profile.batch_size``).

    Returns:
        ``{"train_steps": base + ft_steps, "train_images": base images + ft_steps * batch_size}``.

    Raises:
        KeyError: ``record`` has no ``train_steps``.
    """
    steps = int(record["train_steps"])
    images = int(record.get("train_images", steps * batch_size))
    return {"train_steps": steps + int(ft_steps), "train_images": images + int(ft_steps) * int(batch_size)}


def removed(meas: dict, base_meas: dict) -> dict:
    """Fractions of the dense model's parameters and MACs removed, measured after the shapes changed.

    ``params_removed = 1 - params_m / params_m_dense``, ``macs_removed = 1 - gmacs / gmacs_dense``
    (both from :func:`study.models.model_complexity` of the real tensors, so a masked model,
    whose zeros are still stored and multiplied, removes 0).
    """
    return {"params_removed": 1 - meas["params_m"] / base_meas["params_m"],
            "macs_removed": 1 - meas["gmacs"] / base_meas["gmacs"]}


def verdict_columns(cms_arm, cms_control, n_boot: int = 2000) -> dict:
    """The verdict of ``arm - control`` on test mIoU: paired bootstrap over test images, one seed.

    Args:
        cms_arm, cms_control: int64 ``(N, C, C)`` per-image confusions of the two models on
            the same N test images (:func:`study.sections.common.test_confusions`).
        n_boot: bootstrap replicates (seed 0).

    Returns:
        ``diff_vs_control`` (mIoU arm - control on all N images), ``diff_std`` (of the
        replicates), ``ci95_low``, ``ci95_high`` (percentile interval), ``ci_method``
        ("paired bootstrap over N test images, 1 seed (data noise only)") and ``verdict``
        (:func:`study.metrics.verdict`: "helps" / "hurts" only when the interval excludes 0).

    Raises:
        ValueError: shapes differ or fewer than 2 images.
    """
    b = bootstrap_miou_diff(cms_arm, cms_control, n_boot=n_boot, seed=0)
    return {"diff_vs_control": b["diff"], "diff_std": b["std"], "ci95_low": b["ci95_low"],
            "ci95_high": b["ci95_high"], "ci_method": b["ci_method"], "verdict": verdict(b["ci95_low"], b["ci95_high"])}


def comparison_columns(info: dict, control: dict, method: str, budget_row: dict, budget_control: dict) -> dict:
    """Verdict and budget columns of one row against the control.

    The control row gets ``diff_vs_control`` 0, NaN interval and ``verdict`` "control";
    every other row :func:`verdict_columns` of its test confusions against the control's.
    ``budget_vs_control``: "equal" when ``train_steps`` and ``train_images`` match the
    control's, else what differs (the dense row: no fine-tune, so its delta is minus the
    fine-tune's own effect).
    """
    if method == CONTROL:
        cols = {"diff_vs_control": 0.0, "diff_std": NAN, "ci95_low": NAN, "ci95_high": NAN, "ci_method": "",
                "verdict": "control"}
    else:
        cols = verdict_columns(info["test_cms"], control["test_cms"])
    ds = budget_row["train_steps"] - budget_control["train_steps"]
    di = budget_row["train_images"] - budget_control["train_images"]
    if ds == 0 and di == 0:
        cols["budget_vs_control"] = "equal"
    else:
        why = " (not fine-tuned: its delta is minus the fine-tune's own effect)" if method == DENSE else ""
        cols["budget_vs_control"] = f"{ds:+d} steps, {di:+d} images vs the control{why}"
    return cols


# --------------------------------------------------------------------------- rows, table
def variant_row(ctx, model_name: str, method: str, sparsity: float, meas: dict, base_meas: dict, *,
                base_tag: str, input_hw: Sequence[int], info: dict, control: dict, budget_row: dict,
                budget_control: dict, zero_fraction: float = NAN) -> dict:
    """One row of the section table (every row on the test split).

    Columns after :data:`study.BASE_COLUMNS` and ``split, train_steps, train_images``:
    ``base, kind, params_removed, macs_removed`` (the axes: :func:`removed`), ``sparsity``
    (the method's own amount: fraction of weights for unstructured, of channels for
    structured, of MLP hidden units for ``mlp_hidden``), ``zero_fraction`` (weights that
    are exactly 0: what the masked methods do instead of removing), ``ft_steps``,
    ``ft_lr``, ``diff_vs_control, diff_std, ci95_low, ci95_high, ci_method, verdict,
    budget_vs_control`` (:func:`comparison_columns`), ``val_miou`` (the selection score),
    ``miou_before_ft`` (test), ``ft_last_quarter_gain``, ``gmacs_tp``, the protocol's
    latency columns (``meas["columns"]``, :func:`.measure.latency_columns`: ``threads,
    rounds``, p50 with its 95 % interval, p90 / p99, FPS, CV, peak RSS, load time,
    ``gmacs_per_s``, ``pct_of_peak``, ``verdict_vs_dense_<rt>`` - the latency verdict is
    against the dense model, whose shapes the control shares), then ``speedup`` (ORT p50
    ratio dense / model), ``speedup_torch``, ``macs_reduction`` (= ``macs_removed``),
    ``latency_reduction`` (ORT), ``latency_reduction_torch``, ``ort_error``, ``torch_error``.

    Args:
        model_name: ``model`` column; method / sparsity: what was done (:data:`DENSE` or
            :data:`CONTROL` with 0.0 for the unpruned model).
        meas, base_meas: the row model's and the dense model's entries of
            :meth:`.measure.LatencyPlan.measure`.
        info: :func:`pruned_variant` / :func:`control_variant` / :func:`dense_info` info.
        control: the control's info (the verdict's reference).
        budget_row, budget_control: :func:`budget` of this row and of the control.
        zero_fraction: :func:`study.prune.zero_fraction` of the model.
    """
    rm = removed(meas, base_meas)
    return table_row(
        ctx, SECTION, model_name, method, info["test_scores"], complexity=meas, input_hw=input_hw, split="test",
        train_steps=budget_row["train_steps"], train_images=budget_row["train_images"],
        base=base_tag, kind=METHOD_KIND.get(method, method), **rm, sparsity=sparsity, zero_fraction=zero_fraction,
        ft_steps=info["ft_steps"], ft_lr=info["ft_lr"],
        **comparison_columns(info, control, method, budget_row, budget_control),
        val_miou=info["val_miou"], miou_before_ft=info["miou_before_ft"],
        ft_last_quarter_gain=info["ft_last_quarter_gain"],
        gmacs_tp=meas["gmacs_tp"], **meas["columns"],
        speedup=base_meas["latency_ms_p50_ort"] / meas["latency_ms_p50_ort"],
        speedup_torch=base_meas["latency_ms_p50_torch"] / meas["latency_ms_p50_torch"],
        macs_reduction=rm["macs_removed"],
        latency_reduction=1 - meas["latency_ms_p50_ort"] / base_meas["latency_ms_p50_ort"],
        latency_reduction_torch=1 - meas["latency_ms_p50_torch"] / base_meas["latency_ms_p50_torch"],
        ort_error=meas["ort_error"], torch_error=meas["torch_error"])


def best_importance(rows) -> dict:
    """The channel importance chosen on val: ``structured_magnitude`` vs ``structured_taylor``.

    Rule: among the student's rows of the two methods, the higher mean ``val_miou`` over
    the sparsities both were run at (magnitude on ties or when one is missing).

    Args:
        rows: the section's rows (dicts or a DataFrame with ``model, method, sparsity,
            val_miou``).

    Returns:
        dict ``method`` (the chosen one), ``evidence`` ({method: mean val mIoU}),
        ``sparsities`` (the common ones) and ``split = "val"``.
    """
    df = pd.DataFrame(rows)
    df = df[(df.model == STUDENT) & df.method.isin(["structured_magnitude", "structured_taylor"])]
    common = sorted(set(df[df.method == "structured_magnitude"].sparsity) & set(df[df.method == "structured_taylor"].sparsity))
    df = df[df.sparsity.isin(common)]
    ev = {m: float(g.val_miou.mean()) for m, g in df.groupby("method")}
    best = "structured_taylor" if len(ev) == 2 and ev["structured_taylor"] > ev["structured_magnitude"] else \
        "structured_magnitude"
    return {"method": best, "evidence": ev, "sparsities": common, "split": "val"}


#: Numbers reported by source 001 (a detector on a Jetson Orin Nano, FP16), put next to the
#: matching student rows: (method, sparsity) -> (text, latency reduction, MACs reduction, metric drop).
REPORTED_BY_SOURCE001 = {
    ("unstructured", 0.6): ("source 001: unstructured 60%, 31.0 -> 30.8 ms, 17.2 GFLOPs dense, mAP 0.910 -> 0.905",
                            1 - 30.8 / 31.0, 0.0, 0.005),
    ("structured_magnitude", 0.45): ("source 001: structured 45% (GroupNorm p=2), 31.0 -> 11.4 ms, "
                                     "17.2 -> 9.4 GFLOPs, mAP 0.910 -> 0.904", 1 - 11.4 / 31.0, 1 - 9.4 / 17.2, 0.006),
}


def section_table(student_rows: list, teacher_rows: list, *, depgraph_on_swin: str) -> pd.DataFrame:
    """The section table: student rows, teacher rows (the dense one noting the DepGraph
    outcome on Swin), source 001's reported numbers, ``miou_drop`` (= control mIoU - row
    mIoU, i.e. ``-diff_vs_control``) and ``chosen_on_val`` (True on the rows of the
    importance :func:`best_importance` chose on val)."""
    t_rows = [dict(r) for r in teacher_rows]
    t_rows[0]["note"] = "DepGraph: " + depgraph_on_swin
    df = pd.concat([pd.DataFrame(student_rows), pd.DataFrame(t_rows)], ignore_index=True)
    cols = ["reported_by", "reported_latency_reduction", "reported_macs_reduction", "reported_metric_drop"]
    df["reported_by"] = ""
    for c in cols[1:]:
        df[c] = np.nan
    for (method, s), vals in REPORTED_BY_SOURCE001.items():
        sel = (df.model == STUDENT) & (df.method == method) & np.isclose(df.sparsity, s)
        df.loc[sel, cols] = list(vals)
    df["miou_drop"] = 0.0 - df["diff_vs_control"]
    choice = best_importance(student_rows)
    df["chosen_on_val"] = (df.model == STUDENT) & (df.method == choice["method"])
    return df


def curve_frame(arms: dict) -> pd.DataFrame:
    """Long table of recovery learning curves: ``arm, step, miou`` (val) from ``{label: info}``."""
    return pd.DataFrame([{"arm": k, "step": int(p["step"]), "miou": float(p["miou"])}
                         for k, info in arms.items() for p in info["curve"]])


def _steps(n) -> str:
    return f"{int(n)} step" + ("" if int(n) == 1 else "s")


def _ci(r) -> str:
    return f"{r['diff_vs_control']:+.3f} mIoU vs the control, CI [{r['ci95_low']:+.3f}, {r['ci95_high']:+.3f}] ({r['verdict']})"


def _find(df, model, method, s=None):
    d = df[(df.model == model) & (df.method == method)]
    if s is not None and len(d):
        d = d.iloc[[int(np.argmin(np.abs(d.sparsity.to_numpy() - s)))]]
    return None if d.empty else d.iloc[0]


def what_it_means(df: pd.DataFrame, teacher_name: str) -> list[str]:
    """One line per source claim: "source says X; here, at this budget, Y with CI [a, b]".

    Computed from the section table (:func:`section_table`); a claim whose rows are missing
    says so.
    """
    out = []
    ctl_s, ctl_t = _find(df, STUDENT, CONTROL), _find(df, teacher_name, CONTROL)
    budget = (f"{int(ctl_s.ft_steps)} fine-tune steps on top of {int(ctl_s.train_steps - ctl_s.ft_steps)}"
              if ctl_s is not None else "?")
    for name, ctl, dense in ((STUDENT, ctl_s, _find(df, STUDENT, DENSE)), (teacher_name, ctl_t, _find(df, teacher_name, DENSE))):
        if ctl is not None and dense is not None:
            out.append(f"Control ({name}): the fine-tune alone ({_steps(ctl.ft_steps)}) moves test mIoU "
                       f"{dense.miou:.3f} -> {ctl.miou:.3f}; not fine-tuning is {_ci(dense)}; every delta below is "
                       f"against this control.")
    r = _find(df, STUDENT, "structured_magnitude", 0.2)
    hi = _find(df, STUDENT, "structured_magnitude", 0.45)
    if r is not None:
        extra = (f"; at sparsity {hi.sparsity:g} ({hi.params_removed:.0%} of params removed) {_ci(hi)}"
                 if hi is not None and hi.sparsity != r.sparsity else "")
        out.append(f"Source 000 says MobileViT's accuracy falls from sparsity 0.2; here, at this budget ({budget}), "
                   f"structured (magnitude) {r.sparsity:g} of the channels = {r.params_removed:.0%} of the params, "
                   f"{r.macs_removed:.0%} of the MACs removed: {_ci(r)}{extra}.")
    t = _find(df, teacher_name, "mlp_hidden", SWIN_REPORTED_SPARSITY)
    if t is not None:
        out.append(f"Source 000 says Swin tolerates sparsity up to about 0.7; here, at this budget "
                   f"({_steps(t.ft_steps)} of fine-tune), removing {t.sparsity:g} of the MLP hidden units "
                   f"({t.params_removed:.0%} of the params, {t.macs_removed:.0%} of the MACs) gives {_ci(t)}.")
    u = _find(df, STUDENT, "unstructured", 0.6)
    if u is not None:
        out.append(f"Source 001 says unstructured 60 % gives no speed-up (31.0 -> 30.8 ms); here, zeroing "
                   f"{u.zero_fraction:.0%} of the weights removes {u.params_removed:.0%} of the params, ORT speed-up "
                   f"{u.speedup:.2f}x ({u.verdict_vs_dense_ort}), and {_ci(u)}.")
    s = _find(df, STUDENT, "structured_magnitude", 0.45)
    if s is not None:
        out.append(f"Source 001 says structured 45 % gives 2.72x (31.0 -> 11.4 ms) at -0.006 mAP; here, at this "
                   f"budget, {s.sparsity:g} of the channels removes {s.params_removed:.0%} of the params and "
                   f"{s.macs_removed:.0%} of the MACs, ORT speed-up {s.speedup:.2f}x ({s.verdict_vs_dense_ort}), "
                   f"{_ci(s)}.")
    ch = df[df.get("chosen_on_val", False) == True]  # noqa: E712
    if len(ch):
        parts = "; ".join(f"{r.sparsity:g}: {_ci(r)}" for _, r in ch.sort_values("sparsity").iterrows())
        out.append(f"Importance chosen on val: {ch.method.iloc[0]}; on test: {parts}.")
    return out


__all__ = ["SECTION", "STUDENT", "CONTROL", "DENSE", "METHOD_KIND", "METHOD_PARAM", "MASKED", "STUDENT_METHODS",
           "STUDENT_CORE", "TEACHER_CORE", "CURVE_POINTS", "method_setting", "apply_method", "calib_from_loader",
           "calibration_batches", "student", "student_plan", "teacher_plan", "masked_finetune", "pruned_variant",
           "control_variant", "dense_info", "budget", "removed", "verdict_columns", "comparison_columns",
           "variant_row", "best_importance", "section_table", "curve_frame", "what_it_means",
           "REPORTED_BY_SOURCE001"]
