"""Section ``structured_pruning`` (notebook ``02_structured_pruning``): which pruning makes the student faster?

The pruning methods are in :mod:`study.prune` (no context there); this module applies them
to the study's trained models, fine-tunes and caches the results (:func:`pruned_variant`),
and builds the section's rows and table. :func:`pruned_variant` and :func:`apply_method`
are shared with notebook 03 (:mod:`.head_pruning`).

Notebook 02's path to the methods::

    from study.sections import structured_pruning as sec
    m, info = sec.pruned_variant(ctx, student, builder, "structured_magnitude", sparsity=0.45, ...)
        -> sec.apply_method -> study.prune.prune_structured
    plan = measure.LatencyPlan(ctx, hw, onnx_dir)        # study.sections.measure (kept out of the
    plan.add(tag, m, base=base_tag)                       # cache key of the variants: not imported here)
    meas = plan.measure()    # every model of the table, interleaved: study.bench.compare_latency
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch.nn as nn

from .. import prune
from ..train import evaluate, seed_everything
from . import distillation
from .common import cached, finetune, loaders, model_fingerprint
from .rows import table_row

SECTION = "structured_pruning"
#: The student pruned by notebooks 02-04.
STUDENT = "upernet_mobilevit_s"

#: Methods of the pruning sections (02, 03) and what they do to the tensors.
METHOD_KIND = {
    "unstructured": "masked (zeros only)",
    "filter_norm_masks": "masked (zeros only)",
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

#: Student methods of notebook 02, each at every ``profile.sparsities``.
STUDENT_METHODS = ("unstructured", "filter_norm_masks", "structured_magnitude", "structured_taylor")
#: Sparsity at which source 000 reports that Swin breaks down; always added to the teacher sweep.
SWIN_REPORTED_SPARSITY = 0.7


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
    """Apply one pruning method of :data:`METHOD_KIND` to ``model`` in place.

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


# --------------------------------------------------------------------------- data, models
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


def student(ctx) -> tuple[nn.Module, str]:
    """``(KD student on CPU in eval mode, base tag "kd_student")``: :func:`.distillation.kd_student`."""
    model, _ = distillation.kd_student(ctx)
    return model.cpu().eval(), "kd_student"


