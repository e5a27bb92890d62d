"""Section ``bilevel_search`` (notebook ``06_bilevel_search``): searched widths vs. baselines at equal MACs.

The lab bench of notebook 06; the method itself (source 002's bi-level pruning
parameterization) is :mod:`study.bilevel`, which takes no context. Paths:

- :func:`compress` -> :func:`study.bilevel.bilevel_search` + :func:`study.bilevel.apply_masks`
  (``method="bilevel"``), :func:`study.bilevel.magnitude_prune_to_macs` (``"magnitude"``),
  :func:`study.bilevel.uniform_width` (``"uniform"``), :func:`study.bilevel.random_masks_to_macs`
  (``"random"``); then the same recovery fine-tune (:func:`study.sections.common.finetune`)
  and evaluation for every method. Cached.
- :func:`plan` - the profile's search / sweep lengths and sweep values.
- :func:`reference_row`, :func:`compressed_row` - the table rows (through
  :func:`study.sections.common.table_row`); each row's model is added to the notebook's
  :class:`study.sections.measure.LatencyPlan` (``plan=``), and :func:`add_latency` fills the
  eager-PyTorch latency columns once :meth:`~study.sections.measure.LatencyPlan.measure` has
  timed all of them together (the study's protocol, :func:`study.bench.compare_latency`).
  The plan is passed in, not imported: this module's import closure is the cache key of
  :func:`compress`, and the measuring code must not invalidate the searches.
- :func:`verdict` - searched vs. each baseline at each MACs target.
- :data:`SOURCE002`, :data:`SOURCE002_SWEEPS` - what source 002 reports.

MACs are GMACs of one ``(1, 3, S, S)`` image, ``S = profile.image_size``, counted by
:func:`study.models.gmacs`.
"""
from __future__ import annotations

import copy
import os
import re
import time
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
import torch.nn as nn

from .. import bilevel
from ..models import create_model, gmacs, model_fingerprint
from ..profiles import Profile
from ..train import evaluate, seed_everything
from .common import cached, finetune, loaders, trained_model
from .rows import table_row

SECTION = "bilevel_search"
#: ``method`` values of :func:`compress`.
METHODS = ("bilevel", "magnitude", "uniform", "random")
#: Search settings of the main experiments: source 002's beta and lambda, implicit term on.
DEFAULT_SEARCH = {"beta": 0.01, "lam": 0.1, "implicit": True}
NAN = float("nan")

#: Results reported by source 002 (Yang, Zhao et al., CVPR 2023): ``(table, model,
#: GMACs, mIoU %)``. ADE20K at 512x512, Cityscapes at 512x1024: a different dataset and
#: resolution from this study, so only directions compare.
SOURCE002 = (
    ("Table 1 ADE20K", "TopFormer-Tiny", 0.6, 31.8), ("Table 1 ADE20K", "TopFormer-Small", 1.2, 36.1),
    ("Table 1 ADE20K", "TopFormer-Base", 1.8, 37.8), ("Table 1 ADE20K", "Ours-Tiny", 0.7, 33.5),
    ("Table 1 ADE20K", "Ours-Small", 1.2, 37.5), ("Table 1 ADE20K", "Ours-Base", 1.8, 38.9),
    ("Table 5 Cityscapes", "DeepLabV3+ MBv2", 9.5, 69.0), ("Table 5 Cityscapes", "Ours-Base-DeepLab", 7.6, 70.9),
    ("Table 5 Cityscapes", "Ours-Small-DeepLab", 4.3, 70.2),
    ("Table 3 Cityscapes", "Without implicit gradients", 2.4, 71.9),
    ("Table 3 Cityscapes", "Ours-Small", 2.4, 73.6),
)
SOURCE002_COLUMNS = ("source 002 table", "model", "reported_gmacs", "reported_miou_pct")
#: Source 002's sweeps on Cityscapes (Tables A1, A2, 3): ``{value: mIoU %}`` per parameter;
#: ``no_implicit`` is Table 3's ablation at lambda = 0.1.
SOURCE002_SWEEPS = {"beta": {0.001: 73.1, 0.01: 73.6, 0.1: 72.8, 1.0: 71.2},
                    "lam": {0.01: 73.1, 0.1: 73.6, 1.0: 70.8},
                    "no_implicit": {0.1: 71.9}}


