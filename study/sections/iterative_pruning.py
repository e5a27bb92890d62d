r"""Section ``iterative_pruning`` (notebook ``04_iterative_pruning``): prune a little, fine-tune, repeat?

Question: does reaching a channel sparsity :math:`s_f` in :math:`k` small steps (each
followed by a short recovery fine-tune, with the channel importance re-estimated on the
already-pruned model) keep more accuracy than removing all channels at once and
fine-tuning for the same total number of steps? Source 000 reports only marginal gains.

The algorithm is :func:`study.prune.prune_iteratively` with the schedules of
:func:`study.prune.sparsity_schedule` and the equal budget of
:func:`study.prune.finetune_split`; this module runs one configuration on the context's
data with fine-tuning between the steps (:func:`run_schedule`, cached), sizes the grid to
the profile's time budget (:func:`run_study`) and builds the table and verdicts.

Notebook 04's path to the algorithm::

    from study.sections import iterative_pruning as sec
    res = sec.run_study(ctx, start_model, teacher=teacher, kd_config=kd_config)
        -> sec.run_schedule(ctx, model, cfg)    # one configuration, cached
            -> study.prune.prune_iteratively(model, hw, cfg.sparsities(), cfg.importance, between=fine-tune)

Fine-tuning: all steps draw from one continuing stream of training batches
(:func:`study.data.batch_stream`; every configuration sees the same images in the same
order), each chunk with the settings of :func:`study.sections.common.finetune`. With
``kd=True`` the loss is knowledge distillation from the teacher (:func:`kd_finetune_loss`,
the prune -> distill pipeline).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch.nn as nn
import torch_pruning as tp

from .. import prune
from ..data import batch_stream
from ..distill import KDConfig, make_kd_loss
from ..metrics import bootstrap_miou_diff, verdict as ci_verdict
from ..models import model_complexity
from ..train import TrainConfig, evaluate, seed_everything
from . import distillation
from .common import cached, finetune, finetune_config, loaders, model_fingerprint, test_confusions, test_scores
from .common import is_cached as common_is_cached
from .rows import table_row

SECTION = "iterative_pruning"
#: The step counts the study compares (any positive int is accepted).
STUDY_STEPS = (1, 2, 4, 8)
#: Wall-clock budget (s) of a profile's iterative grid; None = run everything.
#: ``profile.extra["iterative_budget_s"]`` overrides it.
BUDGET_S = {"smoke": None, "cpu": 600.0}  # smoke: the whole (small) grid, so its table never depends on machine speed
#: Cost of a KD fine-tune step relative to a plain one (teacher forward on the same batch;
#: ~2-3x on 2 CPU cores) - used only for planning.
KD_COST_FACTOR = 3.0
MAIN_SPARSITY = 0.45


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class IterativeConfig:
    """One configuration of the iterative-pruning study.

    Attributes:
        final_sparsity: channel sparsity reached at the last step, in [0, 1).
        steps: number of prune -> fine-tune steps k (the study uses 1, 2, 4, 8).
        schedule: one of :data:`study.prune.SCHEDULES` (see :func:`study.prune.sparsity_schedule`).
        importance: one of :data:`study.prune.IMPORTANCES` (the study uses ``"magnitude"``,
            L1, Li et al. 2017, and ``"taylor"``, Molchanov et al. 2019).
        kd: fine-tune with knowledge distillation from a teacher instead of plain CE/OHEM.
        total_finetune_steps: optimizer steps over all k steps (same for every schedule).
        calib_batches: training batches whose gradients feed Taylor importance (None:
            ``ceil(profile.calib_images / batch_size)``); ignored otherwise.

    Raises:
        ValueError: any field out of range (the message names the field).
    """

    final_sparsity: float = 0.45
    steps: int = 1
    schedule: str = "oneshot"
    importance: str = "magnitude"
    kd: bool = False
    total_finetune_steps: int = 0
    calib_batches: int | None = None

    def __post_init__(self):
        if self.schedule not in prune.SCHEDULES:
            raise ValueError(f"schedule must be one of {prune.SCHEDULES}, got {self.schedule!r}")
        # validates final_sparsity and steps; the errors name them
        prune.sparsity_schedule(self.final_sparsity, self.steps, self.schedule)
        object.__setattr__(self, "final_sparsity", float(self.final_sparsity))
        if self.importance not in prune.IMPORTANCES:
            raise ValueError(f"importance must be one of {prune.IMPORTANCES}, got {self.importance!r}")
        if not isinstance(self.kd, bool):
            raise ValueError(f"kd must be a bool, got {self.kd!r}")
        prune.finetune_split(self.total_finetune_steps, self.steps)  # validates total_finetune_steps
        if self.calib_batches is not None and (isinstance(self.calib_batches, bool)
                                               or not isinstance(self.calib_batches, int)
                                               or self.calib_batches < 1):
            raise ValueError(f"calib_batches must be a positive int or None, got {self.calib_batches!r}")

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``"cubic k=4"`` or ``"one-shot"``."""
        return "one-shot" if self.schedule == "oneshot" and self.steps == 1 else f"{self.schedule} k={self.steps}"

    def sparsities(self) -> list[float]:
        """:func:`study.prune.sparsity_schedule` of this config."""
        return prune.sparsity_schedule(self.final_sparsity, self.steps, self.schedule)

    def finetune_steps(self) -> list[int]:
        """:func:`study.prune.finetune_split` of this config."""
        return prune.finetune_split(self.total_finetune_steps, self.steps)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- models, losses
