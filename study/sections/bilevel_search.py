"""Section ``bilevel_search`` (notebook ``06_bilevel_search``): searched widths vs. baselines at equal MACs
and equal training.

The lab bench of notebook 06; the method itself (source 002's bi-level pruning
parameterization) is :mod:`study.bilevel`, which takes no context. Paths:

- :func:`compress` -> :func:`study.bilevel.bilevel_search` + :func:`study.bilevel.apply_masks`
  (``method="bilevel"``), :func:`study.bilevel.magnitude_prune_to_macs` (``"magnitude"``),
  :func:`study.bilevel.uniform_width` (``"uniform"``), :func:`study.bilevel.random_masks_to_macs`
  (``"random"``), or no pruning (``"dense+ft"``, the control); then a recovery fine-tune
  (:func:`study.sections.common.finetune`) so that every arm gets the same number of weight
  updates after its parent's training (:func:`budget_split`), and evaluation on val (for
  choices) and test (reported, with per-image confusions for the paired bootstrap). Cached.
- :func:`hand_designed` - TopFormer-T/S trained like the parent plus the same post-parent
  budget (cached).
- :func:`plan` - the profile's search / sweep lengths, budgets and sweep values.
- :func:`choose_search` - the search hyper-parameters chosen from the sweep (MACs budget met, then val).
- :func:`row` - one table row (through :func:`study.sections.rows.table_row`) with the
  budget columns, ``gmacs_raw`` / ``target_gmacs``, ``params_removed`` / ``macs_removed`` and
  the paired-bootstrap comparison with a reference arm (:func:`compare`); each row's model
  is added to the notebook's :class:`study.sections.measure.LatencyPlan` (``plan=``), and
  :func:`add_latency` fills the eager-PyTorch latency columns once
  :meth:`~study.sections.measure.LatencyPlan.measure` has timed all of them together. The plan
  is passed in, not imported: this module's import closure is the cache key of
  :func:`compress`, and the measuring code must not invalidate the searches.
- :func:`verdict` - searched vs. the control, each baseline and the hand-designed model at each
  MACs target, with a paired bootstrap interval over test images.
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

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .. import bilevel
from ..metrics import bootstrap_miou_diff, verdict as ci_verdict
from ..models import create_model, gmacs, model_fingerprint
from ..profiles import Profile
from ..train import seed_everything
from .common import cached, eval_loader, finetune, loaders, test_confusions, test_scores, trained_model
from .rows import table_row

SECTION = "bilevel_search"
#: ``method`` values of :func:`compress` (``"dense+ft"``: the unpruned parent, fine-tuned for
#: the same post-parent budget: the control every pruning delta is measured against).
METHODS = ("bilevel", "magnitude", "uniform", "random", "dense+ft")
CONTROL = "dense+ft"
#: Search settings of the main experiments before the val choice: source 002's beta and
#: lambda, implicit term on, this study's calibrated mask parameterisation
#: (:data:`study.bilevel.CALIBRATED_PARAMS`, the defaults of ``bilevel_search``).
DEFAULT_SEARCH = {"beta": 0.01, "lam": 0.1, "implicit": True}
#: Source 002's own parameterisation (s starts at 1, per-entry Adam, unscaled penalty), kept
#: as an option: ``compress(..., search_kw={**DEFAULT_SEARCH, **SOURCE002_SEARCH})``.
SOURCE002_SEARCH = dict(bilevel.SOURCE002_PARAMS)
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
    """How long notebook 06's searches, fine-tunes and sweeps run in a profile.

    Attributes:
        main_steps: mask steps of the main searches (``profile.search_steps``; one weight
            update each, ``inner_steps = 1``).
        budget: weight updates every arm of the main experiments gets AFTER its parent's
            training: search weight updates + fine-tune for the searched arms, fine-tune
            only for the baselines, the dense control and the hand-designed models.
        sweep_steps, sweep_budget: the same for each sweep point (Experiment 1).
        betas, lams: the beta / lambda sweep values (source 002 Tables A1, A2).
        deeplab_ratios: MACs targets of Experiment 3 as fractions of the dense DeepLabV3+
            (source 002 Table 5: 4.3/9.5, and 7.6/9.5 in ``paper``).
        full_grid: whether the exhaustive sweeps run (``ctx.full_grid`` or ``paper``).
    """

    main_steps: int
    budget: int
    sweep_steps: int
    sweep_budget: int
    betas: tuple
    lams: tuple
    deeplab_ratios: tuple
    full_grid: bool = False


def plan(profile: Profile, full_grid: bool = False) -> Plan:
    """The :class:`Plan` of ``profile``.

    ``budget = max(finetune_steps, main_steps + max(1, finetune_steps // 5))``: on ``cpu``
    150 = 120 search weight updates + 30 fine-tune steps for the searched models, 150
    fine-tune steps for every other arm. Sweep points search as long as the main searches
    and get the same budget (a shorter sweep stops before the masks settle: on ``cpu`` at 40
    steps every beta still sat 12-40 % above the S target, so their ``gmacs_raw`` could not
    tell the settings apart; :func:`choose_search` needs it). Core sweeps: beta in {0.001, 0.01, 0.1}, lambda in {0.01, 0.1, 1};
    ``full_grid`` adds source 002's beta = 1.
    """
    smoke, paper = profile.name == "smoke", profile.name == "paper"
    full = bool(full_grid) or paper
    ft_min = max(1, profile.finetune_steps // 5)
    main = int(profile.search_steps)
    if smoke:
        betas, lams = (0.01, 1.0), (0.1, 1.0)
    else:
        betas, lams = ((0.001, 0.01, 0.1, 1.0) if full else (0.001, 0.01, 0.1)), (0.01, 0.1, 1.0)
    budget = max(int(profile.finetune_steps), main + ft_min)
    return Plan(main_steps=main, budget=budget, sweep_steps=main, sweep_budget=budget, betas=betas, lams=lams,
                deeplab_ratios=(7.6 / 9.5, 4.3 / 9.5) if paper else (4.3 / 9.5,), full_grid=full)


def budget_split(method: str, budget: int, search_steps: int, inner_steps: int = 1) -> tuple[int, int]:
    """``(search weight updates, fine-tune steps)`` of an arm with ``budget`` post-parent updates.

    Raises:
        ValueError: the search alone needs more weight updates than ``budget``.
    """
    if method != "bilevel":
        return 0, int(budget)
    w = int(search_steps) * int(inner_steps)
    if w > budget:
        raise ValueError(f"budget_split: the search's {w} weight updates exceed the budget of {budget}")
    return w, int(budget) - w


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


def _evaluate(ctx, model: nn.Module) -> dict:
    """val mIoU (choices), test scores (reported) and per-image test confusions."""
    from ..train import evaluate

    val = evaluate(model, eval_loader(ctx, "val"), progress=False)
    # stored as a torch tensor: the cache loads with weights_only=True
    return {"scores": test_scores(ctx, model), "val_miou": float(val["miou"]),
            "test_cms": torch.from_numpy(test_confusions(ctx, model, "test"))}


def compress(ctx, base: str, method: str, target_gmacs: float = NAN, *, search_kw: dict | None = None,
             budget: int | None = None, search_steps: int | None = None) -> dict:
    """Compress the trained ``base`` to ``target_gmacs`` with ``method``, fine-tune, evaluate (cached).

    ``method``: ``"bilevel"`` (:func:`study.bilevel.bilevel_search` with ``search_kw``,
    then physical removal), ``"magnitude"``, ``"uniform"``, ``"random"`` (the
    :mod:`study.bilevel` baselines at matched MACs) or ``"dense+ft"`` (no pruning; the
    control; ``target_gmacs`` ignored). Every arm gets ``budget`` weight updates after the
    parent's training: the searched one ``search_steps * inner_steps`` during the search
    plus the rest as recovery fine-tune (:func:`budget_split`), the others all as fine-tune
    (:func:`study.sections.common.finetune`). The search's mask steps add one forward /
    backward per step on their own batch without updating weights (``mask_passes``).
    The cache key covers the base model's weights (:func:`study.models.model_fingerprint`),
    the arguments, the profile, the seed, the data and the code.

    Args:
        ctx: the notebook's context.
        base: registry name of the trained model (:func:`study.sections.common.trained_model`).
        method: one of :data:`METHODS`.
        target_gmacs: MACs budget, GMACs at :func:`input_hw`; in (0, dense].
        search_kw: extra arguments of :func:`study.bilevel.bilevel_search` (``beta``,
            ``lam``, ``implicit``, ``s_init``, ...); ignored by the other methods.
        budget: post-parent weight updates (default ``plan(profile).budget``).
        search_steps: mask steps of the search (default ``profile.search_steps``).

    Returns:
        dict with ``model`` (the physically pruned, fine-tuned network, eval mode, on
        ``ctx.device``), ``masks`` (``{group key: bool (C,)}``, empty for the control),
        ``scores`` (:func:`study.sections.common.test_scores`, ``split = "test"``),
        ``val_miou``, ``test_cms`` (int64 ``(N, C, C)`` per-image test confusions),
        ``search`` (:class:`study.bilevel.SearchResult` as a dict, None for the others),
        ``search_cpu_s``, ``finetune_s`` (wall seconds), ``base``, ``method``,
        ``target_gmacs``, ``search_steps`` (0 for the others), ``search_weight_steps``,
        ``finetune_steps``, ``mask_passes`` (extra forward/backward passes of the mask
        steps), ``parent_steps``, ``parent_images``, ``train_steps`` (parent + search weight
        updates + fine-tune) and ``train_images`` (parent images + batches of the search,
        weight and mask steps, + fine-tune batches, times the batch size).

    Raises:
        ValueError: unknown ``method``, a bad ``target_gmacs``, or a search longer than ``budget``.
    """
    if method not in METHODS:
        raise ValueError(f"compress: unknown method {method!r}; expected one of {METHODS}")
    hw = input_hw(ctx)
    prof = ctx.profile
    pl = plan(prof, getattr(ctx, "full_grid", False))
    budget = pl.budget if budget is None else int(budget)
    steps = prof.search_steps if search_steps is None else int(search_steps)
    kw = dict(search_kw or {}) if method == "bilevel" else {}
    inner = int(kw.get("inner_steps", 1))
    w_steps, ft = budget_split(method, budget, steps, inner)
    base_model, base_scores = trained_model(ctx, base)
    tgt = NAN if method == CONTROL else round(float(target_gmacs), 9)
    key = {"base": base, "base_fp": model_fingerprint(base_model), "method": method, "target": tgt,
           "budget": budget, "ft": ft, "steps": steps if method == "bilevel" else 0, "kw": kw}

    def compute():
        seed_everything(ctx.seed)
        model = copy.deepcopy(base_model).to(ctx.device)
        x = torch.zeros(1, 3, *hw, device=ctx.device)
        rec, cpu_s = None, 0.0
        tr, _ = loaders(ctx)
        if method == "bilevel":
            res = bilevel.bilevel_search(model, tr, target_gmacs, input_hw=hw, steps=steps, seed=ctx.seed, **kw)
            rec, cpu_s = res.to_dict(), res.cpu_s
            keep = res.masks
            pruned = bilevel.apply_masks(model, keep, x)
        elif method == "magnitude":
            pruned, keep = bilevel.magnitude_prune_to_macs(model, target_gmacs, hw)
        elif method == "uniform":
            pruned, keep = bilevel.uniform_width(model, target_gmacs, hw)
        elif method == "random":
            pruned, keep = bilevel.random_masks_to_macs(model, target_gmacs, hw, seed=ctx.seed)
        else:
            pruned, keep = model, {}
        t0 = time.perf_counter()
        finetune(ctx, pruned, ft, progress=False, desc=f"{method}-{base}")
        ft_s = time.perf_counter() - t0
        pruned.eval()
        return {"masks": keep, "state_dict": {k: v.detach().cpu() for k, v in pruned.state_dict().items()},
                **_evaluate(ctx, pruned), "search": rec, "search_cpu_s": cpu_s, "finetune_s": ft_s}

    rec = cached(ctx, f"bilevel-{base}-{method}", key, compute, modules=[__name__])
    if rec["masks"]:
        pruned = bilevel.apply_masks(base_model, rec["masks"], torch.zeros(1, 3, *hw, device=ctx.device))
    else:
        pruned = copy.deepcopy(base_model)
    pruned.load_state_dict(rec["state_dict"])
    pruned.eval()
    bs = int(prof.batch_size)
    batches = (rec["search"]["config"].get("batches", steps * (inner + 1)) if rec["search"] else 0) + ft
    return {**rec, "model": pruned, "base": base, "method": method, "target_gmacs": float(tgt),
            "search_steps": key["steps"], "search_weight_steps": w_steps, "finetune_steps": ft,
            "mask_passes": key["steps"], "budget": budget,
            "parent_steps": int(base_scores["train_steps"]), "parent_images": int(base_scores["train_images"]),
            "train_steps": int(base_scores["train_steps"]) + w_steps + ft,
            "train_images": int(base_scores["train_images"]) + batches * bs}


def hand_designed(ctx, name: str, budget: int | None = None) -> dict:
    """A hand-designed model (``topformer_t`` / ``topformer_s``) with the parent's budget (cached).

    :func:`study.sections.common.trained_model` (the same ``student_steps`` as the parent
    TopFormer-B) continued with ``budget`` fine-tune steps (:func:`study.sections.common.finetune`,
    the schedule every pruned arm gets), so its ``train_steps`` equal the searched rows'
    (parent + search weight updates + fine-tune).

    Returns:
        the :func:`compress` dict keys (``method = "hand-designed"``, no masks, no search).
    """
    pl = plan(ctx.profile, getattr(ctx, "full_grid", False))
    budget = pl.budget if budget is None else int(budget)
    model0, sc0 = trained_model(ctx, name)
    key = {"name": name, "fp": model_fingerprint(model0), "budget": budget}

    def compute():
        seed_everything(ctx.seed)
        model = copy.deepcopy(model0).to(ctx.device)
        t0 = time.perf_counter()
        finetune(ctx, model, budget, progress=False, desc=f"hand-{name}")
        model.eval()
        return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                **_evaluate(ctx, model), "finetune_s": time.perf_counter() - t0}

    rec = cached(ctx, f"bilevel-hand-{name}", key, compute, modules=[__name__])
    model = copy.deepcopy(model0)
    model.load_state_dict(rec["state_dict"])
    model.eval()
    bs = int(ctx.profile.batch_size)
    return {**rec, "model": model, "masks": {}, "search": None, "search_cpu_s": 0.0, "base": "-",
            "method": "hand-designed", "target_gmacs": NAN, "search_steps": 0, "search_weight_steps": 0,
            "finetune_steps": budget, "mask_passes": 0, "budget": budget,
            "parent_steps": int(sc0["train_steps"]), "parent_images": int(sc0["train_images"]),
            "train_steps": int(sc0["train_steps"]) + budget, "train_images": int(sc0["train_images"]) + budget * bs}


def parent(ctx, name: str) -> dict:
    """The trained parent itself (no fine-tune), in the :func:`compress` dict layout (not cached:
    test confusions are computed on the fly, a few seconds)."""
    model, sc = trained_model(ctx, name)
    from ..train import evaluate

    val = evaluate(model, eval_loader(ctx, "val"), progress=False)
    return {"model": model, "masks": {}, "search": None, "search_cpu_s": 0.0, "base": name, "method": "dense",
            "scores": test_scores(ctx, model), "val_miou": float(val["miou"]),
            "test_cms": test_confusions(ctx, model, "test"), "target_gmacs": NAN, "search_steps": 0,
            "search_weight_steps": 0, "finetune_steps": 0, "mask_passes": 0, "budget": 0,
            "parent_steps": int(sc["train_steps"]), "parent_images": int(sc["train_images"]),
            "train_steps": int(sc["train_steps"]), "train_images": int(sc["train_images"])}


def compare(arm: dict, ref: dict, seed: int = 0) -> dict:
    """Paired bootstrap over test images of ``mIoU(arm) - mIoU(ref)`` (one training seed).

    Returns:
        :func:`study.metrics.bootstrap_miou_diff` (``diff``, ``mean``, ``std``, ``ci95_low``,
        ``ci95_high``, ``n``, ``ci_method``) plus ``verdict`` (:func:`study.metrics.verdict`
        of the interval: ``helps`` / ``hurts`` / ``no detectable difference at this budget``)
        and ``equal_train_steps`` (bool).
    """
    ci = bootstrap_miou_diff(np.asarray(arm["test_cms"]), np.asarray(ref["test_cms"]), seed=seed)
    return {**ci, "verdict": ci_verdict(ci["ci95_low"], ci["ci95_high"]),
            "equal_train_steps": int(arm["train_steps"]) == int(ref["train_steps"])}


#: A search "reaches its target by itself" when its hard-mask MACs at the end, before the
#: projection (``gmacs_raw``), are within this fraction of ``target_gmacs`` (issue #14).
RAW_TOLERANCE = 0.10


def raw_target_error(res: dict) -> float:
    """``|gmacs_raw - target_gmacs| / target_gmacs`` of a :func:`compress` result (fraction;
    NaN for arms without a search)."""
    srch = res.get("search") or {}
    raw, tgt = float(srch.get("gmacs_raw", NAN)), float(res.get("target_gmacs", NAN))
    return abs(raw - tgt) / tgt if raw == raw and tgt == tgt and tgt > 0 else NAN


def choose_search(sweep: Sequence[dict], tolerance: float = RAW_TOLERANCE) -> dict:
    """The search settings chosen from the sweep, on **val** and on MACs (never on test).

    A search hyper-parameter must first let the search meet its own MACs budget (the
    projection only tidies up): among the implicit-term sweep points, those whose
    :func:`raw_target_error` is <= ``tolerance`` are eligible and the one with the highest
    val mIoU wins. When no point is eligible (short sweeps may stop before the masks
    settle), the point with the smallest raw MACs error wins, ties by val mIoU.

    Args:
        sweep: :func:`compress` results of ``method="bilevel"`` (their ``search["config"]``
            holds ``beta``, ``lam``, ``implicit``; ``search["gmacs_raw"]`` and
            ``target_gmacs`` the MACs; ``val_miou`` the val score).
        tolerance: relative raw-MACs error that counts as meeting the target (fraction).

    Returns:
        ``{"beta", "lam", "implicit": True}`` of the chosen point (ties: the first).

    Raises:
        ValueError: no sweep point with the implicit term.
    """
    pts = [r for r in sweep if r["search"]["config"]["implicit"]]
    if not pts:
        raise ValueError("choose_search: no sweep point with the implicit term")
    err = [raw_target_error(r) for r in pts]
    err = [e if e == e else float("inf") for e in err]
    ok = [i for i in range(len(pts)) if err[i] <= tolerance]
    if ok:
        i_best = max(ok, key=lambda i: (pts[i]["val_miou"], -i))
    else:
        i_best = min(range(len(pts)), key=lambda i: (err[i], -pts[i]["val_miou"], i))
    cfg = pts[i_best]["search"]["config"]
    return {"beta": float(cfg["beta"]), "lam": float(cfg["lam"]), "implicit": True}


def row(ctx, name: str, res: dict, *, experiment: str, dense_ref: dict, vs: tuple | None = None,
        plan=None) -> dict:
    """One table row of a :func:`compress` / :func:`hand_designed` / :func:`parent` result.

    Columns: :data:`study.BASE_COLUMNS` (params and GMACs counted on the model at
    :func:`input_hw`; ``miou``/``mdice`` on **test**), ``split`` (``"test"``),
    ``train_steps`` / ``train_images`` (all phases, see :func:`compress`), then
    ``experiment``, ``base``, ``target_gmacs``, ``gmacs_raw`` (hard-mask MACs at the end of
    the search, before the projection; NaN for non-searched rows), ``raw_target_err_pct``,
    ``macs_target_err_pct`` (of the projected, physically counted ``gmacs``),
    ``params_removed`` / ``macs_removed`` (fractions of ``dense_ref``'s, the dense parent),
    ``channels_removed`` (the method's own sparsity: fraction of searched channels removed),
    ``val_miou`` (choices), ``search_steps``, ``search_weight_steps``, ``finetune_steps``,
    ``mask_passes`` (extra forward/backward passes, not weight updates), ``beta``, ``lam``,
    ``implicit``, ``s_init``, ``reg_scale``, ``s_optim``, ``search_cpu_hours``,
    ``latency_ms_p50`` (NaN until :func:`add_latency`), ``bench_tag``, and the comparison with
    ``vs = (label, reference result)``: ``vs``, ``delta_miou``, ``ci95_low``, ``ci95_high``,
    ``ci_method``, ``verdict`` (:func:`compare`; empty without ``vs``).

    Args:
        dense_ref: ``{"params_m", "gmacs"}`` of the dense parent.
    """
    hw = input_hw(ctx)
    tag = ""
    if plan is not None:
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{len(plan):02d}-{name}-{res['method']}-{experiment}")
        plan.add(tag, res["model"])
    cfg = res["search"]["config"] if res["search"] else {}
    raw = res["search"]["gmacs_raw"] if res["search"] else NAN
    tgt = res["target_gmacs"]
    masks = res["masks"]
    ch = sum(int(torch.as_tensor(m).numel()) for m in masks.values())
    ch_removed = (1 - sum(int(torch.as_tensor(m).sum()) for m in masks.values()) / ch) if ch else 0.0
    r = table_row(ctx, SECTION, name, res["method"], res["scores"], model=res["model"], input_hw=hw,
                  split=res["scores"].get("split", "test"), train_steps=int(res["train_steps"]),
                  train_images=int(res["train_images"]), experiment=experiment, base=res["base"],
                  target_gmacs=tgt, gmacs_raw=raw)
    r["raw_target_err_pct"] = 100 * abs(raw - tgt) / tgt if tgt == tgt and raw == raw else NAN
    r["macs_target_err_pct"] = 100 * abs(r["gmacs"] - tgt) / tgt  # NaN without target
    r["params_removed"] = 1 - r["params_m"] / dense_ref["params_m"]
    r["macs_removed"] = 1 - r["gmacs"] / dense_ref["gmacs"]
    r["channels_removed"] = ch_removed
    r.update(val_miou=res["val_miou"], search_steps=res["search_steps"],
             search_weight_steps=res["search_weight_steps"], finetune_steps=res["finetune_steps"],
             mask_passes=res["mask_passes"], beta=cfg.get("beta", NAN), lam=cfg.get("lam", NAN),
             implicit=bool(cfg.get("implicit", False)), s_init=cfg.get("s_init", NAN),
             reg_scale=str(cfg.get("reg_scale", "")), s_optim=cfg.get("s_optim", ""),
             search_cpu_hours=res["search_cpu_s"] / 3600, latency_ms_p50=NAN, bench_tag=tag)
    if vs is not None:
        c = compare(res, vs[1], seed=ctx.seed)
        r.update(vs=vs[0], delta_miou=c["diff"], ci95_low=c["ci95_low"], ci95_high=c["ci95_high"],
                 ci_method=c["ci_method"], verdict=c["verdict"])
    else:
        r.update(vs="", delta_miou=NAN, ci95_low=NAN, ci95_high=NAN, ci_method="", verdict="")
    return r


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


def verdict(results: dict, targets: dict, control: dict, hand: dict, seed: int = 0) -> pd.DataFrame:
    """Searched vs. the dense+same-fine-tune control, each baseline and the hand-designed model.

    Args:
        results: ``{(variant, method): compress result}`` of the main experiment.
        targets: ``{variant: target GMACs}`` (e.g. ``{"t": ..., "s": ...}``).
        control: the :func:`compress` result of ``method="dense+ft"``.
        hand: ``{variant: hand_designed result}``.
        seed: bootstrap seed.

    Returns:
        one row per (target, reference): ``target``, ``vs``, ``searched_miou``, ``other_miou``
        (test), ``delta_miou``, ``ci95_low``, ``ci95_high``, ``ci_method``, ``verdict``
        (computed from the interval), ``searched_gmacs``, ``other_gmacs``,
        ``searched_train_steps``, ``other_train_steps``, ``equal_train_steps``, ``note``
        (why budgets or MACs differ, when they do).
    """
    out = []
    for v in targets:
        b = results[(v, "bilevel")]
        refs = [(CONTROL, control)] + [(m, results[(v, m)]) for m in ("magnitude", "uniform", "random")]
        refs.append(("hand-designed", hand[v]))
        for lab, o in refs:
            c = compare(b, o, seed)
            note = ("the search also ran one extra forward/backward (mask step, no weight update) per search "
                    f"step: {b['mask_passes']} passes")
            if lab == CONTROL:
                note += "; the control is not pruned (more MACs)"
            if not c["equal_train_steps"]:
                note += f"; train_steps differ ({b['train_steps']} vs {o['train_steps']})"
            out.append({"target": f"TopFormer-{v.upper()} MACs", "vs": lab,
                        "searched_miou": b["scores"]["miou"], "other_miou": o["scores"]["miou"],
                        "delta_miou": c["diff"], "ci95_low": c["ci95_low"], "ci95_high": c["ci95_high"],
                        "ci_method": c["ci_method"], "verdict": c["verdict"],
                        "searched_gmacs": gmacs(b["model"], tuple(b["search"]["config"]["input_hw"])),
                        "other_gmacs": gmacs(o["model"], tuple(b["search"]["config"]["input_hw"])),
                        "searched_train_steps": b["train_steps"], "other_train_steps": o["train_steps"],
                        "equal_train_steps": c["equal_train_steps"], "note": note})
    return pd.DataFrame(out)


def claim_lines(verdicts: pd.DataFrame, sweep: pd.DataFrame) -> list[str]:
    """The notebook's "what it means" sentences, one per source-002 claim, from computed numbers.

    Args:
        verdicts: :func:`verdict`'s DataFrame.
        sweep: the table rows of Experiment 1 (``experiment`` in ``beta_sweep``,
            ``lambda_sweep``, ``implicit_ablation``).
    """
    lines = []

    def ci(r):
        return f"{r['delta_miou']:+.4f} mIoU with 95 % CI [{r['ci95_low']:+.4f}, {r['ci95_high']:+.4f}] ({r['verdict']})"

    for _, r in verdicts[verdicts.vs == "hand-designed"].iterrows():
        src = "+1.7 (Tiny)" if "-T" in r["target"] else "+1.4 (Small)"
        lines.append(f"Source 002 says the searched model beats the hand-designed TopFormer at equal MACs "
                     f"({src} mIoU, ADE20K); here, at {r['target']} and this budget, searched - hand-designed = {ci(r)}.")
    for _, r in verdicts[verdicts.vs == "magnitude"].iterrows():
        lines.append(f"Source 002 says the search beats magnitude pruning at equal MACs; here, at {r['target']}, "
                     f"searched - magnitude = {ci(r)}.")
    for _, r in verdicts[verdicts.vs == CONTROL].iterrows():
        lines.append(f"Source 002 says searched models lose little or nothing against their dense parent "
                     f"(Ours-Small-DeepLab 70.2 at 4.3 GMACs vs DeepLabV3+ 69.0 at 9.5); here, at {r['target']}, "
                     f"searched - (dense parent + the same fine-tune) = {ci(r)}.")
    ab = sweep[sweep.experiment == "implicit_ablation"]
    if not ab.empty:
        r = ab.iloc[0]
        lines.append(f"Source 002 says the implicit-gradient term helps (73.6 vs 71.9 mIoU, Table 3); here, "
                     f"without - with = {ci(r)}.")
    for exp, col, best in (("beta_sweep", "beta", 0.01), ("lambda_sweep", "lam", 0.1)):
        d = sweep[sweep.experiment == exp]
        if d.empty:
            continue
        top = d.loc[d.val_miou.idxmax()]
        raws = ", ".join(f"{v:g}: {g:.4f}" for v, g in zip(d[col], d.gmacs_raw))
        lines.append(f"Source 002 says {col} = {best:g} is best; here the val-best {col} is {top[col]:g} "
                     f"(search-only GMACs per value {raws}; one seed, short searches).")
    return lines


__all__ = ["SECTION", "METHODS", "CONTROL", "DEFAULT_SEARCH", "SOURCE002_SEARCH", "SOURCE002", "SOURCE002_COLUMNS",
           "SOURCE002_SWEEPS", "Plan", "plan", "budget_split", "input_hw", "dense_gmacs", "cpu_cores", "compress",
           "hand_designed", "parent", "compare", "choose_search", "raw_target_error", "RAW_TOLERANCE", "row", "add_latency", "verdict", "claim_lines",
           "source002_table"]
