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
from ..distill import FeatureAdapters, KDConfig, KDStudent, make_kd_loss
from ..models import model_complexity, model_fingerprint
from .common import build, table_row, train_cached, train_config, trained_model

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
    """Training steps of every KD run of notebook 01 (and of "none" at equal budget).

    ``profile.extra["kd_steps"]`` if set; else ``student_steps`` for ``smoke`` and
    ``paper`` and ``student_steps // 3`` for ``cpu`` (a KD step also runs the Swin
    teacher forward, ~2-3x the cost of a student step on 2 CPU cores, and the section
    trains ~20 students).
    """
    if "kd_steps" in (profile.extra or {}):
        return int(profile.extra["kd_steps"])
    return profile.student_steps // 3 if profile.name == "cpu" else profile.student_steps


def sweep_plan(profile) -> dict:
    """What notebook 01 trains for ``profile`` (deterministic, so other code can reproduce it).

    1. KL temperature sweep: ``KDConfig("kl", T, 1.0)`` for T in :data:`SWEEP_TEMPERATURES`
       (context seed); 2. KL weight sweep at the best T: weights :data:`SWEEP_WEIGHTS`;
       3. main comparison over ``profile.seeds``: none, best KL, MSE (weight 1, source 000),
       KL + FitNets hints (best KL + :data:`FEAT_WEIGHT`), CWD (T=4, weight 3); 4. ResNet-18
       student: none and the best KD method of step 3 (context seed only).
    Every run trains :func:`kd_steps` steps.
    """
    return {"steps": kd_steps(profile), "temperatures": SWEEP_TEMPERATURES, "weights": SWEEP_WEIGHTS,
            "seeds": tuple(profile.seeds), "cwd": KDConfig("cwd", CWD_TEMPERATURE, CWD_WEIGHT),
            "mse": KDConfig("mse", 1.0, 1.0), "feat_weight": FEAT_WEIGHT}


def main_configs(best_kl: KDConfig) -> dict:
    """Method label -> :class:`KDConfig` of the main comparison, given the best KL setting."""
    return {"none": KDConfig("none"), "kl": best_kl, "mse": KDConfig("mse", 1.0, 1.0),
            "kl+feat": KDConfig("kl+feat", best_kl.temperature, best_kl.kd_weight, FEAT_WEIGHT),
            "cwd": KDConfig("cwd", CWD_TEMPERATURE, CWD_WEIGHT)}


def best_kl(sweep: Mapping[tuple, dict]) -> KDConfig:
    """The KL setting of the sweep ``{(T, weight): record}`` with the highest mIoU (first on ties)."""
    t, w = max(sweep, key=lambda k: sweep[k]["miou"])
    return KDConfig("kl", t, w)


