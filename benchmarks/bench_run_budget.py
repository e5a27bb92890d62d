"""Print the wall time of each notebook from build/<profile>/run.json against the run budgets.

    python benchmarks/bench_run_budget.py [--profile smoke|cpu] [--build-dir build]

Budgets (2-core machine, after set-up; issue #13): smoke <= 5 min for all notebooks; cpu
<= 120 min cold, <= 3 min warm (everything cached). The cpu cold budget gave way to the
levels of issue #13 (models worth compressing): measured cold ~3 h, see README. Whether a run was cold or warm is read from
run.json's ``fresh`` flag and the notebook times; pass --label to name the run.
"""
import argparse
import json
import sys
from pathlib import Path

BUDGET_S = {"smoke": 5 * 60, "cpu": 120 * 60, "cpu-warm": 3 * 60}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--build-dir", default="build")
    ap.add_argument("--warm", action="store_true", help="compare with the warm (cached) budget")
    args = ap.parse_args()
    path = Path(args.build_dir) / args.profile / "run.json"
    if not path.exists():
        print(f"{path}: not found; run ./run_all.sh --profile {args.profile} first", file=sys.stderr)
        return 2
    rec = json.loads(path.read_text())
    print(f"run.json: {path}  commit {rec.get('git_commit', '')[:10]}  CPU {rec.get('cpu_model')} x{rec.get('cpu_cores')}")
    total = 0.0
    for nb in rec["notebooks"]:
        total += nb["seconds"]
        print(f"  {nb['name']:<24} {nb['status']:<7} {nb['seconds']:9.1f} s")
    key = f"{args.profile}-warm" if args.warm else args.profile
    budget = BUDGET_S.get(key)
    verdict = "" if budget is None else f"  budget {budget:.0f} s: {'met' if total <= budget else 'MISSED'}"
    print(f"  {'total':<24} {'':<7} {total:9.1f} s{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
