"""Run the study: execute the notebooks with papermill, record ``run.json``, build ``report.html``.

``./run_all.sh`` calls ``python -m study.report run ...`` once the environment is set up.
Each notebook runs in its own kernel with the run's parameters; a failing notebook is
recorded (failing cell and error) and the next one still runs; the exit code is 1 if any
failed. Outputs go to ``<build>/<profile>/``: ``notebooks/*.ipynb`` (executed),
``tables/``, ``figures/``, ``run.json`` and ``report.html`` (all sections, code hidden by
default, a contents list and the run's provenance).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import re
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import latex2mathml.converter as l2m
import nbformat
import papermill as pm
from nbconvert import HTMLExporter

from . import NOTEBOOKS, SECTIONS
from .cache import atomic_write_text
from .data import DataError, validate_dataset
from .profiles import PROFILES, ProfileError, get_profile
from .sections.claims import claims_table

REPO_ROOT = Path(__file__).resolve().parent.parent
NB_DIR = REPO_ROOT / "notebooks"
PINNED = ("torch", "torchvision", "timm", "torch-pruning", "onnx", "onnxruntime", "onnxslim", "numpy",
          "pandas", "matplotlib", "seaborn", "scikit-image", "albumentations", "papermill", "nbconvert")


def _cache_note(rec: dict) -> str:
    """How much of a notebook's run was computed: ", everything read from the cache" when it
    wrote no cache entry, ", N cache entries computed" otherwise; "" without a count (older run.json)."""
    n = rec.get("cache_writes")
    if n is None:
        return ""
    return ", everything read from the cache" if n == 0 else f", {n} cache entr{'y' if n == 1 else 'ies'} computed"


def _dirty_note(run_rec: dict) -> str:
    """" (uncommitted changes: a, b, c and N more)" for a dirty run's commit line; "" when clean."""
    if not run_rec.get("git_dirty"):
        return ""
    paths = list(run_rec.get("git_dirty_paths") or [])
    if not paths:
        return " (uncommitted changes)"
    more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
    return f" (uncommitted changes: {', '.join(paths[:3])}{more})"


#: What a run executes: a change here makes its ``run.json`` "dirty". The run's own outputs
#: (``figures/``, written by a real profile's notebooks) and untracked set-up files (a
#: ``.venv`` link) are not code.
CODE_PATHS = ("study", "notebooks", "run_all.sh", "pyproject.toml", "environment.yml")


def provenance(repo: Path | None = None) -> dict:
    """Git commit, package versions, Python, CPU model and core count of this machine.

    Called by :func:`run` before the first notebook, so the commit is the code that ran
    (not whatever HEAD is when the run ends).

    Args:
        repo: the repository (default: this package's checkout).

    Returns:
        dict with ``git_commit`` ("" without git), ``git_dirty`` (True when a path of
        :data:`CODE_PATHS` is modified or untracked), ``git_dirty_paths`` (at most 20),
        ``python``, ``packages`` ({name: version or None}), ``cpu_model``, ``cpu_cores``,
        ``hostname``.
    """
    repo = Path(repo or REPO_ROOT)

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                                  timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pkgs = {}
    for name in PINNED:
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    dirty = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHS).splitlines()
             if ln.strip()]
    return {"git_commit": git("rev-parse", "HEAD").strip(), "git_dirty": bool(dirty), "git_dirty_paths": dirty[:20],
            "python": platform.python_version(), "packages": pkgs, "cpu_model": cpu,
            "cpu_cores": os.cpu_count(), "hostname": platform.node()}


#: Notebooks every later one starts from (trained baselines and teacher; THE KD choice): run
#: first and alone by :func:`run` whatever ``jobs`` is.
HEAD_NOTEBOOKS = ("00_baselines", "01_distillation")


def notebooks_for(sections: list[str] | None) -> list[str]:
    """Notebook stems to run for the given sections (all when None), in study order."""
    if not sections:
        return list(NOTEBOOKS)
    return [nb for nb, secs in NOTEBOOKS.items() if any(s in secs for s in sections)]


def _failure(exc) -> dict:
    cell = getattr(exc, "exec_count", None) or getattr(exc, "cell_index", None)
    return {"failed_cell": cell, "error": f"{getattr(exc, 'ename', type(exc).__name__)}: "
                                          f"{getattr(exc, 'evalue', str(exc))}"[:2000]}


