"""Every notebook executes in the smoke profile through the real runner, and writes its table.

Also: a failing notebook does not stop the others, and the same profile and seed give the
same non-timing table values.
"""
import json
import os
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest

import study
from study import BASE_COLUMNS, NOTEBOOKS
from study import report as runner

ROOT = Path(__file__).resolve().parent.parent
TIMING = re.compile(r"latency|seconds|_s$|_s_|fps|rss|ram_|swap|power|cpu_hours|speedup|load_s|_ms|cv_|ci95|"
                    r"gmacs_per_s|pct_of_peak|verdict")


@pytest.fixture(scope="session")
def smoke_build(tmp_path_factory):
    build = tmp_path_factory.mktemp("build")
    # two kernels at once after 00 and 01: the tables do not depend on it (the same seeds,
    # data and cache keys), only the per-notebook wall times do
    rec = runner.run("smoke", seed=0, build_dir=str(build), kernel="python3", jobs=2)
    return build, rec


def test_all_notebooks_have_parameters_cell_and_no_outputs():
    for stem in NOTEBOOKS:
        nb = nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), stem
        for name in ("profile", "seed", "data_root", "build_dir", "fresh", "bench_host", "weights_dir", "fast_dev_run"):
            assert re.search(rf"^{name} = ", code[0].source, re.M), (stem, name)
        assert not any(c.get("outputs") for c in code), f"{stem} is stored with outputs"


@pytest.mark.parametrize("stem", list(NOTEBOOKS))
def test_notebook_runs_in_smoke_and_writes_its_table(smoke_build, stem):
    build, rec = smoke_build
    nbrec = {n["name"]: n for n in rec["notebooks"]}[stem]
    assert nbrec["status"] == "ok", f"{stem} failed at cell {nbrec['failed_cell']}: {nbrec['error']}"
    for section in NOTEBOOKS[stem]:
        df = pd.read_csv(build / "smoke" / "tables" / f"{section}.csv")
        assert list(df.columns[: len(BASE_COLUMNS)]) == list(BASE_COLUMNS)
        assert len(df) > 0 and (df["section"] == section).all()
        # issue #14: every table states the split its numbers come from and the training budget
        assert {"split", "train_steps", "train_images"} <= set(df.columns), f"{section}: split / budget columns"
        measured = df[df["miou"].notna() & ~df["method"].astype(str).str.contains("reported")]
        assert set(measured["split"].dropna()) <= {"test", "val"} and (measured["split"] == "test").any()
        assert (build / "smoke" / "tables" / f"{section}.md").exists()
        assert list((build / "smoke" / "figures").glob(f"{section}_*.png")), f"no figure for {section}"


def test_run_json_and_report(smoke_build):
    build, rec = smoke_build
    on_disk = json.loads((build / "smoke" / "run.json").read_text())
    for key in ("git_commit", "packages", "cpu_model", "cpu_cores", "seed", "profile", "notebooks"):
        assert key in on_disk
    assert all("seconds" in n and "status" in n for n in on_disk["notebooks"])
    html = (build / "smoke" / "report.html").read_text()
    assert "Contents" in html and "hide-code" in html
    for stem in NOTEBOOKS:
        assert f'id="{stem}"' in html and f'href="#{stem}"' in html


