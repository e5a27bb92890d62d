"""Section ``head_pruning`` (notebook ``03_head_pruning``): can removing attention heads make MobileViT faster?

The head surgeries are in :mod:`study.prune` (:func:`~study.prune.head_importance`,
:func:`~study.prune.prune_heads`, :func:`~study.prune.prune_head_dim`,
:func:`~study.prune.repartition_heads`); the cached prune -> fine-tune runner is shared
with notebook 02 (:func:`.structured_pruning.pruned_variant`).

Notebook 03's path to the methods::

    from study.sections import head_pruning as sec
    for method, setting in sec.VARIANTS:     # e.g. ("heads", {"keep_heads": 2})
        m, info = sec.pruned_variant(ctx, student, builder, method, **setting, ...)
            -> structured_pruning.apply_method -> study.prune.prune_heads / prune_head_dim / ...
        plan.add(tag, m)                     # study.sections.measure.LatencyPlan
    meas = plan.measure()                    # all variants interleaved (study.bench.compare_latency)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch.nn as nn

from .. import prune
from .rows import table_row
from .structured_pruning import METHOD_KIND, STUDENT, calibration_batches, pruned_variant, student  # noqa: F401

SECTION = "head_pruning"

#: The variants of notebook 03: (method, its one amount parameter). ``keep_heads`` = heads
#: kept per block, ``keep_ratio`` = fraction of each head's dims kept, ``num_heads`` = new
#: head count of the same width (source 000's "4 -> 2 heads").
VARIANTS = [("heads", {"keep_heads": 2}), ("heads", {"keep_heads": 1}), ("head_dim", {"keep_ratio": 0.5}),
            ("head_dim", {"keep_ratio": 0.25}), ("repartition", {"num_heads": 2})]
LABEL = {"heads": "heads removed (Michel importance)", "head_dim": "head dims removed",
         "repartition": "re-partition, width unchanged (source 000's code)"}
#: Source 000's "4 -> 2 heads" (HF MobileViT-S, LPCVC, Jetson Nano), put next to our real
#: 4 -> 2 removal and the re-partition its code actually performs.
REPORTED_BY_SOURCE000 = {"text": "heads 4->2: mIoU 0.545 -> 0.533, params 5.6M -> 4.6M, no FPS gain",
                         "miou_before": 0.545, "miou_after": 0.533, "params_m_before": 5.6, "params_m_after": 4.6}


def attn_params(model: nn.Module) -> float:
    """Parameters of the attention blocks (qkv + proj), in millions."""
    return sum(p.numel() for m in prune.attention_modules(model).values() for p in m.parameters()) / 1e6


def variant_row(ctx, method: str, amount: float, model: nn.Module, meas: dict, base_meas: dict, *,
                base_tag: str, input_hw: Sequence[int], info: dict | None = None,
                base_scores: dict | None = None) -> dict:
    """One row of the section table.

    Args:
        method: a head method of :data:`VARIANTS`, or ``"dense"`` (``amount`` 0).
        amount: the value of the method's amount parameter (``amount`` column: heads kept,
            fraction of head dims kept or new head count, per method).
        model: the row's model (heads / head_dim / attention params are read from it).
        meas, base_meas: the entries of :meth:`.measure.LatencyPlan.measure` of the model and of
            the dense student. Latency columns: ``latency_ms_p50`` / ``latency_ms_p99`` (ORT,
            ms), then ``meas["columns"]`` (:func:`.measure.latency_columns`: ``threads, rounds``, both runtimes with
            intervals, CV, peak RSS of the measuring process, ``gmacs_per_s``, ``pct_of_peak``,
            ``verdict_vs_dense_<rt>``); ``speedup`` = dense ORT p50 / ORT p50.
        info: :func:`pruned_variant`'s info; None for the dense row (scores ``base_scores``).
    """
    hc = prune.head_config(model)
    dense = info is None
    return table_row(
        ctx, SECTION, STUDENT, method, base_scores if dense else info["scores"], complexity=meas, input_hw=input_hw,
        base=base_tag, amount=amount, kind=METHOD_KIND.get(method, "dense baseline"),
        description=LABEL.get(method, "dense"),
        heads="/".join(str(h) for h in sorted({h for h, _ in hc.values()})),
        head_dim="/".join(str(d) for d in sorted({d for _, d in hc.values()})),
        attn_params_m=attn_params(model),
        latency_ms_p50=meas["latency_ms_p50_ort"], latency_ms_p99=meas["latency_ms_p99_ort"],
        **meas["columns"],
        miou_before_ft=base_scores["miou"] if dense else info["miou_before_ft"],
        ft_steps=0 if dense else info["ft_steps"],
        speedup=base_meas["latency_ms_p50_ort"] / meas["latency_ms_p50_ort"],
        ort_error=meas["ort_error"], torch_error=meas["torch_error"])


def section_table(rows: list) -> pd.DataFrame:
    """The section table with source 000's reported "4 -> 2 heads" numbers next to the
    ``heads`` 2 and ``repartition`` 2 rows."""
    df = pd.DataFrame(rows)
    r = REPORTED_BY_SOURCE000
    df["reported_by_source_000"] = ""
    df["reported_miou_before"], df["reported_miou_after"] = np.nan, np.nan
    df["reported_params_m_before"], df["reported_params_m_after"] = np.nan, np.nan
    sel = ((df.method == "heads") & (df.amount == 2)) | ((df.method == "repartition") & (df.amount == 2))
    df.loc[sel, "reported_by_source_000"] = r["text"]
    df.loc[sel, ["reported_miou_before", "reported_miou_after", "reported_params_m_before",
                 "reported_params_m_after"]] = [r["miou_before"], r["miou_after"], r["params_m_before"],
                                                r["params_m_after"]]
    return df


__all__ = ["SECTION", "VARIANTS", "LABEL", "REPORTED_BY_SOURCE000", "attn_params", "variant_row", "section_table",
           "pruned_variant", "calibration_batches", "student"]