def cache_writes(cache_root: Path, since: float, until: float) -> int:
    """Number of cache entries written between ``since`` and ``until`` (epoch s, file mtimes):
    how much of a notebook was computed rather than read from the cache.

    Counts the files under ``cache_root`` (result entries, cached ONNX files, generated
    data), skipping in-flight temporary files; 0 when the folder does not exist.
    """
    n = 0
    if not Path(cache_root).is_dir():
        return 0
    for f in Path(cache_root).rglob("*"):
        try:
            if f.is_file() and not f.name.startswith(".") and ".tmp" not in f.name and since <= f.stat().st_mtime <= until:
                n += 1
        except OSError:  # removed while we looked (another kernel's temporary file)
            continue
    return n


def run_notebook(stem: str, out_dir: Path, params: dict, kernel: str = "python3",
                 cache_root: Path | None = None) -> dict:
    """Execute ``notebooks/<stem>.ipynb`` into ``<out_dir>/notebooks/`` with ``params``.

    Args:
        cache_root: the run's cache folder; with it the record counts the entries written
            while the notebook ran (:func:`cache_writes`; with ``--jobs`` > 1 notebooks
            overlap, so the count includes the other kernels' writes).

    Returns:
        dict with ``name, sections, status ('ok'|'failed'), seconds, failed_cell, error, output``
        and, with ``cache_root``, ``cache_writes``.
    """
    dst = out_dir / "notebooks" / f"{stem}.ipynb"
    dst.parent.mkdir(parents=True, exist_ok=True)
    rec = {"name": stem, "sections": list(NOTEBOOKS[stem]), "status": "ok", "failed_cell": None,
           "error": None, "output": str(dst.relative_to(out_dir))}
    t0, wall0 = time.perf_counter(), time.time()
    try:
        pm.execute_notebook(str(NB_DIR / f"{stem}.ipynb"), str(dst), parameters=params, kernel_name=kernel,
                            cwd=str(NB_DIR), progress_bar=False, log_output=False)
    except Exception as exc:  # noqa: BLE001 - recorded and reported, the run goes on
        rec.update(status="failed", **_failure(exc))
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    if cache_root is not None:
        rec["cache_writes"] = cache_writes(cache_root, wall0 - 1.0, time.time() + 1.0)
    return rec


def _previous_records(out: Path) -> dict:
    """Notebook records of an earlier ``run.json`` in ``out`` (name -> record), {} if none."""
    try:
        return {n["name"]: n for n in json.loads((out / "run.json").read_text()).get("notebooks", [])}
    except (OSError, ValueError, KeyError):
        return {}


