"""Section ``quantization`` (notebook ``05_quantization``): which precision earns speed on the edge?

The methods are in :mod:`study.quant` (ONNX export, fp16, static / dynamic INT8 PTQ,
calibration tables, op profiles, node sensitivity and selective exclusion, kernel counts,
TensorRT engines) and :mod:`study.bench` (the reported latencies). This module holds what
needs the notebook's context: the image / mask arrays of a split, the models the section
compares (baseline, KD and pruned student, UPerNet + ResNet18), the table rows, the results
table and its verdict.

Notebook 05's path to the methods::

    from study.sections import quantization as sec
    from study import quant, bench
    calib_x, _ = sec.split_arrays(ctx, "train", limit=prof.calib_images)
    models = sec.study_models(ctx)                 # trained_model / kd_student / pruned_student
    p = quant.export_onnx(models[sec.MAIN], work / "main.fp32.onnx", HW)
    q = quant.quantize_int8(p, work / "main.int8.onnx", calib_x)
    row = sec.variant_row(ctx, sec.MAIN, "static INT8 QDQ all ops", "ort", "int8", "minmax", len(calib_x),
                          complexity=..., scores=quant.onnx_scores(q, val_x, val_y, sec.THREADS),
                          bench=bench.benchmark_onnx(q, HW, **sec.bench_settings(ctx)), path=q,
                          kernels=sec.kernel_summary(q))
    df, per_class = sec.results_table(rows)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch.nn as nn

from .. import CLASS_NAMES, RARE_CLASSES, quant
from ..data import IMAGENET_MEAN, IMAGENET_STD, load_split_arrays
from .common import build, loaders, table_row, trained_model
from .distillation import kd_student
from .structured_pruning import pruned_variant

SECTION = "quantization"
#: ORT intra-op threads of every session of the section (fixed, so variants compare).
THREADS = quant.DEFAULT_THREADS
#: The registry names of the two architectures.
STUDENT = "upernet_mobilevit_s"
SECOND = "upernet_resnet18"
#: Fraction of the channels of every DepGraph group removed from the baseline student.
PRUNE_SPARSITY = 0.45
#: Model labels of the table (``model`` column).
DENSE = "mobilevit_s (baseline)"
MAIN = "mobilevit_s (KD)"
PRUNED = "mobilevit_s (pruned 45%)"
RESNET = "resnet18 (baseline)"
#: Models of the ``smoke`` profile's variant sweep (the others are exported and verified only).
SMOKE_MODELS = (MAIN, PRUNED)
NAN = float("nan")


def input_hw(ctx) -> tuple[int, int]:
    """``(image_size, image_size)`` px: the exported models' fixed input size."""
    return ctx.profile.image_size, ctx.profile.image_size


def bench_settings(ctx) -> dict:
    """Keyword arguments of :func:`study.bench.benchmark_onnx` / ``benchmark_torch``: the
    section's :data:`THREADS` and the profile's warm-up / measurement settings."""
    prof = ctx.profile
    return dict(threads=THREADS, warmup_s=prof.bench_warmup_s, min_s=prof.bench_min_s, min_runs=prof.bench_min_runs)


