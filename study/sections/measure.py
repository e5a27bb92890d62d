"""Measure a model the way the pruning sections report it: size, MACs, batch-1 latency.

Shared by the structured-pruning and head-pruning notebooks (02, 03): one call gives the
``params_m``, ``gmacs`` and latency columns of a row, with the profile's benchmark
settings. The counting and timing themselves are :func:`study.models.model_complexity`,
:func:`study.bench.benchmark_torch` and :func:`study.bench.benchmark_onnx`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch.nn as nn

from ..bench import benchmark_onnx, benchmark_torch
from ..models import model_complexity
from ..quant import export_onnx

#: CPU threads of every latency measurement in the pruning sections.
THREADS = 2


def measure_model(ctx, model: nn.Module, input_hw: Sequence[int], onnx_path: str | Path | None = None,
                  bench: bool = True) -> dict:
    """Params (M), GMACs (two counters), torch and ORT batch-1 latency (ms) of ``model``.

    Uses :func:`study.models.model_complexity` (``gmacs``: the study's aten counter;
    ``gmacs_tp``: torch-pruning's cross-check), :func:`study.bench.benchmark_torch` and,
    when ``onnx_path`` is given, :func:`study.quant.export_onnx` +
    :func:`study.bench.benchmark_onnx` (CPU provider), all at batch 1 with
    :data:`THREADS` threads and the profile's ``bench_warmup_s`` / ``bench_min_s`` /
    ``bench_min_runs``. An export / ORT failure gives NaN ORT columns and the error text
    in ``ort_error`` (reported in the table, not raised).

    Args:
        ctx: the notebook's context (benchmark settings).
        model: float32 model ``(1, 3, H, W) -> logits``; not modified.
        input_hw: ``(H, W)`` px.
        onnx_path: where to export the ONNX model for the ORT timing (None: no ORT).
        bench: False skips all timing (latency columns NaN).

    Returns:
        dict with ``params_m, gmacs, gmacs_tp, latency_ms_p50_torch, latency_ms_p99_torch,
        latency_ms_p50_ort, latency_ms_p99_ort, peak_rss_mb_ort`` (floats; ms, MB) and
        ``ort_error`` (str, "" when fine).
    """
    hw = tuple(int(v) for v in input_hw)
    c = model_complexity(model, hw)
    nan = float("nan")
    out = {"params_m": c["params_m"], "gmacs": c["gmacs"], "gmacs_tp": c["gmacs_tp"],
           "latency_ms_p50_torch": nan, "latency_ms_p99_torch": nan,
           "latency_ms_p50_ort": nan, "latency_ms_p99_ort": nan, "peak_rss_mb_ort": nan, "ort_error": ""}
    if not bench:
        return out
    p = ctx.profile
    kw = dict(warmup_s=p.bench_warmup_s, min_s=p.bench_min_s, min_runs=p.bench_min_runs)
    r = benchmark_torch(model, hw, batch=1, threads=THREADS, **kw)
    out.update(latency_ms_p50_torch=r["latency_ms_p50"], latency_ms_p99_torch=r["latency_ms_p99"])
    if onnx_path is not None:
        try:
            path = export_onnx(model, onnx_path, hw)
            r = benchmark_onnx(path, hw, batch=1, threads=THREADS, providers=["CPUExecutionProvider"], **kw)
            out.update(latency_ms_p50_ort=r["latency_ms_p50"], latency_ms_p99_ort=r["latency_ms_p99"],
                       peak_rss_mb_ort=r.get("peak_rss_mb", nan))
        except Exception as exc:  # noqa: BLE001 - reported in the table's ort_error column
            out["ort_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


__all__ = ["measure_model", "THREADS"]
