"""Measure the models of one table the study's way: size, MACs, and latency by THE protocol.

Shared by the sections whose tables have latency columns (00 baselines, 02 structured
pruning, 03 head pruning, 06 bi-level search; other sections may use it too). A table's
models are collected first and measured together at the end, so that they are timed
interleaved in rounds, each in a fresh process (:func:`study.bench.compare_latency`)::

    plan = LatencyPlan(ctx, (96, 96), out_dir)           # runtimes ("ort", "torch")
    plan.add("dense", student)                           # exports ONNX, saves the torch file,
    plan.add("pruned-0.45", pruned, base="dense")        # counts params / MACs now
    meas = plan.measure()                                # ONE compare_latency call per runtime
    meas["pruned-0.45"]["latency_ms_p50_ort"], meas["pruned-0.45"]["threads"]
    row.update(meas["pruned-0.45"]["columns"])           # the table's latency columns, verdict vs "dense"

Section modules whose cached results must not depend on this module's code (their cache
keys cover their import closure) take ``meas[tag]["columns"]`` from the notebook instead
of importing it.

Counting is :func:`study.models.model_complexity`; ONNX export :func:`study.quant.export_onnx`;
torch files :func:`study.bench.save_torch_model`; the protocol settings of a profile
:func:`protocol`.

Cached like trained models (issue #13): an ONNX export is kept under
``<cache>/onnx/<weights fingerprint>-<H>x<W>.onnx`` and copied, not re-exported; a
:meth:`LatencyPlan.measure` of the same models (by weights fingerprint), shapes, runtimes,
protocol settings, machine and benchmark code is answered from the cache unless the run
asks for ``--retime`` (``ctx.retime``). The table then says ``timing = "cached"``.
Sections that time model files directly (05 quantization, 07 deployment, 08 pipeline) use
:func:`cached_latency`, the same rule keyed by the files' bytes.
"""
from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import torch.nn as nn

from .. import bench
from ..cache import make_key
from ..models import model_complexity, model_fingerprint
from ..quant import export_onnx

RUNTIMES = ("ort", "torch")
NAN = float("nan")
#: :func:`study.bench.compare_latency` column -> the per-runtime column of a measurement (``{rt}``).
COLUMNS = {"latency_ms_p50": "latency_ms_p50_{rt}", "latency_ms_p50_ci95_low": "latency_ms_p50_{rt}_ci95_low",
           "latency_ms_p50_ci95_high": "latency_ms_p50_{rt}_ci95_high", "latency_ms_p90": "latency_ms_p90_{rt}",
           "latency_ms_p99": "latency_ms_p99_{rt}", "fps": "fps_{rt}", "cv_p50": "cv_p50_{rt}",
           "peak_rss_mb": "peak_rss_mb_{rt}", "load_s": "load_s_{rt}", "gmacs_per_s": "gmacs_per_s_{rt}",
           "pct_of_peak": "pct_of_peak_{rt}"}


def dry_run_protocol(profile) -> dict | None:
    """The benchmark settings of a dry run (``profile.dry_run``; issue #17: "3 runs per
    benchmark"), or None for a real profile: ``bench_min_runs`` (3) interleaved rounds, each a
    fresh process with one timed run and ``bench_warmup_runs`` (0) warm-up runs, no timed
    minimum (s). Keyword arguments of :func:`study.bench.compare_latency`; shared by
    :func:`protocol` and :func:`study.sections.pipeline.protocol_settings`."""
    if not getattr(profile, "dry_run", False):
        return None
    return {"rounds": max(2, int(profile.bench_min_runs)), "warmup_s": 0.0, "min_s": 0.0, "min_runs": 1,
            "warmup_runs": int(profile.bench_warmup_runs)}