def teacher_plan(profile) -> dict:
    """Teacher sweep of notebook 02: ``sparsities`` (the profile's plus 0.7) and ``ft_steps``.

    The teacher is ~5x slower to train than the student: it gets a third of the
    student's recovery fine-tune steps (at least 1).
    """
    return {"sparsities": sorted(set(profile.sparsities) | {SWIN_REPORTED_SPARSITY}),
            "ft_steps": max(1, profile.finetune_steps // 3)}


# --------------------------------------------------------------------------- cached variants
def masked_finetune(ctx, model: nn.Module, steps: int) -> None:
    """Recovery fine-tune of a masked model whose zeros stay zero (:func:`study.prune.keep_pruned_zeros`)."""
    with prune.keep_pruned_zeros(model):
        finetune(ctx, model, steps, progress=False)


def pruned_variant(ctx, base: nn.Module, builder: Callable[[], nn.Module], method: str, *,
                   sparsity: float | None = None, keep_heads: int | None = None, keep_ratio: float | None = None,
                   num_heads: int | None = None, base_tag: str, input_hw: Sequence[int], ft_steps: int,
                   val_loader, calib_batches=None) -> tuple[nn.Module, dict]:
    """Prune a copy of ``base`` with ``method``, evaluate, fine-tune, evaluate (cached).

    The amount is the one parameter of :data:`METHOD_PARAM` (see :func:`apply_method`).
    Masked methods are fine-tuned with their zeros kept (:func:`masked_finetune`), the
    others with :func:`study.sections.common.finetune`. The cache key holds the method,
    its amount, ``ft_steps``, ``input_hw``, the base model's
    :func:`~study.models.model_fingerprint` and the import closure of this module; the
    entry stores the pruning history + state_dict (:func:`study.prune.pruned_payload`) and
    the scores, so a cache hit rebuilds the model with :func:`study.prune.rebuild_pruned`
    from ``builder()`` (the dense architecture).

    Returns:
        ``(model in eval mode, info)`` with ``miou_before_ft``, ``mdice_before_ft``,
        ``scores`` (after fine-tuning: ``miou, mdice, pixel_acc, per_class_iou``),
        ``ft_steps``, ``ft_seconds`` (s).
    """
    param, value = method_setting(method, sparsity=sparsity, keep_heads=keep_heads, keep_ratio=keep_ratio,
                                  num_heads=num_heads)
    cfg = {"method": method, param: value, "ft_steps": int(ft_steps), "base": base_tag,
           "base_fp": model_fingerprint(base), "input_hw": list(input_hw)}
    fresh: dict = {}

    def compute():
        # fine-tuning draws dropout / drop-path noise: seed it, so the entry does not depend
        # on whatever the notebook ran before (the same profile and seed give the same table)
        seed_everything(ctx.seed)
        m = copy.deepcopy(base).to(ctx.device)
        fresh["model"] = m
        apply_method(m, method, **{param: value}, input_hw=input_hw, calib_batches=calib_batches)
        before = evaluate(m, val_loader, progress=False)
        t0 = time.perf_counter()
        if ft_steps > 0:
            if method in MASKED:
                masked_finetune(ctx, m, ft_steps)
            else:
                finetune(ctx, m, ft_steps, progress=False)
        ft_s = time.perf_counter() - t0
        after = evaluate(m.eval(), val_loader, progress=False)
        keep = ("miou", "mdice", "pixel_acc", "per_class_iou")
        return {"payload": prune.pruned_payload(m), "before": {k: before[k] for k in keep},
                "after": {k: after[k] for k in keep}, "ft_seconds": ft_s}

    rec = cached(ctx, f"pruned-{base_tag}-{method}-{value}", cfg, compute, modules=[__name__])
    # just computed: use it (saves a second dependency-graph trace); else rebuild from the cache
    if "model" in fresh:
        model = fresh["model"].eval()
    else:
        model = prune.rebuild_pruned(builder, rec["payload"]).to(ctx.device).eval()
    info = {"miou_before_ft": rec["before"]["miou"], "mdice_before_ft": rec["before"]["mdice"],
            "scores": rec["after"], "ft_steps": int(ft_steps), "ft_seconds": float(rec["ft_seconds"])}
    return model, info


# --------------------------------------------------------------------------- rows, table
def variant_row(ctx, model_name: str, method: str, sparsity: float, meas: dict, base_meas: dict, *,
                base_tag: str, input_hw: Sequence[int], info: dict | None = None, base_scores: dict | None = None,
                zero_fraction: float = float("nan")) -> dict:
    """One row of the section table.

    Columns after :data:`study.BASE_COLUMNS`: ``base, sparsity, kind, gmacs_tp``, the
    protocol's latency columns (``meas["columns"]``, :func:`.measure.latency_columns`: ``threads, rounds``, p50
    with its 95 % interval, p90 / p99, FPS, CV, the measuring process's peak RSS, load time,
    ``gmacs_per_s`` and ``pct_of_peak`` per runtime, ``verdict_vs_dense_<rt>``), then
    ``miou_before_ft, ft_steps, speedup`` (ORT p50 ratio dense / model), ``speedup_torch``,
    ``macs_reduction``, ``latency_reduction`` (ORT), ``latency_reduction_torch``,
    ``zero_fraction``, ``ort_error``, ``torch_error``.

    Args:
        model_name: ``model`` column; method / sparsity: what was done (``"dense"``, 0.0 for
            the unpruned model).
        meas: the row model's entry of :meth:`.measure.LatencyPlan.measure` (its ``columns``
            go into the row); ``base_meas`` the dense model's (speedups and reductions are
            relative to it; ``verdict_vs_dense_<rt>`` comes from the plan's ``base``).
        info: :func:`pruned_variant`'s info; None for the dense row, whose scores are
            ``base_scores``.
        zero_fraction: :func:`study.prune.zero_fraction` of the model (NaN: not reported).
    """
    dense = info is None
    scores = base_scores if dense else info["scores"]
    return table_row(
        ctx, SECTION, model_name, method, scores, complexity=meas, input_hw=input_hw,
        base=base_tag, sparsity=sparsity, kind=METHOD_KIND.get(method, "dense baseline"),
        gmacs_tp=meas["gmacs_tp"], **meas["columns"],
        miou_before_ft=base_scores["miou"] if dense else info["miou_before_ft"],
        ft_steps=0 if dense else info["ft_steps"],
        speedup=base_meas["latency_ms_p50_ort"] / meas["latency_ms_p50_ort"],
        speedup_torch=base_meas["latency_ms_p50_torch"] / meas["latency_ms_p50_torch"],
        macs_reduction=1 - meas["gmacs"] / base_meas["gmacs"],
        latency_reduction=1 - meas["latency_ms_p50_ort"] / base_meas["latency_ms_p50_ort"],
        latency_reduction_torch=1 - meas["latency_ms_p50_torch"] / base_meas["latency_ms_p50_torch"],
        zero_fraction=zero_fraction, ort_error=meas["ort_error"], torch_error=meas["torch_error"])


#: Numbers reported by source 001 (a detector on a Jetson Orin Nano, FP16), put next to the
#: matching student rows: (method, sparsity) -> (text, latency reduction, MACs reduction, metric drop).
REPORTED_BY_SOURCE001 = {
    ("unstructured", 0.6): ("source 001: unstructured 60%, 31.0 -> 30.8 ms, 17.2 GFLOPs dense, mAP 0.910 -> 0.905",
                            1 - 30.8 / 31.0, 0.0, 0.005),
    ("structured_magnitude", 0.45): ("source 001: structured 45% (GroupNorm p=2), 31.0 -> 11.4 ms, "
                                     "17.2 -> 9.4 GFLOPs, mAP 0.910 -> 0.904", 1 - 11.4 / 31.0, 1 - 9.4 / 17.2, 0.006),
}


def section_table(student_rows: list, teacher_rows: list, *, student_miou: float, teacher_miou: float,
                  teacher_name: str, depgraph_on_swin: str) -> pd.DataFrame:
    """The section table: student rows, teacher rows (the dense one noting the DepGraph
    outcome on Swin), source 001's reported numbers and ``miou_drop`` vs the dense model."""
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
    df["miou_drop"] = [(teacher_miou if m == teacher_name else student_miou) - v for m, v in zip(df.model, df.miou)]
    return df


__all__ = ["SECTION", "STUDENT", "METHOD_KIND", "METHOD_PARAM", "STUDENT_METHODS", "method_setting", "apply_method",
           "calib_from_loader", "calibration_batches", "student", "teacher_plan", "masked_finetune",
           "pruned_variant", "variant_row", "section_table", "REPORTED_BY_SOURCE001"]
