"""Where a notebook's time goes: shares of a py-spy profile by the study's cost categories.

    py-spy record --subprocesses --format raw -r 20 -o prof.raw -- ./run_all.sh ... --only SECTION
    python benchmarks/profile_breakdown.py prof.raw [--root run_study]

Reads py-spy's ``raw`` output (one ``frame;frame;...;frame count`` line per distinct stack),
keeps the stacks that pass through ``--root`` (a function name: the notebook's work, not
the kernel's idle threads) and gives each sample to the first category, in the order
below, whose function is on its stack: so training's own evaluations count as training,
and "evaluation" is what the section evaluates outside its trainings. Prints seconds
(samples / rate) and shares.
"""
from __future__ import annotations

import argparse
import sys

# (category, substrings of py-spy frame names "function (file:line)"); first match wins
CATEGORIES = (
    ("training steps (finetune / train)", ("finetune (study/sections/common.py", "train (study/train.py")),
    ("evaluation at the profile's shapes", ("evaluate (study/train.py", "test_confusions (study/sections/common.py")),
    ("MACs / params counting", ("model_complexity (study/models.py",)),
    ("ONNX export", ("export_onnx (study/quant.py", "export_model (study/sections/measure.py")),
    ("latency benchmarks", ("compare_latency (study/bench.py", "LatencyPlan.measure (study/sections/measure.py")),
    ("pruning (importance, graph, surgery)", ("(study/prune.py",)),
    ("cache reads / writes", ("ArtifactCache._save", "ArtifactCache._load", "torch/serialization.py")),
)


def breakdown(lines, root: str, rate: float) -> tuple[float, list[tuple[str, float]]]:
    """``(seconds under root, [(category, seconds), ...])`` of py-spy raw ``lines``.

    Raises:
        ValueError: a line is not ``stack count`` (names the line number), or no stack
            passes through ``root``.
    """
    cats = {name: 0 for name, _ in CATEGORIES}
    cats["other (copies, data set-up, Python)"] = 0
    total = 0
    for i, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            raise ValueError(f"line {i} is not py-spy raw output ('frame;...;frame count'): {line[:80]!r}")
        frames = stack.split(";")
        names = [f.split(" (")[0] for f in frames]  # "Class.method" or "function"
        if not any(n == root or n.endswith("." + root) for n in names):
            continue
        total += int(n)
        for name, keys in CATEGORIES:
            if any(k in f for f in frames for k in keys):
                cats[name] += int(n)
                break
        else:
            cats["other (copies, data set-up, Python)"] += int(n)
    if total == 0:
        raise ValueError(f"no sampled stack passes through {root!r}")
    return total / rate, [(k, v / rate) for k, v in cats.items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", help="py-spy --format raw output")
    ap.add_argument("--root", default="run_code", help="function every counted stack passes through "
                    "(default: IPython's run_code, i.e. all notebook cells)")
    ap.add_argument("--rate", type=float, default=20.0, help="py-spy sampling rate (-r), samples/s")
    args = ap.parse_args()
    try:
        with open(args.raw) as fh:
            total, cats = breakdown(fh, args.root, args.rate)
    except (OSError, ValueError) as exc:
        print(f"{args.raw}: {exc}", file=sys.stderr)
        return 2
    print(f"{args.raw}: {total:.0f} s sampled under {args.root}")
    for name, sec in cats:
        print(f"  {name:<40} {sec:7.0f} s  {100 * sec / total:5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
