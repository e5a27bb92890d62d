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
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from . import NOTEBOOKS, SECTIONS
from .cache import atomic_write_text
from .profiles import PROFILES

REPO_ROOT = Path(__file__).resolve().parent.parent
NB_DIR = REPO_ROOT / "notebooks"
PINNED = ("torch", "torchvision", "timm", "torch-pruning", "onnx", "onnxruntime", "onnxslim", "numpy",
          "pandas", "matplotlib", "seaborn", "scikit-image", "albumentations", "papermill", "nbconvert")


def provenance() -> dict:
    """Git commit, package versions, Python, CPU model and core count of this machine."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
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
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
            "python": platform.python_version(), "packages": pkgs, "cpu_model": cpu,
            "cpu_cores": os.cpu_count(), "hostname": platform.node()}


def notebooks_for(sections: list[str] | None) -> list[str]:
    """Notebook stems to run for the given sections (all when None), in study order."""
    if not sections:
        return list(NOTEBOOKS)
    return [nb for nb, secs in NOTEBOOKS.items() if any(s in secs for s in sections)]


def _failure(exc) -> dict:
    cell = getattr(exc, "exec_count", None) or getattr(exc, "cell_index", None)
    return {"failed_cell": cell, "error": f"{getattr(exc, 'ename', type(exc).__name__)}: "
                                          f"{getattr(exc, 'evalue', str(exc))}"[:2000]}


def run_notebook(stem: str, out_dir: Path, params: dict, kernel: str = "python3") -> dict:
    """Execute ``notebooks/<stem>.ipynb`` into ``<out_dir>/notebooks/`` with ``params``.

    Returns:
        dict with ``name, sections, status ('ok'|'failed'), seconds, failed_cell, error, output``.
    """
    import papermill as pm

    dst = out_dir / "notebooks" / f"{stem}.ipynb"
    dst.parent.mkdir(parents=True, exist_ok=True)
    rec = {"name": stem, "sections": list(NOTEBOOKS[stem]), "status": "ok", "failed_cell": None,
           "error": None, "output": str(dst.relative_to(out_dir))}
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(NB_DIR / f"{stem}.ipynb"), str(dst), parameters=params, kernel_name=kernel,
                            cwd=str(NB_DIR), progress_bar=False, log_output=False)
    except Exception as exc:  # noqa: BLE001 - recorded and reported, the run goes on
        rec.update(status="failed", **_failure(exc))
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def _previous_records(out: Path) -> dict:
    """Notebook records of an earlier ``run.json`` in ``out`` (name -> record), {} if none."""
    try:
        return {n["name"]: n for n in json.loads((out / "run.json").read_text()).get("notebooks", [])}
    except (OSError, ValueError, KeyError):
        return {}


def run(profile: str, seed: int = 0, data_root: str = "", sections: list[str] | None = None,
        bench_host: str = "", fresh: bool = False, build_dir: str = "build", kernel: str = "python3",
        report: bool = True) -> dict:
    """Execute the notebooks of ``sections`` and write ``run.json`` (and ``report.html``).

    Returns:
        the run record (as written to ``run.json``); ``record['failed']`` lists failed notebooks.
    """
    build = Path(build_dir)
    if not build.is_absolute():
        build = REPO_ROOT / build
    out = build / profile
    out.mkdir(parents=True, exist_ok=True)
    # Kernels inherit this: text progress bars refresh every 15 s instead of flooding the
    # executed notebooks (tqdm reads TQDM_* variables as defaults).
    os.environ.setdefault("TQDM_MININTERVAL", "15")
    params = {"profile": profile, "seed": seed, "data_root": data_root, "build_dir": str(build),
              "fresh": fresh, "bench_host": bench_host}
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    records = []
    for stem in notebooks_for(sections):
        rec = run_notebook(stem, out, params, kernel)
        flag = "ok" if rec["status"] == "ok" else "FAILED"
        extra = "" if rec["status"] == "ok" else f"  cell {rec['failed_cell']}: {rec['error'].splitlines()[0]}"
        print(f"[{flag:>6}] {stem:<24} {rec['seconds']:8.1f} s{extra}", flush=True)
        records.append(rec)
    # re-read at the end: another run on the same build (other sections) may have finished
    prev = {**_previous_records(out), **{r["name"]: r for r in records}}
    run_rec = {"profile": profile, "seed": seed, "data_root": data_root or "(embedded generated dataset)",
               "bench_host": bench_host, "fresh": fresh, "started": started,
               "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "total_seconds": round(sum(r["seconds"] for r in records), 2),
               "profile_config": PROFILES[profile].to_dict(), **provenance(),
               "notebooks": [prev[s] for s in NOTEBOOKS if s in prev],
               "failed": [r["name"] for r in records if r["status"] != "ok"]}
    atomic_write_text(out / "run.json", json.dumps(run_rec, indent=2, default=str))
    if report:
        path = build_report(out, run_rec)
        print(f"report: {path}")
    return run_rec


_CSS = """
<style>
body.hide-code .jp-CodeCell .jp-Cell-inputWrapper { display: none; }
#sc-toolbar { position: fixed; top: 8px; right: 12px; z-index: 10; }
#sc-toolbar button { padding: 4px 10px; }
.sc-failed { border: 2px solid #c0392b; background: #fdecea; padding: 8px 12px; }
.sc-prov td, .sc-prov th { padding: 2px 8px; text-align: left; }
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


def build_report(out_dir: Path, run_rec: dict) -> Path:
    """Combine the executed notebooks of ``out_dir`` into one self-contained ``report.html``.

    Sections that failed get a red box with the failing cell and error; sections never run
    are listed as missing. Code cells are hidden by default (a button shows them).
    """
    import nbformat
    from nbconvert import HTMLExporter

    status = {n["name"]: n for n in run_rec.get("notebooks", [])}
    cells = []
    prov = [("profile", run_rec["profile"]), ("seed", run_rec["seed"]), ("data", run_rec["data_root"]),
            ("git commit", run_rec.get("git_commit", "") + (" (dirty)" if run_rec.get("git_dirty") else "")),
            ("finished", run_rec.get("finished")), ("CPU", f"{run_rec.get('cpu_model')} ({run_rec.get('cpu_cores')} cores)"),
            ("python", run_rec.get("python")),
            ("packages", ", ".join(f"{k} {v}" for k, v in run_rec.get("packages", {}).items() if v))]
    toc = []
    for stem in NOTEBOOKS:
        st = status.get(stem, {}).get("status", "not run")
        secs = status.get(stem, {}).get("seconds")
        toc.append(f"<li><a href='#{stem}'>{stem}</a> ({', '.join(NOTEBOOKS[stem])}): <b>{st}</b>"
                   + (f", {secs:.0f} s" if secs is not None else "") + "</li>")
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in prov)
    cells.append(nbformat.v4.new_markdown_cell(
        "# segcompress: compressing ViT-style segmenters for edge devices\n\n"
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
            cells.append(c)
    book = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                         "language": "python"}})
    exporter = HTMLExporter(template_name="lab")
    body, _ = exporter.from_notebook_node(book)
    body = body.replace("</head>", _CSS + "</head>", 1)
    for stem in NOTEBOOKS:  # nbconvert's sanitizer drops ids written in markdown: add them here
        body = body.replace(f"{_ANCHOR}{stem}", f'<span id="{stem}"></span>')
    path = out_dir / "report.html"
    atomic_write_text(path, body)
    return path


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m study.report", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute notebooks and build the report")
    r.add_argument("--profile", default="cpu", choices=list(PROFILES))
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--data-root", default="")
    r.add_argument("--only", action="append", choices=list(SECTIONS), metavar="SECTION",
                   help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    r.add_argument("--bench-host", default="")
    r.add_argument("--fresh", action="store_true")
    r.add_argument("--build-dir", default="build")
    r.add_argument("--kernel", default=os.environ.get("SEGCOMPRESS_KERNEL", "python3"))
    b = sub.add_parser("report", help="rebuild report.html from an existing build")
    b.add_argument("--profile", default="cpu", choices=list(PROFILES))
    b.add_argument("--build-dir", default="build")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 a notebook failed, 2 bad arguments)."""
    ap = _parser()
    args = ap.parse_args(argv)
    if args.cmd == "report":
        out = Path(args.build_dir)
        out = (out if out.is_absolute() else REPO_ROOT / out) / args.profile
        if not (out / "run.json").exists():
            ap.error(f"--profile {args.profile}: no run.json in {out}; run the study first")
        print(build_report(out, json.loads((out / "run.json").read_text())))
        return 0
    if args.seed < 0:
        ap.error(f"--seed must be >= 0, got {args.seed}")
    from .profiles import ProfileError, get_profile
    try:
        get_profile(args.profile, data_root=args.data_root or None)
    except ProfileError as exc:
        ap.error(f"--profile {args.profile}: {exc}")
    if args.data_root:
        from .data import DataError, validate_dataset
        if not Path(args.data_root).is_dir():
            ap.error(f"--data-root {args.data_root}: not a directory")
        try:
            validate_dataset(args.data_root, check_values=False)
        except DataError as exc:
            ap.error(f"--data-root {args.data_root}: {exc}")
    rec = run(args.profile, args.seed, os.path.abspath(args.data_root) if args.data_root else "", args.only,
              args.bench_host, args.fresh, args.build_dir, args.kernel)
    if rec["failed"]:
        print(f"failed notebooks: {', '.join(rec['failed'])} (see run.json and report.html)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