def protocol(ctx) -> dict:
    """The protocol settings of the context's profile (keyword arguments of :func:`study.bench.compare_latency`).

    ``threads``: :func:`study.bench.default_threads` (physical cores: one policy for the whole
    study); ``rounds``: the profile's ``extra["latency_rounds"]`` (default 5; ``smoke`` sets
    2, the fewest that give an interval); per round ``warmup_s`` = half the profile's
    ``bench_warmup_s``, ``min_s`` = a third of ``bench_min_s`` (so each model gets
    ``rounds * min_s`` ~ 5 s of timed runs in ``cpu``), ``min_runs`` = ``bench_min_runs // 5``
    (at least 3), ``warmup_runs`` = 3.

    A dry run (``--fast-dev-run``, issue #17: "3 runs per benchmark") keeps the protocol -
    fresh processes, interleaved rounds, an interval over rounds - at its smallest:
    ``bench_min_runs`` (3) rounds of one timed run each and no warm-up, so every benchmark
    is 3 timed runs (it was 5 rounds x (3 warm-up + 3 timed) before).
    """
    p = ctx.profile
    dry = dry_run_protocol(p)
    if dry:
        return {"threads": bench.default_threads(), **dry}
    return {"threads": bench.default_threads(), "rounds": int(p.extra.get("latency_rounds", 5)),
            "warmup_s": p.bench_warmup_s / 2, "min_s": p.bench_min_s / 3,
            "min_runs": max(3, p.bench_min_runs // 5), "warmup_runs": 3}


class LatencyPlan:
    """The models of one table, exported when added and measured together by :meth:`measure`.

    Args:
        ctx: the notebook's context (protocol settings: :func:`protocol`).
        input_hw: ``(H, W)`` px of every model (ONNX files are exported at it, static shape).
        out_dir: folder of the files: ``<tag>.onnx`` (ORT) and ``<tag>.pt`` (torch).
        runtimes: which of ``"ort"`` and ``"torch"`` to time.
    """

    def __init__(self, ctx, input_hw: Sequence[int], out_dir: str | Path, runtimes: Iterable[str] = RUNTIMES):
        self.ctx = ctx
        self.hw = tuple(int(v) for v in input_hw)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.runtimes = tuple(runtimes)
        unknown = set(self.runtimes) - set(RUNTIMES)
        if unknown or not self.runtimes:
            raise ValueError(f"LatencyPlan: runtimes must be a non-empty subset of {RUNTIMES}, got {self.runtimes}")
        self.entries: dict = {}
        self.tables: dict = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, tag) -> bool:
        return tag in self.entries

    def add(self, tag: str, model: nn.Module, base: str | None = None) -> dict:
        """Count ``model``'s params / MACs and write its files now; the timing waits for :meth:`measure`.

        Args:
            tag: unique name (also the file stem).
            model: float32 ``(1, 3, H, W) -> logits`` model; not modified (it may be freed
                afterwards: the files are what gets timed).
            base: tag (added before) of the model this one is compared with (the dense
                model): its ``columns`` get ``verdict_vs_dense_<rt>``.

        Returns:
            dict ``params_m, gmacs, gmacs_tp`` (:func:`study.models.model_complexity`) and
            ``ort_error`` / ``torch_error`` ("" when the file was written, else why not: an
            export failure is reported in the table, not raised).

        Raises:
            ValueError: ``tag`` already added, or ``base`` not added.
        """
        if tag in self.entries:
            raise ValueError(f"LatencyPlan.add: tag {tag!r} added twice")
        if base is not None and base not in self.entries:
            raise ValueError(f"LatencyPlan.add: base {base!r} of {tag!r} has not been added")
        c = model_complexity(model, self.hw)
        fp = model_fingerprint(model)
        e = {"params_m": c["params_m"], "gmacs": c["gmacs"], "gmacs_tp": c["gmacs_tp"], "files": {},
             "ort_error": "", "torch_error": "", "base": base, "fingerprint": fp}
        for rt in self.runtimes:
            try:
                if rt == "ort":
                    e["files"][rt] = self._onnx(model, fp, self.out_dir / f"{tag}.onnx")
                else:
                    e["files"][rt] = bench.save_torch_model(model, self.out_dir / f"{tag}.pt")
            except Exception as exc:  # noqa: BLE001 - reported in the table's <runtime>_error column
                e[f"{rt}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        self.entries[tag] = e
        return {k: v for k, v in e.items() if k not in ("files", "base")}

    def _onnx(self, model: nn.Module, fp: str, dest: Path) -> Path:
        """Export ``model`` once per weights fingerprint and shape (kept in the cache), copy it to ``dest``."""
        return export_model(self.ctx, model, dest, self.hw, fp=fp, name=f"{fp}-{self.hw[0]}x{self.hw[1]}")

    def file(self, tag: str, runtime: str = "ort") -> Path | None:
        """The file written for ``tag`` and ``runtime`` (None when it could not be written)."""
        return self.entries[tag]["files"].get(runtime)

    def measure(self, bench_latency: bool = True, verbose: bool = False) -> dict:
        """Time every added model: ONE :func:`study.bench.compare_latency` call per runtime.

        Args:
            bench_latency: False skips the timing (latency columns NaN, ``rounds`` 0).
            verbose: print one line per round.

        Returns:
            ``{tag: meas}`` with ``params_m, gmacs, gmacs_tp``, ``threads``, ``rounds`` and per
            runtime ``rt`` in ``("ort", "torch")``: ``latency_ms_p50_<rt>``,
            ``latency_ms_p50_<rt>_ci95_low/high``, ``latency_ms_p90_<rt>``,
            ``latency_ms_p99_<rt>`` (ms), ``fps_<rt>``, ``cv_p50_<rt>``, ``peak_rss_mb_<rt>``
            (MB, the measuring process alone), ``load_s_<rt>`` (s), ``gmacs_per_s_<rt>``,
            ``pct_of_peak_<rt>`` (% of :func:`study.bench.gemm_peak_gmacs_per_s`) and
            ``<rt>_error`` (""). A runtime not in the plan gives NaN columns. ``columns``:
            the ordered latency columns of a table row (:func:`latency_columns` of the plan's
            runtimes, with ``verdict_vs_dense_<rt>`` against the ``base`` given to
            :meth:`add`, ``"reference"`` for a model without base, when any model has a base). The protocol tables are
            kept in ``self.tables[rt]`` (their ``attrs["protocol"]`` holds the settings and
            the orders run).
        """
        settings = protocol(self.ctx)
        out = {}
        for tag, e in self.entries.items():
            m = {"params_m": e["params_m"], "gmacs": e["gmacs"], "gmacs_tp": e["gmacs_tp"],
                 "threads": settings["threads"], "rounds": settings["rounds"] if bench_latency else 0}
            for rt in RUNTIMES:
                m.update({c.format(rt=rt): NAN for c in COLUMNS.values()})
                m[f"{rt}_error"] = e[f"{rt}_error"] or ("" if rt in self.runtimes else "not measured")
            out[tag] = m
        if bench_latency:
            self._timed(out, settings, verbose)
        compared = any(e["base"] is not None for e in self.entries.values())
        for tag, m in out.items():
            base = self.entries[tag]["base"]
            m["columns"] = latency_columns(m, out[base] if base is not None else None, self.runtimes,
                                           verdict=compared)
        return out

    def _timed(self, out: dict, settings: dict, verbose: bool) -> None:
        """:meth:`_time`, answered from the cache when the same models were timed the same way here."""
        cache = getattr(self.ctx, "cache", None)
        if cache is None:
            self._time(out, settings, verbose)
            return
        cfg = {"entries": [[t, e["fingerprint"], e["base"], sorted(e["files"])] for t, e in self.entries.items()],
               "hw": list(self.hw), "runtimes": list(self.runtimes), "settings": settings,
               "machine": _machine()}
        key = make_key(cfg, modules=["study.bench"])
        hit = None if getattr(self.ctx, "retime", False) else cache.get("latency", key)
        if hit is not None:
            for tag, m in hit["out"].items():
                out[tag].update(m)
                out[tag]["timing"] = "cached"
            import pandas as pd

            for rt, recs in hit["tables"].items():
                self.tables[rt] = pd.DataFrame(recs)
                self.tables[rt].attrs = dict(hit.get("attrs", {}).get(rt, {}))
            return
        self._time(out, settings, verbose)
        for m in out.values():
            m["timing"] = "measured"
        cache.put("latency", key, {"out": _native({t: {k: v for k, v in m.items() if k != "timing"}
                                                    for t, m in out.items()}),
                                   "tables": {rt: _native(df.to_dict("records")) for rt, df in self.tables.items()},
                                   "attrs": {rt: _native(df.attrs) for rt, df in self.tables.items()}})

    def _time(self, out: dict, settings: dict, verbose: bool) -> None:
        for rt in self.runtimes:
            items = {t: e["files"][rt] for t, e in self.entries.items() if rt in e["files"]}
            if not items:
                continue
            df = bench.compare_latency(items, self.hw, runtime=rt, gmacs={t: self.entries[t]["gmacs"] for t in items},
                                       errors="record", verbose=verbose, **settings)
            self.tables[rt] = df
            for r in df.to_dict("records"):
                m = out[r["name"]]
                m.update({c.format(rt=rt): r[k] for k, c in COLUMNS.items()})
                m.update(threads=int(r["threads"]), rounds=int(r["rounds"]))
                if r["error"]:
                    m[f"{rt}_error"] = r["error"]
        return out


def cached_latency(ctx, items, input_hw: Sequence[int] | None, **kw):
    """:func:`study.bench.compare_latency` of model files, answered from the cache when the same
    files were timed the same way on this machine (issue #13: warm runs do not re-time).

    The key covers every file's bytes (:func:`file_digest`), ``input_hw``, the keyword
    arguments (threads, rounds, warm-up, target ...), this machine and the benchmark code
    (:mod:`study.bench` and what it imports); ``--retime`` (``ctx.retime``) re-measures. With no
    cache on ``ctx`` it just measures.

    Args:
        ctx: the notebook's context. items: ``{name: model file}``. input_hw: ``(H, W)`` px or
            None (each ONNX model's static shape). kw: :func:`study.bench.compare_latency`'s.

    Returns:
        the :func:`study.bench.compare_latency` DataFrame (with its ``attrs["protocol"]``) plus
        a ``timing`` column: ``"measured"`` now or ``"cached"``.

    Raises:
        what :func:`study.bench.compare_latency` raises (a missing file: FileNotFoundError).
    """
    import pandas as pd

    items = {str(k): Path(v) for k, v in dict(items).items()}
    for name, path in items.items():
        if not path.is_file():
            raise FileNotFoundError(f"cached_latency: model file of {name!r} does not exist: {path}")
    cache = getattr(ctx, "cache", None)
    cfg = {"files": {k: file_digest(v) for k, v in items.items()}, "hw": list(input_hw) if input_hw else None,
           "kw": _native({k: v for k, v in kw.items() if k != "verbose"}),
           "machine": _machine()}
    key = make_key(cfg, modules=["study.bench"])
    hit = None if cache is None or getattr(ctx, "retime", False) else cache.get("latency-files", key)
    if hit is not None:
        df = pd.DataFrame(hit["records"])
        df.attrs = dict(hit["attrs"])
        df["timing"] = "cached"
        return df
    df = bench.compare_latency(items, input_hw, **kw)
    if cache is not None:
        cache.put("latency-files", key, {"records": _native(df.to_dict("records")), "attrs": _native(df.attrs)})
    df["timing"] = "measured"
    return df


def file_digest(path: str | Path) -> str:
    """SHA-256 (16 hex chars) of a file's bytes (e.g. an fp32 ONNX model a quantized one is made from)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def onnx_simplify(ctx) -> bool:
    """Whether the profile's ONNX exports run onnxslim (``extra["onnx_simplify"]``, default True).

    ``smoke`` turns it off: onnxslim is most of an export's time at 64 px
    (``benchmarks/bench_onnx_export.py``, recorded in ``benchmarks/results/``), and the smoke
    build of the test suite exports dozens of models. Its graphs are then unsimplified (ORT
    still optimises them when it loads them); the simplifying export is tested on its own
    (``tests/test_quant.py``). Real profiles keep it. Without a profile (``ctx`` None): True.
    """
    extra = getattr(getattr(ctx, "profile", None), "extra", None) or {}
    return bool(extra.get("onnx_simplify", True))


def export_model(ctx, model: nn.Module, dest: str | Path, hw: Sequence[int], fp: str | None = None,
                 name: str | None = None) -> Path:
    """:func:`study.quant.export_onnx` of ``model`` at ``hw`` (px) with the profile's
    :func:`onnx_simplify`, made once per weights fingerprint (``fp``, default
    :func:`study.models.model_fingerprint`) and shape and kept in the cache (:func:`cached_file`).

    Returns:
        ``Path(dest)``, a float32 ONNX file with input ``image`` ``(1, 3, H, W)``.

    Raises:
        as :func:`study.quant.export_onnx` (a model that does not export).
    """
    simplify = onnx_simplify(ctx)
    key = {"onnx": fp or model_fingerprint(model), "hw": list(hw), **({} if simplify else {"simplify": False})}
    return cached_file(ctx, dest, key, lambda p: export_onnx(model, p, tuple(hw), simplify=simplify), name=name)


def cached_file(ctx, dest: str | Path, key: dict, make, name: str | None = None,
                modules: Sequence[str] = ("study.quant",)) -> Path:
    """A derived file (ONNX export, INT8 / fp16 model) made once and kept in the cache.

    The file lives under ``<cache>/files/<name or key hash><suffix>``; ``make(path)`` writes
    it there the first time (to a temp name, renamed into place: an interrupted run leaves
    no partial file); every call copies it to ``dest``. The key hashes ``key`` (which must
    name every input, e.g. the fp32 file's :func:`file_digest`, the recipe, the calibration
    images' digest) and the source of ``modules`` (the code that makes the file). Without a
    cache on ``ctx`` (tests), ``make(dest)`` is called directly.

    Returns:
        ``Path(dest)``.
    """
    dest = Path(dest)
    cache = getattr(ctx, "cache", None)
    if cache is None or getattr(cache, "root", None) is None:
        return Path(make(dest))
    k = make_key(key, modules=list(modules))
    kept = Path(cache.root) / "files" / f"{name or k}-{k[:8]}{dest.suffix}"
    if not kept.exists() or getattr(cache, "fresh", False):
        kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = kept.with_name(f".{kept.stem}.{os.getpid()}.tmp{dest.suffix}")
        try:
            made = Path(make(tmp))
            os.replace(made, kept)
        finally:
            tmp.unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.copyfile(kept, tmp)
    os.replace(tmp, dest)
    return dest


def _machine() -> list:
    """What identifies this machine in a latency cache key: host name, processor, CPU count."""
    return [platform.node(), platform.processor(), os.cpu_count()]


def _native(obj):
    """``obj`` with numpy scalars turned into Python ones (what a ``weights_only`` load accepts)."""
    if isinstance(obj, dict):
        return {str(k): _native(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_native(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return obj.item()
        except (TypeError, ValueError):
            return str(obj)
    return obj if obj is None or isinstance(obj, (str, int, float, bool)) else str(obj)


def interval(meas: dict, runtime: str) -> dict:
    """``meas``'s 95 % interval of ``runtime`` in the keys :func:`study.bench.latency_verdict` reads."""
    return {"latency_ms_p50_ci95_low": meas[f"latency_ms_p50_{runtime}_ci95_low"],
            "latency_ms_p50_ci95_high": meas[f"latency_ms_p50_{runtime}_ci95_high"]}


def verdict_vs(meas: dict, base_meas: dict, runtime: str = "ort") -> str:
    """:func:`study.bench.latency_verdict` of ``meas`` against ``base_meas`` ("faster" = ``meas`` is faster)."""
    return bench.latency_verdict(interval(meas, runtime), interval(base_meas, runtime))


def latency_columns(meas: dict, base_meas: dict | None = None, runtimes: Iterable[str] = RUNTIMES,
                    verdict: bool = True) -> dict:
    """The latency columns of a table row from a :meth:`LatencyPlan.measure` entry.

    ``threads``, ``rounds``, ``timing`` (``"measured"`` in this run, ``"cached"`` from an
    earlier identical measurement, see :meth:`LatencyPlan.measure`), then per runtime ``rt``: ``latency_ms_p50_<rt>`` with its
    ``_ci95_low/_high``, ``latency_ms_p90_<rt>``, ``latency_ms_p99_<rt>``, ``fps_<rt>``,
    ``cv_p50_<rt>``, ``peak_rss_mb_<rt>``, ``load_s_<rt>``, ``gmacs_per_s_<rt>``,
    ``pct_of_peak_<rt>`` and, when ``verdict``, ``verdict_vs_dense_<rt>`` (:func:`verdict_vs`
    against ``base_meas``; ``"reference"`` without one).
    """
    row = {"threads": meas["threads"], "rounds": meas["rounds"], "timing": meas.get("timing", "")}
    for rt in runtimes:
        row.update({c.format(rt=rt): meas[c.format(rt=rt)] for c in COLUMNS.values()})
        if verdict:
            row[f"verdict_vs_dense_{rt}"] = verdict_vs(meas, base_meas, rt) if base_meas is not None else "reference"
    return row


def monotonic_in_macs(table, runtime: str = "ort", gmacs_col: str = "gmacs") -> dict:
    """Does latency fall with MACs across ``table``'s rows (e.g. the physically pruned models)?

    Rows are sorted by ``gmacs``; every pair (i, j) with fewer MACs in j is checked with
    :func:`study.bench.latency_verdict`: a pair where the model with fewer MACs is
    detectably SLOWER is a violation; a pair whose point estimates are inverted but whose
    intervals overlap is only a "noise inversion".

    Args:
        table: DataFrame with ``gmacs_col`` and ``latency_ms_p50_<runtime>`` plus its
            ``_ci95_low/_high`` columns.

    Returns:
        dict ``n`` (rows), ``pairs``, ``violations`` (list of ``(more-MACs row index,
        fewer-MACs row index)``), ``noise_inversions`` (count), ``spearman`` (rank
        correlation of MACs and p50; 1 = perfectly monotonic), ``monotonic`` (no
        violation).
    """
    import numpy as np

    col = f"latency_ms_p50_{runtime}"
    t = table[[gmacs_col, col, f"{col}_ci95_low", f"{col}_ci95_high"]].dropna(subset=[col])
    t = t.sort_values(gmacs_col, ascending=False)
    idx = list(t.index)
    violations, noise, pairs = [], 0, 0
    for a in range(len(idx)):
        for b in range(a + 1, len(idx)):
            big, small = t.loc[idx[a]], t.loc[idx[b]]
            if not small[gmacs_col] < big[gmacs_col]:
                continue
            pairs += 1
            v = bench.latency_verdict(interval(small, runtime), interval(big, runtime))
            if v == "slower":
                violations.append((idx[a], idx[b]))
            elif small[col] > big[col]:
                noise += 1
    rho = float("nan")
    if len(t) >= 3:
        rx, ry = t[gmacs_col].rank().to_numpy(), t[col].rank().to_numpy()
        rho = float(np.corrcoef(rx, ry)[0, 1])
    return {"n": len(t), "pairs": pairs, "violations": violations, "noise_inversions": noise,
            "spearman": rho, "monotonic": not violations}


def measure_model(ctx, model: nn.Module, input_hw: Sequence[int], onnx_path: str | Path | None = None,
                  bench: bool = True) -> dict:
    """Params, MACs and protocol latency of ONE model (a one-item :class:`LatencyPlan`).

    For a table of several models use a :class:`LatencyPlan` (interleaved rounds). ORT is
    timed when ``onnx_path`` is given (the ONNX file is written there, the torch file next
    to it), torch always. Returns the :meth:`LatencyPlan.measure` dict of the model.
    """
    out_dir = Path(onnx_path).parent if onnx_path is not None else ctx.out_dir / "latency"
    tag = Path(onnx_path).stem if onnx_path is not None else "model"
    plan = LatencyPlan(ctx, input_hw, out_dir, runtimes=RUNTIMES if onnx_path is not None else ("torch",))
    plan.add(tag, model)
    return plan.measure(bench_latency=bench)[tag]


__all__ = ["cached_file", "file_digest", "LatencyPlan", "protocol", "measure_model", "latency_columns", "verdict_vs", "interval", "RUNTIMES",
           "COLUMNS", "monotonic_in_macs"]
