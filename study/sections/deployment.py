"""Section ``deployment`` (notebook ``07_deployment``): what the final models cost on the target device.

The baseline student, THE KD student (:func:`study.sections.distillation.kd_student`), a
structurally pruned KD student and its fp16 / INT8 conversions are exported to ONNX
(:mod:`study.quant`) and measured with the study's one latency protocol
(:func:`study.bench.compare_latency`: fresh runner processes, interleaved rounds) over SSH
or as local subprocesses (:func:`study.bench.choose_target`); accuracy comes from the same
ONNX files on the test split (:func:`study.quant.onnx_scores`)::

    from study import bench, quant
    from study.sections import deployment as sec
    target = bench.choose_target(ctx.bench_host)
    vs = sec.variants(ctx, baseline, kd_model, sec.pruned_student(ctx, kd_model))
    lat = sec.measure(ctx, target, vs, sec.results_dir(ctx))
    images, masks = sec.test_arrays(ctx)
    row = sec.measured_row(ctx, vs[0], lat.loc[sec.variant_name(vs[0])],
                           quant.onnx_scores(vs[0]["path"], images, masks), target)

Stored device results (:func:`study.bench.load_device_results`) and the numbers reported by
source 000 (:data:`SOURCE000_NANO`) get their own clearly labelled rows.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch.nn as nn

from .. import bench, prune, quant
from ..cache import make_key
from ..models import model_complexity, model_fingerprint
from ..train import seed_everything
from .common import build, cached, eval_loader, finetune
from .measure import cached_latency, onnx_simplify, protocol
from .quantization import calibration_images
from .rows import table_row

SECTION = "deployment"
#: The student that is deployed (source 000's UPerNet + MobileViT-S).
MODEL = "upernet_mobilevit_s"
#: Fraction of the channels of every group that the deployed pruned student loses.
PRUNE_FRACTION_REMOVED = 0.45

#: Jetson Nano numbers published by source 000 (UPerNet + MobileViT student); for the
#: clearly labelled "reported by source 000" rows only, never mixed with measurements.
SOURCE000_NANO = {
    "device": "Jetson Nano 4GB (reported by source 000)",
    "model": "upernet_mobilevit_s", "params_m": 5.6, "miou_kd": 0.6056, "miou_no_kd": 0.5365,
    "fps_fp32": 3.11, "fps_fp16": 4.49, "ram_used_mb": 3742.0, "swap_used_mb": 1030.0,
    "source": "reported by source 000 (Jetson Nano 4GB)",
}


def input_hw(ctx) -> tuple[int, int]:
    """Deployment resolution ``(H, W)`` px = the validation resolution (``image_size``)."""
    return ctx.profile.image_size, ctx.profile.image_size


def results_dir(ctx) -> Path:
    """Where SSH measurements are stored: ``results/devices`` for a named ``bench_host``
    (kept with the repository), else ``<out_dir>/devices`` (this build only)."""
    return bench.DEFAULT_RESULTS_DIR if ctx.bench_host else ctx.out_dir / "devices"


# --------------------------------------------------------------------------- the models

def pruned_student(ctx, student: nn.Module, fraction_removed: float = PRUNE_FRACTION_REMOVED) -> nn.Module:
    """``student`` with ``fraction_removed`` of the channels of every group physically removed
    (:func:`study.prune.prune_structured`, L1 magnitude, DepGraph) and ``finetune_steps``
    recovery steps (:func:`study.sections.common.finetune`, global RNG seeded with
    ``ctx.seed`` first); cached by the student's :func:`study.models.model_fingerprint`.

    Returns:
        the pruned model in eval mode (on the CPU; ``student`` is not modified).
    """
    hw = input_hw(ctx)
    steps = ctx.profile.finetune_steps

    def compute():
        # the fine-tune draws from the global RNG: seed it, or the result depends on what ran before
        seed_everything(ctx.seed)
        m = copy.deepcopy(student).cpu()
        prune.prune_structured(m, hw, fraction_removed)
        finetune(ctx, m.to(ctx.device), steps, progress=False)
        return prune.pruned_payload(m.cpu())

    payload = cached(ctx, "deploy-pruned", {"student": model_fingerprint(student), "fraction_removed":
                                            fraction_removed, "steps": steps, "input_hw": list(hw)},
                     compute, modules=[__name__])
    return prune.rebuild_pruned(lambda: build(MODEL, ctx.profile), payload).eval()


def test_arrays(ctx) -> tuple[np.ndarray, np.ndarray]:
    """The test split as arrays, in file order: images float32 ``(N, 3, S, S)`` and masks
    int64 ``(N, S, S)`` (for :func:`study.quant.onnx_scores`; the numbers the table reports)."""
    images, masks = zip(*((x.numpy(), y.numpy()) for x, y in eval_loader(ctx, "test")))
    return np.concatenate(images), np.concatenate(masks)


def _onnx_path(ctx, module: nn.Module, method: str, precision: str) -> Path:
    """``<out_dir>/deployment_onnx/<method>_<precision>_<key>.onnx``; the key covers the weights
    (:func:`study.models.model_fingerprint`), the size, the profile, the data and the code."""
    hw = input_hw(ctx)
    key = make_key({"weights": model_fingerprint(module), "method": method, "precision": precision,
                    "input_hw": list(hw), "profile": ctx.profile.to_dict()},
                   data_fp=ctx.data_fp, modules=[__name__])
    return ctx.out_dir / "deployment_onnx" / f"{method}_{precision}_{hw[0]}_{key}.onnx"


def variants(ctx, baseline: nn.Module, kd: nn.Module, pruned: nn.Module,
             train_steps: dict | None = None) -> list[dict]:
    """Export the deployed variants to ONNX (reusing files whose key matches).

    The variants: baseline fp32, KD fp32, KD + pruned fp32, KD fp16 (:func:`study.quant.convert_fp16`,
    float32 I/O) and KD static INT8 QDQ (:func:`study.quant.quantize_int8` on
    :func:`calibration_images`, THE calibration set of the study, shared with section 05).
    ``train_steps``: method (``"baseline"``, ``"kd"``) -> the weight updates behind that
    model; the pruned variant adds its recovery fine-tune (``finetune_steps``).

    Returns:
        one dict per variant: ``model``, ``method``, ``precision``, ``path`` (ONNX file),
        ``train_steps`` (NaN when not given) and ``complexity`` (:func:`study.models.model_complexity` of the torch module; fp16 / INT8
        share their fp32 module's).
    """
    hw = input_hw(ctx)
    pruned_method = f"kd+pruned{int(round(PRUNE_FRACTION_REMOVED * 100))}"
    out, cx = [], {}

    def add(module, method, precision, make: Callable[[Path], Path]):
        path = _onnx_path(ctx, module, method, precision)
        if not path.exists():
            make(path)
        if id(module) not in cx:
            cx[id(module)] = {k: v for k, v in model_complexity(module, hw).items() if isinstance(v, (int, float, str))}
        base = method.split("+")[0]
        steps = float((train_steps or {}).get(base, np.nan)) + (ctx.profile.finetune_steps if "+" in method else 0)
        out.append({"model": MODEL, "method": method, "precision": precision, "path": path,
                    "train_steps": steps, "complexity": cx[id(module)]})
        return path

    add(baseline, "baseline", "fp32", lambda p: quant.export_onnx(baseline, p, hw, simplify=onnx_simplify(ctx)))
    kd_fp32 = add(kd, "kd", "fp32", lambda p: quant.export_onnx(kd, p, hw, simplify=onnx_simplify(ctx)))
    add(pruned, pruned_method, "fp32", lambda p: quant.export_onnx(pruned, p, hw, simplify=onnx_simplify(ctx)))
    add(kd, "kd", "fp16", lambda p: quant.convert_fp16(kd_fp32, p))
    add(kd, "kd", "int8", lambda p: quant.quantize_int8(kd_fp32, p, calib_images=calibration_images(ctx)))
    return out


# --------------------------------------------------------------------------- table rows

def variant_name(variant: dict) -> str:
    """``"<method> <precision>"``: the variant's name in :func:`measure`'s table."""
    return f"{variant['method']} {variant['precision']}"


def measure(ctx, target: dict, variants_: Sequence[dict], results_dir: Path | None = None) -> pd.DataFrame:
    """Latency and memory of every variant on ``target`` with THE protocol of the study.

    :func:`study.bench.compare_latency` (ORT, the settings of
    :func:`study.sections.measure.protocol`): one fresh runner process per (round, variant),
    the variants interleaved in rotated rounds, the same seeded input. On an SSH target each
    of those processes runs on the device (threads: the device's own physical cores) and
    every round's result is stored under ``results_dir``; locally, threads = this machine's
    physical cores. Answered from the cache when the same files were timed the same way on
    this machine (:func:`study.sections.measure.cached_latency`; ``--retime`` re-measures). Variants whose measurement fails keep a row with NaN latencies and the
    reason in ``error``.

    Returns:
        the :func:`study.bench.compare_latency` table indexed by :func:`variant_name`
        (ms, MB, W; ``rounds``, ``threads``, ``cv_p50``, 95 % interval of p50).
    """
    kw = protocol(ctx)
    if target["mode"] == "ssh":
        kw["threads"] = None  # the device's own cores, never this host's count
    items = {variant_name(v): v["path"] for v in variants_}
    df = cached_latency(ctx, items, None, runtime="ort", target=target,
                        results_dir=results_dir if target["mode"] == "ssh" else None, errors="record", **kw)
    return df.set_index("name", drop=False)


def measured_row(ctx, variant: dict, result, scores: dict, target: dict) -> dict:
    """Table row of one variant measured now.

    Args:
        variant: from :func:`variants`. result: its row of :func:`measure` (ms, MB, W).
        scores: ``miou``/``mdice`` of the same ONNX file on the test split (:func:`study.quant.onnx_scores`
            of :func:`test_arrays`).
        target: from :func:`study.bench.choose_target`.
    """
    device = target["device"] if target["mode"] == "local" else f"{result['device']} via SSH to {target['host']}"
    where = "stored under deployment/results" if target["mode"] == "ssh" else "local runner, not stored"
    return table_row(
        ctx, SECTION, variant["model"], variant["method"], scores, complexity=variant["complexity"],
        input_hw=input_hw(ctx), split="test", train_steps=variant.get("train_steps", np.nan),
        device=device, runtime=f"onnxruntime {result['runtime_version']}", precision=variant["precision"],
        fps=result["fps"], latency_ms_p50=result["latency_ms_p50"],
        latency_ms_p50_ci95_low=result["latency_ms_p50_ci95_low"],
        latency_ms_p50_ci95_high=result["latency_ms_p50_ci95_high"], latency_ms_p99=result["latency_ms_p99"],
        cv_p50=result["cv_p50"], peak_rss_mb=result["peak_rss_mb"], ram_used_mb=result["ram_used_mb"],
        swap_used_mb=result["swap_used_mb"], power_w=result["power_w_mean"],
        source=f"measured now ({where}; study.bench.compare_latency)",
        runs=result["runs"], memory_source=result["memory_source"],
        threads=result["threads"], rounds=result["rounds"], error=result["error"],
        timing=result.get("timing", "measured"))


def _labelled_row(ctx, model: str, method: str, scores: dict, hw_label: str, complexity: dict, **extra) -> dict:
    """:func:`table_row` whose ``input_hw`` is a label given as text (e.g. ``"not stated"``)."""
    row = table_row(ctx, SECTION, model, method, scores, complexity=complexity, **extra)
    row["input_hw"] = hw_label
    return row


def stored_rows(ctx, stored: pd.DataFrame) -> list[dict]:
    """Rows of device results read back from files (:func:`study.bench.load_device_results`);
    accuracy and complexity are not part of a device result (NaN)."""
    rows = []
    for _, r in stored.iterrows():
        rows.append(_labelled_row(
            ctx, r["model_file"], "stored device result", {}, r["input_hw"], {}, device=r["device"],
            runtime=f"{r['runtime']} {r['runtime_version']}", precision=r["precision"], fps=r["fps"],
            latency_ms_p50=r["latency_ms_p50"], latency_ms_p99=r["latency_ms_p99"], peak_rss_mb=r["peak_rss_mb"],
            ram_used_mb=r["ram_used_mb"], swap_used_mb=r["swap_used_mb"],
            power_w=r["power_w"] if r["power_w"] is not None else np.nan, source=r["source"]))
    return rows


def reported_rows(ctx) -> list[dict]:
    """Source 000's published Jetson Nano numbers (fp32 and fp16), labelled as reported."""
    s = SOURCE000_NANO
    return [_labelled_row(ctx, s["model"], "kd (reported by source 000)", {"miou": s["miou_kd"]}, "not stated",
                          {"params_m": s["params_m"]}, device=s["device"], runtime="PyTorch (reported)",
                          precision=prec, fps=fps, latency_ms_p50=np.nan, latency_ms_p99=np.nan,
                          peak_rss_mb=np.nan, ram_used_mb=s["ram_used_mb"], swap_used_mb=s["swap_used_mb"],
                          power_w=np.nan, source=s["source"])
            for prec, fps in (("fp32", s["fps_fp32"]), ("fp16", s["fps_fp16"]))]


def table(measured: Sequence[dict], stored: Sequence[dict], reported: Sequence[dict]) -> pd.DataFrame:
    """The section table: measured rows, then stored device results, then reported numbers."""
    frames = [pd.DataFrame(rows) for rows in (measured, stored, reported) if len(rows)]
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- verdict

def verdict(measured: pd.DataFrame, kd_record: dict) -> list[str]:
    """Markdown bullet lines summarising ``measured`` (no number typed in by hand).

    Per variant: p50 (ms, with its 95 % interval over rounds) / p99 latency, FPS, peak RSS
    (MB), mIoU; fp16 and INT8 against KD fp32 (FPS ratio, :func:`study.bench.latency_verdict`
    of the p50 intervals, mIoU difference); the pruned student against KD fp32; source 000's
    fp16 / fp32 ratio; where the KD configuration came from (``kd_record``, from
    :func:`study.sections.distillation.kd_student`).
    """
    s = SOURCE000_NANO
    lines = []
    for (meth, prec), r in measured.set_index(["method", "precision"]).iterrows():
        lines.append(f"- **{meth} / {prec}**: p50 {r.latency_ms_p50:.2f} ms "
                     f"[{r.latency_ms_p50_ci95_low:.2f}, {r.latency_ms_p50_ci95_high:.2f}] ({r.rounds:.0f} rounds, "
                     f"{r.threads:.0f} threads), p99 {r.latency_ms_p99:.2f} ms, "
                     f"{r.fps:.1f} FPS, peak RSS {r.peak_rss_mb:.0f} MB, mIoU {r.miou:.3f}")
    ref = measured[(measured.precision == "fp32") & (measured.method == "kd")].iloc[-1]

    def against(r):  # FPS ratio, the interval verdict of the latency, the mIoU change
        return (f"{r.fps / ref.fps:.2f}x FPS ({bench.latency_verdict(r, ref)}: 95 % intervals of p50), "
                f"mIoU {r.miou - ref.miou:+.3f}")

    for prec in ("fp16", "int8"):
        r = measured[measured.precision == prec].iloc[0]
        lines.append(f"- {prec} vs fp32 ({ref.method}): {against(r)}")
    r = measured[measured.method.str.contains("pruned")].iloc[0]
    lines.append(f"- structured pruning ({r.method}): params {r.params_m:.2f}M vs {ref.params_m:.2f}M, {against(r)}")
    lines.append(f"- reported by source 000 (Jetson Nano 4GB): fp16 / fp32 = {s['fps_fp16'] / s['fps_fp32']:.2f}x FPS "
                 f"({s['fps_fp32']} -> {s['fps_fp16']} FPS), {s['ram_used_mb']:.0f} MB RAM + "
                 f"{s['swap_used_mb']:.0f} MB swap")
    src = kd_record.get("kd_choice_source")
    lines.append(f"- the KD student is {kd_record['kd']['method']} (T={kd_record['kd']['temperature']}, weight "
                 f"{kd_record['kd']['kd_weight']}), chosen by "
                 + ("notebook 01" if src == "notebook 01" else
                    "the fallback rule because notebook 01 has not run for this build folder"))
    return lines


__all__ = ["SECTION", "MODEL", "PRUNE_FRACTION_REMOVED", "SOURCE000_NANO", "input_hw",
           "results_dir", "pruned_student", "calibration_images", "test_arrays", "variants", "variant_name",
           "measure", "measured_row", "stored_rows", "reported_rows", "table", "verdict"]