def start_models(ctx) -> dict:
    """The models notebook 04 starts from.

    Returns:
        dict with ``model`` (the KD student, :func:`.distillation.kd_student`), ``record``
        (its record), ``name`` (table label), ``kd_config`` (the KD settings it was
        distilled with) and ``teacher`` (:func:`.distillation.teacher`).
    """
    model, rec = distillation.kd_student(ctx)
    teacher, _ = distillation.teacher(ctx)
    return {"model": model, "record": rec, "name": f"{distillation.MAIN_STUDENT} (KD student)",
            "kd_config": rec["kd"], "teacher": teacher}


def kd_finetune_loss(teacher: nn.Module, kd_config: dict | None = None,
                     train_cfg: TrainConfig | None = None) -> tuple[Callable, dict]:
    """KD loss for the prune -> distill fine-tune, and the KD settings it uses.

    :func:`study.distill.make_kd_loss` with ``kd_config`` (the ``kd`` entry of the
    :func:`.distillation.kd_student` record: the KD configuration the starting student was
    distilled with; default :data:`.distillation.FALLBACK_CHOICE`). ``"kl+feat"`` becomes
    ``"kl"`` (same T and weight): the FitNets adapters were fitted to the unpruned
    feature widths, which pruning changes.

    Returns:
        ``(loss_fn(model, images, masks) -> (loss, logs), settings dict)``.
    """
    kd = dict(kd_config or distillation.FALLBACK_CHOICE)
    if kd.get("method") == "kl+feat":
        kd = {**kd, "method": "kl", "feat_weight": 0.0}
    cfg = KDConfig(**kd)
    return make_kd_loss(teacher, cfg, train_cfg=train_cfg), asdict(cfg)


def _complexity(model: nn.Module, hw) -> dict:
    c = model_complexity(model, tuple(int(v) for v in hw))
    return {"params_m": float(c["params_m"]), "gmacs": float(c["gmacs"])}


def _score(model: nn.Module, val_loader) -> dict:
    s = evaluate(model, val_loader, progress=False)
    return {"miou": float(s["miou"]), "mdice": float(s["mdice"])}


# --------------------------------------------------------------------------- one configuration
def _cache_spec(ctx, model_fp: str, cfg: IterativeConfig, teacher_fp: str | None,
                kd_config: dict | None) -> tuple[str, dict]:
    """(entry name, key config) of one configuration's cache entry."""
    hw = [ctx.profile.crop_size, ctx.profile.crop_size]
    key = {"iterative": cfg.to_dict(), "start": model_fp, "teacher": teacher_fp if cfg.kd else None,
           "kd_config": kd_config if cfg.kd else None, "input_hw": hw}
    name = (f"iterative-{cfg.label.replace(' ', '').replace('=', '')}-s{cfg.final_sparsity:g}-{cfg.importance}"
            + ("-kd" if cfg.kd else ""))
    return name, key


def is_cached(ctx, model: nn.Module, cfg: IterativeConfig, teacher: nn.Module | None = None,
              kd_config: dict | None = None, model_fp: str | None = None) -> bool:
    """Whether :func:`run_schedule` would be answered from the cache (costs no compute)."""
    fp = model_fp or model_fingerprint(model)
    tfp = model_fingerprint(teacher) if (cfg.kd and teacher is not None) else None
    name, key = _cache_spec(ctx, fp, cfg, tfp, kd_config)
    return common_is_cached(ctx, name, key, modules=[__name__])


