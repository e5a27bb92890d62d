"""Section ``pipeline`` (notebook ``08_pipeline``): the deployable student, the study's headline.

One chain of the study's own choices, measured end to end:

1. **KD student** - :func:`.distillation.kd_student` (the KD method notebook 01 chose).
2. **Structured pruning** to several MACs targets - :func:`study.prune.prune_structured`
   (DepGraph, the same fraction of channels removed in every group, kept widths rounded to
   multiples of :data:`ALIGN_CHANNELS`), with the importance notebook 02 found best
   (:func:`pruning_choice`); the channel fraction that meets each MACs target is searched
   by :func:`sparsity_for_macs`. :func:`alignment_twin` / :func:`alignment_table` measure
   what the alignment buys.
3. **Recovery fine-tune with distillation** from :func:`.distillation.teacher`
   (:func:`study.distill.make_kd_loss` through :func:`.common.finetune`), cached by
   :func:`pruned_recovered` (also run without KD, as the control of step 3).
4. **Export** fp32 / fp16 / INT8 (:func:`study.quant.export_onnx`, :func:`~study.quant.convert_fp16`,
   :func:`~study.quant.quantize_recipe` with the INT8 recipe notebook 05 found best,
   :func:`int8_choice`, calibrated on the study's calibration set of clean training images
   at the export size, :func:`.quantization.calibration_images`) - :func:`export_variants`.
5. **Measure** every variant in one interleaved call of the study's latency protocol
   (:func:`measure_latency` -> :func:`study.bench.compare_latency`), the dense KD student in
   ORT fp32 as the reference, and score every variant's mIoU on the same images
   (:func:`onnx_eval`), with a paired bootstrap interval of the change
   (:func:`study.metrics.bootstrap_miou_diff`).

Rows, table and verdict: :func:`variant_row`, :func:`pipeline_table`, :func:`step_costs`,
:func:`headline`; figure: :func:`pareto_front`, :func:`other_section_points`,
:func:`pareto_figure`.

Notebook 08's path::

    from study.sections import pipeline as sec
    student, rec = sec.start_student(ctx); teacher, _ = sec.teacher(ctx)
    p = sec.plan(ctx.profile); imp = sec.pruning_choice(ctx)["importance"]; q = sec.int8_choice(ctx)["recipe"]
    val_x, val_y = sec.eval_arrays(ctx); calib_x = sec.calibration_images(ctx)
    s, g = sec.sparsity_for_target(ctx, student, 0.25)
    model, info = sec.pruned_recovered(ctx, student, teacher, rec, sparsity=s, fraction=0.25, importance=imp,
                                       steps=p.recovery_steps, eval_x=val_x, eval_y=val_y)
    files = sec.export_variants(model, work_dir, "t25", hw, calib_x, p.precisions, int8_recipe=q)
    scores, cms = sec.onnx_eval(files["int8"], val_x, val_y)
    lat = sec.measure_latency(ctx, all_files, hw)          # every variant, one interleaved call
    df = sec.pipeline_table([sec.variant_row(...), ...], all_cms); sec.headline(df)
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .. import bench, prune, quant
from ..distill import KDConfig, make_kd_loss
from ..metrics import bootstrap_miou_diff, confusion_matrix, miou_from_confusion
from ..metrics import verdict as ci_verdict
from ..models import gmacs, model_complexity, model_fingerprint
from ..train import seed_everything
from . import distillation
from . import quantization
from .common import build, cached, finetune, finetune_config
from .measure import cached_file, cached_latency, dry_run_protocol, export_model, file_digest, onnx_simplify
from .quantization import calibration_images, eval_arrays
from .rows import table_row
from .structured_pruning import calibration_batches

SECTION = "pipeline"
#: The student the chain starts from (the KD student of notebook 01).
STUDENT = distillation.MAIN_STUDENT
#: The issue's headline target: at least this many times faster than the dense student
#: (ORT fp32, same threads) ...
SPEEDUP_TARGET = 3.0
#: ... with at most this much mIoU lost (fraction: 0.01 = 1 mIoU point).
MIOU_LOSS_BUDGET = 0.01
#: The reference variant every speed-up and mIoU change is computed against.
REFERENCE = "dense fp32"
#: Export precisions of every model of the chain.
PRECISIONS = ("fp32", "fp16", "int8")
#: Channel fraction searched up to (beyond it DepGraph groups run out of channels).
MAX_SPARSITY = 0.95
NAN = float("nan")

#: Numbers reported by the sources that this section's headline compares with.
#: Source 001 (a detector, Jetson Orin Nano, fp16, torch-pruning): structured 45 %.
REPORTED_BY_SOURCE001 = {"text": "structured 45 % (DepGraph): 31.0 -> 11.4 ms, 17.2 -> 9.4 GFLOPs, "
                                 "mAP 0.910 -> 0.904", "latency_ms": (31.0, 11.4), "speedup": 31.0 / 11.4,
                         "macs_fraction": 9.4 / 17.2, "metric_delta": -0.006}
#: Source 000 (UPerNet + MobileViT-S on LPCVC, Jetson Nano): KD and fp16.
REPORTED_BY_SOURCE000 = {"kd_miou": (distillation.REPORTED_BY_SOURCE000["none"],
                                     distillation.REPORTED_BY_SOURCE000["mse"]),
                         "fp16_fps": (3.11, 4.49), "fp16_speedup": 4.49 / 3.11}


# --------------------------------------------------------------------------- plan

#: Kept channel counts are rounded to multiples of this (``prune_structured(round_to=...)``):
#: ONNX Runtime's CPU convolutions run in the NCHWc layout, whose channel blocks are 16 wide
#: with AVX-512 (8 with AVX2), so a width that is not a multiple of the block is padded and
#: its removed MACs are not saved. Notebook 08 measures aligned against unaligned widths.
ALIGN_CHANNELS = 16


@dataclass(frozen=True)
class Plan:
    """What notebook 08 runs in a profile.

    Attributes:
        macs_fractions: MACs targets as fractions of the dense student's GMACs (at the
            export size), from mild to aggressive.
        recovery_steps: optimizer steps of every recovery fine-tune (batch
            ``profile.batch_size``).
        precisions: export precisions (:data:`PRECISIONS`).
        control_fractions: the targets whose pruned model is also fine-tuned without KD
            (the control of step 3).
        rounds: interleaved rounds of the latency protocol.
        round_to: channel alignment of the pruned widths (:data:`ALIGN_CHANNELS`).
    """

    macs_fractions: tuple
    recovery_steps: int
    precisions: tuple
    control_fractions: tuple
    rounds: int = 5
    round_to: int | None = ALIGN_CHANNELS


def plan(profile) -> Plan:
    """The :class:`Plan` of ``profile``.

    MACs targets: 50 %, 25 % and 10 % of the dense student (``smoke``: 50 % and 25 %).
    Notebook 02 measured that ORT latency falls much more slowly than MACs on this
    student (reshapes, resizes, softmax and LayerNorm do not shrink with the channel
    count), so a 3x speed-up needs an aggressive MACs cut. Recovery: the profile's
    ``finetune_steps`` (the budget every pruned model of notebooks 02-04 gets, so the
    chain's models compare with theirs). The no-KD control runs at every target in
    ``smoke`` and ``paper`` and at the most aggressive one in ``cpu`` (where the accuracy
    bill is largest), to keep the notebook near 10 minutes on 2 cores. Latency: 5
    interleaved rounds (``smoke``: 3; every round starts a fresh process per variant).
    """
    smoke = profile.name == "smoke"
    fracs = (0.5, 0.25) if smoke else (0.5, 0.25, 0.1)
    control = fracs[-1:] if profile.name == "cpu" else fracs
    return Plan(macs_fractions=fracs, recovery_steps=int(profile.finetune_steps), precisions=PRECISIONS,
                control_fractions=control, rounds=3 if smoke else 5)


def input_hw(ctx) -> tuple[int, int]:
    """``(image_size, image_size)`` px: the size the models are pruned (traced), exported, timed and scored at."""
    return ctx.profile.image_size, ctx.profile.image_size


# --------------------------------------------------------------------------- start models and choices

def start_student(ctx) -> tuple[nn.Module, dict]:
    """THE KD student (:func:`.distillation.kd_student`) on ``ctx.device`` in eval mode, and its record."""
    model, rec = distillation.kd_student(ctx)
    return model.eval(), rec


def teacher(ctx) -> tuple[nn.Module, dict]:
    """THE teacher (:func:`.distillation.teacher`): shared and frozen, do not modify it."""
    return distillation.teacher(ctx)


def recovery_kd_config(student_record: Mapping) -> KDConfig:
    """The KD loss of the recovery fine-tune: the logit term of the student's own KD method.

    The student was distilled with ``student_record["kd"]`` (notebook 01's choice). The
    recovery keeps its method, temperature and weight; a ``kl+feat`` choice keeps only its
    KL term, because its FitNets adapters were fitted to the unpruned feature widths.
    A ``none`` choice (KD did not win in notebook 01) falls back to KL, T=2, weight 1.
    """
    kd = dict(student_record["kd"])
    if kd["method"] == "kl+feat":
        kd.update(method="kl", feat_weight=0.0)
    if kd["method"] == "none":
        kd = dict(distillation.FALLBACK_CHOICE)
    return KDConfig(**kd)


def pruning_choice(ctx) -> dict:
    """The channel importance of step 2, read from notebook 02's table when it exists.

    Rule: among ``structured_magnitude`` and ``structured_taylor`` rows of the student in
    ``<out_dir>/tables/structured_pruning.csv``, the method with the higher mean
    **validation** mIoU (``val_miou``; ``miou`` for a table without it) after fine-tuning
    over the sparsities both were run at (magnitude on ties). Without
    that table (notebook 02 has not run for this build folder and profile) the
    importance is ``magnitude`` (L1 filter norm, Li et al. 2017) and ``source`` says so.

    Returns:
        dict with ``importance`` (``"magnitude"`` or ``"taylor"``), ``source`` (text) and
        ``evidence`` (method -> mean mIoU; empty for the fallback).
    """
    path = ctx.out_dir / "tables" / "structured_pruning.csv"
    if not path.is_file():
        return {"importance": "magnitude", "evidence": {},
                "source": f"fallback ({path.name} not found: notebook 02 has not run for this build folder)"}
    df = pd.read_csv(path)
    df = df[(df.model == STUDENT) & df.method.isin(["structured_magnitude", "structured_taylor"])]
    common_s = set(df[df.method == "structured_magnitude"].sparsity) & set(df[df.method == "structured_taylor"].sparsity)
    df = df[df.sparsity.isin(common_s)]
    col = "val_miou" if "val_miou" in df.columns and df.val_miou.notna().any() else "miou"  # choose on val
    means = {m.split("_", 1)[1]: float(g[col].mean()) for m, g in df.groupby("method")}
    if len(means) < 2 or not all(np.isfinite(list(means.values()))):
        return {"importance": "magnitude", "evidence": means,
                "source": f"fallback ({path.name} lacks comparable magnitude / taylor rows)"}
    imp = "taylor" if means["taylor"] > means["magnitude"] else "magnitude"
    return {"importance": imp, "evidence": means,
            "source": f"notebook 02 ({path.name}: mean mIoU over sparsities {sorted(common_s)})"}


def int8_choice(ctx) -> dict:
    """The INT8 recipe of step 4, read from notebook 05's table when it exists.

    Rule: notebook 05's winning ORT graph for the KD student
    (:func:`.quantization.winner` of :func:`.quantization.recipe_summary` of
    ``<out_dir>/tables/quantization.csv``: the fastest recipe within its mIoU budget).
    Without that table, when no recipe keeps the budget, or when the winner is not one of
    :data:`study.quant.INT8_RECIPES` (e.g. the selective recipe, whose float nodes were
    chosen per model), the study's default recipe
    (:data:`.quantization.DEFAULT_RECIPE`) is used and ``source`` says why.

    Returns:
        dict with ``recipe`` (a key of :data:`study.quant.INT8_RECIPES`), ``source`` (text)
        and ``evidence`` (the winner's speed-up and mIoU change on the dense student; {} for
        the fallback).
    """
    path = ctx.out_dir / "tables" / "quantization.csv"
    default = quantization.DEFAULT_RECIPE

    def fallback(why):
        return {"recipe": default, "source": f"fallback to {default} ({why})", "evidence": {}}

    if not path.is_file():
        return fallback(f"{path.name} not found: notebook 05 has not run for this build folder")
    try:
        df = pd.read_csv(path, converters={"recipe": str})    # keep "" (no recipe) as ""
        w = quantization.winner(quantization.recipe_summary(df, quantization.MAIN))
    except (KeyError, AttributeError, ValueError) as exc:     # a table of another layout
        return fallback(f"{path.name} has no recipe comparison for {quantization.MAIN!r}: {exc!r}"[:300])
    if w is None:
        return fallback(f"no INT8 recipe kept the mIoU budget in {path.name}")
    if w.recipe not in quant.INT8_RECIPES:
        return fallback(f"notebook 05's winner {w.recipe!r} is model-specific")
    return {"recipe": str(w.recipe), "source": f"notebook 05 ({path.name}: winning ORT graph for {quantization.MAIN})",
            "evidence": {"speedup_vs_ort_fp32": float(w.speedup_vs_ort_fp32), "d_miou_points": float(w.d_miou_points)}}


# --------------------------------------------------------------------------- step 2: MACs targets

def sparsity_for_macs(model: nn.Module, input_hw: Sequence[int], target_gmacs: float, *, round_to: int | None = None,
                      rel_tol: float = 0.06, max_iter: int = 6, max_sparsity: float = MAX_SPARSITY
                      ) -> tuple[float, float]:
    """The channel fraction whose :func:`study.prune.prune_structured` meets a MACs target.

    With per-group (local) pruning every DepGraph group loses the same fraction of its
    channels whatever the importance, so MACs depend on the fraction only. A conv's MACs
    scale with (kept inputs) x (kept outputs), so ``sqrt(GMACs)`` is close to linear in the
    fraction: the search starts at ``1 - sqrt(target / dense)`` and refines by false
    position on ``sqrt(GMACs)`` inside a shrinking bracket, each step pruning a copy of
    ``model`` (magnitude importance) and counting :func:`study.models.gmacs`. With
    ``round_to`` the widths move in steps of ``round_to`` channels, so GMACs move in steps
    of a few per cent (the default tolerance, 6 %, allows for that).

    Args:
        model: the float model (not modified; copied to the CPU).
        input_hw: ``(H, W)`` px of the trace and of the MACs count.
        target_gmacs: GMACs per image, in (0, dense].
        round_to: channel alignment passed to :func:`study.prune.prune_structured` (MACs
            then move in steps: the closest fraction tried is returned).
        rel_tol: stop when ``|GMACs / target - 1| <= rel_tol``.
        max_iter: most prunings tried.
        max_sparsity: upper end of the bracket.

    Returns:
        ``(sparsity, gmacs)`` of the closest fraction tried (relative error in GMACs).

    Raises:
        ValueError: ``target_gmacs`` not in (0, dense GMACs].
    """
    hw = tuple(int(v) for v in input_hw)
    base = copy.deepcopy(model).cpu().eval()
    dense = gmacs(base, hw)
    target = float(target_gmacs)
    if not 0 < target <= dense:
        raise ValueError(f"sparsity_for_macs: target_gmacs must be in (0, {dense:.4g}] (the dense model), got {target}")
    if target >= dense * (1 - rel_tol):
        return 0.0, dense

    def macs_at(s: float) -> float:
        m = copy.deepcopy(base)
        prune.prune_structured(m, hw, s, round_to=round_to)
        return gmacs(m, hw)

    lo, f_lo = 0.0, dense
    hi, f_hi = max_sparsity, dense * (1 - max_sparsity) ** 2   # estimate until measured
    s = min(max_sparsity, 1 - math.sqrt(target / dense))
    best = (0.0, dense)
    for _ in range(max_iter):
        f = macs_at(s)
        if abs(f / target - 1) < abs(best[1] / target - 1):
            best = (s, f)
        if abs(f / target - 1) <= rel_tol:
            break
        if f > target:
            lo, f_lo = s, f
        else:
            hi, f_hi = s, f
        if hi - lo < 1e-3:
            break
        r_lo, r_hi, r_t = math.sqrt(f_lo), math.sqrt(f_hi), math.sqrt(target)
        s_new = lo + (hi - lo) * (r_lo - r_t) / max(r_lo - r_hi, 1e-12)
        margin = 0.05 * (hi - lo)   # stay strictly inside the bracket
        s = min(max(s_new, lo + margin), hi - margin)
    return float(best[0]), float(best[1])


def sparsity_for_target(ctx, student: nn.Module, fraction: float, round_to: int | None = ALIGN_CHANNELS
                        ) -> tuple[float, float]:
    """:func:`sparsity_for_macs` for ``fraction`` of the student's dense GMACs at :func:`input_hw`
    with channel alignment ``round_to`` (cached).

    Returns:
        ``(sparsity, gmacs)``.
    """
    hw = input_hw(ctx)
    dense = gmacs(student, hw)
    # MACs depend on the architecture and the fraction only (see sparsity_for_macs), not on the weights
    cfg = {"arch": STUDENT, "input_hw": list(hw), "fraction": float(fraction), "dense_gmacs": round(dense, 9),
           "round_to": round_to}

    def compute():
        s, g = sparsity_for_macs(student, hw, fraction * dense, round_to=round_to)
        return {"sparsity": s, "gmacs": g}

    rec = cached(ctx, f"pipeline-sparsity-{fraction:g}-r{round_to}", cfg, compute, modules=[__name__])
    return float(rec["sparsity"]), float(rec["gmacs"])


# --------------------------------------------------------------------------- step 3: prune + recover (cached)

def image_confusions(logits: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per-image confusion matrices of arg-max predictions.

    Args:
        logits: float ``(N, C, H, W)``; masks: int ``(N, H, W)`` (255 ignored).

    Returns:
        int64 ``(N, C, C)`` (:func:`study.metrics.confusion_matrix` of every image; rows =
        ground truth). Their sum is the dataset-level matrix behind mIoU.
    """
    pred = np.asarray(logits).argmax(1)
    return np.stack([confusion_matrix(p, t) for p, t in zip(pred, np.asarray(masks))])


def pruned_recovered(ctx, student: nn.Module, teacher_model: nn.Module | None, student_record: Mapping, *,
                     sparsity: float, fraction: float, importance: str, steps: int, eval_x: np.ndarray,
                     eval_y: np.ndarray, recovery: str = "kd", round_to: int | None = ALIGN_CHANNELS
                     ) -> tuple[nn.Module, dict]:
    """Prune a copy of the KD student, score it, recover it, score it again (cached).

    Step 2: :func:`study.prune.prune_structured` removes ``sparsity`` of every group's
    channels (``importance``; Taylor uses :func:`.structured_pruning.calibration_batches`),
    kept widths rounded to multiples of ``round_to``, traced at :func:`input_hw`. Step 3:
    ``steps`` optimizer steps of :func:`.common.finetune` (a quarter of the profile's peak
    learning rate, 10 % warm-up) with ``recovery="kd"``: the loss of :func:`study.distill.make_kd_loss` with
    :func:`recovery_kd_config` and ``teacher_model``; ``recovery="none"``: the plain
    segmentation loss (the control). Scores come from per-image confusion matrices of the
    torch model on ``eval_x`` / ``eval_y`` (:func:`image_confusions`).

    The cache key holds the student's and the teacher's
    :func:`study.models.model_fingerprint`, the KD config, importance, sparsity, MACs
    fraction, steps, input size and the evaluation images' count, plus (derived) the
    profile, seed, data and this module's import closure. A cache hit rebuilds the model
    with :func:`study.prune.rebuild_pruned`.

    Returns:
        ``(model in eval mode on ctx.device, info)``; info: ``sparsity``, ``fraction``,
        ``importance``, ``recovery``, ``round_to``, ``kd`` (dict or None), ``train_steps``,
        ``train_images`` (= steps x batch size), ``train_seconds`` (s), ``cms_after_prune``
        and ``cms_after_recovery`` (int64 ``(N, C, C)``), ``miou_after_prune``,
        ``miou_after_recovery``.

    Raises:
        ValueError: unknown ``recovery``, or ``recovery="kd"`` without a teacher.
    """
    if recovery not in ("kd", "none"):
        raise ValueError(f"pruned_recovered: recovery must be 'kd' or 'none', got {recovery!r}")
    if recovery == "kd" and teacher_model is None:
        raise ValueError("pruned_recovered: recovery='kd' needs the teacher")
    hw = input_hw(ctx)
    kd_cfg = recovery_kd_config(student_record) if recovery == "kd" else None
    cfg = {"start": model_fingerprint(student), "teacher": model_fingerprint(teacher_model) if kd_cfg else None,
           "kd": asdict(kd_cfg) if kd_cfg else None, "importance": importance, "sparsity": round(float(sparsity), 6),
           "fraction": float(fraction), "steps": int(steps), "input_hw": list(hw), "eval_images": int(len(eval_x)),
           "recovery": recovery, "round_to": round_to}
    fresh: dict = {}

    def compute():
        seed_everything(ctx.seed)
        m = copy.deepcopy(student).to(ctx.device)
        calib = calibration_batches(ctx) if importance == "taylor" else None
        prune.prune_structured(m, hw, float(sparsity), importance=importance, calib_batches=calib, round_to=round_to)
        cms_p = image_confusions(quant.torch_predict(m, eval_x), eval_y)
        loss_fn = None
        if kd_cfg is not None:
            loss_fn = make_kd_loss(teacher_model, kd_cfg, train_cfg=finetune_config(ctx, int(steps)))
        t0 = time.perf_counter()
        finetune(ctx, m, int(steps), loss_fn=loss_fn, progress=False, desc=f"pipeline-{fraction:g}-{recovery}")
        secs = time.perf_counter() - t0
        m.eval()
        cms_r = image_confusions(quant.torch_predict(m, eval_x), eval_y)
        fresh["model"] = m
        return {"payload": prune.pruned_payload(m), "cms_after_prune": torch.from_numpy(cms_p),
                "cms_after_recovery": torch.from_numpy(cms_r), "train_seconds": float(secs)}

    tag = f"pipeline-{STUDENT}-f{fraction:g}-r{round_to}-{importance}-{recovery}"
    rec = cached(ctx, tag, cfg, compute, modules=[__name__])
    if "model" in fresh:
        model = fresh["model"]
    else:
        model = prune.rebuild_pruned(lambda: build(STUDENT, ctx.profile), rec["payload"]).to(ctx.device)
    cms_p = np.asarray(rec["cms_after_prune"]).astype(np.int64)
    cms_r = np.asarray(rec["cms_after_recovery"]).astype(np.int64)
    info = {"sparsity": float(sparsity), "fraction": float(fraction), "importance": importance, "recovery": recovery,
            "round_to": round_to,
            "kd": asdict(kd_cfg) if kd_cfg else None, "train_steps": int(steps),
            "train_images": int(steps) * int(ctx.profile.batch_size), "train_seconds": float(rec["train_seconds"]),
            "cms_after_prune": cms_p, "cms_after_recovery": cms_r,
            "miou_after_prune": miou_from_confusion(cms_p.sum(0)),
            "miou_after_recovery": miou_from_confusion(cms_r.sum(0))}
    return model.eval(), info


def alignment_twin(ctx, student: nn.Module, fraction: float, work_dir: str | Path) -> dict:
    """The control of :data:`ALIGN_CHANNELS`: the same MACs target pruned WITHOUT channel
    alignment (``round_to=None``), exported in fp32 for the latency measurement only.

    It is neither fine-tuned nor scored: latency does not depend on the weights' values
    (the protocol runs ORT with denormals as zero), only on the shapes, so the twin is
    timed in the same interleaved call as the chain and compared with the aligned fp32
    variant of the same target (:func:`alignment_table`).

    Returns:
        dict with ``path`` (``<work_dir>/unaligned-f<fraction>.fp32.onnx``), ``sparsity`` and
        ``gmacs`` (at :func:`input_hw`).
    """
    hw = input_hw(ctx)
    s, g = sparsity_for_target(ctx, student, fraction, round_to=None)
    m = copy.deepcopy(student).cpu().eval()
    prune.prune_structured(m, hw, s)
    path = quant.export_onnx(m, Path(work_dir) / f"unaligned-f{fraction:g}.fp32.onnx", hw,
                             simplify=onnx_simplify(ctx))
    return {"path": path, "sparsity": s, "gmacs": g}


def alignment_table(lat: pd.DataFrame, aligned: str, unaligned: str, gmacs_aligned: float, gmacs_unaligned: float,
                    n_boot: int = 2000) -> pd.DataFrame:
    """Aligned vs unaligned widths at one MACs target, from one :func:`measure_latency` call.

    Returns:
        two rows (``aligned``, ``unaligned``) with ``gmacs``, ``latency_ms_p50`` and its
        interval, ``ms_per_gmac`` (p50 / GMACs), and for the aligned row
        ``speedup_vs_unaligned`` (median of the per-round ratios, 95 % interval
        ``_ci95_low/_high``) and ``latency_verdict`` (:func:`study.bench.latency_verdict`).
    """
    rows = []
    for name, g in ((aligned, gmacs_aligned), (unaligned, gmacs_unaligned)):
        r = lat.loc[name]
        rows.append({"variant": name, "gmacs": g, "latency_ms_p50": r.latency_ms_p50,
                     "latency_ms_p50_ci95_low": r.latency_ms_p50_ci95_low,
                     "latency_ms_p50_ci95_high": r.latency_ms_p50_ci95_high, "ms_per_gmac": r.latency_ms_p50 / g})
    ra, ru = _round_p50s(lat.loc[aligned].round_p50s_ms), _round_p50s(lat.loc[unaligned].round_p50s_ms)
    ok = len(ra) == len(ru) and len(ra) >= 2
    lo, hi = bench.median_ci(ru / ra, n_boot=n_boot) if ok else (NAN, NAN)
    rows[0].update(speedup_vs_unaligned=float(np.median(ru / ra)) if ok else NAN, speedup_ci95_low=lo,
                   speedup_ci95_high=hi, latency_verdict=bench.latency_verdict(lat.loc[aligned], lat.loc[unaligned]))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- step 4: export

def export_variants(model: nn.Module, work_dir: str | Path, name: str, hw: Sequence[int], calib_x: np.ndarray,
                    precisions: Sequence[str] = PRECISIONS, int8_recipe: str = quantization.DEFAULT_RECIPE,
                    ctx=None) -> dict[str, Path]:
    """Export one model in every precision of ``precisions``.

    ``fp32``: :func:`study.quant.export_onnx` (checked, simplified; fixed input
    ``(1, 3, H, W)``); ``fp16``: :func:`study.quant.convert_fp16` of it (fp32 I/O kept);
    ``int8``: :func:`study.quant.quantize_recipe` of it with ``int8_recipe`` (static ORT
    INT8, MinMax calibration on ``calib_x``; the calibration table is kept in ``work_dir``).

    Args:
        model: float32 model; not modified.
        work_dir: folder of the files ``<name>.<precision>.onnx``.
        hw: ``(H, W)`` px of the export.
        calib_x: float32 ``(N, 3, H, W)``: :func:`.quantization.calibration_images` (clean
            training images at ``hw``).
        precisions: subset of :data:`PRECISIONS`.
        int8_recipe: a key of :data:`study.quant.INT8_RECIPES` (:func:`int8_choice`).
        ctx: with a context, every file is made once and kept in the cache
            (:func:`.measure.cached_file`: keyed by the weights fingerprint, the fp32 file's
            bytes, the recipe and the calibration images); a warm run copies them.

    Returns:
        ``{precision: Path}`` in the order of ``precisions``.

    Raises:
        ValueError: an unknown precision. KeyError: an unknown recipe. Export errors
        propagate (:class:`study.quant.ExportError`).
    """
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ValueError(f"export_variants: unknown precision(s) {bad}; expected some of {PRECISIONS}")
    recipe = quant.INT8_RECIPES[int8_recipe]
    work = Path(work_dir)
    hw = tuple(hw)
    fp32 = export_model(ctx, model, work / f"{name}.fp32.onnx", hw)
    src = file_digest(fp32)
    out = {}
    for p in precisions:
        if p == "fp32":
            out[p] = fp32
        elif p == "fp16":
            out[p] = cached_file(ctx, work / f"{name}.fp16.onnx", {"fp16": src},
                                 lambda q: quant.convert_fp16(fp32, q))
        else:
            calib = quantization.array_digest(calib_x)
            out[p] = cached_file(ctx, work / f"{name}.int8.onnx", {"int8": src, "recipe": repr(recipe), "calib": calib},
                                 lambda q: quant.quantize_recipe(fp32, q, recipe, calib_x, table_dir=work))
    return out


# --------------------------------------------------------------------------- step 5: measure

def onnx_eval(path: str | Path, x: np.ndarray, y: np.ndarray, threads: int | None = None,
              ctx=None) -> tuple[dict, np.ndarray]:
    """Scores and per-image confusion matrices of an ONNX model on images / masks.

    The logits of :func:`study.quant.ort_predict` are scored once: ``scores`` is
    :func:`study.quant.scores_from_logits` (what :func:`study.quant.onnx_scores` returns:
    ``miou``, ``mdice``, ``per_class_iou`` ...), ``cms`` is :func:`image_confusions` (for
    the paired bootstrap). ``threads``: ORT intra-op threads (None: the study's policy,
    :func:`study.bench.default_threads`). With ``ctx``, the result is kept in the cache, keyed
    by the file's bytes, the arrays and the threads (:func:`.quantization.cached_result`): a
    warm run does not re-run ORT.

    Returns:
        ``(scores, cms int64 (N, C, C))``.
    """
    threads = threads or bench.default_threads()

    def compute():
        logits = quant.ort_predict(path, x, threads)
        return [quant.scores_from_logits(logits, y), image_confusions(logits, y)]

    key = {"file": file_digest(path), "x": quantization.array_digest(x), "y": quantization.array_digest(y),
           "threads": threads}
    scores, cms = quantization.cached_result(ctx, "onnx-eval", key, compute)
    return scores, cms


def protocol_settings(profile, rounds: int = 5) -> dict:
    """Per-round settings of :func:`measure_latency` for ``profile``: the profile's benchmark
    budget spread over the rounds.

    ``warmup_s`` = ``bench_warmup_s / 2`` (each round runs in a fresh process, so every
    round warms up again), ``min_s`` = ``bench_min_s / rounds`` and ``min_runs`` =
    ``bench_min_runs // rounds`` (at least 5): the total timed time per variant is the
    profile's, now in ``rounds`` interleaved slices. A dry run (``profile.dry_run``) times
    each variant ``bench_min_runs`` (3) times: that many rounds of one run, no warm-up (as
    :func:`study.sections.measure.protocol`).
    """
    dry = dry_run_protocol(profile)
    if dry:
        return dry
    return {"rounds": int(rounds), "warmup_s": profile.bench_warmup_s / 2, "min_s": profile.bench_min_s / rounds,
            "min_runs": max(5, profile.bench_min_runs // rounds)}


def measure_latency(ctx, files: Mapping[str, str | Path], hw: Sequence[int] | None = None, *, rounds: int = 5,
                    threads: int | None = None, gmacs_of: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Batch-1 ORT latency of every file, all in ONE interleaved call of the study's protocol.

    :func:`study.bench.compare_latency` (a fresh process per measurement, the same seeded
    input, ``threads`` recorded, rounds in rotated order A B C, B C A, ...) with
    :func:`protocol_settings` of the profile; ORT's CPU provider; answered from the cache
    when the same files were timed the same way (:func:`.measure.cached_latency`).

    Args:
        files: variant name -> ``.onnx`` file.
        hw: ``(H, W)`` px, or None to read each model's static input shape.
        rounds: interleaved rounds (>= 2 for intervals).
        threads: intra-op threads (None: the study's policy, :func:`study.bench.default_threads`).
        gmacs_of: variant name -> GMACs per image (adds ``gmacs_per_s`` and ``pct_of_peak``,
            the share of this machine's GEMM peak).

    Returns:
        :func:`study.bench.compare_latency`'s DataFrame indexed by variant name (columns
        :data:`study.bench.PROTOCOL_COLUMNS`: ``latency_ms_p50`` and its 95 % interval over
        rounds, ``latency_ms_p90/p99``, ``fps``, ``cv_p50``, ``peak_rss_mb``, ``load_s``,
        ``round_p50s_ms``, ``threads``, ``rounds`` ...); ``.attrs["protocol"]`` holds the
        settings and provenance.

    Raises:
        FileNotFoundError, study.bench.RemoteBenchError: as :func:`study.bench.compare_latency`.
    """
    kw = protocol_settings(ctx.profile, rounds)
    df = cached_latency(ctx, {k: str(v) for k, v in files.items()}, None if hw is None else tuple(hw),
                        runtime="ort", threads=threads, gmacs=dict(gmacs_of) if gmacs_of else None, **kw)
    out = df.set_index("name", drop=False)
    out.attrs = df.attrs
    return out


# --------------------------------------------------------------------------- rows, table, verdict

#: Columns copied from the protocol's row into every table row (ms, FPS, ratio, MB, s, GMAC/s, %).
LATENCY_COLUMNS = ("latency_ms_p50", "latency_ms_p50_ci95_low", "latency_ms_p50_ci95_high", "latency_ms_p90",
                   "latency_ms_p99", "fps", "cv_p50", "peak_rss_mb", "load_s", "gmacs_per_s", "pct_of_peak")


def variant_row(ctx, variant: str, method: str, *, complexity: dict, scores: dict, latency: dict, precision: str,
                target_fraction: float, target_gmacs: float, sparsity: float, importance: str, train_steps: int,
                train_images: int, recovery: str, miou_after_prune: float, miou_after_recovery: float,
                path: str | Path | None = None, int8_recipe: str = "", recovery_steps: int = 0) -> dict:
    """One row of table ``pipeline``: one exported variant, measured.

    Args:
        variant: short unique name (``"dense fp32"``, ``"t25 int8"`` ...); ``method`` the chain in words.
        complexity: ``params_m`` / ``gmacs`` of the float model at :func:`input_hw`.
        scores: :func:`onnx_eval` scores of this file.
        latency: this file's row of :func:`measure_latency` (a mapping with ``threads``,
            ``rounds``, the :data:`LATENCY_COLUMNS` it has and ``round_p50s_ms``).
        precision: ``fp32``, ``fp16`` or ``int8``; target_fraction / target_gmacs: the MACs
            target (1.0 / dense GMACs for the dense student); sparsity: channel fraction removed.
        train_steps, train_images: every weight update behind the variant and the images
            seen: the KD student's training plus the recovery fine-tune.
        recovery_steps: the recovery fine-tune's optimizer steps alone (0 for the dense student).
        recovery: ``"kd (kl T=2 w=1)"``-like text, ``"-"`` for the dense student.
        miou_after_prune, miou_after_recovery: torch-scored mIoU after step 2 and step 3
            (NaN for the dense student).
        path: the ``.onnx`` file (``model_size_mb``).
        int8_recipe: the :data:`study.quant.INT8_RECIPES` key of an INT8 row ("" otherwise).

    Returns:
        dict: :data:`study.BASE_COLUMNS`, then ``variant, precision, runtime, threads, rounds``,
        the latency columns (:data:`LATENCY_COLUMNS`, NaN where the protocol gives none),
        ``round_p50s_ms`` (the round p50s, ``;``-joined),
        ``target_fraction, target_gmacs, sparsity, importance, recovery, train_steps,
        train_images, miou_after_prune, miou_after_recovery, int8_recipe, model_size_mb, onnx_file``.
    """
    lat = {c: float(latency.get(c, NAN)) for c in LATENCY_COLUMNS}
    rounds_p50 = str(latency.get("round_p50s_ms", ""))
    return table_row(ctx, SECTION, STUDENT, method, scores, complexity=complexity, input_hw=input_hw(ctx),
                     split=scores.get("split", "test"), recovery_steps=int(recovery_steps), variant=variant, precision=precision, runtime="ort",
                     threads=int(latency["threads"]), rounds=int(latency["rounds"]), **lat,
                     round_p50s_ms=rounds_p50, timing=str(latency.get("timing", "measured")),
                     target_fraction=float(target_fraction), target_gmacs=float(target_gmacs),
                     sparsity=float(sparsity), importance=importance, recovery=recovery,
                     train_steps=int(train_steps), train_images=int(train_images),
                     miou_after_prune=float(miou_after_prune), miou_after_recovery=float(miou_after_recovery),
                     int8_recipe=int8_recipe if precision == "int8" else "",
                     model_size_mb=quant.model_size_mb(path) if path else NAN,
                     onnx_file=Path(path).name if path else "")


def _round_p50s(text) -> np.ndarray:
    """The protocol's ``round_p50s_ms`` (``"1.2;1.3"``) as floats (ms)."""
    return np.array([float(v) for v in str(text).split(";") if v.strip() not in ("", "nan")], float)


def pipeline_table(rows: Sequence[dict], cms: Mapping[str, np.ndarray], reference: str = REFERENCE,
                   n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Table ``pipeline``: the rows plus the comparison with the reference variant.

    Adds, against the reference row (same protocol call, same threads, same images):

    - ``speedup_vs_dense`` = reference p50 / this p50, and ``speedup_ci95_low / _high``: a
      95 % bootstrap interval of the median of the per-round ratios (round ``i`` of both
      ran in the same interleaved round; :func:`study.bench.median_ci`), NaN with fewer
      than 2 rounds;
    - ``latency_verdict`` (:func:`study.bench.latency_verdict`: ``faster`` / ``slower`` /
      ``no detectable difference`` from the two p50 intervals);
    - ``miou_delta_vs_dense`` = this mIoU - the reference's, with its 95 % paired bootstrap
      interval over images ``miou_delta_ci95_low / _high``
      (:func:`study.metrics.bootstrap_miou_diff` of the per-image confusion matrices; data
      noise only, one training seed) and ``miou_verdict`` (:func:`study.metrics.verdict`);
    - ``meets_target``: speed-up >= :data:`SPEEDUP_TARGET` and mIoU change >=
      -:data:`MIOU_LOSS_BUDGET` (point estimates).

    Args:
        rows: :func:`variant_row` dicts (one of them has ``variant == reference``).
        cms: variant -> :func:`onnx_eval` per-image confusion matrices (same images for all).
        n_boot, seed: of both bootstraps.

    Raises:
        KeyError: no row or no matrices for ``reference``.
    """
    df = pd.DataFrame(list(rows))
    if reference not in set(df.variant):
        raise KeyError(f"pipeline_table: no row for the reference variant {reference!r}")
    ref = df[df.variant == reference].iloc[0]
    df["speedup_vs_dense"] = ref.latency_ms_p50 / df.latency_ms_p50
    ref_rounds = _round_p50s(ref.get("round_p50s_ms", ""))
    s_lo, s_hi, l_ver = [], [], []
    for _, r in df.iterrows():
        mine = _round_p50s(r.get("round_p50s_ms", ""))
        ok = len(mine) == len(ref_rounds) and len(mine) >= 2
        lo, hi = bench.median_ci(ref_rounds / mine, n_boot=n_boot, seed=seed) if ok else (NAN, NAN)
        s_lo.append(lo), s_hi.append(hi)
        l_ver.append("reference" if r.variant == reference else
                     bench.latency_verdict(r, ref) if "latency_ms_p50_ci95_low" in r else "not measured")
    df["speedup_ci95_low"], df["speedup_ci95_high"], df["latency_verdict"] = s_lo, s_hi, l_ver
    df["miou_delta_vs_dense"] = df.miou - ref.miou
    lo, hi, ver = [], [], []
    for v in df.variant:
        if v == reference:
            lo.append(0.0), hi.append(0.0), ver.append("reference")
            continue
        b = bootstrap_miou_diff(cms[v], cms[reference], n_boot=n_boot, seed=seed)
        lo.append(b["ci95_low"]), hi.append(b["ci95_high"]), ver.append(ci_verdict(b["ci95_low"], b["ci95_high"]))
    df["miou_delta_ci95_low"], df["miou_delta_ci95_high"], df["miou_verdict"] = lo, hi, ver
    df["meets_target"] = (df.speedup_vs_dense >= SPEEDUP_TARGET) & (df.miou_delta_vs_dense >= -MIOU_LOSS_BUDGET)
    return df


def step_costs(df: pd.DataFrame, dense_miou: float) -> pd.DataFrame:
    """Where each pruned chain loses its mIoU: one row per (MACs target, precision).

    Columns: ``variant, target_fraction, precision, d_prune`` (after step 2 - dense),
    ``d_recovery`` (after step 3 - after step 2; positive = recovered), ``d_quantization``
    (this precision's ONNX mIoU - the torch model after step 3), ``d_total`` (= their sum =
    this variant's mIoU - dense), ``costliest_step`` (the most negative of the three;
    ``"none ..."`` when none is negative).
    Changes are mIoU fractions (x100 = points). Dense variants (no pruning) are left out.
    """
    out = []
    for _, r in df[df.target_fraction < 1].iterrows():
        d = {"d_prune": r.miou_after_prune - dense_miou, "d_recovery": r.miou_after_recovery - r.miou_after_prune,
             "d_quantization": r.miou - r.miou_after_recovery}
        worst = min(d, key=d.get)
        out.append({"variant": r.variant, "target_fraction": r.target_fraction, "precision": r.precision, **d,
                    "d_total": sum(d.values()),
                    "costliest_step": worst.removeprefix("d_") if d[worst] < 0 else "none (no step lost mIoU)"})
    return pd.DataFrame(out)


def headline(df: pd.DataFrame) -> dict:
    """The headline verdict, computed from table ``pipeline``.

    Returns:
        dict with ``reached`` (bool: some variant has ``meets_target``), ``winner`` (the
        fastest variant meeting it, or None), ``best_within_budget`` (fastest variant with
        at most :data:`MIOU_LOSS_BUDGET` lost, the reference included: how far its speed-up
        is from :data:`SPEEDUP_TARGET`), ``best_fast`` (the most accurate variant at least
        :data:`SPEEDUP_TARGET` faster, or None: how much mIoU it loses), ``fastest`` (the
        fastest variant overall) - each a row as dict - and ``lines`` (Markdown bullets).
    """
    within = df[df.miou_delta_vs_dense >= -MIOU_LOSS_BUDGET].sort_values("latency_ms_p50")
    fast = df[df.speedup_vs_dense >= SPEEDUP_TARGET].sort_values("miou", ascending=False)
    winners = df[df.meets_target].sort_values("latency_ms_p50")
    fastest = df.sort_values("latency_ms_p50").iloc[0]
    res = {"reached": not winners.empty, "winner": winners.iloc[0].to_dict() if not winners.empty else None,
           "best_within_budget": within.iloc[0].to_dict() if not within.empty else None,
           "best_fast": fast.iloc[0].to_dict() if not fast.empty else None, "fastest": fastest.to_dict()}

    def desc(r):
        s_lo, s_hi = r.get("speedup_ci95_low", NAN), r.get("speedup_ci95_high", NAN)
        s_ci = f" [{s_lo:.2f}, {s_hi:.2f}]" if np.isfinite(s_lo) and np.isfinite(s_hi) else ""
        return (f"`{r['variant']}` ({r['gmacs']:.3g} GMACs, {r['latency_ms_p50']:.2f} ms, "
                f"{r['speedup_vs_dense']:.2f}x{s_ci}, mIoU {r['miou']:.4f}, {100 * r['miou_delta_vs_dense']:+.2f} points "
                f"[{100 * r['miou_delta_ci95_low']:+.2f}, {100 * r['miou_delta_ci95_high']:+.2f}]; 95 % intervals)")

    tgt = f"≥ {SPEEDUP_TARGET:g}x faster than `{REFERENCE}` at ≤ {100 * MIOU_LOSS_BUDGET:g} mIoU point lost"
    lines = []
    if res["reached"]:
        w = res["winner"]
        weak = []
        if not w.get("speedup_ci95_low", NAN) >= SPEEDUP_TARGET:
            weak.append(f"the speed-up's interval reaches down to {w.get('speedup_ci95_low', NAN):.2f}x")
        if not w["miou_delta_ci95_low"] >= -MIOU_LOSS_BUDGET:
            weak.append(f"the mIoU change's interval reaches down to {100 * w['miou_delta_ci95_low']:+.2f} points")
        lines.append(f"- **Target reached** ({tgt}) on point estimates: {desc(w)}"
                     + (f"; not established within the 95 % intervals ({'; '.join(weak)})." if weak
                        else "; both 95 % intervals clear the target."))
    else:
        lines.append(f"- **Target not reached** ({tgt}).")
        b = res["best_within_budget"]
        if b is not None:
            lines.append(f"- Fastest variant within the mIoU budget: {desc(b)}: it would have to run "
                         f"{SPEEDUP_TARGET / b['speedup_vs_dense']:.2f}x faster still to reach {SPEEDUP_TARGET:g}x.")
        f = res["best_fast"]
        if f is not None:
            lines.append(f"- Most accurate variant at ≥ {SPEEDUP_TARGET:g}x: {desc(f)}: loses "
                         f"{-100 * f['miou_delta_vs_dense'] - 100 * MIOU_LOSS_BUDGET:.2f} points more than the budget.")
        else:
            lines.append(f"- No variant is {SPEEDUP_TARGET:g}x faster; the fastest is {desc(res['fastest'])}.")
    return {**res, "lines": lines}


def pareto_front(latency: Sequence[float], miou: Sequence[float]) -> np.ndarray:
    """Boolean mask of the points no other point dominates (lower-or-equal latency AND
    higher-or-equal mIoU, one of them strictly). NaN points are never on the front."""
    lat = np.asarray(latency, float)
    acc = np.asarray(miou, float)
    ok = np.isfinite(lat) & np.isfinite(acc)
    front = np.zeros(len(lat), bool)
    for i in np.flatnonzero(ok):
        dom = ok & (lat <= lat[i]) & (acc >= acc[i]) & ((lat < lat[i]) | (acc > acc[i]))
        front[i] = not dom.any()
    return front


def other_section_points(ctx, exclude: Sequence[str] = (SECTION,)) -> pd.DataFrame:
    """Latency / mIoU points of the other sections' tables (``<out_dir>/tables/*.csv``).

    Every table with ``latency_ms_p50`` and ``miou`` columns contributes its rows at this
    section's input size (``input_hw``) with finite values. These latencies were measured
    by the other notebooks, at other moments, possibly with other thread counts or
    runtimes (``threads`` / ``runtime`` are kept where the table has them): they are
    drawn for orientation, not compared with this section's interleaved measurement.

    Returns:
        DataFrame ``section, model, method, latency_ms_p50, miou, threads, runtime`` (may be empty).
    """
    hw = "{}x{}".format(*input_hw(ctx))
    parts = []
    for csv in sorted((ctx.out_dir / "tables").glob("*.csv")):
        if csv.stem in exclude:
            continue
        try:
            t = pd.read_csv(csv)
        except (OSError, ValueError, pd.errors.ParserError):
            continue
        if not {"latency_ms_p50", "miou"} <= set(t.columns):
            continue
        if "input_hw" in t.columns:
            t = t[t.input_hw.astype(str) == hw]
        t = t[np.isfinite(pd.to_numeric(t.latency_ms_p50, errors="coerce")) & np.isfinite(pd.to_numeric(t.miou, errors="coerce"))]
        if t.empty:
            continue
        parts.append(pd.DataFrame({"section": csv.stem, "model": t.get("model", ""), "method": t.get("method", ""),
                                   "latency_ms_p50": t.latency_ms_p50.astype(float), "miou": t.miou.astype(float),
                                   "threads": t["threads"] if "threads" in t else np.nan,
                                   "runtime": t["runtime"] if "runtime" in t else ""}))
    cols = ["section", "model", "method", "latency_ms_p50", "miou", "threads", "runtime"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def pareto_figure(df: pd.DataFrame, others: pd.DataFrame | None = None):
    """Latency-mIoU plane of every pipeline variant with the Pareto front and the target region.

    Pipeline variants: colour = precision, marker = MACs target, error bars = the p50
    latency interval and the mIoU-change interval (shifted to mIoU). The front of the
    pipeline variants is drawn as a line; the target region (≤ reference / 3 ms, ≥
    reference mIoU - 1 point) is shaded. ``others`` (:func:`other_section_points`) are
    hollow grey markers labelled with their section, measured by their own notebooks.

    Returns:
        a matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    if others is not None and len(others):
        for j, (sec, g) in enumerate(others.groupby("section")):
            ax.scatter(g.latency_ms_p50, g.miou, s=28, facecolors="none", edgecolors=f"C{7 + j % 3}", alpha=0.6,
                       marker="o", label=f"tables/{sec}.csv (its own measurement)")
    ref = df[df.variant == REFERENCE].iloc[0]
    colours = {"fp32": "tab:blue", "fp16": "tab:orange", "int8": "tab:green"}
    markers = ["o", "s", "^", "D", "v", "P"]
    fr = sorted(df.target_fraction.unique(), reverse=True)
    for _, r in df.iterrows():
        mk = markers[fr.index(r.target_fraction) % len(markers)]
        xerr = np.array([[r.latency_ms_p50 - r.latency_ms_p50_ci95_low], [r.latency_ms_p50_ci95_high - r.latency_ms_p50]])
        yerr = np.array([[r.miou_delta_vs_dense - r.miou_delta_ci95_low], [r.miou_delta_ci95_high - r.miou_delta_vs_dense]])
        xerr = None if not np.all(np.isfinite(xerr)) else np.clip(xerr, 0, None)
        yerr = None if not np.all(np.isfinite(yerr)) else np.clip(yerr, 0, None)
        ax.errorbar(r.latency_ms_p50, r.miou, xerr=xerr, yerr=yerr, fmt=mk, color=colours.get(r.precision, "k"),
                    ms=7, capsize=2, lw=0.8)
    front = pareto_front(df.latency_ms_p50, df.miou)
    f = df[front].sort_values("latency_ms_p50")
    ax.plot(f.latency_ms_p50, f.miou, "k--", lw=1.2, label="Pareto front (pipeline variants)", zorder=0)
    offsets = [(6, 6), (6, -12), (-60, 8), (-60, -12)]   # cycled: neighbours on the front do not overlap
    for k, (_, r) in enumerate(f.iterrows()):
        ax.annotate(r.variant, (r.latency_ms_p50, r.miou), textcoords="offset points", xytext=offsets[k % 4],
                    fontsize=7, arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"})
    x_t, y_t = ref.latency_ms_p50 / SPEEDUP_TARGET, ref.miou - MIOU_LOSS_BUDGET
    ax.axvline(x_t, color="tab:red", lw=0.8, ls=":")
    ax.axhline(y_t, color="tab:red", lw=0.8, ls=":")
    ylim = ax.get_ylim()
    ax.fill_between([0, x_t], [y_t, y_t], [max(ylim[1], y_t + 0.01)] * 2, color="tab:red", alpha=0.08,
                    label=f"target: ≥{SPEEDUP_TARGET:g}x faster, ≤{100 * MIOU_LOSS_BUDGET:g} point lost")
    for p, c in colours.items():
        ax.scatter([], [], color=c, label=p)
    for i, t in enumerate(fr):
        ax.scatter([], [], color="grey", marker=markers[i % len(markers)],
                   label="dense" if t >= 1 else f"MACs target {100 * t:g} %")
    ax.set_xlim(left=0)
    ax.set_xlabel("batch-1 latency p50 [ms] (ORT, CPU, interleaved rounds)")
    ax.set_ylabel("mIoU")
    ax.set_title("The deployable student: latency vs mIoU")
    ax.legend(fontsize=7, loc="lower right")
    return fig


__all__ = ["SECTION", "STUDENT", "SPEEDUP_TARGET", "MIOU_LOSS_BUDGET", "REFERENCE", "PRECISIONS",
           "MAX_SPARSITY", "ALIGN_CHANNELS", "REPORTED_BY_SOURCE000", "REPORTED_BY_SOURCE001", "Plan", "plan", "input_hw",
           "start_student", "teacher", "recovery_kd_config", "pruning_choice", "int8_choice", "sparsity_for_macs",
           "sparsity_for_target", "image_confusions", "pruned_recovered", "alignment_twin", "alignment_table", "export_variants", "onnx_eval",
           "protocol_settings", "measure_latency", "LATENCY_COLUMNS", "variant_row", "pipeline_table", "step_costs", "headline",
           "pareto_front", "other_section_points", "pareto_figure", "calibration_images", "eval_arrays",
           "model_complexity"]
