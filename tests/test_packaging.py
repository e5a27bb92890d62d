"""environment.yml pins exactly what pyproject.toml pins; the fixed top-level shape exists."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_matches_pyproject():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = set(proj["dependencies"]) | set(proj["optional-dependencies"]["test"])
    env = set(re.findall(r"^\s+- ([A-Za-z0-9_.\-]+==[^\s#]+)", (ROOT / "environment.yml").read_text(), re.M))
    assert pins == env, f"only in pyproject: {pins - env}; only in environment.yml: {env - pins}"
    unpinned = [d for d in proj["dependencies"] if "==" not in d]
    assert not unpinned, f"pyproject.toml dependencies without an exact pin: {unpinned}"
    env_unpinned = re.findall(r"^\s+- ([A-Za-z0-9_.\-]+)\s*$", (ROOT / "environment.yml").read_text(), re.M)
    assert set(env_unpinned) <= {"pip", "conda-forge"}, f"environment.yml pip packages without a pin: {env_unpinned}"


def test_top_level_shape_and_ci_calls_readme_test_command():
    for p in ("notebooks", "study", "figures", "tests", "environment.yml", "README.md", "run_all.sh", ".ci/run"):
        assert (ROOT / p).exists(), p
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./run_all.sh --test" in readme and "./run_all.sh --test" in ci
