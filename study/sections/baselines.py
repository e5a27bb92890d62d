"""Section ``baselines`` (notebook ``00_baselines``): the data, the model zoo, the trained baselines.

Everything the later sections start from: the teacher and the students trained from
scratch (:func:`study.sections.common.trained_model`, cached and shared), measured the way
every compressed model is measured (params and GMACs by :func:`study.models.model_complexity`,
PyTorch eager latency by the study's protocol, :func:`study.bench.compare_latency` through
:class:`.measure.LatencyPlan`: all models timed together, interleaved, each in a fresh process)::

    from study.sections import baselines as sec
    trained = {name: sec.trained_model(ctx, name) for name in sec.model_names(ctx.profile)}
    table = pd.DataFrame(sec.table_rows(ctx, trained))
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .. import CLASS_NAMES, RARE_CLASSES
from ..data import LPCVCDataset, class_frequencies, load_split_arrays, val_transform
from ..metrics import SegmentationMeter
from ..models import list_models, model_complexity
from .common import build, start_label, trained_model
from .rows import table_row
from .measure import LatencyPlan

SECTION = "baselines"
#: The main student (source 000's UPerNet + MobileViT-S).
MAIN_STUDENT = "upernet_mobilevit_s"
#: Numbers reported by source 000 for orientation (real LPCVC, ImageNet-pretrained, 512 px).
REPORTED_BY_SOURCE000 = {"upernet_mobilevit_s": {"miou": 0.5365, "params_m": 5.6}}


def model_names(profile) -> list[str]:
    """The models section 0 trains: the profile's teacher, the MobileViT-S and ResNet-18 students."""
    return [profile.teacher, MAIN_STUDENT, "upernet_resnet18"]


def class_frequency(ctx) -> pd.DataFrame:
    """Pixel share (fraction in [0, 1]) of each class, index :data:`study.CLASS_NAMES`, columns train / val / test."""
    return pd.DataFrame({sp: class_frequencies(ctx.data_root, sp) for sp in ("train", "val", "test")},
                        index=CLASS_NAMES)


def background_floor(ctx, split: str = "val") -> float:
    """mIoU of a model that predicts background everywhere on ``split`` (the learning curves' floor).

    Returns:
        mIoU (0-1) over the classes present in the split (:class:`study.metrics.SegmentationMeter`).
    """
    _, masks = load_split_arrays(ctx.data_root, split, ctx.profile.image_size)
    meter = SegmentationMeter()
    meter.update(np.zeros_like(masks), masks)
    return float(meter.compute()["miou"])


def zoo_rows(ctx) -> list[dict]:
    """Params and MACs of every registered model at ``image_size`` (untrained; two counters).

    Returns:
        one dict per model: ``model, params_m, gmacs`` (aten counter), ``gmacs_tp``
        (torch-pruning hooks), ``rel_diff``, ``note`` (see :func:`study.models.model_complexity`).
    """
    hw = (ctx.profile.image_size, ctx.profile.image_size)
    rows = []
    for name in list_models():
        c = model_complexity(build(name, ctx.profile), hw)
        rows.append({"model": name, **{k: c[k] for k in ("params_m", "gmacs", "gmacs_tp", "rel_diff", "note")}})
    return rows


def table_rows(ctx, trained: Mapping[str, tuple[nn.Module, dict]]) -> list[dict]:
    """Rows of table ``baselines``: one per trained model.

    Columns after :data:`study.BASE_COLUMNS` (``params_m`` / ``gmacs`` at ``image_size``):
    ``role`` (teacher / student), ``pixel_acc``, ``gmacs_tp``, ``latency_ms_p50`` and
    ``latency_ms_p99`` (ms, PyTorch eager on this machine's CPU, batch 1), ``steps``,
    ``val_miou`` (the validation score), ``miou_last_quarter_gain`` (final validation mIoU
    minus its value at 75 % of training: > 0 means still learning), followed by the
    protocol's columns for torch (:func:`.measure.latency_columns`: ``threads``, ``rounds``,
    the p50's 95 % interval, CV, peak RSS of the measuring process, load time,
    ``gmacs_per_s_torch``, ``pct_of_peak_torch``); all models are measured together by one
    :meth:`.measure.LatencyPlan.measure` (files under ``<out_dir>/latency/baselines``),
    ``train_seconds`` (s), ``iou_<class>`` for every class (test), ``reported_by_source000_miou`` and
    ``reported_by_source000_params_m`` (NaN unless source 000 reports the model).

    Args:
        ctx: the notebook's context.
        trained: name -> ``(model, scores)`` as returned by :func:`trained_model`.
    """
    prof = ctx.profile
    hw = (prof.image_size, prof.image_size)
    plan = LatencyPlan(ctx, hw, ctx.out_dir / "latency" / SECTION, runtimes=("torch",))
    for name, (model, _) in trained.items():
        plan.add(name, model)
    meas = plan.measure()
    rows = []
    for name, (_, s) in trained.items():
        lat = meas[name]
        reported = REPORTED_BY_SOURCE000.get(name, {})
        rows.append(table_row(
            ctx, SECTION, name, _trained_label(name, prof), s, complexity=lat, input_hw=hw,
            role="teacher" if name == prof.teacher else "student", pixel_acc=s["pixel_acc"],
            gmacs_tp=lat["gmacs_tp"], latency_ms_p50=lat["latency_ms_p50_torch"],
            latency_ms_p99=lat["latency_ms_p99_torch"], steps=s["steps"], val_miou=s["val_miou"],
            miou_last_quarter_gain=s["miou_last_quarter_gain"], **lat["columns"],
            train_seconds=s["train_seconds"],
            **{f"iou_{k}": v for k, v in zip(CLASS_NAMES, s["per_class_iou"])},
            reported_by_source000_miou=reported.get("miou", np.nan),
            reported_by_source000_params_m=reported.get("params_m", np.nan)))
    return rows