def run(profile: str, seed: int = 0, data_root: str = "", sections: list[str] | None = None,
        bench_host: str = "", fresh: bool = False, build_dir: str = "build", kernel: str = "python3",
        report: bool = True, weights_dir: str = "", fast_dev_run: bool = False, nproc: int = 1,
        nnodes: int = 1, rdzv_endpoint: str = "", full_grid: bool = False, retime: bool = False,
        cache_dir: str = "", jobs: int = 1) -> dict:
    """Execute the notebooks of ``sections`` and write ``run.json`` (and ``report.html``).

    Args:
        profile, seed, data_root, sections, bench_host, fresh, build_dir: as the CLI options.
        kernel: Jupyter kernel of the notebooks.
        report: build ``report.html`` (and check it in a browser where one is installed).
        weights_dir: ``--weights-dir`` (ImageNet encoder checkpoints; makes every profile
            start pretrained).
        fast_dev_run: ``--fast-dev-run``: the profile's dry run
            (:meth:`study.profiles.Profile.fast_dev_run`), written to
            ``<build_dir>/<profile>-dryrun/``.
        nproc, nnodes, rdzv_endpoint: ``torchrun`` launch of every cached training (passed
            to the kernels in the environment, see :mod:`study.context`).
        full_grid: ``--full-grid``: the exhaustive sweeps too (tables merged when present).
        retime: ``--retime``: re-measure cached latencies.
        cache_dir: ``--cache-dir``: another (possibly read-only) cache to read from.
        jobs: ``--jobs``: notebooks executed at once (default 1). :data:`HEAD_NOTEBOOKS`
            (the trained models and THE KD choice every later section starts from) always run
            first, one after the other; the rest then share ``jobs`` kernels. Their
            ``seconds`` are then wall times of notebooks that shared the machine (``run.json``
            records ``jobs``): use 1 for timings, more to finish sooner (the test suite's smoke
            build uses 2). Tables do not depend on it (the same seeds, cache keys and data).
            With ``jobs > 1`` the kernels (and the benchmark processes they fork) get
            ``OMP_WAIT_POLICY=PASSIVE`` unless it is set: OpenMP threads that spin on shared
            cores inflate torch latencies ~50x (recorded as ``omp_wait_policy`` in ``run.json``).

    Returns:
        the run record (as written to ``run.json``); ``record['failed']`` lists failed notebooks.

    Raises:
        study.profiles.ProfileError: unknown profile or unmet requirements.
        study.models.WeightsError: a pretrained run without its checkpoints (before any
            notebook runs; the message names every file and its download command).
    """
    from .context import (CACHE_DIR_ENV, FULL_GRID_ENV, NNODES_ENV, NPROC_ENV, RDZV_ENV, RETIME_ENV,  # noqa: I001
                          check_weights)  # torch, timm: not for --help

    prof = get_profile(profile, data_root=data_root or None, fast_dev_run=fast_dev_run,
                       weights_dir=weights_dir or None)
    if prof.dry_run:
        print(f"DRY RUN (--fast-dev-run) of profile {profile!r}: every notebook with 2 optimizer steps per "
              f"training, {prof.eval_batches} validation batches per evaluation, {prof.bench_min_runs} runs per "
              f"benchmark, the real shapes; the numbers are not results.", flush=True)
    weights = check_weights(prof, load=True)  # before the first notebook: fail early, naming the files
    build = Path(build_dir)
    if not build.is_absolute():
        build = REPO_ROOT / build
    out = build / prof.out_name
    out.mkdir(parents=True, exist_ok=True)
    # Kernels inherit these: no progress bars in the saved notebooks (one summary line per
    # training instead, study.train.progress_bar), and the multi-process launch settings.
    if cache_dir and not Path(cache_dir).is_dir():
        raise FileNotFoundError(f"--cache-dir {cache_dir}: no such folder (point it at another build's cache, "
                                "e.g. /path/to/build/cache)")
    env = {"SEGCOMPRESS_BATCH": "1", NPROC_ENV: str(int(nproc)), NNODES_ENV: str(int(nnodes)),
           RDZV_ENV: rdzv_endpoint or "", FULL_GRID_ENV: "1" if full_grid else "",
           RETIME_ENV: "1" if retime else "",
           CACHE_DIR_ENV: str(Path(cache_dir).resolve()) if cache_dir else ""}
    if int(jobs) > 1 and "OMP_WAIT_POLICY" not in os.environ:
        # Kernels that share the cores must not busy-wait: with OpenMP's default (active)
        # policy, a 2-thread torch benchmark forked beside another kernel measured 997 ms
        # p50 for a smoke MobileViT-S that takes 15-18 ms (1 thread, or PASSIVE):
        # benchmarks/results/omp-wait-policy-2026-11-29.txt. One-at-a-time runs keep the default.
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    params = {"profile": profile, "seed": seed, "data_root": data_root, "build_dir": str(build),
              "fresh": fresh, "bench_host": bench_host, "weights_dir": prof.weights_dir,
              "fast_dev_run": bool(fast_dev_run)}
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    prov = provenance()  # before the notebooks: the code that runs, not what HEAD is at the end
    records = []
    if int(jobs) < 1:
        raise ValueError(f"run: jobs must be >= 1, got {jobs!r}")

    def one(stem):
        rec = run_notebook(stem, out, params, kernel, cache_root=build / "cache")
        flag = "ok" if rec["status"] == "ok" else "FAILED"
        extra = "" if rec["status"] == "ok" else f"  cell {rec['failed_cell']}: {rec['error'].splitlines()[0]}"
        print(f"[{flag:>6}] {stem:<24} {rec['seconds']:8.1f} s{extra}{_cache_note(rec)}", flush=True)
        return rec

    try:
        stems = notebooks_for(sections)
        head = [s_ for s_ in stems if s_ in HEAD_NOTEBOOKS or int(jobs) == 1]
        rest = [s_ for s_ in stems if s_ not in head]
        records += [one(s_) for s_ in head]
        if rest:
            from concurrent.futures import ThreadPoolExecutor  # each notebook runs in its own kernel process

            with ThreadPoolExecutor(max_workers=int(jobs)) as pool:
                records += list(pool.map(one, rest))  # results in study order
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    # re-read at the end: another run on the same build (other sections) may have finished
    prev = {**_previous_records(out), **{r["name"]: r for r in records}}
    run_rec = {"profile": profile, "seed": seed, "data_root": data_root or "(embedded generated dataset)",
               "bench_host": bench_host, "fresh": fresh, "started": started,
               "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "total_seconds": round(sum(r["seconds"] for r in records), 2),
               "fast_dev_run": bool(prof.dry_run), "pretrained": bool(prof.pretrained),
               "weights_dir": prof.weights_dir, "weights": weights,
               "nproc": int(nproc), "nnodes": int(nnodes), "rdzv_endpoint": rdzv_endpoint,
               "full_grid": bool(full_grid), "retime": bool(retime), "cache_dir": cache_dir, "jobs": int(jobs),
               "omp_wait_policy": env.get("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "(OpenMP default)")),
               "profile_config": prof.to_dict(), **prov,
               "notebooks": [prev[s] for s in NOTEBOOKS if s in prev],
               "failed": [r["name"] for r in records if r["status"] != "ok"]}
    atomic_write_text(out / "run.json", json.dumps(run_rec, indent=2, default=str))
    if report:
        path = build_report(out, run_rec)
        print(f"report: {path}")
        if find_chromium():  # what a reader sees: DOM counts and a screenshot beside the report
            try:
                check = check_report_in_browser(path, screenshot=out / "report-screenshot.png")
                run_rec["report_check"] = check
                atomic_write_text(out / "run.json", json.dumps(run_rec, indent=2, default=str))
                print(f"report check (headless Chromium): {json.dumps(check)}")
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                print(f"report check skipped: {exc}", file=sys.stderr)
    return run_rec


_CSS = """
<style>
body.hide-code .jp-CodeCell .jp-Cell-inputWrapper { display: none; }
#sc-toolbar { position: fixed; top: 8px; right: 12px; z-index: 10; }
#sc-toolbar button { padding: 4px 10px; }
.sc-failed { border: 2px solid #c0392b; background: #fdecea; padding: 8px 12px; }
.sc-prov td, .sc-prov th { padding: 2px 8px; text-align: left; }
.sc-claims { border-collapse: collapse; font-size: 90%; }
.sc-claims td, .sc-claims th { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
.sc-verdict { font-weight: bold; white-space: nowrap; }
</style>
<script>
document.addEventListener('DOMContentLoaded', function () {
  document.body.classList.add('hide-code');
  var bar = document.createElement('div'); bar.id = 'sc-toolbar';
  var b = document.createElement('button'); b.textContent = 'show code';
  b.onclick = function () { var h = document.body.classList.toggle('hide-code');
                            b.textContent = h ? 'show code' : 'hide code'; };
  bar.appendChild(b); document.body.appendChild(bar);
});
</script>
"""


_ANCHOR = "SC-SECTION-ANCHOR:"

_CODE = re.compile(r"(```.*?```|~~~.*?~~~|`[^`\n]*`)", re.S)
_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
_INLINE = re.compile(r"(?<![\\$\w])\$(?=\S)((?:[^$\n]|\n(?!\s*\n))+?)(?<=\S)\$(?![\w$])")
_REMOTE_SCRIPT = re.compile(r"<script[^>]*\ssrc=[\"']https?://[^>]*>\s*</script>", re.I)
_REMOTE_MODULE = re.compile(r"<script type=\"module\">(?:(?!</script>).)*?https?://(?:(?!</script>).)*</script>", re.S)
_MATHJAX_CONFIG = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.S)