def run_schedule(ctx, model: nn.Module, cfg: IterativeConfig, teacher: nn.Module | None = None,
                 kd_config: dict | None = None, progress: bool = False,
                 rebuild: bool = True) -> tuple[nn.Module | None, list[dict]]:
    """Prune ``model`` to ``cfg.final_sparsity`` in ``cfg.steps`` steps with fine-tuning between (cached).

    At step t: re-estimate channel importance on the current model (Taylor: on
    ``cfg.calib_batches`` training batches from a separately seeded stream), prune to the
    schedule's cumulative sparsity (relative to the original widths; the final widths
    equal one-shot's, see :func:`study.prune.prune_iteratively`), measure params / MACs
    on the smaller model, evaluate, fine-tune ``cfg.finetune_steps()[t]`` steps (KD from
    ``teacher`` when ``cfg.kd``), evaluate again. Every configuration starts from the same
    seed and draws the same stream of training batches. The cache key holds cfg, the
    start model's and teacher's :func:`~study.models.model_fingerprint`, the KD settings
    and the import closure of this module (so :mod:`study.prune`, :mod:`study.train` and
    :mod:`study.distill` too); a hit rebuilds the pruned model from the stored pruning
    history + state_dict.

    Args:
        model: trained segmenter (float32 ``(N,3,H,W) -> (N,14,H,W)``); not modified
            (a deep copy is pruned).
        cfg: :class:`IterativeConfig`.
        teacher: teacher segmenter, required when ``cfg.kd``.
        kd_config: KD settings (see :func:`kd_finetune_loss`).
        progress: show tqdm bars while fine-tuning.
        rebuild: on a cache hit, rebuild the pruned model (one graph trace per step); with
            False the model is returned as None when it was not computed in this call.

    Returns:
        ``(pruned model in eval mode on ctx.device, trajectory)``; ``trajectory`` is a list
        of dicts, step 0 (the start model) then steps 1..k, with ``step``, ``sparsity``
        (cumulative channel sparsity), ``params_m`` (M params), ``gmacs`` (GMACs per image
        at ``crop_size``), ``miou_before_ft``, ``miou_after_ft``, ``mdice_before_ft``,
        ``mdice_after_ft``, ``finetune_steps``, ``finetune_seconds``, ``prune_seconds``,
        ``eval_seconds`` (s, wall clock); step 0 also holds ``wall_seconds``, the whole
        configuration's wall time (s, incl. graph tracing and MAC counting).

    Raises:
        ValueError: ``cfg`` not an IterativeConfig, or ``cfg.kd`` without ``teacher``.
    """
    if not isinstance(cfg, IterativeConfig):
        raise ValueError(f"cfg must be an IterativeConfig, got {type(cfg).__name__}")
    if cfg.kd and teacher is None:
        raise ValueError("teacher is required when cfg.kd is True (prune -> distill fine-tune)")
    device = ctx.device
    start = copy.deepcopy(model).to(device).eval()
    hw = (ctx.profile.crop_size, ctx.profile.crop_size)
    name, key = _cache_spec(ctx, model_fingerprint(start), cfg, model_fingerprint(teacher) if cfg.kd else None,
                            kd_config)
    n_start = len(prune.pruning_record(start))
    computed = {}

    def compute():
        wall0 = time.perf_counter()
        seed_everything(ctx.seed)
        m = copy.deepcopy(start)
        tr, va = loaders(ctx)
        stream = batch_stream(tr)
        ft_steps = cfg.finetune_steps()
        sched = cfg.sparsities()
        loss_fn, kd_used = None, None
        if cfg.kd:
            loss_fn, kd_used = kd_finetune_loss(teacher.to(device).eval(), kd_config, finetune_config(ctx, 1))
        n_calib = cfg.calib_batches or max(1, math.ceil(ctx.profile.calib_images / ctx.profile.batch_size))

        def score(net):
            t0 = time.perf_counter()
            s = _score(net, va)
            return s, time.perf_counter() - t0

        b0, e0 = score(m)
        traj = [{"step": 0, "sparsity": 0.0, **_complexity(m, hw),
                 "miou_before_ft": b0["miou"], "miou_after_ft": b0["miou"],
                 "mdice_before_ft": b0["mdice"], "mdice_after_ft": b0["mdice"],
                 "finetune_steps": 0, "finetune_seconds": 0.0, "prune_seconds": 0.0, "eval_seconds": e0}]
        clock = {}

        def before(t, net):
            clock["t0"] = time.perf_counter()

        def between(t, net):
            prune_s = time.perf_counter() - clock["t0"]
            c = _complexity(net, hw)
            b, eb = score(net)
            secs, loss_end, ea = 0.0, float("nan"), 0.0
            a = b
            if ft_steps[t] > 0:
                h = finetune(ctx, net, ft_steps[t], loss_fn=loss_fn, progress=progress,
                             desc=f"{cfg.label} step {t + 1}", train_loader=stream)
                secs, loss_end = float(h["seconds"]), float(h["loss"][-1])
                a, ea = score(net)
            traj.append({"step": t + 1, "sparsity": sched[t], **c,
                         "miou_before_ft": b["miou"], "miou_after_ft": a["miou"],
                         "mdice_before_ft": b["mdice"], "mdice_after_ft": a["mdice"],
                         "finetune_steps": ft_steps[t], "finetune_seconds": secs,
                         "prune_seconds": prune_s, "eval_seconds": eb + ea, "loss_end": loss_end})

        calib = None
        if cfg.importance == "taylor":  # own stream: the fine-tune batches stay identical across configs
            calib_stream = batch_stream(loaders(ctx, seed=ctx.seed + 1)[0])
            calib = lambda t: calib_stream.take(n_calib)  # noqa: E731
        prune.prune_iteratively(m, hw, sched, cfg.importance, between=between, before=before, calib_batches=calib)
        m.eval()
        traj[0]["wall_seconds"] = time.perf_counter() - wall0
        _report_on_test(ctx, m, traj)
        computed["model"] = m
        new_steps = prune.pruning_record(m)[n_start:]
        return {"trajectory": traj, "payload": prune.pruned_payload(m, new_steps),
                "kd": kd_used or {}, "tp_version": str(tp.__version__), "config": cfg.to_dict()}

    rec = cached(ctx, name, key, compute, modules=[__name__])
    pruned = computed.get("model")
    if pruned is None and not rebuild:
        return None, [dict(r) for r in rec["trajectory"]]
    if pruned is None:  # cache hit: replay the stored pruning history on a copy of the start model
        pruned = prune.rebuild_pruned(lambda: copy.deepcopy(start), rec["payload"])
    pruned = pruned.to(device).eval()
    return pruned, [dict(r) for r in rec["trajectory"]]


