"""The claims table computes its verdicts from the section tables (never types them)."""
from pathlib import Path

import pandas as pd

from study import report
from study.sections import claims as C


def _write(tables, name, rows):
    pd.DataFrame(rows).to_csv(tables / f"{name}.csv", index=False)


def test_verdicts_follow_the_numbers(tmp_path):
    _write(tmp_path, "distillation", [
        {"model": "upernet_mobilevit_s", "method": "none", "miou": 0.30},
        {"model": "upernet_mobilevit_s", "method": "mse", "miou": 0.34, "ci95_low": 0.01, "ci95_high": 0.07},
        # the claim is about the source's KD (its code's logit MSE): a better KL row does not count
        {"model": "upernet_mobilevit_s", "method": "kl", "miou": 0.50, "ci95_low": 0.1, "ci95_high": 0.3}])
    _write(tmp_path, "iterative_pruning", [
        {"role": "schedule", "schedule": "cubic", "steps": 2, "val_miou": 0.31, "miou_vs_oneshot": 0.004,
         "oneshot_ci95_low": -0.01, "oneshot_ci95_high": 0.02},
        {"role": "schedule", "schedule": "linear", "steps": 2, "val_miou": 0.29, "miou_vs_oneshot": 0.05,
         "oneshot_ci95_low": 0.03, "oneshot_ci95_high": 0.07}])
    _write(tmp_path, "structured_pruning", [
        {"model": "upernet_mobilevit_s", "method": "unstructured", "sparsity": 0.6, "speedup": 1.02,
         "speedup_ci95_low": 0.97, "speedup_ci95_high": 1.06, "miou": 0.3},
        {"model": "upernet_mobilevit_s", "method": "structured_magnitude", "sparsity": 0.45, "speedup": 2.5,
         "miou_drop": 0.004, "miou": 0.3}])
    t = C.claims_table(tmp_path, "cpu").set_index("source", append=True)
    by_claim = {r.claim: r for r in C.claims_table(tmp_path, "cpu").itertuples()}
    kd = by_claim["KD from the Swin teacher improves the MobileViT student"]
    assert kd.verdict == C.REPRODUCED and "+0.0400" in kd.this_run and "[+0.0100, +0.0700]" in kd.this_run
    # the schedule chosen on val (cubic) is the one compared: its interval includes 0 -> marginal gain
    it = by_claim["iterative pruning gives only marginal gains over one-shot"]
    assert it.verdict == C.REPRODUCED and "cubic k=2" in it.this_run
    assert by_claim["60 % unstructured sparsity gives no speed-up"].verdict == C.REPRODUCED
    assert by_claim["45 % structured pruning: large speed-up at a tiny metric cost"].verdict == C.REPRODUCED
    # tables that did not run are said to be missing, not guessed
    assert by_claim["searched TopFormer-S beats the hand-designed one at equal MACs"].verdict == C.NOT_MEASURED
    assert len(t) == len(C.CLAIMS)


def test_opposite_sign_and_missing_interval(tmp_path):
    _write(tmp_path, "distillation", [
        {"model": "upernet_mobilevit_s", "method": "none (= section-0 baseline, equal budget)", "miou": 0.30},
        {"model": "upernet_mobilevit_s", "method": "mse", "miou": 0.28}])
    kd = C.claims_table(tmp_path, "smoke").iloc[0]
    assert kd.verdict == C.NOT_REPRODUCED
    _write(tmp_path, "distillation", [
        {"model": "upernet_mobilevit_s", "method": "none", "miou": 0.30},
        {"model": "upernet_mobilevit_s", "method": "mse", "miou": 0.31}])
    kd = C.claims_table(tmp_path, "smoke").iloc[0]
    assert kd.verdict == C.SIGN_ONLY and "no interval" in kd.reason