def render_math(text: str) -> str:
    """Replace ``$$...$$`` and ``$...$`` LaTeX in Markdown ``text`` with MathML (pre-rendered).

    Browsers render MathML natively, so the report needs no MathJax from a CDN and renders
    offline. Code spans and fenced blocks are left alone; ``\\$`` stays a dollar sign. A
    formula latex2mathml cannot parse is kept as ``<code class="sc-math-error">`` (visible,
    and counted by the browser test) rather than silently dropped.
    """
    def conv(tex: str, display: str) -> str:
        try:
            return l2m.convert(tex.strip(), display=display)
        except Exception:  # noqa: BLE001 - shown, not hidden
            return f"<code class='sc-math-error'>{html.escape(tex)}</code>"

    out = []
    for i, part in enumerate(_CODE.split(text)):
        if i % 2 == 0:
            part = _DISPLAY.sub(lambda m: conv(m.group(1), "block"), part)
            part = _INLINE.sub(lambda m: conv(m.group(1), "inline"), part)
        out.append(part)
    return "".join(out)


def _prerender_math(cell) -> None:
    if cell.cell_type == "markdown":
        cell.source = render_math(cell.source)
    elif cell.cell_type == "code":
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if "text/markdown" in data:
                md = data["text/markdown"]
                data["text/markdown"] = render_math("".join(md) if isinstance(md, list) else md)


