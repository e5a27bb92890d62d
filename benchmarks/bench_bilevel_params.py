"""Bi-level search settings on the cached cpu parents: raw MACs vs target, groups switched off, val mIoU.

    python benchmarks/bench_bilevel_params.py MODEL RATIO SETTINGS_JSON... [magnitude]

e.g. ``topformer_b 0.6206 '{"beta": 0.01, "s_optim": "adam_group"}' magnitude``: searches the trained
``MODEL`` of ``BUILD_DIR/cache`` (default build) to ``RATIO`` x its dense MACs with each setting
(``project=False``: the raw hard masks), removes the masked channels, and prints one JSON line
per setting: ``gmacs_raw``, its error against the target, groups switched off entirely, val mIoU
with no fine-tune and after ``ft`` (default 30) fine-tune steps. ``magnitude``: the projection
baseline at the same MACs (no fine-tune, 30 and 150 steps). Results of 2026-11-28:
``benchmarks/results/cpu-bilevel-params-2026-11-28.txt``.
"""
import os
import copy
import json
import sys
import time
import torch
from study.context import setup
from study import bilevel
from study.sections import bilevel_search as sec
from study.sections.common import trained_model, loaders, eval_loader, finetune
from study.train import evaluate

ctx = setup(profile="cpu", seed=0, build_dir=os.environ.get("BUILD_DIR", "build"))
hw = sec.input_hw(ctx)
base = sys.argv[1]; ratio = float(sys.argv[2]); variants = sys.argv[3:]
m0, _ = trained_model(ctx, base)
dense = sec.dense_gmacs(base, hw)
target = dense * ratio
tr, _ = loaders(ctx)
val = eval_loader(ctx, "val")
x = torch.zeros(1, 3, *hw)
for v in variants:
    if v == "magnitude":
        m = copy.deepcopy(m0)
        pr, keep = bilevel.magnitude_prune_to_macs(m, target, hw); pr.eval()
        a = evaluate(pr, val, progress=False)["miou"]
        finetune(ctx, pr, 30, progress=False); pr.eval(); b = evaluate(pr, val, progress=False)["miou"]
        finetune(ctx, pr, 120, progress=False); pr.eval(); c = evaluate(pr, val, progress=False)["miou"]
        print(json.dumps({"kw": "magnitude", "noft": a, "ft30": b, "ft150": c}), flush=True)
        continue
    kw = json.loads(v)
    steps = kw.pop("steps", ctx.profile.search_steps)
    ft = kw.pop("ft", 30)
    torch.manual_seed(0)
    m = copy.deepcopy(m0)
    t0 = time.time()
    res = bilevel.bilevel_search(m, tr, target, input_hw=hw, steps=steps, seed=0, project=False, **kw)
    keep = res.masks
    dead = [k for k, v in keep.items() if not bool(torch.as_tensor(v).any())]
    if dead:
        mi = mi_ft = float("nan")
    else:
        pr = bilevel.apply_masks(m, keep, x); pr.eval()
        mi = evaluate(pr, val, progress=False)["miou"]
        finetune(ctx, pr, ft, progress=False); pr.eval()
        mi_ft = evaluate(pr, val, progress=False)["miou"]
    w = res.widths
    print(json.dumps({"kw": v, "secs": round(time.time()-t0,1), "gmacs_raw": res.gmacs_raw, "target": target,
                      "raw_err": res.gmacs_raw/target-1, "dead_groups": dead[:4], "n_dead": len(dead), "val_miou_masked_noft": mi, "val_ft30": mi_ft,
                      "min_kept_frac": min(d["kept_frac"] for d in w),
                      "narrow": sorted([(round(d["kept_frac"],2), d["kept"], d["channels"], d["group"][:40]) for d in w])[:5]}), flush=True)