def source002_table() -> pd.DataFrame:
    """:data:`SOURCE002` as a DataFrame with columns :data:`SOURCE002_COLUMNS`."""
    return pd.DataFrame(list(SOURCE002), columns=list(SOURCE002_COLUMNS))


@dataclass(frozen=True)
class Plan:
    """How long notebook 06's searches and sweeps run in a profile.

    Attributes:
        main_steps: mask steps of the main searches (Experiments 1 and 2).
        sweep_steps, sweep_finetune_steps: mask steps and recovery fine-tune steps of each
            sweep point (Experiment 3); shorter than the main ones except in ``paper``.
        betas, lams: the beta / lambda sweep values (source 002 Tables A1, A2).
        deeplab_ratios: MACs targets of Experiment 2 as fractions of the dense DeepLabV3+
            (source 002 Table 5: 4.3/9.5, and 7.6/9.5 in ``paper``).
    """

    main_steps: int
    sweep_steps: int
    sweep_finetune_steps: int
    betas: tuple
    lams: tuple
    deeplab_ratios: tuple


def plan(profile: Profile) -> Plan:
    """The :class:`Plan` of ``profile`` (full lists and lengths in ``paper``, short sweeps elsewhere)."""
    smoke, paper = profile.name == "smoke", profile.name == "paper"
    return Plan(main_steps=profile.search_steps,
                sweep_steps=profile.search_steps if paper else max(2, profile.search_steps // 5),
                sweep_finetune_steps=profile.finetune_steps if paper else max(1, profile.finetune_steps // 5),
                betas=(0.001, 0.01, 0.1, 1.0) if not smoke else (0.01, 1.0),
                lams=(0.01, 0.1, 1.0) if not smoke else (0.1, 1.0),
                deeplab_ratios=(7.6 / 9.5, 4.3 / 9.5) if paper else (4.3 / 9.5,))


def input_hw(ctx) -> tuple[int, int]:
    """``(H, W)`` px of this section's MACs and latency: the profile's full image size."""
    return (ctx.profile.image_size, ctx.profile.image_size)


def dense_gmacs(name: str, hw: Sequence[int]) -> float:
    """GMACs (:func:`study.models.gmacs`) of a freshly built registry model ``name`` at ``hw``."""
    return gmacs(create_model(name), tuple(hw))


def cpu_cores() -> int:
    """CPU cores this process may use (printed beside the search's CPU time)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def compress(ctx, base: str, method: str, target_gmacs: float, *, search_kw: dict | None = None,
             finetune_steps: int | None = None, search_steps: int | None = None) -> dict:
    """Compress the trained ``base`` to ``target_gmacs`` with ``method``, fine-tune, evaluate (cached).

    ``method``: ``"bilevel"`` (:func:`study.bilevel.bilevel_search` with ``search_kw``,
    then physical removal), ``"magnitude"``, ``"uniform"``, ``"random"`` (the
    :mod:`study.bilevel` baselines at matched MACs). Every method gets the same recovery
    fine-tune (:func:`study.sections.common.finetune`, ``finetune_steps``, default the
    profile's) and is evaluated on the validation split. The cache key covers the base
    model's weights (:func:`study.models.model_fingerprint`), the arguments, the profile,
    the seed, the data and the code (this module's import closure).

    Args:
        ctx: the notebook's context.
        base: registry name of the trained model (:func:`study.sections.common.trained_model`).
        method: one of :data:`METHODS`.
        target_gmacs: MACs budget, GMACs at :func:`input_hw`; in (0, dense].
        search_kw: extra arguments of :func:`study.bilevel.bilevel_search` (``beta``,
            ``lam``, ``implicit``, ...); ignored by the baselines.
        finetune_steps: recovery fine-tune steps (default ``profile.finetune_steps``).
        search_steps: mask steps of the search (default ``profile.search_steps``).

    Returns:
        dict with ``model`` (the physically pruned, fine-tuned network, eval mode, on
        ``ctx.device``), ``masks`` (``{group key: bool (C,)}``), ``scores`` (as
        :func:`study.train.evaluate`), ``search`` (:class:`study.bilevel.SearchResult`
        as a dict, None for the baselines), ``search_cpu_s`` (process CPU seconds of the
        search, 0 for the one-shot baselines), ``finetune_s`` (wall seconds), and the
        arguments as used: ``base``, ``method``, ``target_gmacs``, ``search_steps`` (0 for
        the baselines), ``finetune_steps``.

    Raises:
        ValueError: unknown ``method`` or a bad ``target_gmacs``.
    """
    if method not in METHODS:
        raise ValueError(f"compress: unknown method {method!r}; expected one of {METHODS}")
    hw = input_hw(ctx)
    prof = ctx.profile
    ft = prof.finetune_steps if finetune_steps is None else int(finetune_steps)
    steps = prof.search_steps if search_steps is None else int(search_steps)
    kw = dict(search_kw or {})
    base_model, _ = trained_model(ctx, base)
    key = {"base": base, "base_fp": model_fingerprint(base_model), "method": method,
           "target": round(float(target_gmacs), 9), "ft": ft,
           "steps": steps if method == "bilevel" else 0, "kw": kw if method == "bilevel" else {}}

    def compute():
        seed_everything(ctx.seed)
        model, _ = trained_model(ctx, base)
        model = copy.deepcopy(model).to(ctx.device)
        x = torch.zeros(1, 3, *hw, device=ctx.device)
        rec = None
        cpu_s = 0.0
        if method == "bilevel":
            tr, _ = loaders(ctx)
            res = bilevel.bilevel_search(model, tr, target_gmacs, input_hw=hw, steps=steps, seed=ctx.seed, **kw)
            rec, cpu_s = res.to_dict(), res.cpu_s
            keep = res.masks
            pruned = bilevel.apply_masks(model, keep, x)
        elif method == "magnitude":
            pruned, keep = bilevel.magnitude_prune_to_macs(model, target_gmacs, hw)
        elif method == "uniform":
            pruned, keep = bilevel.uniform_width(model, target_gmacs, hw)
        else:
            pruned, keep = bilevel.random_masks_to_macs(model, target_gmacs, hw, seed=ctx.seed)
        t0 = time.perf_counter()
        finetune(ctx, pruned, ft, progress=False, desc=f"{method}-{base}")
        ft_s = time.perf_counter() - t0
        _, va = loaders(ctx)
        scores = evaluate(pruned, va, progress=False)
        return {"masks": keep, "state_dict": {k: v.detach().cpu() for k, v in pruned.state_dict().items()},
                "scores": scores, "search": rec, "search_cpu_s": cpu_s, "finetune_s": ft_s}

    rec = cached(ctx, f"bilevel-{base}-{method}", key, compute, modules=[__name__])
    pruned = bilevel.apply_masks(base_model, rec["masks"], torch.zeros(1, 3, *hw, device=ctx.device))
    pruned.load_state_dict(rec["state_dict"])
    pruned.eval()
    return {**rec, "model": pruned, "base": base, "method": method, "target_gmacs": float(target_gmacs),
            "search_steps": key["steps"], "finetune_steps": ft}


def _row(ctx, name: str, method: str, model: nn.Module, scores: dict, *, base: str, target_gmacs: float,
         search_cpu_s: float, beta: float, lam: float, implicit: bool, experiment: str,
         steps_search: int, finetune_steps: int, plan=None) -> dict:
    hw = input_hw(ctx)
    tag = ""
    if plan is not None:
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{len(plan):02d}-{name}-{method}-{experiment}")
        plan.add(tag, model)
    row = table_row(ctx, SECTION, name, method, scores, model=model, input_hw=hw,
                    latency_ms_p50=NAN, base=base, target_gmacs=target_gmacs,
                    search_cpu_hours=search_cpu_s / 3600, beta=beta, lam=lam, implicit=implicit,
                    experiment=experiment, steps_search=steps_search, finetune_steps=finetune_steps, bench_tag=tag)
    row["macs_target_err_pct"] = 100 * abs(row["gmacs"] - target_gmacs) / target_gmacs  # NaN without target
    return row


def add_latency(rows: Sequence[dict], meas: dict) -> list[dict]:
    """The rows with their latency filled from :meth:`study.sections.measure.LatencyPlan.measure`.

    ``latency_ms_p50`` becomes the protocol's eager-PyTorch p50 (ms, batch 1, median of the
    round medians), followed by the protocol columns ``meas[tag]["columns"]`` (``threads``,
    ``rounds``, the 95 % interval, CV, peak RSS of the measuring process, ``gmacs_per_s_torch``,
    ``pct_of_peak_torch``, ...). Rows without a ``bench_tag`` in ``meas`` keep NaN.
    """
    out = []
    for r in rows:
        r = dict(r)
        m = meas.get(r.get("bench_tag", ""))
        if m is not None:
            r["latency_ms_p50"] = m["latency_ms_p50_torch"]
            r.update(m["columns"])
        out.append(r)
    return out


def reference_row(ctx, name: str, method: str, model: nn.Module, scores: dict, *, base: str,
                  experiment: str, target_gmacs: float = NAN, plan=None) -> dict:
    """Row of an uncompressed model (``method`` ``"dense"`` or ``"hand-designed"``).

    Columns: :data:`study.BASE_COLUMNS` (params and GMACs counted on ``model`` at
    :func:`input_hw`), ``latency_ms_p50`` (ms, eager PyTorch, batch 1, this machine; NaN until
    :func:`add_latency`; ``model`` is added to ``plan``, a
    :class:`study.sections.measure.LatencyPlan`, when given),
    ``base``, ``target_gmacs`` (the MACs target it stands beside, NaN for none),
    ``search_cpu_hours`` (0), ``beta``, ``lam`` (NaN), ``implicit`` (False),
    ``experiment``, ``steps_search``, ``finetune_steps`` (0), ``bench_tag`` (the model's tag
    in ``plan``, "" without), ``macs_target_err_pct`` (``100 |gmacs - target| / target``,
    NaN without a target).
    """
    return _row(ctx, name, method, model, scores, base=base, target_gmacs=target_gmacs, search_cpu_s=0.0,
                beta=NAN, lam=NAN, implicit=False, experiment=experiment, steps_search=0, finetune_steps=0,
                plan=plan)


def compressed_row(ctx, name: str, result: dict, *, experiment: str, plan=None) -> dict:
    """Row of a :func:`compress` result (same columns as :func:`reference_row`).

    ``beta``, ``lam``, ``implicit`` are the search's (NaN, NaN, False for the baselines);
    ``search_cpu_hours`` is the process CPU time of the search / 3600 (all threads, not
    wall time x cores); ``steps_search`` and ``finetune_steps`` are the steps used.
    """
    if result["method"] == "bilevel":
        cfg = result["search"]["config"]
        beta, lam, implicit = cfg["beta"], cfg["lam"], cfg["implicit"]
    else:
        beta, lam, implicit = NAN, NAN, False
    return _row(ctx, name, result["method"], result["model"], result["scores"], base=result["base"],
                target_gmacs=result["target_gmacs"], search_cpu_s=result["search_cpu_s"], beta=beta, lam=lam,
                implicit=implicit, experiment=experiment, steps_search=result["search_steps"],
                finetune_steps=result["finetune_steps"], plan=plan)


def verdict(table: pd.DataFrame, targets: dict) -> pd.DataFrame:
    """Searched vs. each baseline at each MACs target of the ``main`` experiment.

    Args:
        table: rows of :func:`reference_row` / :func:`compressed_row`.
        targets: ``{variant: target GMACs}`` (e.g. ``{"t": ..., "s": ...}``).

    Returns:
        one row per (target, baseline): ``target``, ``vs``, ``searched_miou``,
        ``other_miou``, ``delta_miou``, ``searched_gmacs``, ``other_gmacs``,
        ``searched_better`` (searched mIoU strictly higher).
    """
    main = table[table.experiment == "main"]
    out = []
    for v, tgt in targets.items():
        sub = main[main.target_gmacs == tgt].set_index("method")
        b = sub.loc["bilevel"]
        for other in ("magnitude", "uniform", "random", "hand-designed"):
            o = sub.loc[other]
            out.append({"target": f"TopFormer-{v.upper()} MACs", "vs": other,
                        "searched_miou": b.miou, "other_miou": o.miou, "delta_miou": b.miou - o.miou,
                        "searched_gmacs": b.gmacs, "other_gmacs": o.gmacs,
                        "searched_better": bool(b.miou > o.miou)})
    return pd.DataFrame(out)


__all__ = ["SECTION", "METHODS", "DEFAULT_SEARCH", "SOURCE002", "SOURCE002_COLUMNS", "SOURCE002_SWEEPS",
           "Plan", "plan", "input_hw", "dense_gmacs", "cpu_cores", "compress", "reference_row",
           "compressed_row", "add_latency", "verdict", "source002_table"]
