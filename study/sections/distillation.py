"""Section ``distillation`` (notebook ``01_distillation``): cached KD runs, plan, table, verdict.

The losses and the KD training loss are in :mod:`study.distill` (no context there); this
module trains and caches students with them on the context's data and teacher.

Public entry points other sections use::

    from study.sections import distillation
    teacher, t_scores = distillation.teacher(ctx)          # the trained teacher (shared, frozen)
    student, record = distillation.kd_student(ctx)          # THE KD student later sections start from

Notebook 01 runs :func:`distill_student` over :func:`sweep_plan`, records its choice with
:func:`save_kd_choice`, and builds its table with :func:`table_rows` and its conclusion
with :func:`verdict`.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from typing import Mapping, Sequence

import numpy as np
import torch.nn as nn

from .. import CLASS_NAMES, RARE_CLASSES
from ..cache import atomic_write_text
from ..data import batch_stream
from ..distill import FeatureAdapters, KDConfig, KDStudent, make_kd_loss, teacher_targets
from ..metrics import paired_seed_ci, verdict as ci_verdict
from ..models import model_complexity, model_fingerprint
from .common import (build, cached, distributed, loaders, record_scores, train_cached, train_config,
                     trained_model)
from .rows import table_row

#: What the KD results are keyed on besides :mod:`study.sections.common` (which
#: :func:`study.sections.common.train_cached` adds): the losses and stored teacher targets.
#: This module's tables and verdicts are not part of the key, so editing them never retrains.
KEY_MODULES = ["study.distill"]

SECTION = "distillation"
#: The student of the main comparison and of every later section.
MAIN_STUDENT = "upernet_mobilevit_s"
#: The second student (one seed): none vs the best KD method.
SECOND_STUDENT = "upernet_resnet18"
#: Configuration used by :func:`kd_student` when notebook 01 has not chosen one yet
#: (equal to ``KDConfig()``: KL, T=2, weight 1).
FALLBACK_CHOICE = {"method": "kl", "temperature": 2.0, "kd_weight": 1.0, "feat_weight": 0.0}

#: KL temperatures and KD weights swept by notebook 01 (KL only; see :func:`sweep_plan`).
SWEEP_TEMPERATURES = (1.0, 2.0, 4.0)
SWEEP_WEIGHTS = (0.5, 1.0, 2.0)
#: Fixed a priori, not tuned here: CWD temperature / weight and the FitNets hint weight.
CWD_TEMPERATURE, CWD_WEIGHT = 4.0, 3.0
FEAT_WEIGHT = 1.0
#: mIoU reported by source 000 (LPCVC 2023, ImageNet-pretrained, 20,000 iterations at
#: 384 px): MobileViT-S without KD, and with KD from Swin-V2-T (its code uses the logit MSE).
REPORTED_BY_SOURCE000 = {"none": 0.5365, "mse": 0.6056}


# --------------------------------------------------------------------------- plan

def kd_steps(profile) -> int:
    """Training steps of every KD run of notebook 01: the no-KD control's, ``student_steps``.

    KD runs train exactly as long as the control they are compared with (issue #13); the
    control of seed ``s`` *is* the section-0 baseline of seed ``s`` (same code, data order
    and budget; one cache entry). ``profile.extra["kd_steps"]`` overrides (the dry run).
    """
    if "kd_steps" in (profile.extra or {}):
        return int(profile.extra["kd_steps"])
    return int(profile.student_steps)


#: Fixed a priori for the core comparison (no tuning on the run's data): Hinton et al.'s
#: usual T=2 with weight 1.
CORE_KL = KDConfig("kl", 2.0, 1.0)


def sweep_plan(profile, full_grid: bool = False) -> dict:
    """What notebook 01 trains for ``profile`` (deterministic, so other code can reproduce it).

    Core (every profile): over ``profile.seeds``, the no-KD control ("none") and source
    000's KD (the logit MSE of its code, weight 1) - the claim under test. On ``cpu`` each
    arm costs ~8 min per seed at the budget that gives a student worth distilling, so the
    rest is ``full_grid`` (``--full-grid``): 1. the KL temperature sweep
    ``KDConfig("kl", T, 1.0)`` for T in :data:`SWEEP_TEMPERATURES` and 2. the weight sweep
    :data:`SWEEP_WEIGHTS` at the best T (context seed; chosen on **val**; without the sweep
    KL would use :data:`CORE_KL`); 3. KL, KL + FitNets hints and CWD (T=4, weight 3) over the
    seeds; 4. the ResNet-18 student, none and the chosen KD method (context seed). Every run
    trains :func:`kd_steps` steps.

    Returns:
        dict: ``steps``, ``seeds``, ``full_grid``, ``methods`` (labels of the main
        comparison), ``temperatures`` / ``weights`` (empty without the full grid),
        ``second_student`` (bool).
    """
    full = bool(full_grid)
    return {"steps": kd_steps(profile), "seeds": tuple(profile.seeds), "full_grid": full,
            "methods": ("none", "kl", "mse", "kl+feat", "cwd") if full else ("none", "mse"),
            "temperatures": SWEEP_TEMPERATURES if full else (), "weights": SWEEP_WEIGHTS if full else (),
            "second_student": full, "feat_weight": FEAT_WEIGHT}


def main_configs(best_kl: KDConfig = CORE_KL, methods: Sequence[str] = ("none", "kl", "mse", "kl+feat", "cwd")) -> dict:
    """Method label -> :class:`KDConfig` of the main comparison, given the KL setting."""
    every = {"none": KDConfig("none"), "kl": best_kl, "mse": KDConfig("mse", 1.0, 1.0),
             "kl+feat": KDConfig("kl+feat", best_kl.temperature, best_kl.kd_weight, FEAT_WEIGHT),
             "cwd": KDConfig("cwd", CWD_TEMPERATURE, CWD_WEIGHT)}
    return {m: every[m] for m in methods}


def best_kl(sweep: Mapping[tuple, dict]) -> KDConfig:
    """The KL setting of the sweep ``{(T, weight): record}`` with the highest **validation**
    mIoU (``val_miou``; first on ties)."""
    t, w = max(sweep, key=lambda k: sweep[k]["val_miou"])
    return KDConfig("kl", t, w)


def best_kd_method(summaries: Mapping[str, dict]) -> str:
    """The KD method (not ``"none"``) with the highest mean **validation** mIoU (``val_miou``;
    first in order on ties)."""
    return max((m for m in summaries if m != "none"), key=lambda m: summaries[m]["val_miou"])


# --------------------------------------------------------------------------- cached runs

_TEACHERS: dict = {}


def _teacher_entry(ctx) -> tuple[nn.Module, dict, dict]:
    """``(teacher, scores, identity)`` of the context; loaded once per process and context."""
    name = ctx.profile.teacher
    key = json.dumps([str(ctx.cache.root), ctx.profile.to_dict(), ctx.seed, ctx.data_fp, str(ctx.device)],
                     sort_keys=True, default=str)
    if key not in _TEACHERS or ctx.cache.fresh:
        model, scores = trained_model(ctx, name)
        ident = {"name": name, "seed": ctx.seed, "train": asdict(train_config(ctx, name)),
                 "weights": model_fingerprint(model)}
        _TEACHERS.clear()  # keep at most one teacher in memory
        _TEACHERS[key] = (model, scores, ident)
    return _TEACHERS[key]


def teacher(ctx) -> tuple[nn.Module, dict]:
    """THE teacher of the study: ``ctx.profile.teacher`` trained from scratch (cached).

    Trained for ``teacher_steps`` at the context seed by
    :func:`study.sections.common.trained_model`; loaded once per process and shared by
    every caller, so do not modify it (``copy.deepcopy`` it first). KD runs freeze its
    parameters (``requires_grad=False``).

    Returns:
        ``(model in eval mode on ctx.device, scores)`` with the
        :func:`study.train.evaluate` scores plus ``train_seconds``.
    """
    model, scores, _ = _teacher_entry(ctx)
    return model, scores


def distill_student(ctx, student: str = MAIN_STUDENT, cfg: KDConfig | None = None, seed: int | None = None,
                    steps: int | None = None) -> tuple[nn.Module, dict]:
    """Train ``student`` from scratch with KD from :func:`teacher` (cached).

    The cache key holds the teacher's name, training config, seed and weights
    (:func:`study.models.model_fingerprint`) and the import closure of this module (so
    :mod:`study.distill` and :mod:`study.train` too). ``method="none"`` trains with the
    segmentation loss only (same code path and budget: the equal-steps control).

    Args:
        ctx: the notebook's context.
        student: registry name of a UPerNet student (has ``forward_with_features`` and
            ``feature_channels``).
        cfg: :class:`study.distill.KDConfig` (default ``KDConfig()``: KL, T=2, weight 1).
        seed: student seed (default ``ctx.seed``); the teacher always uses ``ctx.seed``.
        steps: training steps (default :func:`kd_steps`).

    Returns:
        ``(model, record)``: the plain student in eval mode on ``ctx.device`` and a dict
        with the :func:`study.train.evaluate` scores (``miou``, ``mdice``,
        ``per_class_iou``...), ``train_seconds``, ``history`` (loss, evals), ``kd``
        (``asdict(cfg)``), ``steps``, ``seed`` and ``teacher_miou`` (NaN for ``none``).
    """
    cfg = cfg or KDConfig()
    seed = ctx.seed if seed is None else seed
    steps = kd_steps(ctx.profile) if steps is None else int(steps)
    tcfg = train_config(ctx, student, steps)
    if cfg.method == "none" and steps == train_config(ctx, student).steps:
        # the equal-budget control IS the section-0 baseline of this seed (one cache entry)
        model, rec = trained_model(ctx, student, seed=seed)
        return model, {**rec, "kd": asdict(cfg), "seed": seed, "teacher_miou": float("nan"),
                       "teacher_targets": "none"}
    tmodel, tscores, tident = (None, {"miou": float("nan")}, None)
    if cfg.method != "none":
        tmodel, tscores, tident = _teacher_entry(ctx)
    use_feat = cfg.method == "kl+feat"
    replay = cfg.method != "none" and not use_feat and not distributed(ctx)
    targets = teacher_outputs(ctx, seed, steps, bf16=tcfg.bf16) if replay else None

    def build_fn():
        s = build(student, ctx.profile)
        if not use_feat:
            return s
        return KDStudent(s, FeatureAdapters(s.feature_channels, tmodel.feature_channels))

    def factory():
        return make_kd_loss(tmodel, cfg, train_cfg=tcfg, targets=targets)

    model, rec = train_cached(ctx, f"kd-{student}-{cfg.tag}", build_fn, tcfg, loss_fn_factory=factory,
                              seed=seed, extra_key={"kd": asdict(cfg), "student": student, "teacher": tident},
                              modules=KEY_MODULES)
    if isinstance(model, KDStudent):
        model = model.student
    model.to(ctx.device).eval()
    record = {**record_scores(rec, steps, ctx.profile.batch_size), "history": rec["history"],
              "kd": asdict(cfg), "seed": seed, "teacher_miou": tscores["miou"],
              "teacher_targets": "stored (fp16, decoder resolution)" if targets is not None else "live teacher"}
    return model, record


def teacher_outputs(ctx, seed: int, steps: int, bf16: bool = False) -> dict:
    """The teacher's logits on the first ``steps`` training batches of ``seed`` (cached).

    Every KD run of one seed trains on the same batch stream (the loader is seeded), so the
    teacher's forward pass is paid once per seed, not once per KD configuration:
    :func:`study.distill.teacher_targets` over ``loaders(ctx, seed=seed)``, float16 logits at
    the decoder's resolution (1/4 of the input side) plus a checksum of every batch, which
    the KD loss checks when it replays them. Keyed by the teacher's weights
    (:func:`study.models.model_fingerprint`), ``seed``, ``steps`` and ``bf16``.

    Returns:
        the :func:`study.distill.teacher_targets` dict.
    """
    tmodel, _, tident = _teacher_entry(ctx)

    def compute():
        tr, _ = loaders(ctx, seed=seed)
        return teacher_targets(tmodel, batch_stream(tr), steps, bf16=bf16)

    return cached(ctx, "teacher-targets", {"teacher": tident, "steps": int(steps), "bf16": bool(bf16)}, compute,
                  modules=["study.sections.common", *KEY_MODULES], seed=seed)


def choice_path(ctx):
    """File where notebook 01 records the KD configuration chosen for later sections."""
    return ctx.out_dir / "kd_choice.json"


def save_kd_choice(ctx, cfg: KDConfig, steps: int, evidence: dict | None = None) -> None:
    """Write the chosen configuration (and the evidence it was chosen on) for :func:`kd_student`."""
    atomic_write_text(choice_path(ctx), json.dumps({"kd": asdict(cfg), "steps": int(steps),
                                                    "evidence": evidence or {}}, indent=2, default=float))


def kd_student(ctx) -> tuple[nn.Module, dict]:
    """THE KD student the pruning / quantization / deployment sections start from.

    Choice rule (applied by notebook 01 and recorded in ``<out_dir>/kd_choice.json``): among
    the KD methods of the main comparison (the best KL setting of the temperature / weight
    sweep, MSE, KL + features, CWD), the one with the highest mean validation mIoU over
    ``ctx.profile.seeds`` (:func:`best_kd_method`); the main student (:data:`MAIN_STUDENT`)
    distilled with it for :func:`kd_steps` steps at the context seed. When notebook 01 has
    not run yet for this build folder and profile, :data:`FALLBACK_CHOICE` (KL, T=2,
    weight 1) is used and a note is printed. Ties and the fact that the choice uses
    validation data are disclosed in notebook 01.

    Returns:
        ``(model, record)``: plain student in eval mode on ``ctx.device``; record as
        :func:`distill_student`'s plus ``kd_choice_source`` (``"notebook 01"`` or
        ``"fallback"``).
    """
    path = choice_path(ctx)
    if path.exists():
        data = json.loads(path.read_text())
        cfg, steps, src = KDConfig(**data["kd"]), int(data["steps"]), "notebook 01"
    else:
        print(f"kd_student: {path} not found (notebook 01_distillation has not run for this build "
              f"folder / profile); using the fallback {FALLBACK_CHOICE}")
        cfg, steps, src = KDConfig(**FALLBACK_CHOICE), kd_steps(ctx.profile), "fallback"
    model, rec = distill_student(ctx, MAIN_STUDENT, cfg, steps=steps)
    return model, {**rec, "kd_choice_source": src}


# --------------------------------------------------------------------------- summaries, table, verdict

def summarize(records: Sequence[dict], class_names: Sequence[str] = CLASS_NAMES) -> dict:
    """Mean / std over runs (seeds) of one configuration.

    Args:
        records: :func:`distill_student` records of the same configuration.
        class_names: names of the classes in ``per_class_iou`` order.

    Returns:
        dict with ``miou`` (test, mean), ``miou_std`` (sample std, ddof=1; NaN for one run),
        ``val_miou`` (mean: the selection score), ``mdice``, ``seeds`` (count),
        ``seed_mious`` (test mIoU per run, in order), ``train_seconds`` (mean, s),
        ``train_steps``, ``train_images``, ``split`` (``"test"``), ``per_class_iou``
        (nan-mean per class, list) and ``iou_<class>`` for every class.
    """
    m = np.array([r["miou"] for r in records], float)
    pc = np.array([r["per_class_iou"] for r in records], float)
    with warnings.catch_warnings():  # a class absent from every run gives NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        pcm = np.nanmean(pc, axis=0)
    out = {"miou": float(m.mean()), "miou_std": float(m.std(ddof=1)) if len(m) > 1 else float("nan"),
           "val_miou": float(np.mean([r.get("val_miou", np.nan) for r in records])),
           "mdice": float(np.mean([r["mdice"] for r in records])), "seeds": len(records),
           "seed_mious": [float(x) for x in m],
           "train_seconds": float(np.mean([r["train_seconds"] for r in records])),
           "train_steps": records[0].get("train_steps", np.nan), "train_images": records[0].get("train_images", np.nan),
           "split": records[0].get("split", "test"),
           "miou_last_quarter_gain": float(np.nanmean([r.get("miou_last_quarter_gain", np.nan) for r in records]))
           if any(np.isfinite(r.get("miou_last_quarter_gain", np.nan)) for r in records) else float("nan"),
           "per_class_iou": [float(x) for x in pcm]}
    out.update({f"iou_{c}": float(v) for c, v in zip(class_names, pcm)})
    return out


def compare_to_none(summaries: Mapping[str, dict]) -> dict:
    """Test-mIoU difference of every KD method to the no-KD control, with a 95 % interval.

    Paired by seed (:func:`study.metrics.paired_seed_ci`: Student-t over the per-seed
    differences) when both arms have >= 2 seeds; otherwise no interval (NaN bounds,
    ``ci_method`` says so). The verdict is computed from the interval
    (:func:`study.metrics.verdict`).

    Returns:
        method -> ``{diff, std, ci95_low, ci95_high, n, ci_method, verdict}``.
    """
    base = summaries["none"]["seed_mious"]
    out = {}
    for m, s in summaries.items():
        if m == "none":
            continue
        a = s["seed_mious"]
        if len(a) >= 2 and len(a) == len(base):
            ci = paired_seed_ci(a, base)
        else:
            ci = {"diff": float(np.mean(a) - np.mean(base)), "std": float("nan"), "ci95_low": float("nan"),
                  "ci95_high": float("nan"), "n": len(a), "ci_method": "one seed: no interval"}
        out[m] = {**ci, "verdict": ci_verdict(ci["ci95_low"], ci["ci95_high"])}
    return out


def per_class_delta(summaries: Mapping[str, dict], method: str) -> np.ndarray:
    """Per-class IoU of ``method`` minus that of ``"none"`` (seed means), float (14,), NaN where absent."""
    return np.array(summaries[method]["per_class_iou"]) - np.array(summaries["none"]["per_class_iou"])


def _complexity(ctx, name: str) -> dict:
    """``params_m`` / ``gmacs`` of architecture ``name`` at the size it accepts (Swin: its fixed size)."""
    hw = (ctx.profile.image_size, ctx.profile.image_size)
    model = build(name, ctx.profile)
    return model_complexity(model, getattr(model, "fixed_input_hw", None) or hw)


def gap_rows(ctx, teacher_scores: dict, base_scores: dict) -> list[dict]:
    """Teacher vs no-KD main student at full budget: model, split, steps, test mIoU, val mIoU,
    last-quarter gain, mDice, params, GMACs."""
    rows = []
    for name, s in ((ctx.profile.teacher, teacher_scores), (MAIN_STUDENT, base_scores)):
        c = _complexity(ctx, name)
        rows.append({"model": name, "split": s.get("split", "test"), "steps": s.get("steps"), "miou": s["miou"],
                     "val_miou": s.get("val_miou", np.nan),
                     "miou_last_quarter_gain": s.get("miou_last_quarter_gain", np.nan), "mdice": s["mdice"],
                     "params_m": c["params_m"], "gmacs": c["gmacs"]})
    return rows


_NO_CI = {"diff": float("nan"), "ci95_low": float("nan"), "ci95_high": float("nan"), "ci_method": "", "verdict": ""}


def _row(ctx, cx: dict, model: str, method: str, s: dict, cfg: KDConfig | None, teacher_miou: float,
         reported: float = float("nan"), ci: dict | None = None) -> dict:
    nan = float("nan")
    hw = (ctx.profile.image_size, ctx.profile.image_size)
    ci = ci or _NO_CI
    return table_row(
        ctx, SECTION, model, method, s, complexity=cx[model], input_hw=hw,
        temperature=cfg.temperature if cfg is not None and cfg.method in ("kl", "kl+feat", "cwd") else nan,
        kd_weight=cfg.kd_weight if cfg is not None and cfg.method != "none" else nan,
        feat_weight=cfg.feat_weight if cfg is not None and cfg.method == "kl+feat" else nan,
        steps=s.get("train_steps", nan), seeds=s.get("seeds", 1), miou_std=s.get("miou_std", nan),
        val_miou=s.get("val_miou", nan), miou_last_quarter_gain=s.get("miou_last_quarter_gain", nan),
        diff_vs_none=ci["diff"], ci95_low=ci["ci95_low"], ci95_high=ci["ci95_high"], ci_method=ci["ci_method"],
        verdict=ci["verdict"],
        **{f"iou_{k}": s["per_class_iou"][CLASS_NAMES.index(k)] for k in RARE_CLASSES},
        train_seconds=s["train_seconds"], teacher_miou=teacher_miou, reported_by_source000_miou=reported)


def table_rows(ctx, *, teacher_scores: dict, base_scores: dict, configs: Mapping[str, KDConfig],
               summaries: Mapping[str, dict], sweep: Mapping[tuple, dict],
               second: Mapping[str, dict]) -> list[dict]:
    """Rows of table ``distillation``.

    One row each for: the teacher; every method of the main comparison (seed mean,
    ``miou_std``; "none" is the section-0 baseline, the equal-budget control); every KL
    sweep point (one seed; ``--full-grid``); the :data:`SECOND_STUDENT` runs
    (``--full-grid``). Columns after :data:`study.BASE_COLUMNS` and ``split`` (``test``),
    ``train_steps``, ``train_images``: ``temperature, kd_weight, feat_weight, steps, seeds,
    miou_std, val_miou`` (the selection score), ``miou_last_quarter_gain``, ``diff_vs_none``,
    ``ci95_low``, ``ci95_high``, ``ci_method``, ``verdict`` (:func:`compare_to_none`, main
    comparison only), ``iou_<rare class>..., train_seconds (s), teacher_miou,
    reported_by_source000_miou``; ``params_m`` / ``gmacs`` at ``image_size``.

    Args:
        teacher_scores, base_scores: :func:`teacher` and section-0 student scores.
        configs: :func:`main_configs`; summaries: method -> :func:`summarize` of its seeds.
        sweep: ``{(T, weight): record}`` of the KL sweep (may be empty).
        second: method -> :data:`SECOND_STUDENT` record (may be empty).
    """
    prof = ctx.profile
    t_miou = teacher_scores["miou"]
    cx = {name: _complexity(ctx, name) for name in (prof.teacher, MAIN_STUDENT, SECOND_STUDENT)}
    cis = compare_to_none(summaries)

    def one(rec):
        return {**summarize([rec]), "seeds": 1}

    nan = float("nan")
    rows = [_row(ctx, cx, prof.teacher, "teacher (no KD)", one(teacher_scores), None, nan)]
    for m, c in configs.items():
        label = "none (= section-0 baseline, equal budget)" if m == "none" else m
        rows.append(_row(ctx, cx, MAIN_STUDENT, label, summaries[m], c, t_miou,
                         REPORTED_BY_SOURCE000.get(m, nan), cis.get(m)))
    for (t, w), rec in sweep.items():
        rows.append(_row(ctx, cx, MAIN_STUDENT, "kl (sweep, chosen on val)", one(rec), KDConfig("kl", t, w), t_miou))
    for m, rec in second.items():
        rows.append(_row(ctx, cx, SECOND_STUDENT, m, one(rec), KDConfig("none") if m == "none" else configs[m],
                         t_miou))
    return rows


def verdict(ctx, *, teacher_scores: dict, base_scores: dict, summaries: Mapping[str, dict],
            sweep: Mapping[tuple, dict], second: Mapping[str, dict]) -> str:
    """Markdown conclusion of notebook 01: gap, KD vs none per method with its 95 % interval, source 000.

    Every "helps" / "hurts" is :func:`compare_to_none`'s: the interval of the paired per-seed
    test-mIoU difference excludes 0. Arguments as :func:`table_rows`.
    """
    prof = ctx.profile
    best_method = best_kd_method(summaries)
    steps = kd_steps(prof)
    none_m = summaries["none"]["miou"]
    cis = compare_to_none(summaries)
    lines = []
    for m, ci in cis.items():
        iv = (f"95 % CI [{ci['ci95_low']:+.4f}, {ci['ci95_high']:+.4f}], {ci['ci_method']}"
              if np.isfinite(ci["ci95_low"]) else ci["ci_method"])
        lines.append(f"- **{m}**: test mIoU {summaries[m]['miou']:.4f}; {ci['diff']:+.4f} vs none ({iv}) → "
                     f"**{ci['verdict']}**.")
    t_miou = teacher_scores["miou"]
    src_gain = REPORTED_BY_SOURCE000["mse"] - REPORTED_BY_SOURCE000["none"]
    data = "the embedded generated data" if ctx.generated_data else ctx.data_root
    out = [
        f"**Teacher–student gap.** The teacher reaches {t_miou:.4f} test mIoU after {teacher_scores.get('steps')} "
        f"steps, the no-KD student {none_m:.4f} (mean of {summaries['none']['seeds']} seed(s), {steps} steps): "
        f"gap {t_miou - none_m:+.4f}.",
        "",
        f"**KD vs none** (MobileViT-S, every arm {steps} steps = {steps * prof.batch_size} images, test split, "
        f"paired by seed):",
        *lines,
        "",
        f"**Chosen for the later sections (on val):** {best_method}.",
    ]
    if sweep:
        kl = best_kl(sweep)
        temps = sorted({t for t, _ in sweep})
        t_range = max(sweep[(t, 1.0)]["miou"] for t in temps) - min(sweep[(t, 1.0)]["miou"] for t in temps)
        out.append(f"**Temperature** (full grid, one seed): test mIoU spans {t_range:.4f} over T ∈ "
                   f"{{{', '.join(f'{t:g}' for t in temps)}}}; chosen on val: T={kl.temperature:g}, λ={kl.kd_weight:g}.")
    if second:
        rn_d = second[best_method]["miou"] - second["none"]["miou"]
        out.append(f"**ResNet-18** ({best_method} vs none, one seed, no interval): {rn_d:+.4f}.")
    delta = per_class_delta(summaries, best_method)
    out.append("**Rare classes** (" + best_method + " − none): "
               + ", ".join(f"{c} {delta[CLASS_NAMES.index(c)]:+.3f}" for c in RARE_CLASSES) + ".")
    ci = cis[best_method] if best_method in cis else None
    here = (f"{ci['diff']:+.4f} with 95 % CI [{ci['ci95_low']:+.4f}, {ci['ci95_high']:+.4f}] ({ci['verdict']})"
            if ci is not None and np.isfinite(ci["ci95_low"]) else f"{summaries[best_method]['miou'] - none_m:+.4f} "
            "(one seed, no interval)")
    out += ["", f"**Against the source.** Source 000 says KD (logit MSE) adds +{src_gain:.4f} mIoU "
                f"({REPORTED_BY_SOURCE000['none']} → {REPORTED_BY_SOURCE000['mse']}, LPCVC, ImageNet-pretrained, "
                f"20,000 iterations); here, at this budget on {data}, {best_method} gives {here}; MSE gives "
                f"{cis['mse']['diff']:+.4f} ({cis['mse']['verdict']})."]
    return "\n".join(out)


__all__ = ["CORE_KL", "compare_to_none", "teacher_outputs", "SECTION", "MAIN_STUDENT", "SECOND_STUDENT", "FALLBACK_CHOICE", "SWEEP_TEMPERATURES", "SWEEP_WEIGHTS",
           "CWD_TEMPERATURE", "CWD_WEIGHT", "FEAT_WEIGHT", "REPORTED_BY_SOURCE000", "kd_steps", "sweep_plan",
           "main_configs", "best_kl", "best_kd_method", "teacher", "distill_student", "choice_path",
           "save_kd_choice", "kd_student", "summarize", "per_class_delta", "gap_rows", "table_rows", "verdict",
           "trained_model"]