#: Said above the claims table of a ``--fast-dev-run`` report.
_DRY_RUN_NOTE = (" **This is a dry run (`--fast-dev-run`): every training took 2 optimizer steps, so no "
                 "number in this report is a result and no claim is judged.**")


def build_report(out_dir: Path, run_rec: dict) -> Path:
    """Combine the executed notebooks of ``out_dir`` into one self-contained ``report.html``.

    Sections that failed get a red box with the failing cell and error; sections never run
    are listed as missing. Code cells are hidden by default (a button shows them).
    """
    status = {n["name"]: n for n in run_rec.get("notebooks", [])}
    cells = []
    prov = [("profile", run_rec["profile"]), ("seed", run_rec["seed"]), ("data", run_rec["data_root"]),
            ("git commit", run_rec.get("git_commit", "") + _dirty_note(run_rec)),
            ("finished", run_rec.get("finished")), ("CPU", f"{run_rec.get('cpu_model')} ({run_rec.get('cpu_cores')} cores)"),
            ("python", run_rec.get("python")),
            ("packages", ", ".join(f"{k} {v}" for k, v in run_rec.get("packages", {}).items() if v))]
    claims = claims_table(out_dir / "tables", run_rec["profile"], dry_run=bool(run_rec.get("fast_dev_run")) or None)
    atomic_write_text(out_dir / "claims.csv", claims.to_csv(index=False))
    toc = []
    for stem in NOTEBOOKS:
        st = status.get(stem, {}).get("status") or (
            "executed, no record in run.json" if (out_dir / "notebooks" / f"{stem}.ipynb").exists() else "not run")
        secs = status.get(stem, {}).get("seconds")
        mine = claims[claims["notebook"] == stem]
        verdicts = "; ".join(f"{html.escape(r.claim)}: <i>{html.escape(r.verdict)}</i>" for r in mine.itertuples())
        toc.append(f"<li><a href='#{stem}'>{stem}</a> ({', '.join(NOTEBOOKS[stem])}): <b>{st}</b>"
                   + (f", {secs:.0f} s" if secs is not None else "")
                   + _cache_note(status.get(stem, {}))
                   + (f"<br><small>{verdicts}</small>" if verdicts else "") + "</li>")
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in prov)
    claim_rows = "".join(
        f"<tr><td>{html.escape(r.source)}</td><td>{html.escape(r.claim)}</td><td>{html.escape(r.reported)}</td>"
        f"<td>{html.escape(r.this_run)}</td><td class='sc-verdict'>{html.escape(r.verdict)}</td>"
        f"<td>{html.escape(r.reason)}</td><td><a href='#{r.notebook}'>{r.notebook}</a></td></tr>"
        for r in claims.itertuples())
    claims_html = ("<table class='sc-claims'><tr><th>source</th><th>claim</th><th>reported by the source</th>"
                   f"<th>this run ({html.escape(run_rec['profile'])} profile)</th><th>verdict</th><th>why</th>"
                   f"<th>measured in</th></tr>{claim_rows}</table>")
    cells.append(nbformat.v4.new_markdown_cell(
        "# segcompress: compressing ViT-style segmenters for edge devices\n\n"
        "## Claims of the sources, checked by this run\n\n"
        "Each row: the number a source published (never mixed with ours), this run's number from "
        "the section tables, and a verdict computed from the two (rules in `study/sections/claims.py`; "
        f"also `claims.csv`).{_DRY_RUN_NOTE if run_rec.get('fast_dev_run') else ''}\n\n{claims_html}\n\n"
        f"<table class='sc-prov'>{rows}</table>\n\n## Contents\n<ul>{''.join(toc)}</ul>\n\n"
        "Tables are in `tables/` beside this file (CSV and Markdown); figures in `figures/`."))
    for stem in NOTEBOOKS:
        cells.append(nbformat.v4.new_markdown_cell(f"{_ANCHOR}{stem}\n\n---\n"))
        rec = status.get(stem)
        path = out_dir / "notebooks" / f"{stem}.ipynb"
        if rec and rec["status"] != "ok":
            cells.append(nbformat.v4.new_markdown_cell(
                f"<div class='sc-failed'><b>Section {stem} FAILED</b> at cell {rec.get('failed_cell')}: "
                f"<pre>{html.escape(str(rec.get('error')))}</pre>The outputs below stop there.</div>"))
        if not path.exists():
            cells.append(nbformat.v4.new_markdown_cell(f"## {stem}\n\n*Not run in this build.*"))
            continue
        nb = nbformat.read(str(path), as_version=4)
        for i, c in enumerate(nb.cells):
            c["id"] = f"{stem}-{i}"  # cell ids must stay unique in the combined notebook
            if c.cell_type == "code":  # progress bars and warnings (stderr) stay in the notebooks
                c.outputs = [o for o in c.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
            if "parameters" in c.get("metadata", {}).get("tags", []) or \
               "injected-parameters" in c.get("metadata", {}).get("tags", []):
                continue
            _prerender_math(c)
            cells.append(c)
    book = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                         "language": "python"}})
    exporter = HTMLExporter(template_name="lab")
    body, _ = exporter.from_notebook_node(book)
    # offline: math is pre-rendered MathML, so no MathJax / require.js from a CDN
    body = _MATHJAX_CONFIG.sub("", body)
    body = _REMOTE_SCRIPT.sub("", body)
    body = _REMOTE_MODULE.sub("", body)  # the template's mermaid loader (no diagrams here)
    body = body.replace("</head>", _CSS + "</head>", 1)
    for stem in NOTEBOOKS:  # nbconvert's sanitizer drops ids written in markdown: add them here
        body = body.replace(f"{_ANCHOR}{stem}", f'<span id="{stem}"></span>')
    path = out_dir / "report.html"
    atomic_write_text(path, body)
    return path