def per_class_iou(table: pd.DataFrame) -> pd.DataFrame:
    """Test IoU per class: rows = models, columns = :data:`study.CLASS_NAMES` (from the table)."""
    iou = table.set_index("model")[[f"iou_{k}" for k in CLASS_NAMES]]
    iou.columns = list(CLASS_NAMES)
    return iou


@torch.inference_mode()
def predictions(ctx, trained: Mapping[str, tuple[nn.Module, dict]], n: int = 4):
    """The first ``n`` test images, their masks and each model's predicted label maps.

    Returns:
        ``(images uint8 (n, H, W, 3), masks uint8 (n, H, W), {name: int64 (n, H, W)})`` at
        ``image_size``.
    """
    size = ctx.profile.image_size
    images, masks = load_split_arrays(ctx.data_root, "test", size, limit=n)
    ds = LPCVCDataset(ctx.data_root, "test", transform=val_transform(size))
    x = torch.stack([ds[i][0] for i in range(len(images))]).to(ctx.device)
    preds = {name: model(x).argmax(1).cpu().numpy() for name, (model, _) in trained.items()}
    return images, masks, preds


def verdict(ctx, table: pd.DataFrame) -> str:
    """Markdown conclusion of notebook 00: teacher-student gap, compute ratio, rare classes, source 000."""
    prof = ctx.profile
    t = table.set_index("model")
    teacher, student = t.loc[prof.teacher], t.loc[MAIN_STUDENT]
    gap = teacher["miou"] - student["miou"]
    rare = ", ".join(f"{k} {student[f'iou_{k}']:.3f}" for k in RARE_CLASSES)
    reported = REPORTED_BY_SOURCE000[MAIN_STUDENT]
    lq = ", ".join(f"{m} {t.loc[m, 'miou_last_quarter_gain']:+.4f}" for m in t.index)
    return "\n".join([
        f"- On the **test** split the teacher ({prof.teacher}, {int(teacher['train_steps'])} steps) reaches mIoU "
        f"**{teacher['miou']:.4f}** against the MobileViT-S student's **{student['miou']:.4f}** "
        f"({int(student['train_steps'])} steps): a gap of **{gap:+.4f}** "
        + ("(the teacher is better, so KD has something to transfer)." if gap > 0 else
           "(**the teacher is not better**: knowledge distillation has nothing to transfer in this profile; "
           "see the distillation section)."),
        f"- The student has {student['params_m']:.2f} M params (source 000 reports {reported['params_m']} M) and costs "
        f"{student['gmacs']:.3f} GMACs at {prof.image_size}px; the teacher costs "
        f"{teacher['gmacs'] / student['gmacs']:.1f}x as much compute.",
        f"- Rare classes for the student: {rare} IoU.",
        f"- Still learning? Validation mIoU gained in the last quarter of training: {lq} "
        "(see the learning curves; a gain near 0 means the budget was long enough for this schedule).",
        f"- Source 000 reports mIoU {reported['miou']} for its MobileViT student on real LPCVC with ImageNet-pretrained "
        f"weights; our {student['miou']:.4f} is on "
        f"{'the embedded generated data' if ctx.generated_data else 'the given data'}, "
        f"{start_label(MAIN_STUDENT, prof)}, "
        f"at {prof.image_size}px: the numbers are not comparable, only the protocol is.",
    ])


__all__ = ["background_floor", "SECTION", "MAIN_STUDENT", "REPORTED_BY_SOURCE000", "model_names", "class_frequency", "zoo_rows",
           "table_rows", "per_class_iou", "predictions", "verdict", "trained_model"]


def _trained_label(name: str, profile) -> str:
    """``"trained from scratch"`` or ``"trained from an ImageNet encoder (<checkpoint>)"``."""
    label = start_label(name, profile)
    return "trained from scratch" if label == "from scratch" else f"trained from an {label}"