def best_kd_method(summaries: Mapping[str, dict]) -> str:
    """The KD method (not ``"none"``) with the highest mean mIoU (first in order on ties)."""
    return max((m for m in summaries if m != "none"), key=lambda m: summaries[m]["miou"])


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
    tmodel, tscores, tident = (None, {"miou": float("nan")}, None)
    if cfg.method != "none":
        tmodel, tscores, tident = _teacher_entry(ctx)
    use_feat = cfg.method == "kl+feat"

    def build_fn():
        s = build(student, ctx.profile)
        if not use_feat:
            return s
        return KDStudent(s, FeatureAdapters(s.feature_channels, tmodel.feature_channels))

    def factory():
        return make_kd_loss(tmodel, cfg, train_cfg=tcfg)

    model, rec = train_cached(ctx, f"kd-{student}-{cfg.tag}", build_fn, tcfg, loss_fn_factory=factory,
                              seed=seed, extra_key={"kd": asdict(cfg), "student": student, "teacher": tident},
                              modules=[__name__])
    if isinstance(model, KDStudent):
        model = model.student
    model.to(ctx.device).eval()
    record = {**rec["scores"], "train_seconds": rec["history"]["seconds"], "history": rec["history"],
              "kd": asdict(cfg), "steps": steps, "seed": seed, "teacher_miou": tscores["miou"]}
    return model, record


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
        dict with ``miou``, ``miou_std`` (sample std, ddof=1; NaN for one run), ``mdice``,
        ``seeds`` (count), ``train_seconds`` (mean, s), ``per_class_iou`` (nan-mean per
        class, list) and ``iou_<class>`` for every class.
    """
    m = np.array([r["miou"] for r in records], float)
    pc = np.array([r["per_class_iou"] for r in records], float)
    with warnings.catch_warnings():  # a class absent from every run gives NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        pcm = np.nanmean(pc, axis=0)
    out = {"miou": float(m.mean()), "miou_std": float(m.std(ddof=1)) if len(m) > 1 else float("nan"),
           "mdice": float(np.mean([r["mdice"] for r in records])), "seeds": len(records),
           "train_seconds": float(np.mean([r["train_seconds"] for r in records])),
           "per_class_iou": [float(x) for x in pcm]}
    out.update({f"iou_{c}": float(v) for c, v in zip(class_names, pcm)})
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
    """Teacher vs no-KD main student at full budget: model, steps, mIoU, mDice, params, GMACs."""
    prof = ctx.profile
    rows = []
    for name, steps, s in ((prof.teacher, prof.teacher_steps, teacher_scores),
                           (MAIN_STUDENT, prof.student_steps, base_scores)):
        c = _complexity(ctx, name)
        rows.append({"model": name, "steps": steps, "miou": s["miou"], "mdice": s["mdice"],
                     "params_m": c["params_m"], "gmacs": c["gmacs"]})
    return rows


def _row(ctx, cx: dict, model: str, method: str, s: dict, cfg: KDConfig | None, steps: int,
         teacher_miou: float, reported: float = float("nan")) -> dict:
    nan = float("nan")
    hw = (ctx.profile.image_size, ctx.profile.image_size)
    return table_row(
        ctx, SECTION, model, method, s, complexity=cx[model], input_hw=hw,
        temperature=cfg.temperature if cfg is not None and cfg.method in ("kl", "kl+feat", "cwd") else nan,
        kd_weight=cfg.kd_weight if cfg is not None and cfg.method != "none" else nan,
        feat_weight=cfg.feat_weight if cfg is not None and cfg.method == "kl+feat" else nan,
        steps=steps, seeds=s.get("seeds", 1), miou_std=s.get("miou_std", nan),
        **{f"iou_{k}": s["per_class_iou"][CLASS_NAMES.index(k)] for k in RARE_CLASSES},
        train_seconds=s["train_seconds"], teacher_miou=teacher_miou, reported_by_source000_miou=reported)


def table_rows(ctx, *, teacher_scores: dict, base_scores: dict, configs: Mapping[str, KDConfig],
               summaries: Mapping[str, dict], sweep: Mapping[tuple, dict],
               second: Mapping[str, dict]) -> list[dict]:
    """Rows of table ``distillation``.

    One row each for: the teacher; the section-0 student (full steps); every method of the
    main comparison (seed mean, ``miou_std``); every KL sweep point (one seed); the
    :data:`SECOND_STUDENT` runs. Columns after :data:`study.BASE_COLUMNS`: ``temperature,
    kd_weight, feat_weight, steps, seeds, miou_std, iou_<rare class>..., train_seconds (s),
    teacher_miou, reported_by_source000_miou``; ``params_m`` / ``gmacs`` at ``image_size``
    (the Swin teacher at its fixed input size).

    Args:
        teacher_scores, base_scores: :func:`teacher` and section-0 student scores.
        configs: :func:`main_configs`; summaries: method -> :func:`summarize` of its seeds.
        sweep: ``{(T, weight): record}`` of the KL sweep.
        second: method (``"none"`` and the best KD method) -> :data:`SECOND_STUDENT` record.
    """
    prof = ctx.profile
    steps = kd_steps(prof)
    t_miou = teacher_scores["miou"]
    cx = {name: _complexity(ctx, name) for name in (prof.teacher, MAIN_STUDENT, SECOND_STUDENT)}

    def one(rec):
        return {**summarize([rec]), "seeds": 1}

    nan = float("nan")
    rows = [_row(ctx, cx, prof.teacher, "teacher (no KD)", one(teacher_scores), None, prof.teacher_steps, nan),
            _row(ctx, cx, MAIN_STUDENT, "none (section 0 baseline, full steps)", one(base_scores),
                 KDConfig("none"), prof.student_steps, t_miou)]
    for m, c in configs.items():
        rows.append(_row(ctx, cx, MAIN_STUDENT, m, summaries[m], c, steps, t_miou,
                         REPORTED_BY_SOURCE000.get(m, nan)))
    for (t, w), rec in sweep.items():
        rows.append(_row(ctx, cx, MAIN_STUDENT, "kl (sweep)", one(rec), KDConfig("kl", t, w), steps, t_miou))
    for m, rec in second.items():
        rows.append(_row(ctx, cx, SECOND_STUDENT, m, one(rec), KDConfig("none") if m == "none" else configs[m],
                         steps, t_miou))
    return rows


def verdict(ctx, *, teacher_scores: dict, base_scores: dict, summaries: Mapping[str, dict],
            sweep: Mapping[tuple, dict], second: Mapping[str, dict]) -> str:
    """Markdown conclusion of notebook 01: gap, KD vs none per method (with seed noise), T, rare classes.

    A method "helps"/"hurts" only when its difference to ``none`` exceeds the pooled seed
    std ``sqrt(mean(std_m^2, std_none^2))``; with one seed there is no noise estimate and
    the text says "higher"/"lower". Arguments as :func:`table_rows`.
    """
    prof = ctx.profile
    best_method = best_kd_method(summaries)
    steps = kd_steps(prof)
    n_seeds = len(prof.seeds)
    none_m, none_s = summaries["none"]["miou"], summaries["none"]["miou_std"]

    def pm(sd):
        return f" ± {sd:.4f}" if np.isfinite(sd) else " (one seed, no std)"

    lines = []
    for m in (k for k in summaries if k != "none"):
        d = summaries[m]["miou"] - none_m
        pooled = np.sqrt(np.nanmean([summaries[m]["miou_std"] ** 2, none_s ** 2])) if n_seeds > 1 else np.nan
        verdict_m = ("within seed noise" if np.isfinite(pooled) and abs(d) <= pooled else
                     "helps" if d > 0 else "hurts") if np.isfinite(pooled) else \
            ("higher" if d > 0 else "lower") + " (one seed: no noise estimate)"
        lines.append(f"- **{m}** {summaries[m]['miou']:.4f}{pm(summaries[m]['miou_std'])}: "
                     f"{d:+.4f} vs none ({verdict_m}).")
    temps = list(sweep_plan(prof)["temperatures"])
    t_range = max(sweep[(t, 1.0)]["miou"] for t in temps) - min(sweep[(t, 1.0)]["miou"] for t in temps)
    kl = best_kl(sweep)
    delta = per_class_delta(summaries, best_method)
    rare = ", ".join(f"{c} {delta[CLASS_NAMES.index(c)]:+.3f}" for c in RARE_CLASSES)
    rn_d = second[best_method]["miou"] - second["none"]["miou"]
    helped = summaries[best_method]["miou"] - none_m
    t_miou, b_miou = teacher_scores["miou"], base_scores["miou"]
    src_gain = REPORTED_BY_SOURCE000["mse"] - REPORTED_BY_SOURCE000["none"]
    data = "the embedded generated data" if ctx.generated_data else ctx.data_root
    return "\n".join([
        f"**Teacher–student gap.** The teacher reaches {t_miou:.4f} mIoU, the no-KD student "
        f"{b_miou:.4f} after {prof.student_steps} steps and {none_m:.4f} after the {steps}-step KD budget "
        f"(gap {t_miou - none_m:+.4f} at equal student budget).",
        "",
        f"**KD vs none** (MobileViT-S, {steps} steps, {n_seeds} seed(s), none = {none_m:.4f}{pm(none_s)}):",
        *lines,
        "",
        f"**Temperature.** Across T ∈ {{{', '.join(f'{t:g}' for t in temps)}}} (λ=1, one seed) mIoU spans "
        f"{t_range:.4f}; the best KL setting is T={kl.temperature:g}, λ={kl.kd_weight:g}.",
        f"**Rare classes** ({best_method} − none): {rare}.",
        f"**ResNet-18** ({best_method} vs none, one seed): {second[best_method]['miou']:.4f} vs "
        f"{second['none']['miou']:.4f} ({rn_d:+.4f}).",
        "",
        (f"**Verdict.** The best KD method here, {best_method}, changes mIoU by {helped:+.4f} over the equal-budget "
         f"control. Source 000 reports +{src_gain:.4f} ({REPORTED_BY_SOURCE000['none']} → "
         f"{REPORTED_BY_SOURCE000['mse']}) on LPCVC with ImageNet-pretrained models and 20,000 iterations; "
         f"here the teacher is trained from scratch for {prof.teacher_steps} steps and the students for {steps} "
         f"steps on {data}, so the size of the effect is not comparable with source 000's, only its sign."),
    ])


__all__ = ["SECTION", "MAIN_STUDENT", "SECOND_STUDENT", "FALLBACK_CHOICE", "SWEEP_TEMPERATURES", "SWEEP_WEIGHTS",
           "CWD_TEMPERATURE", "CWD_WEIGHT", "FEAT_WEIGHT", "REPORTED_BY_SOURCE000", "kd_steps", "sweep_plan",
           "main_configs", "best_kl", "best_kd_method", "teacher", "distill_student", "choice_path",
           "save_kd_choice", "kd_student", "summarize", "per_class_delta", "gap_rows", "table_rows", "verdict",
           "trained_model"]