def _report_on_test(ctx, model: nn.Module, traj: list[dict]) -> None:
    """Add the final model's test scores and per-image confusions to the last trajectory entry."""
    t = test_scores(ctx, model)
    traj[-1].update(test_miou=float(t["miou"]), test_mdice=float(t["mdice"]),
                    test_confusions=np.asarray(test_confusions(ctx, model)).tolist())


def control_finetune(ctx, model: nn.Module, total_steps: int, progress: bool = False) -> list[dict]:
    """The "dense + same fine-tune" control: ``model`` unpruned, fine-tuned exactly like the arms (cached).

    The same seed, the same continuing stream of training batches, the same
    :func:`study.sections.common.finetune` settings and ``total_steps`` optimizer steps as
    every configuration of :func:`run_schedule` - only the pruning is missing - so every
    pruning delta can be read against it (issue #14). Keyed by the model's fingerprint.

    Returns:
        a two-entry trajectory in the format of :func:`run_schedule` (step 0 = start,
        step 1 = after the fine-tune; sparsity 0) whose last entry has ``test_miou``,
        ``test_mdice`` and ``test_confusions`` (int64 (N, C, C)).
    """
    hw = (ctx.profile.crop_size, ctx.profile.crop_size)

    def compute():
        seed_everything(ctx.seed)
        m = copy.deepcopy(model).to(ctx.device).eval()
        tr, va = loaders(ctx)
        b = _score(m, va)
        c = _complexity(m, hw)
        t0 = test_scores(ctx, m)  # the start model's test score (step 0), before the fine-tune
        h = finetune(ctx, m, total_steps, progress=progress, desc="control: dense + same fine-tune",
                     train_loader=batch_stream(tr))
        a = _score(m.eval(), va)
        traj = [{"step": 0, "sparsity": 0.0, **c, "miou_before_ft": b["miou"], "miou_after_ft": b["miou"],
                 "mdice_before_ft": b["mdice"], "mdice_after_ft": b["mdice"], "finetune_steps": 0,
                 "finetune_seconds": 0.0, "prune_seconds": 0.0, "eval_seconds": 0.0,
                 "test_miou": float(t0["miou"]), "test_mdice": float(t0["mdice"])},
                {"step": 1, "sparsity": 0.0, **c, "miou_before_ft": b["miou"], "miou_after_ft": a["miou"],
                 "mdice_before_ft": b["mdice"], "mdice_after_ft": a["mdice"], "finetune_steps": int(total_steps),
                 "finetune_seconds": float(h["seconds"]), "prune_seconds": 0.0, "eval_seconds": 0.0}]
        _report_on_test(ctx, m, traj)
        return {"trajectory": traj}

    rec = cached(ctx, "iterative-control", {"start": model_fingerprint(model), "steps": int(total_steps),
                                            "input_hw": list(hw)}, compute, modules=[__name__])
    return [dict(r) for r in rec["trajectory"]]


def trajectory_frame(trajectory: list[dict], cfg: IterativeConfig) -> pd.DataFrame:
    """A trajectory as a DataFrame with the config's label / schedule / steps / importance / kd."""
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "test_confusions"} for r in trajectory])
    for k, v in (("config", cfg.label), ("schedule", cfg.schedule), ("steps", cfg.steps),
                 ("importance", cfg.importance), ("kd", cfg.kd), ("final_sparsity", cfg.final_sparsity)):
        df[k] = v
    return df


