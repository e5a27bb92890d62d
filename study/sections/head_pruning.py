"""Section ``head_pruning`` (notebook ``03_head_pruning``): can removing attention heads make MobileViT faster?

The head surgeries are in :mod:`study.prune` (:func:`~study.prune.head_importance`,
:func:`~study.prune.prune_heads`, :func:`~study.prune.prune_head_dim`,
:func:`~study.prune.repartition_heads`); the cached prune -> fine-tune runner, the
"dense + same fine-tune" control and the verdict helpers are shared with notebook 02
(:mod:`.structured_pruning`). Every row is on the test split; every mIoU delta is
``variant - control`` with a paired bootstrap over test images (one seed, data noise only);
the axes are ``params_removed`` / ``macs_removed`` with the method's amount as a secondary
column.

Notebook 03's path to the methods::

    from study.sections import head_pruning as sec
    ctl, cinfo = sec.control_variant(ctx, student, builder, ...)   # notebook 02's cache entry
    for method, setting in sec.variants(ctx.full_grid):   # e.g. ("heads", {"keep_heads": 2})
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
from .structured_pruning import (CONTROL, CURVE_POINTS, DENSE, METHOD_KIND, STUDENT, budget,  # noqa: F401
                                 calibration_batches, comparison_columns, control_variant, curve_frame,
                                 dense_info, pruned_variant, removed, student, verdict_columns)

SECTION = "head_pruning"

#: The variants of notebook 03: (method, its one amount parameter). ``keep_heads`` = heads
#: kept per block, ``keep_ratio`` = fraction of each head's dims kept, ``num_heads`` = new
#: head count of the same width (source 000's "4 -> 2 heads").
VARIANTS = [("heads", {"keep_heads": 2}), ("heads", {"keep_heads": 1}), ("head_dim", {"keep_ratio": 0.5}),
            ("head_dim", {"keep_ratio": 0.25}), ("repartition", {"num_heads": 2})]
#: The core comparison (always run): source 000's 4 -> 2 done for real, the same width
#: removed as head dimensions, and source 000's re-partition. The rest is ``--full-grid``.
CORE_VARIANTS = [("heads", {"keep_heads": 2}), ("head_dim", {"keep_ratio": 0.5}), ("repartition", {"num_heads": 2})]
LABEL = {"heads": "heads removed (Michel importance)", "head_dim": "head dims removed",
         "repartition": "re-partition, width unchanged (source 000's code)",
         DENSE: "dense (no fine-tune)", CONTROL: "control: dense + the same fine-tune"}
#: Source 000's "4 -> 2 heads" (HF MobileViT-S, LPCVC, Jetson Nano), put next to our real
#: 4 -> 2 removal and the re-partition its code actually performs.
REPORTED_BY_SOURCE000 = {"text": "heads 4->2: mIoU 0.545 -> 0.533, params 5.6M -> 4.6M, no FPS gain",
                         "miou_before": 0.545, "miou_after": 0.533, "params_m_before": 5.6, "params_m_after": 4.6}


def variants(full_grid: bool = False) -> list:
    """The ``(method, setting)`` pairs to run: :data:`CORE_VARIANTS`, or all :data:`VARIANTS` with ``full_grid``."""
    return list(VARIANTS if full_grid else CORE_VARIANTS)


def attn_params(model: nn.Module) -> float:
    """Parameters of the attention blocks (qkv + proj), in millions."""
    return sum(p.numel() for m in prune.attention_modules(model).values() for p in m.parameters()) / 1e6


def variant_row(ctx, method: str, amount: float, model: nn.Module, meas: dict, base_meas: dict, *,
                base_tag: str, input_hw: Sequence[int], info: dict, control: dict, budget_row: dict,
                budget_control: dict) -> dict:
    """One row of the section table (test split).

    Args:
        method: a head method of :data:`VARIANTS`, :data:`DENSE` or :data:`CONTROL` (``amount`` 0).
        amount: the value of the method's amount parameter (``amount`` column, secondary to
            ``params_removed`` / ``macs_removed``: heads kept, fraction of head dims kept or
            new head count, per method).
        model: the row's model (heads / head_dim / attention params are read from it).
        meas, base_meas: the entries of :meth:`.measure.LatencyPlan.measure` of the model and of
            the dense student. Latency columns: ``latency_ms_p50`` / ``latency_ms_p99`` (ORT,
            ms), then ``meas["columns"]`` (:func:`.measure.latency_columns`: ``threads, rounds``, both runtimes with
            intervals, CV, peak RSS of the measuring process, ``gmacs_per_s``, ``pct_of_peak``,
            ``verdict_vs_dense_<rt>``); ``speedup`` = dense ORT p50 / ORT p50.
        info: :func:`pruned_variant` / :func:`control_variant` / :func:`dense_info` info.
        control: the control's info; budget_row, budget_control: :func:`budget` of the row
            and of the control. Verdict columns: :func:`.structured_pruning.comparison_columns`.
    """
    hc = prune.head_config(model)
    rm = removed(meas, base_meas)
    return table_row(
        ctx, SECTION, STUDENT, method, info["test_scores"], complexity=meas, input_hw=input_hw, split="test",
        train_steps=budget_row["train_steps"], train_images=budget_row["train_images"],
        base=base_tag, kind=METHOD_KIND.get(method, method), description=LABEL.get(method, method), **rm,
        amount=amount, heads="/".join(str(h) for h in sorted({h for h, _ in hc.values()})),
        head_dim="/".join(str(d) for d in sorted({d for _, d in hc.values()})),
        attn_params_m=attn_params(model), ft_steps=info["ft_steps"], ft_lr=info["ft_lr"],
        **comparison_columns(info, control, method, budget_row, budget_control),
        val_miou=info["val_miou"], miou_before_ft=info["miou_before_ft"],
        ft_last_quarter_gain=info["ft_last_quarter_gain"],
        latency_ms_p50=meas["latency_ms_p50_ort"], latency_ms_p99=meas["latency_ms_p99_ort"],
        **meas["columns"],
        speedup=base_meas["latency_ms_p50_ort"] / meas["latency_ms_p50_ort"],
        ort_error=meas["ort_error"], torch_error=meas["torch_error"])


def section_table(rows: list) -> pd.DataFrame:
    """The section table with source 000's reported "4 -> 2 heads" numbers next to the
    ``heads`` 2 and ``repartition`` 2 rows, and ``miou_drop`` = ``-diff_vs_control``."""
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
    df["miou_drop"] = 0.0 - df["diff_vs_control"]
    return df


def _row(df, method, amount=None):
    d = df[df.method == method]
    if amount is not None:
        d = d[np.isclose(d.amount.astype(float), float(amount))]
    return None if d.empty else d.iloc[0]


def _ci(r) -> str:
    return f"{r['diff_vs_control']:+.3f} mIoU vs the control, CI [{r['ci95_low']:+.3f}, {r['ci95_high']:+.3f}] ({r['verdict']})"


def same_width_comparison(info_heads: dict, info_dims: dict) -> dict:
    """``heads - head_dim`` test mIoU at equal width removed: :func:`.structured_pruning.verdict_columns`
    of the two variants' per-image test confusions (paired bootstrap, one seed)."""
    return verdict_columns(info_heads["test_cms"], info_dims["test_cms"])


