"""The claims table: every headline claim of the three sources against this run's numbers.

Read by :func:`study.report.build_report` (it opens the report) and written as
``build/<profile>/claims.csv``. Each claim names the source's number, this run's number
(from the section tables of the run, with profile, split and interval when the table has
one), a verdict computed from the two, and the notebook that measured it.

Verdicts:

- ``reproduced``: the effect has the source's sign and its 95 % interval (when the table
  carries ``ci95_low`` / ``ci95_high``) excludes zero; for ratio claims, the ratio is within
  a factor 1.5 of the source's.
- ``reproduced in sign only``: same sign, but no interval (one seed) or an interval that
  includes zero, or a size far from the source's.
- ``not reproduced``: the opposite sign (or no speed-up where one was claimed).
- ``not comparable at this profile``: different hardware or setting; the reason says why.
- ``not measured in this run``: the table or row is missing (e.g. the section did not run).

A dry run (``--fast-dev-run``: 2 optimizer steps per training) has numbers but no results:
every claim it measures is ``not comparable at this profile``, its value still shown.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from ..bench import latency_verdict

REPRODUCED = "reproduced"
SIGN_ONLY = "reproduced in sign only"
NOT_REPRODUCED = "not reproduced"
NOT_COMPARABLE = "not comparable at this profile"
NOT_MEASURED = "not measured in this run"


@dataclass(frozen=True)
class Claim:
    """One published claim and how this run's tables test it.

    Attributes:
        key: short id; source: ``000``, ``001`` or ``002``; claim: what the source says;
        reported: the source's number(s) as text; notebook: the notebook stem that measures
        it; measure: ``measure(tables, profile) -> (this run's number as text, verdict,
        reason)``.
    """

    key: str
    source: str
    claim: str
    reported: str
    notebook: str
    measure: Callable[[dict, str], tuple[str, str, str]]


def _row(df: pd.DataFrame | None, **match) -> pd.Series | None:
    if df is None:
        return None
    sel = df
    for col, val in match.items():
        if col not in sel:
            return None
        sel = sel[sel[col].astype(str).str.fullmatch(str(val))] if isinstance(val, str) else sel[sel[col] == val]
    return None if sel.empty else sel.iloc[0]


def _num(row: pd.Series | None, *cols: str) -> float:
    if row is None:
        return math.nan
    for c in cols:
        if c in row and pd.notna(row[c]):
            return float(row[c])
    return math.nan


def _interval(row: pd.Series | None) -> tuple[float, float]:
    return _num(row, "ci95_low"), _num(row, "ci95_high")


def _delta_verdict(delta: float, expected_sign: int, ci: tuple[float, float]) -> tuple[str, str]:
    if not math.isfinite(delta):
        return NOT_MEASURED, "no value"
    if delta * expected_sign <= 0:
        return NOT_REPRODUCED, "opposite sign (or zero)"
    lo, hi = ci
    if math.isfinite(lo) and math.isfinite(hi):
        if (lo > 0 and expected_sign > 0) or (hi < 0 and expected_sign < 0):
            return REPRODUCED, "95 % interval excludes 0"
        return SIGN_ONLY, "same sign, 95 % interval includes 0"
    return SIGN_ONLY, "same sign; no interval in the table (one seed)"


# --------------------------------------------------------------------------- the claims

def _kd(t, profile):
    d = t.get("distillation")
    if d is None:
        return "-", NOT_MEASURED, "distillation table missing"
    none = d[(d["model"] == "upernet_mobilevit_s") & d["method"].astype(str).str.startswith("none")]
    if none.empty:
        return "-", NOT_MEASURED, "no no-KD control row"
    none = none.iloc[0]
    mse = _row(d, model="upernet_mobilevit_s", method="mse")  # the source's method (its code's logit MSE)
    if mse is None:
        return "-", NOT_MEASURED, "no MSE (source 000's KD) row"
    delta = float(mse["miou"]) - float(none["miou"])
    verdict, why = _delta_verdict(delta, +1, _interval(mse))
    lo, hi = _interval(mse)
    iv = f", 95 % CI [{lo:+.4f}, {hi:+.4f}]" if math.isfinite(lo) else ""
    return (f"{none['miou']:.4f} -> {mse['miou']:.4f} (mse, {delta:+.4f}{iv}; test split, equal budget)", verdict,
            why + ("" if profile == "paper" else f"; absolute mIoU not comparable ({profile} profile)"))


def _iterative(t, profile):
    d = t.get("iterative_pruning")
    if d is None or "val_miou" not in d or "oneshot_ci95_low" not in d:
        return "-", NOT_MEASURED, "iterative-pruning table missing (or without intervals)"
    it = d[(d["role"] == "schedule") & (d["schedule"] != "oneshot")]
    if it.empty:
        return "-", NOT_MEASURED, "no iterative schedule ran"
    best = it.loc[it["val_miou"].idxmax()]  # chosen on val, as notebook 04 does
    delta, lo, hi = _num(best, "miou_vs_oneshot"), _num(best, "oneshot_ci95_low"), _num(best, "oneshot_ci95_high")
    if not math.isfinite(delta):
        return "-", NOT_MEASURED, "no one-shot reference"
    marginal = (math.isfinite(lo) and lo <= 0 <= hi) or abs(delta) < 0.02
    verdict = REPRODUCED if marginal else NOT_REPRODUCED
    why = ("interval includes 0 or |gain| < 0.02: marginal, as the source says" if marginal
           else "detectable difference of at least 0.02")
    return (f"best iterative ({best['schedule']} k={int(best['steps'])}, chosen on val) minus one-shot: {delta:+.4f} "
            f"test mIoU, 95 % CI [{lo:+.4f}, {hi:+.4f}], equal fine-tune budget", verdict, why)


def _fp16(t, profile):
    q = t.get("quantization")
    fp32 = _row(q, runtime="ort", precision="fp32")
    fp16 = _row(q, runtime="ort", precision="fp16")
    if fp32 is None or fp16 is None:
        return "-", NOT_MEASURED, "quantization table missing"
    ratio = _num(fp32, "latency_ms_p50") / _num(fp16, "latency_ms_p50")
    return (f"ORT fp16 / fp32 speed {ratio:.2f}x on this CPU", NOT_COMPARABLE,
            "source measured a Jetson Nano GPU (fp16 tensor path); a CPU has no fast fp16 kernels")


def _heads(t, profile):
    h = t.get("head_pruning")
    dense, rep = _row(h, method="dense"), _row(h, method="repartition")
    phys = _row(h, method="heads", heads=2)
    if dense is None or rep is None:
        return "-", NOT_MEASURED, "head-pruning table missing"
    d_miou = float(rep["miou"]) - float(dense["miou"])
    checks = {"accuracy cost <= 0.02": d_miou >= -0.02,
              "params drop": float(rep["params_m"]) < float(dense["params_m"]) - 1e-6,
              "no FPS gain (speed-up <= 1.1x)": _num(rep, "speedup") <= 1.1}
    held = sum(checks.values())
    verdict = REPRODUCED if held == 3 else SIGN_ONLY if held == 2 else NOT_REPRODUCED
    text = (f"re-partition 4->2 (the source's method): mIoU {d_miou:+.4f}, params {dense['params_m']:.2f} -> "
            f"{rep['params_m']:.2f} M, speed-up {_num(rep, 'speedup'):.2f}x; physically removing 2 heads: "
            f"params {_num(phys, 'params_m'):.2f} M, speed-up {_num(phys, 'speedup'):.2f}x")
    reason = "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items())
    return text, verdict, reason + " (re-partitioning keeps the q/k/v width, so its params cannot drop)"


def _sparsity_sensitivity(t, profile):
    s = t.get("structured_pruning")
    if s is None:
        return "-", NOT_MEASURED, "structured-pruning table missing"
    mv = s[(s["model"] == "upernet_mobilevit_s") & (s["method"] == "structured_magnitude")]
    sw = s[(s["model"] == "upernet_swinv2_t") & (s["method"] == "mlp_hidden")]
    if mv.empty or sw.empty or "diff_vs_control" not in s:
        return "-", NOT_MEASURED, "sparsity sweep rows (with a dense + same fine-tune control) missing"

    def hurts_from(d):  # the lowest sparsity whose interval vs the control is entirely below 0
        bad = d[d["verdict"] == "hurts"].sort_values("sparsity")
        return float(bad["sparsity"].iloc[0]) if len(bad) else math.inf

    f = lambda d: ", ".join(f"{r.sparsity:g}: {r.diff_vs_control:+.3f} [{r.ci95_low:+.3f}, {r.ci95_high:+.3f}]"  # noqa: E731
                            for r in d.sort_values("sparsity").itertuples())
    first_mv, first_sw = hurts_from(mv), hurts_from(sw)
    verdict = (REPRODUCED if first_mv < first_sw else NOT_REPRODUCED if first_mv > first_sw else SIGN_ONLY)
    fmt = lambda x: "never" if math.isinf(x) else f"{x:g}"  # noqa: E731
    return (f"test mIoU vs dense + same fine-tune (95 % CI), MobileViT channels {f(mv)}; Swin MLP {f(sw)}",
            verdict, f"first sparsity that detectably hurts: MobileViT {fmt(first_mv)}, Swin {fmt(first_sw)} "
                     "(paired bootstrap over test images, one seed)")


def _unstructured(t, profile):
    s = t.get("structured_pruning")
    r = _row(s, method="unstructured")
    if r is None:
        return "-", NOT_MEASURED, "no unstructured row"
    sp = _num(r, "speedup")
    lo, hi = _num(r, "speedup_ci95_low"), _num(r, "speedup_ci95_high")
    dense = _row(s[s["model"] == r["model"]] if "model" in s else s, method="dense")
    if math.isfinite(lo) and math.isfinite(hi):
        verdict = REPRODUCED if lo <= 1.0 <= hi else NOT_REPRODUCED
        why = "speed-up interval includes 1" if verdict == REPRODUCED else "speed-up interval excludes 1"
    elif dense is not None and all(math.isfinite(_num(x, f"latency_ms_p50_ort{c}")) for x in (r, dense)
                                   for c in ("_ci95_low", "_ci95_high")):
        # the two models' ORT p50 intervals from the one protocol, read by the study's one rule
        ort = {k: {f"latency_ms_p50{c}": _num(x, f"latency_ms_p50_ort{c}") for c in ("_ci95_low", "_ci95_high")}
               for k, x in (("masked", r), ("dense", dense))}
        lat = latency_verdict(ort["masked"], ort["dense"])
        verdict = NOT_REPRODUCED if lat == "faster" else REPRODUCED
        why = (f"ORT p50 95 % intervals: masked [{ort['masked']['latency_ms_p50_ci95_low']:.2f}, "
               f"{ort['masked']['latency_ms_p50_ci95_high']:.2f}] ms vs dense "
               f"[{ort['dense']['latency_ms_p50_ci95_low']:.2f}, {ort['dense']['latency_ms_p50_ci95_high']:.2f}] ms; "
               + ("the masked model is detectably faster" if lat == "faster" else "not detectably faster"))
    else:
        verdict = REPRODUCED if 0.9 <= sp <= 1.1 else NOT_REPRODUCED
        why = "point estimate within +-10 % of 1 (no interval in the table)"
    return f"sparsity {_num(r, 'sparsity'):g}: ORT speed-up {sp:.2f}x", verdict, why


def _structured45(t, profile):
    s = t.get("structured_pruning")
    if s is None:
        return "-", NOT_MEASURED, "structured-pruning table missing"
    rows = s[(s["method"] == "structured_magnitude") & (s["model"] == "upernet_mobilevit_s")]
    if rows.empty:
        return "-", NOT_MEASURED, "no structured rows"
    r = rows.iloc[(rows["sparsity"] - 0.45).abs().argmin()]
    sp, drop = _num(r, "speedup"), _num(r, "miou_drop")
    ratio_src = 31.0 / 11.4
    verdict = (REPRODUCED if ratio_src / 1.5 <= sp <= ratio_src * 1.5 and drop <= 0.02 else
               SIGN_ONLY if sp > 1.0 else NOT_REPRODUCED)
    lo, hi = _interval(r)
    iv = f" (vs dense + same fine-tune, 95 % CI of the change [{lo:+.4f}, {hi:+.4f}])" if math.isfinite(lo) else ""
    return (f"sparsity {r['sparsity']:g}: speed-up {sp:.2f}x (source {ratio_src:.2f}x), mIoU drop {drop:+.4f}{iv}",
            verdict, "speed-up within 1.5x of the source's and drop <= 0.02 for 'reproduced'; "
                     "source 001 is a detector on a Jetson, this is a segmenter on a CPU")


def _searched_s(t, profile):
    b = t.get("bilevel_search")
    hand = _row(b, model="topformer_s", method="hand-designed")
    srch = _row(b, model="topformer_b->S", method="bilevel", experiment="main")
    if hand is None or srch is None:
        return "-", NOT_MEASURED, "bi-level table missing"
    delta = float(srch["miou"]) - float(hand["miou"])
    # the table's intervals are each row against its `vs` reference (the dense + same fine-tune
    # control), not searched vs hand-designed: no interval for this difference here
    verdict, why = _delta_verdict(delta, +1, (math.nan, math.nan))
    budget = (f"equal train_steps ({int(srch['train_steps'])})" if _num(srch, "train_steps") == _num(hand, "train_steps")
              else "unequal train_steps")
    return (f"searched {srch['miou']:.4f} vs hand-designed {hand['miou']:.4f} at {srch['gmacs']:.4f} GMACs "
            f"({delta:+.4f}; test split, {budget})", verdict,
            why + "; notebook 06's verdict table has the paired interval of this difference")


def _implicit(t, profile):
    b = t.get("bilevel_search")
    if b is None or "implicit" not in b or "experiment" not in b:
        return "-", NOT_MEASURED, "bi-level table missing"
    off = _row(b, experiment="implicit_ablation", implicit=False)
    if off is None:
        return "-", NOT_MEASURED, "no implicit-gradient ablation row"
    if "delta_miou" not in off or not math.isfinite(_num(off, "delta_miou")):
        return "-", NOT_MEASURED, "the ablation row has no paired difference to its reference"
    # the row holds (without - with) against its `vs` reference (the same search with the term): flip it
    delta = -_num(off, "delta_miou")
    lo, hi = _interval(off)
    verdict, why = _delta_verdict(delta, +1, (-hi, -lo))
    return (f"{off['model']}: with minus without the implicit term {delta:+.4f} test mIoU, 95 % CI "
            f"[{-hi:+.4f}, {-lo:+.4f}] (reference: {off.get('vs', '?')})", verdict, why)


def _beta_lambda(t, profile):
    b = t.get("bilevel_search")
    if b is None or "experiment" not in b:
        return "-", NOT_MEASURED, "bi-level table missing"
    out, ok = [], True
    for exp, col, best_src in (("beta_sweep", "beta", 0.01), ("lambda_sweep", "lam", 0.1)):
        d = b[b["experiment"] == exp]
        if d.empty:
            return "-", NOT_MEASURED, f"no {exp} rows"
        score = "val_miou" if "val_miou" in d else "miou"  # a choice is made on val (tables before: test)
        best = d.loc[d[score].idxmax()]
        out.append(f"best {col} = {best[col]:g}")
        ok = ok and math.isclose(float(best[col]), best_src) and d[score].nunique() > 1
    return ", ".join(out) + " (on val)", (SIGN_ONLY if ok else NOT_REPRODUCED), \
        "best by val mIoU on one seed, as notebook 06 chooses; ties (equal mIoU) count as not reproduced"


CLAIMS = (
    Claim("kd", "000", "KD from the Swin teacher improves the MobileViT student", "mIoU 0.5365 -> 0.6056",
          "01_distillation", _kd),
    Claim("iterative", "000", "iterative pruning gives only marginal gains over one-shot", "marginal gains",
          "04_iterative_pruning", _iterative),
    Claim("fp16", "000", "fp16 speeds the student up on the Jetson Nano", "3.11 -> 4.49 FPS", "05_quantization", _fp16),
    Claim("heads", "000", "heads 4 -> 2 costs little accuracy, cuts params, gains no FPS",
          "mIoU 0.545 -> 0.533, params 5.6 -> 4.6 M, no FPS gain", "03_head_pruning", _heads),
    Claim("sensitivity", "000", "MobileViT degrades from sparsity 0.2, Swin only near 0.7",
          "MobileViT from 0.2, Swin near 0.7", "02_structured_pruning", _sparsity_sensitivity),
    Claim("unstructured", "001", "60 % unstructured sparsity gives no speed-up", "no speed-up",
          "02_structured_pruning", _unstructured),
    Claim("structured45", "001", "45 % structured pruning: large speed-up at a tiny metric cost",
          "31.0 -> 11.4 ms (2.72x) at -0.006 mAP", "02_structured_pruning", _structured45),
    Claim("searched_s", "002", "searched TopFormer-S beats the hand-designed one at equal MACs",
          "37.5 vs 36.1 mIoU at 1.2 GMACs", "06_bilevel_search", _searched_s),
    Claim("implicit", "002", "the implicit-gradient term helps the search", "73.6 vs 71.9 mIoU",
          "06_bilevel_search", _implicit),
    Claim("beta_lambda", "002", "beta = 0.01 and lambda = 0.1 are the best settings", "beta 0.01, lambda 0.1",
          "06_bilevel_search", _beta_lambda),
)


DRY_RUN_REASON = "dry run (--fast-dev-run): 2 optimizer steps per training, so its numbers test the code, not the claim"


def claims_table(tables_dir: str | Path, profile: str, dry_run: bool | None = None) -> pd.DataFrame:
    """Evaluate every :data:`CLAIMS` entry on the section tables in ``tables_dir``.

    Args:
        tables_dir: ``build/<profile>/tables`` (``<section>.csv`` files).
        profile: the run's profile name (stated in each row).
        dry_run: whether the tables come from a ``--fast-dev-run``; None: read from the
            tables' ``dry_run`` column (any true value). A dry run's measured claims are
            ``not comparable at this profile`` (:data:`DRY_RUN_REASON`) and its rows' profile
            says ``(dry run)``.

    Returns:
        DataFrame with ``source, claim, reported, this_run, profile, verdict, reason,
        notebook`` (one row per claim; a claim whose table is missing says so).
    """
    tables_dir = Path(tables_dir)
    tables = {p.stem: pd.read_csv(p) for p in sorted(tables_dir.glob("*.csv"))}
    if dry_run is None:
        dry_run = any(t["dry_run"].fillna(False).astype(bool).any() for t in tables.values() if "dry_run" in t)
    rows = []
    for c in CLAIMS:
        try:
            value, verdict, reason = c.measure(tables, profile)
        except (KeyError, ValueError, TypeError) as exc:  # a table without the expected columns
            value, verdict, reason = "-", NOT_MEASURED, f"table lacks what the claim needs ({exc!r})"
        if dry_run and verdict != NOT_MEASURED:
            verdict, reason = NOT_COMPARABLE, DRY_RUN_REASON
        rows.append({"source": c.source, "claim": c.claim, "reported": c.reported, "this_run": value,
                     "profile": f"{profile} (dry run)" if dry_run else profile, "verdict": verdict,
                     "reason": reason, "notebook": c.notebook})
    return pd.DataFrame(rows)
