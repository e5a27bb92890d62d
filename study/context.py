"""What every notebook gets from :func:`setup`: profile, seed, cache, data, writers.

A notebook's ``parameters`` cell holds ``profile, seed, data_root, build_dir, fresh,
bench_host``; its next cell calls ``ctx = study.context.setup(...)`` with them. Tables go
to ``<build_dir>/<profile>/tables/<section>.{csv,md}``, figures to
``<build_dir>/<profile>/figures/<section>_<name>.png`` (and, for the ``cpu`` profile, to
the top-level ``figures/`` as well, so readers see them without running anything).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from . import BASE_COLUMNS, SECTIONS
from . import data as sdata
from .cache import ArtifactCache, atomic_write_bytes, atomic_write_text
from .profiles import Profile, get_profile
from .train import seed_everything  # noqa: F401 - re-exported for notebooks

REPO_ROOT = Path(__file__).resolve().parent.parent


class TableError(ValueError):
    """A section table misses required columns or names an unknown section."""


@dataclass
class Context:
    """State shared by one notebook run.

    Attributes:
        profile: the :class:`~study.profiles.Profile`.
        seed: the run's base seed.
        out_dir: ``<build_dir>/<profile>``.
        cache: artifact cache at ``<build_dir>/cache`` (shared by all profiles; keys
            include the profile's sizes).
        data_root: folder of the dataset in the LPCVC layout.
        data_fp: fingerprint of that dataset (part of every cache key).
        generated_data: True when ``data_root`` is the embedded generated dataset.
        bench_host: SSH host for the deployment section ("" = this machine).
    """

    profile: Profile
    seed: int
    out_dir: Path
    cache: ArtifactCache
    data_root: Path
    data_fp: str
    generated_data: bool = True
    bench_host: str = ""
    tables: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """``cuda`` when available, else ``cpu``."""
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def save_table(self, section: str, df) -> Path:
        """Validate and write a section table as CSV and Markdown (atomically).

        Args:
            section: one of :data:`study.SECTIONS`.
            df: pandas DataFrame whose first columns include :data:`study.BASE_COLUMNS`.

        Returns:
            Path of the CSV.

        Raises:
            TableError: unknown section or missing required columns.
        """
        if section not in SECTIONS:
            raise TableError(f"unknown section {section!r}; expected one of {SECTIONS}")
        missing = [c for c in BASE_COLUMNS if c not in df.columns]
        if missing:
            raise TableError(f"table {section!r} lacks required columns {missing}")
        if (df["section"] != section).any():
            raise TableError(f"table {section!r} has rows whose 'section' is not {section!r}")
        ordered = list(BASE_COLUMNS) + [c for c in df.columns if c not in BASE_COLUMNS]
        df = df[ordered]
        tdir = self.out_dir / "tables"
        csv = tdir / f"{section}.csv"
        atomic_write_text(csv, df.to_csv(index=False))
        atomic_write_text(tdir / f"{section}.md", df.to_markdown(index=False, floatfmt=".4g"))
        self.tables[section] = df
        return csv

    def save_figure(self, fig, section: str, name: str, dpi: int = 110, caption: str = "",
                    split: str = "val", seeds=None) -> Path:
        """Save a matplotlib figure as ``<section>_<name>.png`` (atomically) and show it inline.

        In a notebook the PNG is displayed where this is called, followed by a caption that
        states the profile, the split and the seeds behind the figure (so the executed
        notebook and the HTML report carry every figure next to its text); the figure is
        then closed. For the ``cpu`` profile the PNG is also copied to the top-level
        ``figures/``.

        Args:
            fig: a matplotlib ``Figure``.
            section: one of :data:`study.SECTIONS`.
            name: file-name part (letters, digits, ``_``).
            dpi: resolution of the PNG.
            caption: what the figure shows (one sentence).
            split: the data split the plotted numbers come from (``val``, ``test``, ``train``).
            seeds: the seeds behind the numbers (default: the run's seed).

        Returns:
            Path of the PNG under ``<build_dir>/<profile>/figures/``.
        """
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        data = buf.getvalue()
        out = self.out_dir / "figures" / f"{section}_{name}.png"
        atomic_write_bytes(out, data)
        if self.profile.name == "cpu":
            atomic_write_bytes(REPO_ROOT / "figures" / out.name, data)
        plt.close(fig)
        seeds = self.seed if seeds is None else seeds
        seeds = ", ".join(str(s) for s in seeds) if isinstance(seeds, (list, tuple)) else str(seeds)
        text = (f"**Figure `{out.name}`.** {caption.strip()} *(profile `{self.profile.name}`, "
                f"split `{split}`, seed(s) {seeds})*")
        _display_png(data, text)
        return out


def _display_png(data: bytes, caption_md: str) -> None:
    """Show PNG bytes and a Markdown caption when running inside an IPython kernel."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, Markdown, display
    except ImportError:  # plain Python without IPython: nothing to show
        return
    if get_ipython() is None:
        return
    display(Image(data=data, format="png"))
    display(Markdown(caption_md))


def setup(profile: str = "cpu", seed: int = 0, data_root: str = "", build_dir: str = "build",
          fresh: bool = False, bench_host: str = "") -> Context:
    """Build the :class:`Context` of a notebook run: seed, check the profile, prepare data.

    Args:
        profile: ``smoke``, ``cpu`` or ``paper``.
        seed: base seed.
        data_root: a dataset in the LPCVC layout; "" uses the embedded generated dataset.
        build_dir: output root (relative paths are taken from the repository root).
        fresh: ignore cached artifacts.
        bench_host: SSH host for the deployment section.

    Raises:
        study.profiles.ProfileError: bad profile or unmet requirements.
        study.data.DataError: a malformed data root (the message names the file).
    """
    prof = get_profile(profile, data_root=data_root or None)
    if prof.extra.get("torch_threads"):
        torch.set_num_threads(int(prof.extra["torch_threads"]))
    seed_everything(seed)
    build = Path(build_dir)
    if not build.is_absolute():
        build = REPO_ROOT / build
    cache = ArtifactCache(build / "cache", fresh=fresh)
    info = sdata.prepare_dataset(prof, seed=prof.data_seed, cache_root=build / "cache", data_root=data_root or None)
    out = build / prof.name
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    return Context(profile=prof, seed=seed, out_dir=out, cache=cache, data_root=Path(info.root),
                   data_fp=info.fingerprint, generated_data=info.generated, bench_host=bench_host)
