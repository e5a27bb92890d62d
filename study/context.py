"""What every notebook gets from :func:`setup`: profile, seed, cache, data, writers.

A notebook's ``parameters`` cell holds ``profile, seed, data_root, build_dir, fresh,
bench_host, weights_dir, fast_dev_run``; its next cell calls ``ctx =
study.context.setup(...)`` with them (``weights_dir`` and ``fast_dev_run``, when the call
does not pass them, are read from the notebook's namespace: the parameters cell). Tables go
to ``<build_dir>/<profile>/tables/<section>.{csv,md}``, figures to
``<build_dir>/<profile>/figures/<section>_<name>.png`` (and, for the ``cpu`` profile, to
the top-level ``figures/`` as well, so readers see them without running anything). A dry
run (``fast_dev_run``) writes to ``<build_dir>/<profile>-dryrun/`` and never to
``figures/``.

Multi-process training (``--nproc``, ``--nnodes``, ``--rdzv-endpoint`` of the runner) is a
property of the machine, not of the experiment: the runner passes it to the notebooks'
kernels in the environment variables :data:`NPROC_ENV`, :data:`NNODES_ENV` and
:data:`RDZV_ENV`, and :func:`study.sections.common.train_cached` launches every cached
training as a ``torchrun`` job when ``ctx.nproc * ctx.nnodes > 1``.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from . import BASE_COLUMNS, SECTIONS
from . import data as sdata
from .cache import ArtifactCache, atomic_write_bytes, atomic_write_text
from .models import PRETRAINED_ENCODERS, check_pretrained
from .profiles import PROFILES, Profile, get_profile
from .train import seed_everything  # noqa: F401 - re-exported for notebooks

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Environment variables of the multi-process launch (set by ``study.report run``).
NPROC_ENV, NNODES_ENV, RDZV_ENV = "SEGCOMPRESS_NPROC", "SEGCOMPRESS_NNODES", "SEGCOMPRESS_RDZV_ENDPOINT"
#: Run options passed to the kernels by the runner (``--full-grid``, ``--retime``, ``--cache-dir``).
FULL_GRID_ENV, RETIME_ENV, CACHE_DIR_ENV = "SEGCOMPRESS_FULL_GRID", "SEGCOMPRESS_RETIME", "SEGCOMPRESS_CACHE_DIR"
#: Columns every table gets from its context (added by :meth:`Context.save_table` when a
#: table lacks them; :func:`study.sections.common.table_row` fills them per row).
CONTEXT_COLUMNS = ("pretrained", "dry_run")


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
        nproc, nnodes, rdzv_endpoint: processes per node, nodes and rendezvous endpoint of
            every cached training (``torchrun``; 1, 1, "" = train in this process).
        full_grid: run the exhaustive sweeps too (``--full-grid``: every KD temperature x
            weight, every importance x schedule...); the sections' core comparisons run always.
        retime: re-measure latencies even when a measurement of the same models is cached
            (``--retime``).
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
    nproc: int = 1
    nnodes: int = 1
    rdzv_endpoint: str = ""
    full_grid: bool = False
    retime: bool = False

    @property
    def dry_run(self) -> bool:
        """True for a ``--fast-dev-run`` (:meth:`study.profiles.Profile.fast_dev_run`)."""
        return bool(self.profile.dry_run)

    @property
    def pretrained(self) -> bool:
        """True when the encoders start from ImageNet checkpoints (``profile.pretrained``)."""
        return bool(self.profile.pretrained)

    @property
    def device(self) -> torch.device:
        """``cuda`` when available, else ``cpu``."""
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def save_table(self, section: str, df) -> Path:
        """Validate and write a section table as CSV and Markdown (atomically).

        Every table also carries the :data:`CONTEXT_COLUMNS` ``pretrained`` and
        ``dry_run``: rows from :func:`study.sections.common.table_row` have them; a table
        without the column gets the context's value.

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
        df = df.copy()
        for col, value in zip(CONTEXT_COLUMNS, (self.pretrained, self.dry_run)):
            if col not in df.columns:
                df[col] = value
        ordered = list(BASE_COLUMNS) + [c for c in df.columns if c not in BASE_COLUMNS]
        df = df[ordered]
        tdir = self.out_dir / "tables"
        csv = tdir / f"{section}.csv"
        atomic_write_text(csv, df.to_csv(index=False))
        atomic_write_text(tdir / f"{section}.md", df.to_markdown(index=False, floatfmt=".4g"))
        self.tables[section] = df
        return csv

    def save_figure(self, fig, section: str, name: str, dpi: int = 110, caption: str = "",
                    split: str = "test", seeds=None) -> Path:
        """Save a matplotlib figure as ``<section>_<name>.png`` (atomically) and show it inline.

        In a notebook the PNG is displayed where this is called, followed by a caption that
        states the profile, the split and the seeds behind the figure (so the executed
        notebook and the HTML report carry every figure next to its text); the figure is
        then closed. For the ``cpu`` profile the PNG is also copied to the top-level
        ``figures/`` (not in a dry run).

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
        if self.profile.name == "cpu" and not self.dry_run:
            atomic_write_bytes(REPO_ROOT / "figures" / out.name, data)
        plt.close(fig)
        seeds = self.seed if seeds is None else seeds
        seeds = ", ".join(str(s) for s in seeds) if isinstance(seeds, (list, tuple)) else str(seeds)
        dry = " - DRY RUN (--fast-dev-run): not a result" if self.dry_run else ""
        text = (f"**Figure `{out.name}`.** {caption.strip()} *(profile `{self.profile.name}`{dry}, "
                f"split `{split}`, seed(s) {seeds})*")
        _display_png(data, text)
        return SavedFigure(out)


class SavedFigure(type(Path())):
    """The path of a saved figure; as the last value of a notebook cell it shows nothing
    (the figure and its caption were already displayed by :meth:`Context.save_figure`)."""

    def _ipython_display_(self) -> None:
        return None


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


def _notebook_parameter(name: str, default):
    """The value of ``name`` in the calling IPython kernel's namespace (the notebook's
    parameters cell), else ``default``. Outside IPython: ``default``."""
    try:
        from IPython import get_ipython
    except ImportError:
        return default
    ip = get_ipython()
    if ip is None:
        return default
    return ip.user_ns.get(name, default)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"environment variable {name} must be a positive integer, got {raw!r}")
    return value


#: Registry names whose ImageNet encoders a pretrained run needs (checked before training).
#: TopFormer is optional: without its file the bi-level section trains it from scratch.
PRETRAINED_MODELS = tuple(PRETRAINED_ENCODERS)


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    """Whether the Hugging Face hub endpoint accepts a TCP connection (one quick probe, so a
    machine without network fails in seconds rather than after timm's retries)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    u = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _in_hf_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds ``repo_id``'s weights (what timm loads offline)."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in ("model.safetensors", "pytorch_model.bin"))


def check_weights(prof: Profile, load: bool = False) -> dict:
    """Check, before any training, that a pretrained run has every encoder checkpoint.

    Nothing to check unless ``prof.pretrained``. With ``prof.weights_dir``: every file of
    :data:`PRETRAINED_MODELS` must exist (:func:`study.models.check_pretrained`). Without
    it (the hub): each checkpoint must be in the Hugging Face cache, or the hub must be
    reachable (and ``HF_HUB_OFFLINE`` unset). With ``load`` every encoder is also built
    and loaded once (:func:`study.sections.common.build`: a wrong file, a download
    failure), TopFormer's too when its file is in ``weights_dir``.

    Returns:
        ``{registry name: "file <path>" | "hub cache" | "hub"}`` of what will be used
        (``{}`` when not pretrained).

    Raises:
        study.models.WeightsError: one message naming every missing or unusable file, the
            folder layout expected and the command that fetches each file.
    """
    if not prof.pretrained:
        return {}
    from .models import TOPFORMER_CHECKPOINTS, WeightsError, pretrained_weights_file

    found = {}
    if prof.weights_dir:
        files = check_pretrained(PRETRAINED_MODELS, prof.weights_dir)
        found = {n: f"file {f}" for n, f in files.items()}
        for n in TOPFORMER_CHECKPOINTS:
            try:
                found[n] = f"file {pretrained_weights_file(n, prof.weights_dir)}"
            except WeightsError:
                pass  # optional: the bi-level section trains TopFormer from scratch without it
    else:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        missing = [n for n in PRETRAINED_MODELS if not _in_hf_cache(f"timm/{PRETRAINED_ENCODERS[n]}")]
        found = {n: "hub" if n in missing else "hub cache" for n in PRETRAINED_MODELS}
        if missing and (offline or not _hub_reachable()):
            why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is not reachable from this machine"
            lines = [f"{n}: timm/{PRETRAINED_ENCODERS[n]} is not in the Hugging Face cache and {why}; expected "
                     f"DIR/{PRETRAINED_ENCODERS[n]}/model.safetensors - fetch it on a connected machine with "
                     f"`hf download timm/{PRETRAINED_ENCODERS[n]} --local-dir DIR/{PRETRAINED_ENCODERS[n]}`"
                     for n in missing]
            raise WeightsError(f"profile {prof.name!r} starts from ImageNet-pretrained encoders; pretrained weights "
                               "missing:\n  " + "\n  ".join(lines) + "\nthen pass --weights-dir DIR "
                               "(README, 'The paper profile')")
    if load:
        from .sections.common import build

        problems = []
        for n in found:
            try:
                build(n, prof, pretrained=True)
            except Exception as exc:  # noqa: BLE001 - collected: one message for all
                problems.append(f"{n} ({found[n]}): {type(exc).__name__}: {exc}")
        if problems:
            raise WeightsError("pretrained weights unusable:\n  " + "\n  ".join(problems))
    return found


def setup(profile: str = "cpu", seed: int = 0, data_root: str = "", build_dir: str = "build",
          fresh: bool = False, bench_host: str = "", weights_dir: str | None = None,
          fast_dev_run: bool | None = None, nproc: int | None = None, nnodes: int | None = None,
          rdzv_endpoint: str | None = None, full_grid: bool | None = None, retime: bool | None = None,
          cache_dir: str | None = None) -> Context:
    """Build the :class:`Context` of a notebook run: seed, check the profile, prepare data.

    Args:
        profile: ``smoke``, ``cpu`` or ``paper``.
        seed: base seed.
        data_root: a dataset in the LPCVC layout; "" uses the embedded generated dataset.
        build_dir: output root (relative paths are taken from the repository root).
        fresh: ignore cached artifacts.
        bench_host: SSH host for the deployment section.
        weights_dir: folder of ImageNet encoder checkpoints (``--weights-dir``, layout of
            :func:`study.models.pretrained_weights_file`); makes every profile start
            pretrained. None: the notebook's ``weights_dir`` parameter, else "".
        fast_dev_run: the dry run of the profile (:meth:`study.profiles.Profile.fast_dev_run`).
            None: the notebook's ``fast_dev_run`` parameter, else False.
        nproc, nnodes, rdzv_endpoint: ``torchrun`` launch of every cached training. None:
            the environment variables :data:`NPROC_ENV`, :data:`NNODES_ENV`,
            :data:`RDZV_ENV` (set by the runner), else 1, 1, "".
        full_grid, retime: see :class:`Context`; None: the environment variables
            :data:`FULL_GRID_ENV`, :data:`RETIME_ENV` ("1" = on), else off.
        cache_dir: another cache to read trained models and measurements from
            (``--cache-dir``; used as is, never written; new entries go to
            ``<build_dir>/cache``). None: :data:`CACHE_DIR_ENV`, else none.

    torch-pruning's "Unwrapped parameters detected" warning (raised for the Swin teacher's
    per-head ``q_bias`` / ``v_bias`` / ``logit_scale`` whenever a dependency graph is built)
    is silenced in the notebook's process: on the teacher the study prunes only MLP hidden
    channels with torch-pruning, which never touch those per-head parameters, so the
    warning would only fill the saved notebook's stderr.

    Torch runs with ``set_flush_denormal(True)`` (subnormal floats slow x86 kernels ~100x)
    and, unless the profile fixes ``torch_threads``, as many intra-op threads as the machine
    has physical cores (:func:`study.bench.default_threads`, the study's one thread policy).

    Raises:
        study.profiles.ProfileError: bad profile or unmet requirements.
        study.data.DataError: a malformed data root (the message names the file).
        study.models.WeightsError: a pretrained run whose checkpoint files are missing under
            ``weights_dir`` (one message naming every file and its download command), raised
            before any training.
        ValueError: a non-positive ``nproc`` / ``nnodes``.
    """
    if weights_dir is None:
        weights_dir = _notebook_parameter("weights_dir", "") or ""
    if fast_dev_run is None:
        fast_dev_run = bool(_notebook_parameter("fast_dev_run", False))
    nproc = _env_int(NPROC_ENV, 1) if nproc is None else int(nproc)
    nnodes = _env_int(NNODES_ENV, 1) if nnodes is None else int(nnodes)
    rdzv_endpoint = os.environ.get(RDZV_ENV, "") if rdzv_endpoint is None else str(rdzv_endpoint)
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"nproc and nnodes must be >= 1, got {nproc}, {nnodes}")
    prof = get_profile(profile, data_root=data_root or None, fast_dev_run=bool(fast_dev_run),
                       weights_dir=weights_dir or None)
    if prof.pretrained and prof.weights_dir:
        check_weights(prof)  # every missing file in one message, before any training
    from .bench import default_threads

    warnings.filterwarnings("ignore", message="Unwrapped parameters detected", category=UserWarning)
    torch.set_flush_denormal(True)
    torch.set_num_threads(int(prof.extra.get("torch_threads") or default_threads()))
    if full_grid is None:
        full_grid = os.environ.get(FULL_GRID_ENV, "") == "1"
    if retime is None:
        retime = os.environ.get(RETIME_ENV, "") == "1"
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_DIR_ENV, "")
    seed_everything(seed)
    build = Path(build_dir)
    if not build.is_absolute():
        build = REPO_ROOT / build
    cache = ArtifactCache(build / "cache", fresh=fresh, extra_roots=[cache_dir] if cache_dir else ())
    # the dataset is the profile's own (a dry run trains on the same images)
    info = sdata.prepare_dataset(PROFILES[prof.name], seed=prof.data_seed, cache_root=build / "cache",
                                 data_root=data_root or None)
    out = build / prof.out_name
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    if prof.dry_run:
        print(f"DRY RUN (--fast-dev-run) of profile {prof.name!r}: 2 optimizer steps per training, "
              f"{prof.eval_batches} validation batches per evaluation, {prof.bench_min_runs} runs per "
              f"benchmark, seeds {prof.seeds}; real shapes ({prof.image_size}px images, {prof.crop_size}px "
              f"crops, batch {prof.batch_size}). The numbers are NOT results; outputs go to {out}.")
    return Context(profile=prof, seed=seed, out_dir=out, cache=cache, data_root=Path(info.root),
                   data_fp=info.fingerprint, generated_data=info.generated, bench_host=bench_host,
                   nproc=nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint, full_grid=bool(full_grid),
                   retime=bool(retime))