@pytest.mark.parametrize("stem", list(NOTEBOOKS))
def test_every_saved_figure_is_shown_in_its_executed_notebook(smoke_build, stem):
    """Each PNG a notebook saved is also an image output of that notebook (same bytes)."""
    import base64

    build, _ = smoke_build
    nb = nbformat.read(build / "smoke" / "notebooks" / f"{stem}.ipynb", as_version=4)
    shown = {base64.b64decode(o["data"]["image/png"]) for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", []) if "image/png" in o.get("data", {})}
    saved = [p for sec in NOTEBOOKS[stem] for p in (build / "smoke" / "figures").glob(f"{sec}_*.png")]
    assert saved, f"{stem} saved no figure"
    missing = [p.name for p in saved if p.read_bytes() not in shown]
    assert not missing, f"{stem}: saved but not displayed: {missing}"
    assert len(shown) >= len(saved)


@pytest.mark.parametrize("stem", list(NOTEBOOKS))
def test_executed_notebooks_hold_no_progress_bars(smoke_build, stem):
    build, _ = smoke_build
    nb = nbformat.read(build / "smoke" / "notebooks" / f"{stem}.ipynb", as_version=4)
    bars = re.compile(r"\d+%\|.*\|\s*\d+/\d+|it/s\]|s/it\]|TqdmWarning|IProgress")
    for c in nb.cells:
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            text = o.get("text", "") if o.get("output_type") == "stream" else ""
            assert not bars.search(text), f"{stem}: progress bar saved in a cell output: {text[:200]!r}"


def test_report_renders_offline_in_headless_chromium(smoke_build):
    """The smoke report, opened in a real browser with no network: math rendered, figures
    loaded, no error cell, every contents link resolves."""
    if runner.find_chromium() is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    build, _ = smoke_build
    out = build / "smoke"
    res = runner.check_report_in_browser(out / "report.html", screenshot=out / "report-screenshot.png")
    assert res["math_elements"] > 0, res
    assert res["raw_dollar_math"] == 0 and res["raw_latex_commands"] == 0 and res["math_errors"] == 0, res
    assert res["images"] > 0 and res["images_broken"] == 0, res
    assert res["error_outputs"] == 0 and res["failed_sections"] == 0, res
    assert res["contents_links"] >= len(NOTEBOOKS) and res["contents_links_broken"] == 0, res
    assert (out / "report-screenshot.png").stat().st_size > 10_000
    html = (out / "report.html").read_text()
    assert "cdnjs.cloudflare.com" not in html and "mathjax" not in html.lower()


def test_same_seed_same_tables(smoke_build, tmp_path):
    """Re-running the baselines from scratch (fresh cache) reproduces every non-timing value."""
    build, _ = smoke_build
    rec = runner.run("smoke", seed=0, build_dir=str(tmp_path), sections=["baselines"], fresh=True,
                     kernel="python3", report=False)
    assert rec["failed"] == []
    a = pd.read_csv(build / "smoke" / "tables" / "baselines.csv")
    b = pd.read_csv(tmp_path / "smoke" / "tables" / "baselines.csv")
    cols = [c for c in a.columns if not TIMING.search(c)]
    assert "miou" in cols and "gmacs" in cols
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_failing_notebook_does_not_stop_the_others(tmp_path, monkeypatch):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    def write(stem, src):
        nb = nbformat.v4.new_notebook(cells=[
            nbformat.v4.new_code_cell('profile = "smoke"\nseed = 0\ndata_root = ""\nbuild_dir = ""\nfresh = False\nbench_host = ""',
                                      metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell(src)])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, nbdir / f"{stem}.ipynb")
    write("a_fails", "raise RuntimeError('boom in a')")
    write("b_works", "x = 1 + 1")
    monkeypatch.setattr(runner, "NB_DIR", nbdir)
    monkeypatch.setattr(runner, "NOTEBOOKS", {"a_fails": ("baselines",), "b_works": ("distillation",)})
    rec = runner.run("smoke", build_dir=str(tmp_path / "b"), kernel="python3", report=False)
    st = {n["name"]: n for n in rec["notebooks"]}
    assert st["a_fails"]["status"] == "failed" and "boom in a" in st["a_fails"]["error"]
    assert st["b_works"]["status"] == "ok"
    assert rec["failed"] == ["a_fails"]
    assert st["b_works"]["cache_writes"] == 0  # nothing computed: the report says "everything read from the cache"


def test_jobs_run_the_head_notebooks_first_then_the_rest_at_once(tmp_path, monkeypatch):
    """--jobs 2: 00 and 01 run alone and first; the others overlap; records keep study order."""
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    stems = ["00_baselines", "01_distillation", "02_x", "03_y"]
    for stem in stems:
        nb = nbformat.v4.new_notebook(cells=[
            nbformat.v4.new_code_cell('profile = "smoke"\nseed = 0\ndata_root = ""\nbuild_dir = ""\nfresh = False\nbench_host = ""',
                                      metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("import os, time, json, pathlib\nt0 = time.time(); time.sleep(1.5)\n"
                                      f"pathlib.Path({str(tmp_path)!r}, '{stem}.json').write_text("
                                      "json.dumps([t0, time.time(), os.environ.get('OMP_WAIT_POLICY')]))")])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, nbdir / f"{stem}.ipynb")
    monkeypatch.setattr(runner, "NB_DIR", nbdir)
    monkeypatch.setattr(runner, "NOTEBOOKS", {s: (f"sec{i}",) for i, s in enumerate(stems)})
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    rec = runner.run("smoke", build_dir=str(tmp_path / "b"), kernel="python3", report=False, jobs=2)
    assert [n["name"] for n in rec["notebooks"]] == stems and rec["failed"] == [] and rec["jobs"] == 2
    t = {s: json.loads((tmp_path / f"{s}.json").read_text()) for s in stems}
    assert t["00_baselines"][1] <= t["01_distillation"][0] <= t["01_distillation"][1] <= min(t["02_x"][0], t["03_y"][0])
    assert t["02_x"][0] < t["03_y"][1] and t["03_y"][0] < t["02_x"][1]  # the two overlapped
    # kernels sharing the cores do not busy-wait (OpenMP), and run.json says so; the caller's env is restored
    assert all(t[s][2] == "PASSIVE" for s in stems) and rec["omp_wait_policy"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in os.environ
    with pytest.raises(ValueError, match="jobs"):
        runner.run("smoke", build_dir=str(tmp_path / "c"), kernel="python3", report=False, jobs=0)


def test_notebook_runs_top_to_bottom_without_papermill(smoke_build, tmp_path):
    """What a reader does in JupyterLab: open a notebook, set its parameters cell, run all.

    nbclient executes the stored notebook with no parameter injection; only the values of
    the parameters cell are edited (smoke profile, the smoke build's cache), as a user would.
    """
    from nbclient import NotebookClient

    build, _ = smoke_build
    nb = nbformat.read(ROOT / "notebooks" / "00_baselines.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    for line in params.source.splitlines():  # the cell holds plain assignments only
        assert re.fullmatch(r"\w+ = .+", line.split("#")[0].strip()), line
    params.source = re.sub(r'^profile = .*$', 'profile = "smoke"', params.source, flags=re.M)
    params.source = re.sub(r'^build_dir = .*$', f'build_dir = "{build}"', params.source, flags=re.M)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_provenance_is_dirty_only_for_code_changes(tmp_path):
    """A run's own figures/ and an untracked .venv link are not code; an edit under study/ is."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    (tmp_path / "study").mkdir()
    (tmp_path / "figures").mkdir()
    (tmp_path / "study" / "a.py").write_text("x = 1\n")
    (tmp_path / "figures" / "f.png").write_bytes(b"1")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    (tmp_path / "figures" / "f.png").write_bytes(b"2")   # what a real profile's run writes
    (tmp_path / ".venv").symlink_to(tmp_path / "figures")
    prov = runner.provenance(tmp_path)
    assert len(prov["git_commit"]) == 40 and prov["git_dirty"] is False and prov["git_dirty_paths"] == []
    (tmp_path / "study" / "a.py").write_text("x = 2\n")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "new.ipynb").write_text("{}")
    prov = runner.provenance(tmp_path)
    assert prov["git_dirty"] is True and sorted(prov["git_dirty_paths"]) == ["notebooks/new.ipynb", "study/a.py"]
    assert runner._dirty_note(prov) == f" (uncommitted changes: {', '.join(prov['git_dirty_paths'])})"
    many = {"git_dirty": True, "git_dirty_paths": [f"study/m{i}.py" for i in range(5)]}
    assert runner._dirty_note(many) == " (uncommitted changes: study/m0.py, study/m1.py, study/m2.py and 2 more)"
    assert runner._dirty_note({"git_dirty": False}) == ""


def test_cache_writes_counts_entries_written_in_the_window(tmp_path):
    import os

    cache = tmp_path / "cache"
    (cache / "files").mkdir(parents=True)
    for name, t in [("old.pt", 100.0), ("new.pt", 200.0), ("files/m.onnx", 250.0), ("late.pt", 400.0),
                    (".x.pt.tmp", 200.0)]:
        (cache / name).write_bytes(b"x")
        os.utime(cache / name, (t, t))
    assert runner.cache_writes(cache, 150.0, 300.0) == 2          # new.pt, files/m.onnx; not the temp file
    assert runner.cache_writes(cache, 0.0, 1e12) == 4
    assert runner.cache_writes(tmp_path / "absent", 0.0, 1e12) == 0
    assert runner._cache_note({"cache_writes": 0}) == ", everything read from the cache"
    assert runner._cache_note({"cache_writes": 1}) == ", 1 cache entry computed"
    assert runner._cache_note({"cache_writes": 7}) == ", 7 cache entries computed"
    assert runner._cache_note({}) == ""
