"""Section ``quantization`` (notebook ``05_quantization``): which precision earns speed on the edge?

The methods are in :mod:`study.quant` (ONNX export, fp16, static / dynamic INT8 PTQ, the
INT8 recipes of issue #15 (:data:`study.quant.INT8_RECIPES`), calibration tables, op
profiles, node sensitivity, kernel counts, TensorRT engines) and :mod:`study.bench` (THE
latency protocol, :func:`study.bench.compare_latency`). This module holds what needs the
notebook's context: the calibration set and the evaluation arrays of the section, the
models it compares (baseline, KD and pruned student, UPerNet + ResNet18), the interleaved
measurement of a model's variants, the table rows, the results table and its verdicts.

Notebook 05's path to the methods::

    from study.sections import quantization as sec
    calib_x = sec.calibration_images(ctx)                 # THE calibration set (train split)
    eval_x, eval_y = sec.eval_arrays(ctx)                  # the section's evaluation split
    models = sec.study_models(ctx)
    fp32 = quant.export_onnx(models[sec.MAIN], work / "main.fp32.onnx", sec.input_hw(ctx))
    files = sec.build_recipes(fp32, quant.INT8_RECIPES.values(), calib_x, work)
    rows = sec.measure_variants(ctx, sec.MAIN, fp32, {**files}, eval_x, eval_y, complexity)
    df, per_class = sec.results_table(rows)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch.nn as nn

from .. import CLASS_NAMES, RARE_CLASSES, bench, quant
from ..data import IMAGENET_MEAN, IMAGENET_STD, load_split_arrays
from .common import build, loaders, trained_model
from .rows import table_row
from .distillation import kd_student
from .measure import cached_file, cached_latency, export_model, file_digest, protocol
from .structured_pruning import pruned_variant

SECTION = "quantization"
#: The split calibration images come from (never the evaluation split).
CALIB_SPLIT = "train"
#: The split the table's accuracy is measured on (a parameter of :func:`eval_arrays`): the
#: held-out test split; the selective recipe chooses its float groups on train images.
EVAL_SPLIT = "test"
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
#: The reference row of every interleaved group.
FP32 = "ORT fp32"
#: The study's default INT8 recipe (also used by the calibration-size and stale-calibration runs).
DEFAULT_RECIPE = "qdq_u8s8_pc"
#: Recipes measured on the models other than :data:`MAIN` and :data:`RESNET`.
SHORT_RECIPES = ("qdq_u8s8_pc", "qoperator_u8s8_pc")
#: The issue's budget: INT8 at least this much faster than ORT fp32 (same threads) ...
SPEEDUP_TARGET = 1.5
#: ... with at most this mIoU loss (fraction, i.e. 1 point).
MIOU_LOSS_BUDGET = 0.01
NAN = float("nan")


def input_hw(ctx) -> tuple[int, int]:
    """``(image_size, image_size)`` px: the exported models' fixed input size."""
    return ctx.profile.image_size, ctx.profile.image_size


def threads() -> int:
    """ORT intra-op threads of the section's accuracy runs and op profiles: the study's one
    thread policy, :func:`study.bench.default_threads` (the latency rows record theirs)."""
    return bench.default_threads()