def split_arrays(ctx, split: str, limit: int | None = None, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images and masks of a split as model inputs, at the profile's ``image_size``.

    The first ``offset + limit`` pairs of the split are loaded (resized to ``image_size``,
    :func:`study.data.load_split_arrays`) and the first ``offset`` dropped.

    Returns:
        ``(images float32 (N, 3, S, S) ImageNet-normalised, masks int64 (N, S, S))``.

    Raises:
        study.data.DataError: a malformed data root (from the loader).
    """
    size = ctx.profile.image_size
    imgs, masks = load_split_arrays(ctx.data_root, split, size, None if limit is None else limit + offset)
    imgs, masks = imgs[offset:], masks[offset:]
    x = imgs.astype(np.float32) / 255.0
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), masks.astype(np.int64)


# --------------------------------------------------------------------------- the models

def pruned_student(ctx, student: nn.Module, sparsity: float = PRUNE_SPARSITY) -> tuple[nn.Module, dict]:
    """``student`` with ``sparsity`` of the channels of every DepGraph group removed
    (``structured_magnitude``) and ``finetune_steps`` recovery steps: the cached runner of
    notebook 02, :func:`study.sections.structured_pruning.pruned_variant` (key: the
    student's fingerprint, base tag ``baseline_student``).

    Returns:
        ``(model in eval mode, info)`` as ``pruned_variant`` returns them.
    """
    return pruned_variant(ctx, student, lambda: build(STUDENT, ctx.profile), "structured_magnitude",
                          sparsity=sparsity, base_tag="baseline_student", input_hw=input_hw(ctx),
                          ft_steps=ctx.profile.finetune_steps, val_loader=loaders(ctx)[1])


def study_models(ctx) -> dict[str, nn.Module]:
    """The four models of the section, by table label, in eval mode.

    :data:`DENSE`: the baseline student (:func:`.common.trained_model`); :data:`MAIN`: THE KD
    student (:func:`.distillation.kd_student`); :data:`PRUNED`: the baseline student pruned
    by :func:`pruned_student`; :data:`RESNET`: UPerNet + ResNet18 (source 000 found that
    fp16 did *not* speed it up). A failure of any of them is an error, not a substitution.
    """
    dense = trained_model(ctx, STUDENT)[0]
    models = {DENSE: dense, MAIN: kd_student(ctx)[0]}
    models[PRUNED] = pruned_student(ctx, dense)[0]
    models[RESNET] = trained_model(ctx, SECOND)[0]
    return {k: m.eval() for k, m in models.items()}


def slug(name: str) -> str:
    """File-name form of a model label (``"mobilevit_s (pruned 45%)"`` -> ``mobilevit_s_pruned_45``)."""
    return name.replace(" ", "_").replace("(", "").replace(")", "").replace("%", "")


def sweep_models(ctx, names: Sequence[str]) -> list[str]:
    """The models whose variants are all measured: every one, except in ``smoke`` (:data:`SMOKE_MODELS`)."""
    return [n for n in names if ctx.profile.name != "smoke" or n in SMOKE_MODELS]


def sensitivity_groups(ctx, groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """The op-type groups of the sensitivity analysis: all, or in ``smoke`` the 5 with the most nodes."""
    if ctx.profile.name == "smoke":
        return dict(sorted(groups.items(), key=lambda kv: -len(kv[1]))[:5])
    return groups


def calibration_sizes(n_available: int) -> list[int]:
    """Calibration-set sizes of the sweep: 1, N/8, N/2 and N (at least 1, distinct, sorted)."""
    n = int(n_available)
    return sorted({1, max(1, n // 8), max(1, n // 2), n})


def calibration_size_sweep(fp32_path: str | Path, calib_images: np.ndarray, val_images: np.ndarray,
                           val_masks: np.ndarray, work_dir: str | Path, prefix: str = "main",
                           threads: int = THREADS) -> pd.DataFrame:
    """mIoU / mDice of static INT8 (QDQ, MinMax, all ops) calibrated on the first ``n`` images.

    For each ``n`` of :func:`calibration_sizes`: :func:`study.quant.quantize_int8` on
    ``calib_images[:n]`` (written to ``<work_dir>/<prefix>.calib<n>.onnx``), scored with
    :func:`study.quant.onnx_scores` on the validation arrays.

    Returns:
        DataFrame ``calib_images, miou, mdice``, one row per size.
    """
    rows = []
    for n in calibration_sizes(len(calib_images)):
        q = quant.quantize_int8(fp32_path, Path(work_dir) / f"{prefix}.calib{n}.onnx", calib_images[:n])
        s = quant.onnx_scores(q, val_images, val_masks, threads)
        rows.append({"calib_images": n, "miou": s["miou"], "mdice": s["mdice"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- rows, table, verdict

def kernel_summary(path: str | Path, threads: int = THREADS) -> dict:
    """``int8_nodes, float_nodes, qdq_nodes`` of :func:`study.quant.kernel_counts` (the ORT-optimised graph)."""
    k = quant.kernel_counts(path, threads)
    return {"int8_nodes": k["int8_nodes"], "float_nodes": k["float_nodes"], "qdq_nodes": k["qdq_nodes"]}


def variant_row(ctx, model_name: str, method: str, runtime: str, precision: str, calibration: str,
                calib_images: int, *, complexity: dict, scores: dict, bench: dict, path: str | Path | None = None,
                kernels: dict | None = None, **extra) -> dict:
    """One row of the section table: one (model, runtime, precision, calibration) variant.

    Args:
        model_name: table label (:data:`MAIN` ...).
        method: e.g. ``"static INT8 QDQ all ops"``.
        runtime: ``"ort"`` or ``"torch"``; precision ``fp32 / fp16 / bf16 / int8``.
        calibration: ``"-"``, ``"dynamic"``, ``"minmax"``, ``"entropy"`` or ``"percentile"``;
            ``calib_images`` the number of calibration images (0 without calibration).
        complexity: ``params_m`` and ``gmacs`` of the fp32 model
            (:func:`study.models.model_complexity` at :func:`input_hw`).
        scores: :func:`study.metrics.segmentation_scores`-like dict (``miou``, ``mdice``,
            ``per_class_iou``).
        bench: :func:`study.bench.benchmark_onnx` / ``benchmark_torch`` result.
        path: the model file (``model_size_mb``; NaN for torch rows).
        kernels: :func:`kernel_summary` (torch rows: 0 INT8 nodes, NaN float nodes, 0 Q/DQ nodes).
        extra: further columns, after the per-class IoUs.

    Returns:
        dict with :data:`study.BASE_COLUMNS` first, then ``runtime, precision, calibration,
        calib_images, model_size_mb`` (MB), ``latency_ms_p50, latency_ms_p99`` (ms), ``fps``,
        ``peak_rss_mb`` (MB), ``iou_<rare class>``, ``int8_nodes, float_nodes, qdq_nodes`` and
        ``_per_class`` (the per-class IoU list, popped by :func:`results_table`).
    """
    per_class = scores["per_class_iou"]
    return table_row(ctx, SECTION, model_name, method, scores, complexity=complexity, input_hw=input_hw(ctx),
                     runtime=runtime, precision=precision, calibration=calibration, calib_images=calib_images,
                     model_size_mb=quant.model_size_mb(path) if path else NAN,
                     latency_ms_p50=bench["latency_ms_p50"], latency_ms_p99=bench["latency_ms_p99"],
                     fps=bench["fps"], peak_rss_mb=bench["peak_rss_mb"],
                     **{f"iou_{k}": per_class[CLASS_NAMES.index(k)] for k in RARE_CLASSES},
                     **(kernels or {"int8_nodes": 0, "float_nodes": NAN, "qdq_nodes": 0}),
                     _per_class=list(per_class), **extra)


def reported_by_source(row) -> str:
    """What the sources reported for the setting of a table row ("" when nothing)."""
    if row.precision == "fp16" and row.model.startswith("mobilevit"):
        return "source 000: Jetson Nano GPU fp16, MobileViT 3.11 -> 4.49 FPS (1.44x)"
    if row.precision == "fp16" and row.model.startswith("resnet18"):
        return "source 000: Jetson Nano GPU fp16, ResNet18 throughput decreased"
    if "stale" in row.method:
        return "source 001: dense model's INT8 calibration cache useless after pruning; re-calibrate"
    return ""


def results_table(rows: Sequence[dict]) -> tuple[pd.DataFrame, np.ndarray]:
    """The section table from :func:`variant_row` rows, and the per-class IoUs.

    Adds ``speedup_vs_ort_fp32`` (ORT fp32 p50 latency of the same model / this p50),
    ``d_miou_vs_fp32`` and ``d_iou_<rare class>`` (this minus the model's ORT fp32 row) and
    ``reported_by_source``.

    Returns:
        ``(table, per_class)``: ``per_class`` is float ``(rows, classes)`` in table order.

    Raises:
        KeyError: a model has no ``"ORT fp32"`` row.
    """
    df = pd.DataFrame(list(rows))
    fp32_ref = df[df.method == "ORT fp32"].set_index("model")
    df["speedup_vs_ort_fp32"] = fp32_ref.loc[df.model, "latency_ms_p50"].values / df.latency_ms_p50
    df["d_miou_vs_fp32"] = df.miou - fp32_ref.loc[df.model, "miou"].values
    for k in RARE_CLASSES:
        df[f"d_iou_{k}"] = df[f"iou_{k}"] - fp32_ref.loc[df.model, f"iou_{k}"].values
    df["reported_by_source"] = df.apply(reported_by_source, axis=1)
    per_class = np.array(df.pop("_per_class").tolist(), dtype=float)
    return df, per_class


#: The issue's budget: INT8 at least this much faster than ORT fp32 ...
SPEEDUP_TARGET = 1.5
#: ... with at most this mIoU loss (fraction, i.e. 1 point).
MIOU_LOSS_BUDGET = 0.01
#: Variants of the main student compared with ORT fp32 in the verdict.
VERDICT_METHODS = ("ORT fp16 (keep fp32 I/O)", "dynamic INT8", "static INT8 QOperator all ops",
                   "static INT8 QDQ selective")


def verdict(df: pd.DataFrame, main: str = MAIN) -> list[str]:
    """Lines computed from the table: each :data:`VERDICT_METHODS` variant of ``main`` vs ORT
    fp32 (latency, speed-up, mIoU change), the fastest INT8 variant, and whether the issue's
    budget (:data:`SPEEDUP_TARGET` with at most :data:`MIOU_LOSS_BUDGET` lost) is met."""
    m = df[df.model == main].set_index("method")
    f = m.loc["ORT fp32"]
    lines = []
    for meth in VERDICT_METHODS:
        r = m.loc[meth]
        r = r.iloc[0] if isinstance(r, pd.DataFrame) else r
        lines.append(f"{meth:32s} {r.latency_ms_p50:7.1f} ms vs fp32 {f.latency_ms_p50:.1f} ms -> "
                     f"{f.latency_ms_p50 / r.latency_ms_p50:.2f}x; mIoU {100 * (r.miou - f.miou):+.2f} points")
    best = df[(df.model == main) & (df.precision == "int8")].sort_values("latency_ms_p50").iloc[0]
    lines.append(f"fastest INT8 variant of {main}: {best.method} ({best.calibration}), "
                 f"{best.speedup_vs_ort_fp32:.2f}x ORT fp32, mIoU {100 * best.d_miou_vs_fp32:+.2f} points")
    met = best.speedup_vs_ort_fp32 >= SPEEDUP_TARGET and best.d_miou_vs_fp32 >= -MIOU_LOSS_BUDGET
    lines.append("issue budget: INT8 >= 1.5x faster with <= 1 mIoU point lost -> " +
                 ("met" if met else "NOT met on this CPU (see the profiler figure: where INT8 time goes)"))
    return lines


__all__ = ["SECTION", "THREADS", "STUDENT", "SECOND", "PRUNE_SPARSITY", "DENSE", "MAIN", "PRUNED", "RESNET",
           "SMOKE_MODELS", "input_hw", "bench_settings", "split_arrays", "pruned_student", "study_models",
           "slug", "sweep_models", "sensitivity_groups", "calibration_sizes", "calibration_size_sweep", "kernel_summary", "variant_row", "reported_by_source",
           "results_table", "verdict", "trained_model", "kd_student", "SPEEDUP_TARGET", "MIOU_LOSS_BUDGET"]