# --------------------------------------------------------------------------- the study grid
def study_grid(profile, full_grid: bool = False) -> dict:
    """Sizes of the iterative-pruning grid for ``profile`` (``full_grid``: k = 2, 4, 8 and no time budget).

    Returns:
        dict with ``main_sparsity`` (0.45 if in ``profile.sparsities``, else the median),
        ``extra_sparsities`` (up to two other sparsities of the profile, nearest first),
        ``ks`` (step counts compared with one-shot: smoke (2,), cpu (2, 4), else (2, 4, 8)),
        ``total_finetune_steps`` (``profile.finetune_steps``), ``budget_s`` (s or None).
    """
    sp = sorted(float(s) for s in profile.sparsities)
    main = MAIN_SPARSITY if MAIN_SPARSITY in sp else sp[len(sp) // 2]
    extra = sorted((s for s in sp if s != main), key=lambda s: (abs(s - main), s))[:2]
    ks = {"smoke": (2,), "cpu": (2, 4)}.get(profile.name, (2, 4, 8))
    budget = (profile.extra or {}).get("iterative_budget_s", BUDGET_S.get(profile.name))
    if full_grid:
        ks, budget = (2, 4, 8), None
    return {"main_sparsity": main, "extra_sparsities": sorted(extra), "ks": tuple(ks),
            "total_finetune_steps": int(profile.finetune_steps),
            "budget_s": None if budget is None else float(budget)}


def estimate_seconds(cfg: IterativeConfig, timing: dict) -> float:
    """Planned wall time of ``cfg`` (s) from a measured configuration's ``timing``.

    ``timing``: ``sec_per_step`` (s per fine-tune step), ``prune_s`` (s per pruning step),
    ``eval_s`` (s per evaluation), ``overhead_s`` (s per configuration: graph tracing,
    MAC counting, copies).
    """
    ft = cfg.total_finetune_steps * timing["sec_per_step"] * (KD_COST_FACTOR if cfg.kd else 1.0)
    evals = 1 + cfg.steps + sum(1 for n in cfg.finetune_steps() if n > 0)
    return ft + cfg.steps * timing["prune_s"] + evals * timing["eval_s"] + timing.get("overhead_s", 0.0)


def timing_of(trajectory: list[dict]) -> dict:
    """Per-unit costs measured on one configuration (see :func:`estimate_seconds`)."""
    steps = [r for r in trajectory if r["step"] > 0]
    n_ft = sum(r["finetune_steps"] for r in steps)
    n_eval = 1 + len(steps) + sum(1 for r in steps if r["finetune_steps"] > 0)
    parts = (sum(r["finetune_seconds"] + r["prune_seconds"] for r in steps)
             + sum(r.get("eval_seconds", 0.0) for r in trajectory))
    return {"sec_per_step": sum(r["finetune_seconds"] for r in steps) / max(1, n_ft),
            "prune_s": sum(r["prune_seconds"] for r in steps) / max(1, len(steps)),
            "eval_s": sum(r.get("eval_seconds", 0.0) for r in trajectory) / max(1, n_eval),
            "overhead_s": max(0.0, trajectory[0].get("wall_seconds", parts) - parts)}


def _input_hw(ctx) -> tuple[int, int]:
    return (ctx.profile.crop_size, ctx.profile.crop_size)


def result_row(ctx, cfg: IterativeConfig | None, trajectory: list[dict], model_name: str, role: str = "",
               start_steps: float = float("nan")) -> dict:
    """One table row (:func:`study.sections.rows.table_row`) for a finished configuration.

    ``miou`` / ``mdice`` are on the **test** split; ``val_miou`` (the validation score after
    the last fine-tune) is what schedules are chosen on. ``train_steps`` = ``start_steps``
    (the start model's training) + the fine-tune steps. ``cfg`` None: the control.
    """
    last = trajectory[-1]
    if cfg is None:
        cfg = IterativeConfig(final_sparsity=0.0, steps=1, total_finetune_steps=int(last["finetune_steps"]))
        method = "control: dense + same fine-tune"
    else:
        method = f"{cfg.label}, {cfg.importance}" + (", prune->distill" if cfg.kd else ", plain FT")
    ft = sum(r["finetune_steps"] for r in trajectory)
    row = table_row(
        ctx, SECTION, model_name, method, {"miou": last["test_miou"], "mdice": last["test_mdice"]},
        complexity=last, input_hw=_input_hw(ctx), split="test", train_steps=start_steps + ft,
        val_miou=last["miou_after_ft"],
        schedule=cfg.schedule, steps=cfg.steps, importance=cfg.importance, kd=cfg.kd,
        final_sparsity=cfg.final_sparsity, finetune_steps=sum(r["finetune_steps"] for r in trajectory),
        finetune_seconds=sum(r["finetune_seconds"] for r in trajectory),
        miou_start=trajectory[0]["miou_after_ft"],
        miou_pruned_no_ft=trajectory[-1]["miou_before_ft"] if cfg.steps == 1 else float("nan"),
        role=role)
    if role == "control":
        row.update(schedule="none", importance="none")
    return row


def run_study(ctx, model: nn.Module, teacher: nn.Module | None = None, kd_config: dict | None = None,
              model_name: str = "upernet_mobilevit_s", log: Callable[[str], None] = print,
              start_steps: float = float("nan")) -> dict:
    """Run the iterative-pruning grid within the profile's time budget (none with ``ctx.full_grid``).

    Order (later groups are dropped first when the budget would be exceeded; every drop
    is reported in ``dropped``):

    1. one-shot, magnitude, plain fine-tune at the main sparsity - always run; its
       measured costs size the rest (:func:`estimate_seconds`);
    0. the control: the start model, unpruned, with the same fine-tune (:func:`control_finetune`);
    2. linear and cubic schedules for each k in ``ks`` (largest k first), magnitude, plain
       fine-tune; the **best schedule** is the one with the highest final **validation** mIoU;
    3. Taylor importance for one-shot and the best schedule;
    4. prune -> distill (KD fine-tune) for one-shot and the best schedule (needs ``teacher``);
    5. one-shot and the best schedule at the extra sparsities.

    Groups 3-5 are run as pairs (a pair is dropped whole). Cached configurations cost nothing
    and are never dropped.

    Args:
        model: the starting (trained, unpruned) model.
        teacher: teacher for group 4 (None: group 4 is skipped and reported).
        kd_config: KD settings of the starting student (see :func:`kd_finetune_loss`).
        model_name: value of the table's ``model`` column.
        log: where progress notes go.
        start_steps: the start model's training steps (the rows' ``train_steps`` add the fine-tune).

    Returns:
        dict with ``rows`` (list of table rows, :func:`result_row`; the control first),
        ``confusions`` (row method -> per-image test confusions), ``trajectories``
        (label -> DataFrame), ``best`` (IterativeConfig or None), ``grid``, ``timing``,
        ``dropped`` (list of (label, reason)), ``spent_s`` (s, estimated for cached entries: 0).
    """
    grid = study_grid(ctx.profile, getattr(ctx, "full_grid", False))
    total, main = grid["total_finetune_steps"], grid["main_sparsity"]
    budget = grid["budget_s"]
    fp = model_fingerprint(model)
    hw = f"{ctx.profile.crop_size}x{ctx.profile.crop_size}"
    rows, trajs, dropped, confusions = [], {}, [], {}
    spent = {"s": 0.0}
    timing = {}
    ctrl = control_finetune(ctx, model, total)
    rows.append(result_row(ctx, None, ctrl, model_name, "control", start_steps))
    confusions[_key(rows[-1])] = np.asarray(ctrl[-1]["test_confusions"])
    trajs["control"] = pd.DataFrame([{k: v for k, v in r.items() if k != "test_confusions"} for r in ctrl]).assign(
        config="control: dense + same fine-tune", schedule="none", steps=0, importance="none", kd=False,
        final_sparsity=0.0)
    log(f"  {'control: dense + same fine-tune':45s} test mIoU {rows[-1]['miou']:.4f}")

    def tag(cfg):
        return f"{cfg.label}, {cfg.importance}, {'KD' if cfg.kd else 'FT'}, s={cfg.final_sparsity:g}"

    def run(cfg, role):
        t0 = time.perf_counter()
        hit = is_cached(ctx, model, cfg, teacher, kd_config, model_fp=fp)
        _, traj = run_schedule(ctx, model, cfg, teacher=teacher if cfg.kd else None, kd_config=kd_config,
                               rebuild=False)
        if not hit:
            spent["s"] += time.perf_counter() - t0
        for r in traj:
            r["input_hw"] = hw
        row = result_row(ctx, cfg, traj, model_name, role, start_steps)
        rows.append(row)
        confusions[_key(row)] = np.asarray(traj[-1]["test_confusions"])
        trajs[tag(cfg)] = trajectory_frame(traj, cfg)
        log(f"  {tag(cfg):45s} val mIoU {row['val_miou']:.4f}  params {row['params_m']:.3f} M  "
            f"{'(cached)' if hit else f'{time.perf_counter() - t0:.0f} s'}")
        return traj

    def fits(cfgs):
        need = sum(0.0 if is_cached(ctx, model, c, teacher, kd_config, model_fp=fp) else estimate_seconds(c, timing)
                   for c in cfgs)
        return budget is None or spent["s"] + need <= budget, need

    def group(cfgs, role):
        ok, need = fits(cfgs)
        if not ok:
            for c in cfgs:
                dropped.append((tag(c), f"time budget: needs ~{need:.0f} s, "
                                        f"{budget - spent['s']:.0f} s of {budget:.0f} s left"))
            log(f"  dropped {[tag(c) for c in cfgs]} (budget)")
            return False
        for c in cfgs:
            run(c, role)
        return True

    def cfg_of(schedule, k, s=main, importance="magnitude", kd=False):
        return IterativeConfig(final_sparsity=s, steps=k, schedule=schedule, importance=importance, kd=kd,
                               total_finetune_steps=total)

    oneshot = cfg_of("oneshot", 1)
    timing.update(timing_of(run(oneshot, "one-shot")))
    iters = []
    for k in sorted(grid["ks"], reverse=True):
        cs = [cfg_of("cubic", k), cfg_of("linear", k)]
        if group(cs, "schedule"):
            iters += cs
    best = None
    if iters:
        miou = {(r["schedule"], r["steps"], r["importance"], r["kd"], r["final_sparsity"]): r["val_miou"]
                for r in rows}
        best = max(iters, key=lambda c: miou[(c.schedule, c.steps, c.importance, c.kd, c.final_sparsity)])
        log(f"best iterative schedule at s={main:g}: {best.label}")
    if best is not None:
        group([cfg_of("oneshot", 1, importance="taylor"), cfg_of(best.schedule, best.steps, importance="taylor")],
              "taylor")
        if teacher is not None:
            group([cfg_of("oneshot", 1, kd=True), cfg_of(best.schedule, best.steps, kd=True)], "kd")
        else:
            dropped.append(("prune->distill pair", "no teacher available"))
        for s in grid["extra_sparsities"]:
            group([cfg_of("oneshot", 1, s), cfg_of(best.schedule, best.steps, s)], "sparsity")
    return {"rows": rows, "trajectories": trajs, "best": best, "grid": grid, "timing": timing,
            "dropped": dropped, "spent_s": spent["s"], "confusions": confusions}


# --------------------------------------------------------------------------- table, verdicts
def _key(row: dict) -> str:
    """Identity of a row's configuration (its method and final sparsity)."""
    return f"{row['method']} s={float(row['final_sparsity']):g}"


def study_table(ctx, res: dict, start_name: str, start_steps: float = float("nan")) -> pd.DataFrame:
    """The section table: the unpruned start model (role ``reference``), the control and
    :func:`run_study`'s rows, all scored on the **test** split.

    Verdict columns (paired bootstrap over test images of one seed,
    :func:`study.metrics.bootstrap_miou_diff`; the verdict is computed from the interval):
    ``diff_vs_control``, ``ci95_low``, ``ci95_high``, ``ci_method``, ``verdict`` against the
    "dense + same fine-tune" control; ``miou_vs_oneshot`` with ``oneshot_ci95_low``,
    ``oneshot_ci95_high``, ``verdict_vs_oneshot`` against one-shot at the same importance,
    KD flag and final sparsity. Also ``params_removed`` / ``macs_removed`` (fractions of the
    start model's).
    """
    first = res["trajectories"]["control"].iloc[0]
    start = table_row(ctx, SECTION, start_name, "start (unpruned)",
                      {"miou": first["test_miou"], "mdice": first["test_mdice"]},
                      complexity={"params_m": first["params_m"], "gmacs": first["gmacs"]}, input_hw=_input_hw(ctx),
                      split="test", train_steps=start_steps, val_miou=first["miou_after_ft"],
                      schedule="none", steps=0, importance="none", kd=False, final_sparsity=0.0, finetune_steps=0,
                      finetune_seconds=0.0, miou_start=first["miou_after_ft"], miou_pruned_no_ft=np.nan,
                      role="reference")
    table = pd.DataFrame([start] + res["rows"])
    table["params_removed"] = 1.0 - table.params_m / start["params_m"]
    table["macs_removed"] = 1.0 - table.gmacs / start["gmacs"]
    cms = res.get("confusions", {})
    ctrl = next((k for k in cms if k.startswith("control")), None)
    for c in ("diff_vs_control", "ci95_low", "ci95_high", "miou_vs_oneshot", "oneshot_ci95_low", "oneshot_ci95_high"):
        table[c] = np.nan
    for c in ("ci_method", "verdict", "verdict_vs_oneshot"):
        table[c] = ""
    for i, r in table.iterrows():
        if r.role in ("reference", "control"):
            continue
        k = _key(r)
        if ctrl is not None and k in cms:
            b = bootstrap_miou_diff(cms[k], cms[ctrl], seed=ctx.seed)
            table.loc[i, ["diff_vs_control", "ci95_low", "ci95_high"]] = [b["diff"], b["ci95_low"], b["ci95_high"]]
            table.loc[i, "ci_method"] = b["ci_method"]
            table.loc[i, "verdict"] = ci_verdict(b["ci95_low"], b["ci95_high"])
        ref = table[(table.schedule == "oneshot") & (table.importance == r.importance) & (table.kd == r.kd)
                    & (table.final_sparsity == r.final_sparsity) & (table.role != "control")]
        if len(ref) and r.schedule != "oneshot":
            table.loc[i, "miou_vs_oneshot"] = r.miou - ref.miou.iloc[0]
            rk = _key(ref.iloc[0])
            if k in cms and rk in cms:
                b = bootstrap_miou_diff(cms[k], cms[rk], seed=ctx.seed)
                table.loc[i, ["oneshot_ci95_low", "oneshot_ci95_high"]] = [b["ci95_low"], b["ci95_high"]]
                table.loc[i, "verdict_vs_oneshot"] = ci_verdict(b["ci95_low"], b["ci95_high"])
    return table


def pick(table: pd.DataFrame, schedule: str, steps: int, importance: str = "magnitude", kd: bool = False, *,
         s: float):
    """The row of :func:`study_table` of one configuration at final sparsity ``s``, or None."""
    d = table[(table.schedule == schedule) & (table.steps == steps) & (table.importance == importance)
              & (table.kd == kd) & (table.final_sparsity == s)]
    return d.iloc[0] if len(d) else None


def _ci(r) -> str:
    return (f"95 % CI [{r.ci95_low:+.4f}, {r.ci95_high:+.4f}] vs control → **{r.verdict}**"
            if np.isfinite(r.ci95_low) else "no interval")


def summary_lines(ctx, table: pd.DataFrame, res: dict, start_name: str) -> list[str]:
    """Markdown bullet lines of "What it means", recomputed from the table (test split, CIs computed)."""
    grid, best = res["grid"], res["best"]
    main = grid["main_sparsity"]
    hw = f"{ctx.profile.crop_size}x{ctx.profile.crop_size}"
    start = table[table.role == "reference"].iloc[0]
    ctrl = table[table.role == "control"].iloc[0]
    one = pick(table, "oneshot", 1, s=main)
    lines = [f"- Start: {start_name}, test mIoU {start.miou:.4f}, {start.params_m:.2f} M params, "
             f"{start.gmacs:.3f} GMACs at {hw}. Control (unpruned, the same {int(ctrl.finetune_steps)} fine-tune "
             f"steps): {ctrl.miou:.4f} - every pruning delta below is against it."]
    lines.append(f"- One-shot to s_f = {main:g} (channels): removes {one.params_removed:.0%} of the params and "
                 f"{one.macs_removed:.0%} of the MACs; test mIoU {one.miou:.4f} after {int(one.finetune_steps)} "
                 f"fine-tune steps: {one.diff_vs_control:+.4f} vs control, {_ci(one)}.")
    if best is not None:
        b = pick(table, best.schedule, best.steps, s=main)
        iters = table[(table.schedule != "oneshot") & (table.role == "schedule")]
        every = ", ".join(f"{r.schedule} k={r.steps} val {r.val_miou:.4f}" for r in iters.itertuples())
        lines.append(f"- Best iterative schedule (chosen on val: {every}): {best.label}, test mIoU {b.miou:.4f}, "
                     f"{b.miou_vs_oneshot:+.4f} vs one-shot at the same widths and budget, 95 % CI "
                     f"[{b.oneshot_ci95_low:+.4f}, {b.oneshot_ci95_high:+.4f}] → **{b.verdict_vs_oneshot}**.")
        for imp, kd, what in (("taylor", False, "Taylor importance"),
                              ("magnitude", True, "prune -> distill (KD fine-tune)")):
            o, bb = pick(table, "oneshot", 1, imp, kd, s=main), pick(table, best.schedule, best.steps, imp, kd, s=main)
            if o is not None and bb is not None:
                lines.append(f"- {what}: one-shot {o.miou:.4f} ({_ci(o)}), {best.label} {bb.miou:.4f} "
                             f"(vs one-shot {bb.miou_vs_oneshot:+.4f}, {bb.verdict_vs_oneshot}).")
        for s_ in grid["extra_sparsities"]:
            o, bb = pick(table, "oneshot", 1, s=s_), pick(table, best.schedule, best.steps, s=s_)
            if o is not None and bb is not None:
                lines.append(f"- s_f = {s_:g}: one-shot {o.miou:.4f} ({_ci(o)}), {best.label} {bb.miou:.4f} "
                             f"(vs one-shot {bb.miou_vs_oneshot:+.4f}, {bb.verdict_vs_oneshot}).")
    n = next(iter(res.get("confusions", {}).values()), np.zeros((0,))).shape[0]
    lines.append(f"- Intervals: paired bootstrap over the {n} test images, one training seed ({ctx.seed}): they "
                 "capture which images were drawn, not seed-to-seed variation of the fine-tunes.")
    if res["dropped"]:
        lines.append(f"- Reduced grid: {len(res['dropped'])} configurations dropped for time (listed above; "
                     "`--full-grid` runs them).")
    return lines


#: Source 000's claims about iterative pruning and MobileViT's sensitivity.
REPORTED_BY_SOURCE000 = ("iterative pruning gave only marginal gains over one-shot (bulk) pruning on MobileViT",
                         "accuracy drops from 0.2 sparsity")


def comparison_with_source(table: pd.DataFrame, res: dict) -> pd.DataFrame:
    """Claim / reported by source 000 / this study / verdict, for the two claims of source 000.

    Both verdicts are computed from 95 % intervals (paired bootstrap over test images):
    "iterative gives marginal gains" agrees when best-iterative minus one-shot is "no
    detectable difference" or a detectable gain below 0.02 mIoU; "accuracy drops from 0.2
    sparsity" agrees when one-shot at the lowest sparsity run is detectably worse than the
    dense + same fine-tune control.
    """
    grid, best = res["grid"], res["best"]
    main = grid["main_sparsity"]
    if best is not None:
        b = pick(table, best.schedule, best.steps, s=main)
        v = b.verdict_vs_oneshot
        verdict = ("agrees" if v == "no detectable difference at this budget" or (v == "helps" and b.miou_vs_oneshot < 0.02)
                   else f"differs ({v})")
        ours = (f"best iterative ({best.label}, chosen on val) minus one-shot at s_f={main:g}: "
                f"{b.miou_vs_oneshot:+.4f} test mIoU, 95 % CI [{b.oneshot_ci95_low:+.4f}, {b.oneshot_ci95_high:+.4f}], "
                f"equal budget")
    else:
        verdict, ours = "not tested (grid reduced to one-shot)", "n/a"
    low = pick(table, "oneshot", 1, s=min([main] + grid["extra_sparsities"]))
    return pd.DataFrame([
        {"claim": "iterative vs one-shot", "reported by source 000": REPORTED_BY_SOURCE000[0], "this study": ours,
         "verdict": verdict},
        {"claim": "sensitivity of MobileViT to sparsity", "reported by source 000": REPORTED_BY_SOURCE000[1],
         "this study": ("n/a" if low is None else
                        f"one-shot at s_f={low.final_sparsity:g} vs dense + same fine-tune: {low.diff_vs_control:+.4f} "
                        f"test mIoU, 95 % CI [{low.ci95_low:+.4f}, {low.ci95_high:+.4f}]"),
         "verdict": ("n/a" if low is None else ("agrees" if low.verdict == "hurts" else f"differs ({low.verdict})"))},
    ])


__all__ = ["SECTION", "IterativeConfig", "STUDY_STEPS", "BUDGET_S", "KD_COST_FACTOR", "MAIN_SPARSITY",
           "start_models", "kd_finetune_loss", "is_cached", "run_schedule", "control_finetune", "trajectory_frame",
           "study_grid", "estimate_seconds", "timing_of", "result_row", "run_study", "study_table", "pick",
           "summary_lines", "comparison_with_source", "REPORTED_BY_SOURCE000"]