_CHECK_JS = """
<script>
window.addEventListener('load', function () {
  var text = document.body.innerText;
  var imgs = Array.from(document.images);
  var links = Array.from(document.querySelectorAll('a[href^="#"]'));
  var r = {
    raw_dollar_math: (text.match(/\\$[^$\\n]*\\\\[a-zA-Z]+[^$\\n]*\\$/g) || []).length,
    raw_latex_commands: (text.match(/\\\\(mathcal|frac|sum|text|lVert|left|right|mathbb|cdot)\\b/g) || []).length,
    math_elements: document.getElementsByTagName('math').length,
    math_errors: document.querySelectorAll('.sc-math-error').length,
    images: imgs.length,
    images_broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length,
    error_outputs: document.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"]').length,
    failed_sections: document.querySelectorAll('.sc-failed').length,
    contents_links: links.length,
    contents_links_broken: 0
  };
  var broken = links.filter(function (a) {
      var id = a.getAttribute('href').slice(1);
      return !(document.getElementById(id) || document.getElementById(decodeURIComponent(id))); });
  r.contents_links_broken = broken.length;
  r.broken_links = broken.slice(0, 5).map(function (a) { return a.getAttribute('href'); });
  var pre = document.createElement('pre'); pre.id = 'sc-check'; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>
"""