def what_it_means(df: pd.DataFrame) -> list[str]:
    """One line per source claim: "source 000 says X; here, at this budget, Y with CI [a, b]".

    Computed from :func:`section_table`'s table; a claim whose rows are missing says so.
    """
    out = []
    ctl, dense = _row(df, CONTROL), _row(df, DENSE)
    rep, heads, dims = _row(df, "repartition", 2), _row(df, "heads", 2), _row(df, "head_dim", 0.5)
    if ctl is None or dense is None:
        return ["control or dense row missing: no verdict"]
    out.append(f"Control: the fine-tune alone ({int(ctl.ft_steps)} steps) moves test mIoU {dense.miou:.3f} -> "
               f"{ctl.miou:.3f}; every delta below is against this control (equal train_steps).")
    if rep is not None:
        out.append(f"Source 000 says 4 -> 2 heads costs little accuracy (0.545 -> 0.533, -0.012); here, at this "
                   f"budget, its re-partition {_ci(rep)}" + (f", removing 2 heads for real {_ci(heads)}" if heads is not None else "") + ".")
        out.append(f"Source 000 says params 5.6 M -> 4.6 M; here the re-partition removes {rep.params_removed:.1%} "
                   f"of the params (it keeps every weight)" + (f", real 4 -> 2 removal {heads.params_removed:.1%} of the params "
                                                               f"and {heads.macs_removed:.1%} of the MACs" if heads is not None else "") + ".")
        out.append(f"Source 000 says no FPS gain; here the re-partition's ORT speed-up is {rep.speedup:.2f}x "
                   f"({rep.verdict_vs_dense_ort})" + (f", real removal {heads.speedup:.2f}x ({heads.verdict_vs_dense_ort})"
                                                      if heads is not None else "") + " (95 % intervals over rounds).")
    if dims is not None:
        out.append(f"Head-dim pruning (keep 0.5 of each head's dims, the same width as 2 of 4 heads) removes "
                   f"{dims.params_removed:.1%} of the params: {_ci(dims)}.")
    return out


__all__ = ["SECTION", "VARIANTS", "CORE_VARIANTS", "LABEL", "REPORTED_BY_SOURCE000", "variants", "attn_params",
           "variant_row", "section_table", "same_width_comparison", "what_it_means", "pruned_variant",
           "control_variant", "dense_info", "budget", "curve_frame", "calibration_batches", "student", "CONTROL",
           "DENSE", "CURVE_POINTS"]