def test_a_dry_run_reproduces_nothing(tmp_path):
    """The paper dry run's tables (2 optimizer steps) once gave 'reproduced' verdicts in its report."""
    _write(tmp_path, "distillation", [
        {"model": "upernet_mobilevit_s", "method": "none", "miou": 0.30, "dry_run": True},
        {"model": "upernet_mobilevit_s", "method": "mse", "miou": 0.31, "dry_run": True}])
    for dry in (None, True):                                  # read from the tables, or said by the run
        kd = C.claims_table(tmp_path, "paper", dry_run=dry).iloc[0]
        assert kd.verdict == C.NOT_COMPARABLE and "dry run" in kd.reason and kd.profile == "paper (dry run)"
        assert "0.3" in kd.this_run                           # the number is still shown
    missing = C.claims_table(tmp_path, "paper").set_index("notebook").loc["06_bilevel_search"]
    assert (missing.verdict == C.NOT_MEASURED).all()          # absent stays absent
    _write(tmp_path, "distillation", [
        {"model": "upernet_mobilevit_s", "method": "none", "miou": 0.30, "dry_run": False},
        {"model": "upernet_mobilevit_s", "method": "mse", "miou": 0.31, "dry_run": False}])
    assert C.claims_table(tmp_path, "cpu").iloc[0].verdict == C.SIGN_ONLY


def test_render_math_converts_wrapped_inline_and_display_math_but_not_prices_or_code():
    out = report.render_math("loss $\\mathcal{L} = a +\nb$ and $$\\frac{1}{2}$$, `$x$`, $5 and $6.")
    assert out.count("<math") == 2 and "`$x$`" in out and "$5 and $6" in out


def test_unstructured_speed_claim_uses_the_p50_intervals_of_the_same_protocol(tmp_path):
    def table(masked_ci):
        _write(tmp_path, "structured_pruning", [
            {"model": "upernet_mobilevit_s", "method": "dense", "sparsity": 0.0, "speedup": 1.0,
             "latency_ms_p50_ort_ci95_low": 5.8, "latency_ms_p50_ort_ci95_high": 9.6},
            {"model": "upernet_mobilevit_s", "method": "unstructured", "sparsity": 0.6, "speedup": 0.71,
             "latency_ms_p50_ort_ci95_low": masked_ci[0], "latency_ms_p50_ort_ci95_high": masked_ci[1]}])
        return {r.claim: r for r in C.claims_table(tmp_path, "cpu").itertuples()}[
            "60 % unstructured sparsity gives no speed-up"]

    overlap = table((5.8, 10.1))            # a 0.71x point estimate, but the intervals overlap
    assert overlap.verdict == C.REPRODUCED and "not detectably faster" in overlap.reason
    faster = table((2.0, 3.0))              # detectably faster than dense: the claim fails
    assert faster.verdict == C.NOT_REPRODUCED and "detectably faster" in faster.reason


def test_best_beta_and_lambda_are_read_on_val_as_the_notebook_chooses():
    import pandas as pd
    from study.sections import claims

    rows = [("beta_sweep", 0.01, 0.1, 0.30, 0.20), ("beta_sweep", 0.1, 0.1, 0.25, 0.22),
            ("lambda_sweep", 0.01, 0.01, 0.31, 0.19), ("lambda_sweep", 0.01, 0.1, 0.26, 0.21)]
    t = {"bilevel_search": pd.DataFrame(rows, columns=["experiment", "beta", "lam", "val_miou", "miou"])}
    text, verdict, _ = claims._beta_lambda(t, "cpu")
    # on val: beta 0.01 (source's) and lam 0.01 (not the source's 0.1); on test it would be 0.1 / 0.1
    assert text == "best beta = 0.01, best lam = 0.01 (on val)" and verdict == claims.NOT_REPRODUCED


def test_dry_run_report_says_so_above_its_claims(tmp_path):
    (tmp_path / "tables").mkdir()
    _write(tmp_path / "tables", "distillation", [
        {"model": "upernet_mobilevit_s", "method": "none", "miou": 0.30, "dry_run": True},
        {"model": "upernet_mobilevit_s", "method": "mse", "miou": 0.31, "dry_run": True}])
    rec = {"profile": "paper", "seed": 0, "data_root": "lpcvc", "fast_dev_run": True, "notebooks": []}
    html = Path(report.build_report(tmp_path, rec)).read_text()
    assert "This is a dry run" in html and "<i>not comparable at this profile</i>" in html
    assert "<i>reproduced</i>" not in html and "<i>not reproduced</i>" not in html
    assert "paper (dry run)" in (tmp_path / "claims.csv").read_text()