def find_chromium() -> str | None:
    """Path of a headless-capable Chromium / Chrome, or None (Debian's ``chromium`` package)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def check_report_in_browser(report: Path, screenshot: Path | None = None, timeout_s: float = 120) -> dict:
    """Open ``report`` in headless Chromium (no network) and count what rendered.

    A copy of the page with a checking script is loaded with ``--dump-dom``; the script
    reports, from the rendered DOM: ``math_elements`` (MathML formulas), ``raw_dollar_math``
    and ``raw_latex_commands`` (LaTeX left unrendered), ``math_errors``, ``images`` and
    ``images_broken`` (``naturalWidth == 0``), ``error_outputs`` (cells that raised),
    ``failed_sections``, ``contents_links`` and ``contents_links_broken`` (in-page links
    whose target id is missing). With ``screenshot`` a PNG of the top of the page is written.

    Raises:
        FileNotFoundError: no Chromium on this machine, or no ``report``.
        RuntimeError: Chromium failed or the page never reported (message has its stderr).
    """
    chrome = find_chromium()
    if chrome is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    report = Path(report)
    if not report.is_file():
        raise FileNotFoundError(f"report {report} does not exist")
    flags = [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--disable-background-networking", "--proxy-server=127.0.0.1:9",
             "--virtual-time-budget=15000"]
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "report-check.html"
        probe.write_text(report.read_text(encoding="utf-8").replace("</body>", _CHECK_JS + "</body>", 1),
                         encoding="utf-8")
        r = subprocess.run(flags + ["--dump-dom", probe.as_uri()], capture_output=True, text=True,
                           timeout=timeout_s)
        m = re.search(r'<pre id="sc-check">(.*?)</pre>', r.stdout, re.S)
        if not m:
            raise RuntimeError(f"chromium rendered no check result (exit {r.returncode}): {r.stderr[-1500:]}")
        result = json.loads(html.unescape(m.group(1)))
        if screenshot is not None:
            screenshot = Path(screenshot)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(flags + ["--hide-scrollbars", "--window-size=1280,2400",
                                    f"--screenshot={screenshot}", report.resolve().as_uri()],
                           capture_output=True, text=True, timeout=timeout_s)
            result["screenshot"] = str(screenshot) if screenshot.exists() else ""
    return result


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m study.report", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    r = sub.add_parser("run", help="execute notebooks and build the report", formatter_class=fmt)
    r.add_argument("--profile", default="cpu", choices=list(PROFILES),
                   help="experiment size: smoke (CI, minutes), cpu (this 2-core machine), paper (GPU + LPCVC)")
    r.add_argument("--seed", type=int, default=0, help="base seed of every training (non-negative int)")
    r.add_argument("--data-root", default="", metavar="DIR",
                   help="a dataset in the LPCVC layout; empty: the embedded generated dataset")
    r.add_argument("--only", action="append", choices=list(SECTIONS), metavar="SECTION",
                   help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    r.add_argument("--bench-host", default="", metavar="HOST",
                   help="SSH host (alias of ~/.ssh/config allowed) for the deployment section; empty: this machine")
    r.add_argument("--fresh", action="store_true", help="ignore cached models and results (recompute everything)")
    r.add_argument("--build-dir", default="build", metavar="DIR",
                   help="output root; results go to DIR/<profile>/, the cache to DIR/cache/")
    r.add_argument("--kernel", default=os.environ.get("SEGCOMPRESS_KERNEL", "python3"),
                   help="Jupyter kernel that executes the notebooks (run_all.sh installs 'segcompress')")
    r.add_argument("--weights-dir", default="", metavar="DIR",
                   help="ImageNet encoder checkpoints, DIR/<timm name>.<tag>/model.safetensors (+ DIR/topformer/); "
                        "every profile then starts pretrained (paper does by default, from the hub)")
    r.add_argument("--fast-dev-run", action="store_true",
                   help="dry run: 2 optimizer steps per training, 2 validation batches per evaluation, 3 runs per "
                        "benchmark, every sweep point, the real shapes; paper runs on a CPU; outputs in "
                        "DIR/<profile>-dryrun/")
    r.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes per node of every cached training (torchrun; gloo on CPU, NCCL on GPU)")
    r.add_argument("--nnodes", type=int, default=1, metavar="N", help="nodes of every cached training (torchrun)")
    r.add_argument("--full-grid", action="store_true",
                   help="also run the exhaustive sweeps (every KD temperature x weight and method, every "
                        "importance x schedule, ...); their rows are merged into the tables")
    r.add_argument("--retime", action="store_true",
                   help="re-measure latencies even when the same models were measured before (cached)")
    r.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="notebooks executed at once after 00 and 01 (more than 1: per-notebook times then "
                        "come from a shared machine)")
    r.add_argument("--cache-dir", default="", metavar="DIR",
                   help="another build's cache to read trained models and measurements from (used as is, "
                        "never written; new entries go to BUILD_DIR/cache)")
    r.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT",
                   help="torchrun rendezvous endpoint (needed with --nnodes > 1)")
    b = sub.add_parser("report", help="rebuild report.html from an existing build", formatter_class=fmt)
    b.add_argument("--profile", default="cpu", choices=list(PROFILES), help="which build/<profile>/ to rebuild")
    b.add_argument("--build-dir", default="build", metavar="DIR", help="output root of the earlier run")
    b.add_argument("--fast-dev-run", action="store_true", help="the dry run's build (DIR/<profile>-dryrun/)")
    c = sub.add_parser("check", help="open build/<profile>/report.html in headless Chromium and print "
                                     "the DOM check (JSON); keeps a screenshot beside it", formatter_class=fmt)
    c.add_argument("--profile", default="cpu", choices=list(PROFILES), help="which build/<profile>/report.html")
    c.add_argument("--build-dir", default="build", metavar="DIR", help="output root of the run")
    c.add_argument("--fast-dev-run", action="store_true", help="the dry run's build (DIR/<profile>-dryrun/)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 a notebook failed, 2 bad arguments)."""
    ap = _parser()
    args = ap.parse_args(argv)
    out_name = args.profile + ("-dryrun" if getattr(args, "fast_dev_run", False) else "")
    if args.cmd == "check":
        out = Path(args.build_dir)
        out = (out if out.is_absolute() else REPO_ROOT / out) / out_name
        res = check_report_in_browser(out / "report.html", screenshot=out / "report-screenshot.png")
        print(json.dumps(res, indent=2))
        bad = (res["raw_dollar_math"] + res["raw_latex_commands"] + res["math_errors"] + res["images_broken"]
               + res["error_outputs"] + res["contents_links_broken"])
        return 1 if bad else 0
    if args.cmd == "report":
        out = Path(args.build_dir)
        out = (out if out.is_absolute() else REPO_ROOT / out) / out_name
        if not (out / "run.json").exists():
            ap.error(f"--profile {args.profile}: no run.json in {out}; run the study first")
        print(build_report(out, json.loads((out / "run.json").read_text())))
        return 0
    if args.seed < 0:
        ap.error(f"--seed must be >= 0, got {args.seed}")
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.nproc < 1 or args.nnodes < 1:
        ap.error(f"--nproc and --nnodes must be >= 1, got {args.nproc}, {args.nnodes}")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        ap.error("--nnodes > 1 needs --rdzv-endpoint HOST:PORT")
    if args.weights_dir and not Path(args.weights_dir).is_dir():
        ap.error(f"--weights-dir {args.weights_dir}: not a directory")
    try:
        prof = get_profile(args.profile, data_root=args.data_root or None, fast_dev_run=args.fast_dev_run)
    except ProfileError as exc:
        ap.error(f"--profile {args.profile}: {exc}")
    world = args.nproc * args.nnodes
    if prof.batch_size % world:
        ap.error(f"--nproc {args.nproc} x --nnodes {args.nnodes} = {world} processes must divide the profile's "
                 f"batch size {prof.batch_size}")
    if args.data_root:
        if not Path(args.data_root).is_dir():
            ap.error(f"--data-root {args.data_root}: not a directory")
        try:
            validate_dataset(args.data_root, check_values=False)
        except DataError as exc:
            ap.error(f"--data-root {args.data_root}: {exc}")
    from .models import WeightsError

    try:
        rec = run(args.profile, args.seed, os.path.abspath(args.data_root) if args.data_root else "", args.only,
                  args.bench_host, args.fresh, args.build_dir, args.kernel,
                  weights_dir=os.path.abspath(args.weights_dir) if args.weights_dir else "",
                  fast_dev_run=args.fast_dev_run, nproc=args.nproc, nnodes=args.nnodes,
                  rdzv_endpoint=args.rdzv_endpoint, full_grid=args.full_grid, retime=args.retime,
                  cache_dir=os.path.abspath(args.cache_dir) if args.cache_dir else "", jobs=args.jobs)
    except (WeightsError, FileNotFoundError) as exc:
        print(f"python -m study.report run: {exc}", file=sys.stderr)
        return 2
    except WeightsError as exc:
        print(f"python -m study.report run: {exc}", file=sys.stderr)
        return 2
    if rec["failed"]:
        print(f"failed notebooks: {', '.join(rec['failed'])} (see run.json and report.html)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