def split_arrays(ctx, split: str, limit: int | None = None, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images and masks of a split as model inputs, at the profile's ``image_size``.

    The first ``offset + limit`` pairs of the split (sorted file order) are loaded (resized
    to ``image_size``, :func:`study.data.load_split_arrays`, no augmentation) and the first
    ``offset`` dropped.

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


def calibration_images(ctx, n: int | None = None) -> np.ndarray:
    """THE calibration set of every INT8 path of the study (static INT8 of every recipe,
    calibration tables, TensorRT INT8): the first ``n`` (default the profile's
    ``calib_images``) images of the TRAIN split, clean (resized to ``image_size``, the
    export size; ImageNet-normalised; no augmentation), identical in every run
    (:func:`study.quant.calibration_set`).

    Drop-in replacement of :func:`study.sections.deployment.calibration_images` (same
    signature and output).

    Returns:
        float32 ``(n, 3, S, S)``.

    Raises:
        ValueError: the train split holds fewer than ``n`` images, or ``n < 1``.
    """
    n = ctx.profile.calib_images if n is None else int(n)
    if n < 1:
        raise ValueError(f"calibration_images: n must be >= 1; got {n}")
    x, _ = split_arrays(ctx, CALIB_SPLIT, limit=n)
    return quant.calibration_set(x, n, input_hw(ctx))


def eval_arrays(ctx, split: str = EVAL_SPLIT, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The section's evaluation images and masks (:func:`split_arrays` of ``split``, the first
    ``limit``, default the profile's ``n_val``)."""
    if split == CALIB_SPLIT:
        raise ValueError(f"eval_arrays: the {CALIB_SPLIT!r} split holds the calibration images; evaluate elsewhere")
    if limit is None and getattr(ctx.profile, "dry_run", False):
        limit = ctx.profile.n_test or ctx.profile.n_val
    return split_arrays(ctx, split, limit=limit)


_SELECTION: dict = {}


def selection_arrays(ctx) -> tuple[np.ndarray, np.ndarray]:
    """The val split as model inputs (memoised per context): what recipe choices are made on
    (``val_miou`` column; :func:`recipe_summary`'s budget check), never the reported test."""
    key = (id(ctx), ctx.profile.name, bool(getattr(ctx.profile, "dry_run", False)), str(ctx.data_root))
    if key not in _SELECTION:
        _SELECTION.clear()
        _SELECTION[key] = split_arrays(ctx, "val", limit=(ctx.profile.n_val if getattr(ctx.profile, "dry_run", False) else None))
    return _SELECTION[key]


_BUDGETS: dict = {}


def model_budgets(ctx) -> dict:
    """Weight updates behind each model of the table (``train_steps``): label -> steps.

    :data:`DENSE` and :data:`RESNET`: their section-0 training; :data:`MAIN`: its KD run (the
    same budget, :func:`.distillation.kd_steps`); :data:`PRUNED`: the dense student's steps
    plus the recovery fine-tune (``finetune_steps``). Post-training quantization adds none.
    Memoised per context.
    """
    key = (id(ctx), ctx.profile.name, bool(getattr(ctx.profile, "dry_run", False)))
    if key not in _BUDGETS:
        dense = trained_model(ctx, STUDENT)[1]["train_steps"]
        _BUDGETS.clear()
        _BUDGETS[key] = {DENSE: dense, MAIN: kd_student(ctx)[1]["train_steps"],
                         PRUNED: dense + int(ctx.profile.finetune_steps),
                         RESNET: trained_model(ctx, SECOND)[1]["train_steps"]}
    return _BUDGETS[key]


def sensitivity_images(ctx, n: int = 8) -> np.ndarray:
    """Images of the selective-INT8 sensitivity scan: ``n`` TRAIN images after the
    calibration set (so the choice of float nodes sees neither calibration nor evaluation
    images; it needs no labels: it compares with the fp32 model's arg-max)."""
    x, _ = split_arrays(ctx, CALIB_SPLIT, limit=n, offset=ctx.profile.calib_images)
    if len(x) == 0:
        x, _ = split_arrays(ctx, CALIB_SPLIT, limit=n)
    return x


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
    by :func:`pruned_student`; :data:`RESNET`: UPerNet + ResNet18 (the control that gains from
    INT8; source 000 found that fp16 did *not* speed it up). A failure of any of them is an
    error, not a substitution.
    """
    dense = trained_model(ctx, STUDENT)[0]
    models = {DENSE: dense, MAIN: kd_student(ctx)[0]}
    models[PRUNED] = pruned_student(ctx, dense)[0]
    models[RESNET] = trained_model(ctx, SECOND)[0]
    return {k: m.eval() for k, m in models.items()}


def slug(name: str) -> str:
    """File-name form of a model label (``"mobilevit_s (pruned 45%)"`` -> ``mobilevit_s_pruned_45``)."""
    return name.replace(" ", "_").replace("(", "").replace(")", "").replace("%", "")


def recipes_for(ctx, model_name: str) -> list[quant.Int8Recipe]:
    """The INT8 recipes measured on a model: all of :data:`study.quant.INT8_RECIPES` for the
    KD student (:data:`MAIN`) and the ResNet18 control (in ``smoke`` the control gets
    :data:`SHORT_RECIPES` only, to keep the run short), :data:`SHORT_RECIPES` otherwise."""
    if model_name == MAIN or (model_name == RESNET and ctx.profile.name != "smoke"):
        return list(quant.INT8_RECIPES.values())
    return [quant.INT8_RECIPES[k] for k in SHORT_RECIPES]


def sweep_models(ctx, names: Sequence[str]) -> list[str]:
    """The models of the per-model precision sweep besides :data:`MAIN` and :data:`RESNET`:
    :data:`DENSE` and :data:`PRUNED` (``smoke``: :data:`PRUNED` only)."""
    return [n for n in names if n not in (MAIN, RESNET) and (ctx.profile.name != "smoke" or n == PRUNED)]


def sensitivity_groups(ctx, groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """The candidate groups of the selective scan: every op-type group except the
    multiply-accumulate ones (:data:`study.quant.MAC_OP_TYPES`, which INT8 is for: keeping
    them float would trade the speed away), in ``smoke`` the 5 with the most nodes."""
    groups = {k: v for k, v in groups.items() if k not in quant.MAC_OP_TYPES}
    if ctx.profile.name == "smoke":
        return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:5])
    return groups


def selective_recipe(float_groups: Sequence[str]) -> quant.Int8Recipe:
    """The default recipe with the op-type groups ``float_groups`` (chosen by accuracy,
    :func:`study.quant.select_nodes_to_exclude`) kept in float: a deterministic recipe."""
    types = tuple(sorted(float_groups))
    return dataclasses.replace(
        quant.INT8_RECIPES[DEFAULT_RECIPE], name="qdq_selective",
        label=f"QDQ U8S8 per-channel, selective (float: {', '.join(types) or 'none'})", float_op_types=types,
        doc="nodes_to_exclude = the op-type groups whose float version raised the arg-max agreement with fp32 "
            "on train images (accuracy only: deterministic; timed separately).")


def build_recipes(fp32_path: str | Path, recipes: Iterable[quant.Int8Recipe], calib_images: np.ndarray,
                  work_dir: str | Path, prefix: str | None = None, ctx=None) -> dict[str, Path]:
    """Quantize one fp32 model with each recipe (:func:`study.quant.quantize_recipe`).

    With ``ctx``, every INT8 file is made once and kept in the cache
    (:func:`.measure.cached_file`, keyed by the fp32 file's bytes, the recipe, the
    calibration images and the :mod:`study.quant` source): a warm run copies it.

    Args:
        fp32_path: the exported fp32 model.
        recipes: :class:`study.quant.Int8Recipe` objects.
        calib_images: :func:`calibration_images` of the section.
        work_dir: folder of ``<prefix>.<recipe name>.onnx`` and of the calibration tables.
        prefix: file-name prefix (default the fp32 file's stem).

    Returns:
        ``{recipe name: path}`` in the recipes' order.
    """
    work_dir = Path(work_dir)
    prefix = prefix or Path(fp32_path).stem
    if ctx is None:
        return {r.name: quant.quantize_recipe(fp32_path, work_dir / f"{prefix}.{r.name}.onnx", r, calib_images,
                                              table_dir=work_dir) for r in recipes}
    src, cal = file_digest(fp32_path), array_digest(calib_images)
    out = {}
    for r in recipes:
        out[r.name] = cached_file(
            ctx, work_dir / f"{prefix}.{r.name}.onnx", {"int8": src, "recipe": repr(r), "calib": cal},
            lambda p, r=r: quant.quantize_recipe(fp32_path, p, r, calib_images, table_dir=work_dir))
    return out


def export_fp32(ctx, model: nn.Module, path: str | Path) -> Path:
    """:func:`study.quant.export_onnx` of ``model`` at :func:`input_hw`, made once per weights
    fingerprint and kept in the cache (:func:`.measure.cached_file`)."""
    return export_model(ctx, model.eval(), path, input_hw(ctx))


def array_digest(a: np.ndarray) -> str:
    """SHA-256 (16 hex chars) of an array's shape, dtype and bytes (e.g. the calibration images
    an INT8 model was calibrated on: part of its cache key)."""
    import hashlib

    a = np.ascontiguousarray(a)
    return hashlib.sha256(str((a.shape, a.dtype)).encode() + a.tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------- measurement

def _pack(obj):
    """``obj`` in what a ``weights_only`` cache load accepts: numpy arrays as tensors, numpy
    scalars as Python numbers, containers recursively (inverse: :func:`_unpack`)."""
    import torch

    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, dict):
        return {str(k): _pack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_pack(v) for v in obj]
    return obj.item() if isinstance(obj, np.generic) else obj


def _unpack(obj):
    """Inverse of :func:`_pack`."""
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        return {k: _unpack(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v) for v in obj]
    return obj


def cached_result(ctx, name: str, key: dict, compute):
    """``compute()`` (numbers, numpy arrays, lists and dicts of them) kept in the context's
    cache under ``name`` / ``key`` (+ the source of :mod:`study.quant` and :mod:`study.metrics`):
    a warm run reads it (issue #13). ``key`` must name every input (file digests, array
    digests, settings). Without a cache on ``ctx`` (tests) it just computes.

    Returns:
        what ``compute()`` returns (numpy arrays keep their dtype and shape; tuples come back
        as lists).

    Raises:
        whatever ``compute()`` raises (nothing is stored then).
    """
    cache = getattr(ctx, "cache", None) if ctx is not None else None
    if cache is None or getattr(cache, "root", None) is None:
        return compute()
    return _unpack(cache.memo(name, key, lambda: _pack(compute()), modules=["study.quant", "study.metrics"]))


def scores(ctx, path: str | Path, images: np.ndarray, masks: np.ndarray) -> dict:
    """:func:`study.quant.onnx_scores` of an ONNX file at :func:`threads`, computed once per
    (file bytes, images, masks) and kept in the cache: a warm run does not re-run ORT over
    the evaluation split (issue #13). The numbers are those of ``onnx_scores``.

    Args:
        path: the ONNX model. images: float32 ``(N, 3, S, S)``. masks: int64 ``(N, S, S)``.

    Returns:
        ``miou``, ``mdice``, ``pixel_acc`` (floats), ``per_class_iou`` float64 ``(C,)``,
        ``confusion`` int64 ``(C, C)``.

    Raises:
        FileNotFoundError: ``path`` does not exist. ValueError: from ``onnx_scores``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"scores: ONNX file {path} does not exist")
    key = {"file": file_digest(path), "x": array_digest(images), "y": array_digest(masks), "threads": threads()}
    return cached_result(ctx, "onnx-scores", key, lambda: quant.onnx_scores(path, images, masks, threads()))


def sensitivity(ctx, fp32_path: str | Path, calib_images: np.ndarray, images: np.ndarray,
                groups: dict[str, list[str]], work_dir: str | Path) -> pd.DataFrame:
    """:func:`study.quant.node_sensitivity` (``mode="exclude"``, one ORT thread) of the fp32
    model, kept in the cache keyed by the file's bytes, the calibration and scan images and
    the groups (a warm run reads it).

    Args:
        fp32_path: the fp32 ONNX model. calib_images: float32 ``(N, 3, S, S)``.
        images: float32 ``(M, 3, S, S)`` scan images. groups: ``{group: [node names]}``.
        work_dir: folder of the variant models.

    Returns:
        the ``node_sensitivity`` DataFrame (one row per variant, reference rows first;
        ``sqnr_db`` in dB, ``miou`` / ``argmax_agreement`` fractions).

    Raises:
        ValueError: images of the wrong shape (from ``node_sensitivity``).
    """
    key = {"file": file_digest(fp32_path), "calib": array_digest(calib_images), "x": array_digest(images),
           "groups": {k: list(v) for k, v in groups.items()}}
    recs = cached_result(ctx, "node-sensitivity", key, lambda: quant.node_sensitivity(
        fp32_path, calib_images, images, work_dir=work_dir, groups=groups, threads=1).to_dict("records"))
    return pd.DataFrame(recs)


def derived_model(ctx, kind: str, fp32_path: str | Path, dest: str | Path) -> Path:
    """``dynamic`` INT8 (:func:`study.quant.quantize_dynamic_int8`) or ``fp16``
    (:func:`study.quant.convert_fp16`, fp32 I/O kept) of an fp32 ONNX file, made once per
    fp32 file and kept in the cache (:func:`.measure.cached_file`).

    Args:
        kind: ``"dynamic"`` or ``"fp16"``. fp32_path: the fp32 ONNX model. dest: output file.

    Returns:
        ``Path(dest)``.

    Raises:
        ValueError: an unknown ``kind``. FileNotFoundError: ``fp32_path`` does not exist.
    """
    makers = {"dynamic": quant.quantize_dynamic_int8, "fp16": quant.convert_fp16}
    if kind not in makers:
        raise ValueError(f"derived_model: kind must be one of {sorted(makers)}; got {kind!r}")
    return cached_file(ctx, dest, {kind: file_digest(fp32_path)}, lambda p: makers[kind](fp32_path, p))


def paired_speedup(ref: Mapping, row: Mapping, n_boot: int = 2000) -> tuple[float, float, float]:
    """Speed-up of ``row`` over ``ref`` from one interleaved :func:`study.bench.compare_latency`
    call: the median over rounds of ``ref_p50 / row_p50`` of the SAME round (both timed in
    it, so slow rounds cancel), with its 95 % bootstrap interval (:func:`study.bench.median_ci`).

    Args:
        ref, row: protocol rows (``round_p50s_ms``: the round p50s joined by ``;``).

    Returns:
        ``(speedup, ci_low, ci_high)``; NaN interval with fewer than 2 rounds, all NaN when
        a row was not measured.
    """
    def rounds(r):
        s = str(r.get("round_p50s_ms") or "")
        return np.array([float(v) for v in s.split(";") if v.strip()], dtype=float)

    a, b = rounds(ref), rounds(row)
    if a.size == 0 or a.size != b.size:
        return NAN, NAN, NAN
    ratio = a / b
    lo, hi = bench.median_ci(ratio, n_boot=n_boot)
    return float(np.median(ratio)), lo, hi


def node_summary(path: str | Path) -> dict:
    """``int8_nodes, float_nodes, qdq_nodes, q_nodes, dq_nodes, transpose_nodes, leftover_nodes``
    of :func:`study.quant.kernel_counts` (the ORT-optimised graph that really runs)."""
    k = quant.kernel_counts(path, threads())
    return {c: k[c] for c in ("int8_nodes", "float_nodes", "qdq_nodes", "q_nodes", "dq_nodes",
                               "transpose_nodes", "leftover_nodes")}


def measure_variants(ctx, model_name: str, variants: Mapping[str, tuple], eval_x: np.ndarray, eval_y: np.ndarray,
                     complexity: dict, group: str = "recipes", split: str = EVAL_SPLIT,
                     n_threads: int | None = None, rounds: int | None = None) -> list[dict]:
    """Score every ONNX variant of one model and time them all INTERLEAVED with its ORT fp32.

    One :func:`study.bench.compare_latency` call (fresh process per measurement, rounds
    A B C ... rotated, the protocol settings of :func:`.measure.protocol`) over the fp32
    model (the first variant, method :data:`FP32`) and every other variant, so each
    variant's speed-up is paired round by round with the fp32 model measured at the same
    threads (:func:`paired_speedup`).

    Args:
        model_name: table label.
        variants: ``{method: (path, precision, calibration, calib_images, recipe_name)}``;
            must contain :data:`FP32`. ``recipe_name`` "" for non-recipe variants.
        eval_x, eval_y: evaluation images / masks (:func:`eval_arrays`).
        complexity: ``params_m`` and ``gmacs`` of the fp32 model.
        group: name of this interleaved measurement (the ``group`` column: rows compare
            only within a group; ``"recipes"`` is the main one, :func:`recipe_summary`).
        split: name of the evaluation split (the ``eval_split`` column).
        n_threads: intra-op threads (default: the protocol's, the study's policy).
        rounds: rounds (default: the protocol's).

    Returns:
        list of :func:`variant_row` dicts, fp32 first.

    Raises:
        KeyError: no :data:`FP32` variant.
    """
    if FP32 not in variants:
        raise KeyError(f"measure_variants: {model_name} has no {FP32!r} variant")
    settings = protocol(ctx)
    if n_threads is not None:
        settings["threads"] = int(n_threads)
    if rounds is not None:
        settings["rounds"] = int(rounds)
    names = [FP32] + [m for m in variants if m != FP32]
    lat = cached_latency(ctx, {m: variants[m][0] for m in names}, None, errors="record", **settings)
    lat = lat.set_index("name")
    ref = lat.loc[FP32]
    sel_x, sel_y = selection_arrays(ctx)
    rows = []
    for m in names:
        path, prec, cal, n, recipe = variants[m]
        sc = scores(ctx, path, eval_x, eval_y)
        sc["val_miou"] = scores(ctx, path, sel_x, sel_y)["miou"]
        sp = paired_speedup(ref, lat.loc[m])
        rows.append(variant_row(ctx, model_name, m, "ort", prec, cal, n, complexity=complexity, scores=sc,
                                lat=lat.loc[m], path=path, kernels=node_summary(path), recipe=recipe,
                                group=group, eval_split=split, val_miou=sc["val_miou"],
                                speedup_vs_ort_fp32=sp[0], speedup_ci95_low=sp[1],
                                speedup_ci95_high=sp[2],
                                latency_verdict_vs_fp32="reference" if m == FP32 else
                                bench.latency_verdict(lat.loc[m], ref)))
    return rows


def variant_row(ctx, model_name: str, method: str, runtime: str, precision: str, calibration: str,
                calib_images: int, *, complexity: dict, scores: dict, lat, path: str | Path | None = None,
                kernels: dict | None = None, **extra) -> dict:
    """One row of the section table: one (model, runtime, precision, graph) variant.

    Args:
        model_name: table label (:data:`MAIN` ...).
        method: e.g. ``"QDQ U8S8 per-channel, all ops (quant_pre_process)"``.
        runtime: ``"ort"`` or ``"torch"``; precision ``fp32 / fp16 / bf16 / int8``.
        calibration: ``"-"``, ``"dynamic"``, ``"minmax"``, ``"entropy"`` or ``"percentile"``;
            ``calib_images`` the number of calibration images (0 without calibration).
        complexity: ``params_m`` and ``gmacs`` of the fp32 model.
        scores: :func:`study.metrics.segmentation_scores`-like dict (``miou``, ``mdice``,
            ``per_class_iou``).
        lat: a :func:`study.bench.compare_latency` row (mapping).
        path: the model file (``model_size_mb``; NaN for torch rows).
        kernels: :func:`node_summary` (torch rows: NaN).
        extra: further columns (``recipe``, ``eval_split``, speed-up ...), after the rare-class IoUs.

    Returns:
        dict with :data:`study.BASE_COLUMNS` first, ``split``, ``train_steps`` (weight updates
        behind the model, :func:`model_budgets`), ``train_images``, then ``runtime, precision, calibration,
        calib_images, model_size_mb`` (MB), ``threads, rounds``, ``latency_ms_p50`` with
        ``latency_ms_p50_ci95_low/high``, ``latency_ms_p90, latency_ms_p99`` (ms), ``fps``,
        ``cv_p50``, ``peak_rss_mb`` (MB, the measuring process alone), ``load_s``,
        ``iou_<rare class>``, the node counts and ``_per_class`` (popped by
        :func:`results_table`).
    """
    per_class = scores["per_class_iou"]
    kn = kernels or {k: NAN for k in ("int8_nodes", "float_nodes", "qdq_nodes", "q_nodes", "dq_nodes",
                                      "transpose_nodes", "leftover_nodes")}
    return table_row(ctx, SECTION, model_name, method, scores, complexity=complexity, input_hw=input_hw(ctx),
                     split=extra.get("eval_split", EVAL_SPLIT),
                     train_steps=model_budgets(ctx).get(model_name, NAN), runtime=runtime, precision=precision, calibration=calibration, calib_images=calib_images,
                     model_size_mb=quant.model_size_mb(path) if path else NAN,
                     threads=int(lat["threads"]), rounds=int(lat["rounds"]),
                     latency_ms_p50=lat["latency_ms_p50"], latency_ms_p50_ci95_low=lat["latency_ms_p50_ci95_low"],
                     latency_ms_p50_ci95_high=lat["latency_ms_p50_ci95_high"], latency_ms_p90=lat["latency_ms_p90"],
                     latency_ms_p99=lat["latency_ms_p99"], fps=lat["fps"], cv_p50=lat["cv_p50"],
                     peak_rss_mb=lat["peak_rss_mb"], load_s=lat["load_s"], timing=lat.get("timing", "measured"),
                     **{f"iou_{k}": per_class[CLASS_NAMES.index(k)] for k in RARE_CLASSES},
                     **kn, _per_class=list(per_class), **extra)


def torch_rows(ctx, model_name: str, variants: Mapping[str, tuple], eval_x: np.ndarray, eval_y: np.ndarray,
               complexity: dict, work_dir: str | Path, split: str = EVAL_SPLIT) -> list[dict]:
    """Torch eager variants of one model timed interleaved by the protocol (``runtime="torch"``).

    Args:
        variants: ``{method: (module, precision)}``; the modules take and return float32.

    Returns:
        :func:`variant_row` dicts (node counts NaN; no ORT speed-up: another runtime).
    """
    work_dir = Path(work_dir)
    files = {m: bench.save_torch_model(mod, work_dir / f"{slug(model_name)}.{slug(m)}.pt")
             for m, (mod, _) in variants.items()}
    lat = cached_latency(ctx, files, input_hw(ctx), runtime="torch", errors="record", **protocol(ctx))
    lat = lat.set_index("name")
    rows = []
    for m, (mod, prec) in variants.items():
        scores = quant.scores_from_logits(quant.torch_predict(mod, eval_x), eval_y)
        rows.append(variant_row(ctx, model_name, m, "torch", prec, "-", 0, complexity=complexity, scores=scores,
                                lat=lat.loc[m], recipe="", group="torch", eval_split=split, speedup_vs_ort_fp32=NAN,
                                speedup_ci95_low=NAN, speedup_ci95_high=NAN,
                                latency_verdict_vs_fp32="other runtime"))
    return rows


def calibration_sizes(n_available: int) -> list[int]:
    """Calibration-set sizes of the sweep: 1, N/8, N/2 and N (at least 1, distinct, sorted)."""
    n = int(n_available)
    return sorted({1, max(1, n // 8), max(1, n // 2), n})


def calibration_size_sweep(fp32_path: str | Path, calib_images: np.ndarray, eval_images: np.ndarray,
                           eval_masks: np.ndarray, work_dir: str | Path, prefix: str = "main",
                           ctx=None) -> pd.DataFrame:
    """mIoU / mDice of the default recipe calibrated on the first ``n`` images of the calibration set.

    For each ``n`` of :func:`calibration_sizes`: :func:`study.quant.quantize_recipe`
    (:data:`DEFAULT_RECIPE`) on :func:`study.quant.calibration_set` ``(calib_images, n)``,
    written to ``<work_dir>/<prefix>.calib<n>.onnx``, scored with
    :func:`study.quant.onnx_scores`. With ``ctx``, the INT8 files and their scores are kept
    in the cache (:func:`build_recipes`, :func:`scores`): a warm run reads them.

    Returns:
        DataFrame ``calib_images, miou, mdice``, one row per size.
    """
    rows = []
    for n in calibration_sizes(len(calib_images)):
        q = _quantize(ctx, fp32_path, Path(work_dir) / f"{prefix}.calib{n}.onnx",
                      quant.calibration_set(calib_images, n), work_dir)
        s = scores(ctx, q, eval_images, eval_masks)
        rows.append({"calib_images": n, "miou": s["miou"], "mdice": s["mdice"]})
    return pd.DataFrame(rows)


def _quantize(ctx, fp32_path, dest: Path, calib_images: np.ndarray, work_dir, method: str = "minmax") -> Path:
    """:data:`DEFAULT_RECIPE` with calibration ``method`` on ``calib_images``, written to ``dest``
    (kept in the cache with ``ctx``, keyed like :func:`build_recipes`)."""
    make = lambda p: quant.quantize_recipe(fp32_path, p, DEFAULT_RECIPE, calib_images, method=method,  # noqa: E731
                                           table_dir=work_dir)
    if ctx is None:
        return Path(make(dest))
    return cached_file(ctx, dest, {"int8": file_digest(fp32_path), "recipe": DEFAULT_RECIPE, "method": method,
                                   "calib": array_digest(calib_images)}, make)


def calibration_method_sweep(fp32_path: str | Path, calib_images: np.ndarray, eval_images: np.ndarray,
                             eval_masks: np.ndarray, work_dir: str | Path, prefix: str = "main",
                             methods: Sequence[str] = ("minmax", "entropy", "percentile"),
                             ctx=None) -> pd.DataFrame:
    """mIoU / mDice of the default recipe calibrated on the whole calibration set with each
    calibration method (MinMax, Entropy, Percentile 99.999; ORT docs, "Quantize ONNX Models",
    *Static Quantization*). The graphs differ only in their scales, so they are not timed
    (their latency is the default recipe's). With ``ctx``, files and scores are cached as in
    :func:`calibration_size_sweep`.

    Returns:
        DataFrame ``calibration, calib_images, miou, mdice``, one row per method.
    """
    rows = []
    for meth in methods:
        q = _quantize(ctx, fp32_path, Path(work_dir) / f"{prefix}.{meth}.onnx", calib_images, work_dir, meth)
        s = scores(ctx, q, eval_images, eval_masks)
        rows.append({"calibration": meth, "calib_images": len(calib_images), "miou": s["miou"], "mdice": s["mdice"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- where the time goes

def op_breakdown(paths: Mapping[str, str | Path], input_hw_, runs: int = 20, n_threads: int | None = None,
                 images=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ORT profiler breakdown of several models: per op type and per category.

    Args:
        paths: ``{label: .onnx}``.
        input_hw_: ``(H, W)`` px.
        runs: profiled runs per model (after 5 warm-up runs).
        n_threads: intra-op threads (default :func:`threads`).

    Returns:
        ``(by_type, by_category)``: long DataFrames with a ``variant`` column;
        ``by_type`` = :func:`study.quant.op_time_by_type` rows, ``by_category`` =
        :func:`study.quant.op_time_categories` rows (ms per inference, share of kernel time).
    """
    by_type, by_cat = [], []
    for label, p in paths.items():
        nodes = quant.profile_ops(p, input_hw_, runs=runs, threads=n_threads or threads(), images=images)
        by_type.append(quant.op_time_by_type(nodes).assign(variant=label))
        by_cat.append(quant.op_time_categories(nodes).assign(variant=label))
    return pd.concat(by_type, ignore_index=True), pd.concat(by_cat, ignore_index=True)


def explain_speedup(by_cat: pd.DataFrame, fp32_label: str, int8_label: str) -> list[str]:
    """Lines computed from an :func:`op_breakdown` category table: the fraction of fp32 time
    in Conv/MatMul/Gemm, how much faster those kernels run in INT8, the Amdahl bound that
    implies (:func:`study.quant.amdahl_bound`), and what INT8 adds (Q/DQ, layout, other)."""
    f = by_cat[by_cat.variant == fp32_label].set_index("category")
    q = by_cat[by_cat.variant == int8_label].set_index("category")
    mac_f = f.loc["Conv/MatMul/Gemm float", "ms_per_run"] + f.loc["Conv/MatMul/Gemm int8", "ms_per_run"]
    mac_q_int8 = q.loc["Conv/MatMul/Gemm int8", "ms_per_run"]
    mac_q = mac_q_int8 + q.loc["Conv/MatMul/Gemm float", "ms_per_run"]
    share = mac_f / f["ms_per_run"].sum()
    k = mac_f / mac_q if mac_q > 0 else float("inf")
    lines = [f"fp32 ({fp32_label}): {f['ms_per_run'].sum():.2f} ms of kernels, {100 * share:.0f} % in "
             f"Conv/MatMul/Gemm ({mac_f:.2f} ms)",
             f"INT8 ({int8_label}): {q['ms_per_run'].sum():.2f} ms of kernels; Conv/MatMul/Gemm {mac_q:.2f} ms "
             f"({mac_q_int8:.2f} ms of it in integer kernels) -> those ops {k:.2f}x faster",
             f"Amdahl: with {100 * share:.0f} % of the time {k:.2f}x faster and the rest unchanged, the model could "
             f"be at most {quant.amdahl_bound(share, min(k, 1e9)):.2f}x faster; even infinitely fast MACs give "
             f"{1 / (1 - share) if share < 1 else float('inf'):.2f}x"]
    rest = []
    for cat in ("Q/DQ", "layout (Transpose/Reshape/...)", "other float", "other int8"):
        rest.append(f"{cat} {f.loc[cat, 'ms_per_run']:.2f} -> {q.loc[cat, 'ms_per_run']:.2f} ms")
    lines.append("everything else, fp32 -> INT8: " + "; ".join(rest))
    return lines


# --------------------------------------------------------------------------- table and verdicts

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

    Adds ``d_miou_vs_fp32`` and ``d_iou_<rare class>`` (this minus the ORT fp32 row of the
    same model measured at the same threads) and ``reported_by_source``. The speed-ups were
    computed inside each interleaved group (:func:`measure_variants`).

    Returns:
        ``(table, per_class)``: ``per_class`` is float ``(rows, classes)`` in table order.

    Raises:
        KeyError: a model has no :data:`FP32` row.
    """
    df = pd.DataFrame(list(rows))
    ref = df[df.method == FP32].drop_duplicates("model").set_index("model")
    missing = set(df.model) - set(ref.index)
    if missing:
        raise KeyError(f"results_table: no {FP32!r} row for {sorted(missing)}")
    df["d_miou_vs_fp32"] = df.miou - ref.loc[df.model, "miou"].values
    for k in RARE_CLASSES:
        df[f"d_iou_{k}"] = df[f"iou_{k}"] - ref.loc[df.model, f"iou_{k}"].values
    df["reported_by_source"] = df.apply(reported_by_source, axis=1)
    per_class = np.array(df.pop("_per_class").tolist(), dtype=float)
    return df, per_class


def recipe_summary(df: pd.DataFrame, model_name: str, group: str = "recipes") -> pd.DataFrame:
    """The recipe table of one model: every INT8 recipe row (and fp32) of one interleaved
    group (default the main one, ``"recipes"``), with speed-up (95 % interval), test mIoU change
    (``d_miou_points``), val mIoU change (``d_val_miou_points``: what ``meets_budget`` is
    checked on, so the winner is chosen on val), leftover node counts; sorted by speed-up."""
    m = df[(df.model == model_name) & (df.group == group) & (df.recipe.astype(bool) | (df.method == FP32))].copy()
    ref = m[m.method == FP32]
    if ref.empty:
        raise KeyError(f"recipe_summary: no {FP32!r} row of {model_name} in group {group!r}")
    m["d_miou_vs_fp32"] = m.miou - float(ref.miou.iloc[0])
    has_val = "val_miou" in m.columns and m.val_miou.notna().any()
    m["d_val_miou_vs_fp32"] = (m.val_miou - float(ref.val_miou.iloc[0])) if has_val else m.d_miou_vs_fp32
    out = m[["recipe", "method", "latency_ms_p50", "speedup_vs_ort_fp32", "speedup_ci95_low", "speedup_ci95_high",
             "latency_verdict_vs_fp32", "d_miou_vs_fp32", "d_val_miou_vs_fp32", "q_nodes", "dq_nodes",
             "transpose_nodes", "leftover_nodes", "int8_nodes", "threads", "rounds"]].copy()
    out["d_miou_points"] = 100 * out.pop("d_miou_vs_fp32")
    out["d_val_miou_points"] = 100 * out.pop("d_val_miou_vs_fp32")
    # the budget is checked on val (a choice), the reported change is the test one
    out["meets_budget"] = (out.speedup_vs_ort_fp32 >= SPEEDUP_TARGET) \
        & (out.d_val_miou_points >= -100 * MIOU_LOSS_BUDGET) & (out.method != FP32)
    return out.sort_values("speedup_vs_ort_fp32", ascending=False).reset_index(drop=True)


def winner(summary: pd.DataFrame) -> pd.Series | None:
    """The ORT graph that wins a :func:`recipe_summary`: the fastest INT8 recipe within the
    mIoU budget on **val** (None when no INT8 recipe keeps the budget)."""
    ok = summary[(summary.method != FP32) & (summary.d_val_miou_points >= -100 * MIOU_LOSS_BUDGET)]
    return None if ok.empty else ok.sort_values("speedup_vs_ort_fp32", ascending=False).iloc[0]


def verdict(df: pd.DataFrame, main: str = MAIN, control: str = RESNET) -> list[str]:
    """Lines computed from the table: for ``main`` and ``control``, the winning ORT graph
    (:func:`winner`) with its speed-up (95 % interval) and mIoU change, the default QDQ
    recipe and fp16 against ORT fp32, and whether the issue's budget (:data:`SPEEDUP_TARGET`
    with at most :data:`MIOU_LOSS_BUDGET` lost) is met."""
    lines = []
    for name in (main, control):
        s = recipe_summary(df, name)
        w = winner(s)
        if w is None:
            lines.append(f"{name}: no INT8 recipe keeps the mIoU loss within {100 * MIOU_LOSS_BUDGET:.0f} point")
            continue
        lines.append(f"{name}: winning ORT graph = {w.recipe} ({w.method}): {w.speedup_vs_ort_fp32:.2f}x ORT fp32 "
                     f"[95 % CI {w.speedup_ci95_low:.2f}-{w.speedup_ci95_high:.2f}], {w.threads} threads, "
                     f"{w.rounds} rounds, mIoU {w.d_miou_points:+.2f} points, {int(w.leftover_nodes)} Q/DQ/Transpose "
                     f"nodes left")
        g = df[(df.model == name) & (df.group == "recipes")].set_index("method")
        ties = [r.recipe for r in s.itertuples() if r.method not in (FP32, w.method)
                and bench.latency_verdict(g.loc[r.method], g.loc[w.method]) == "no detectable difference"]
        if ties:
            lines.append(f"{name}: not distinguishable from {w.recipe} at this budget (overlapping 95 % latency "
                         f"intervals): {', '.join(ties)}")
        met = w.speedup_vs_ort_fp32 >= SPEEDUP_TARGET
        robust = w.speedup_ci95_low >= SPEEDUP_TARGET
        if met:
            how = (" (the whole 95 % interval clears it)" if robust
                   else " (point estimate; the 95 % interval reaches below it)")
        else:
            reach = ("the interval reaches it" if w.speedup_ci95_high >= SPEEDUP_TARGET
                     else "the whole 95 % interval lies below it")
            how = (f": the best graph reaches {w.speedup_vs_ort_fp32:.2f}x ({reach}); the op-time breakdown gives the "
                   f"ceiling")
        lines.append(f"{name}: issue budget (>= {SPEEDUP_TARGET}x with <= 1 mIoU point lost) -> "
                     + ("met" if met else "NOT met") + how)
    m = df[(df.model == main) & (df.group == "recipes")]
    for meth in ("ORT fp16 (keep fp32 I/O)", "dynamic INT8"):
        r = m[m.method == meth]
        if len(r):
            r = r.iloc[0]
            lines.append(f"{main}: {meth}: {r.speedup_vs_ort_fp32:.2f}x ORT fp32, "
                         f"mIoU {100 * r.d_miou_vs_fp32:+.2f} points")
    return lines


__all__ = ["SECTION", "CALIB_SPLIT", "EVAL_SPLIT", "STUDENT", "SECOND", "PRUNE_SPARSITY", "DENSE", "MAIN", "PRUNED",
           "RESNET", "FP32", "DEFAULT_RECIPE", "SHORT_RECIPES", "SPEEDUP_TARGET", "MIOU_LOSS_BUDGET", "input_hw",
           "threads", "array_digest", "export_fp32", "model_budgets", "selection_arrays", "split_arrays", "calibration_images", "eval_arrays", "sensitivity_images", "pruned_student",
           "study_models", "slug", "recipes_for", "sweep_models", "sensitivity_groups", "selective_recipe",
           "build_recipes", "paired_speedup", "node_summary", "measure_variants", "variant_row", "torch_rows",
           "cached_result", "scores", "sensitivity", "derived_model", "calibration_sizes", "calibration_size_sweep", "calibration_method_sweep", "op_breakdown",
           "explain_speedup", "reported_by_source", "results_table", "recipe_summary", "winner", "verdict",
           "trained_model", "kd_student"]
