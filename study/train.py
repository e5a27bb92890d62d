"""Training loop and evaluation of a segmentation model (no context, no cache).

A plain loop (d2l style): AdamW, poly learning-rate schedule with linear warm-up,
cross-entropy or OHEM cross-entropy (source 000's loss, threshold 0.7) with the ignore
index, evaluation every N steps, a CSV log, AMP when a GPU is present. It runs unchanged
under ``torchrun`` (DDP; gloo on CPU, NCCL on GPU): each rank takes every
``world_size``-th batch of one :func:`study.data.batch_stream` and DDP averages the
gradients. ``loss_fn`` plugs in other objectives (knowledge distillation:
:func:`study.distill.make_kd_loss`)::

    from study import train
    cfg = train.TrainConfig(steps=300, lr=2e-3, loss="ohem")
    history = train.train(model, train_loader, val_loader, cfg)     # model trained in place
    scores = train.evaluate(model, val_loader)                       # miou, mdice, per_class_iou...

Entry points: :func:`train`, :func:`evaluate`, :func:`predict`, :func:`seed_everything`,
:func:`last_quarter_gain`,
:class:`TrainConfig`, :func:`segmentation_loss`. Multi-process jobs: :func:`write_job`
(a training as a self-contained file), :func:`launch_job` (``torchrun ... -m study.train
job FILE``, which runs :func:`run_job` on every rank). The cached baseline models, the profile's
training config and recovery fine-tuning (all of which take a context) are in
:mod:`study.sections.common` (``trained_model``, ``train_config``, ``finetune``).
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import io
import marshal
import os
import pickle
import random
import subprocess
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import IGNORE_INDEX, NUM_CLASSES
from .cache import atomic_torch_save, atomic_write_text
from .data import batch_stream
from .metrics import SegmentationMeter


#: Set (to "1") by the notebook runner: notebooks executed in batch print one summary line
#: per training instead of progress bars, so saved notebooks stay readable.
BATCH_ENV = "SEGCOMPRESS_BATCH"


def progress_bar(iterable, desc: str, enabled: bool = True, **kw):
    """A tqdm progress bar over ``iterable`` (widgets in JupyterLab, text in a terminal).

    Disabled when ``enabled`` is False or when the environment variable
    :data:`BATCH_ENV` is ``"1"`` (papermill runs); callers then print one summary line.
    """
    quiet = not enabled or os.environ.get(BATCH_ENV) == "1"
    return tqdm(iterable, desc=desc, disable=quiet, leave=False, **kw)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, and ask torch for deterministic algorithms.

    Args:
        seed: any non-negative int.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False


@dataclass
class TrainConfig:
    """Optimisation settings.

    Attributes:
        steps: optimizer steps.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps (None: 5% of ``steps``).
        poly_power: exponent of the poly decay ``lr * (1 - t/T)**p`` after warm-up.
        loss: ``"ce"`` or ``"ohem"`` (online hard example mining, Shrivastava et al. 2016,
            as in source 000's code: keep pixels whose true-class probability < ``ohem_thresh``,
            at least ``ohem_min_kept`` per batch).
        eval_every: evaluate on the validation loader every N steps (0: only at the end).
        grad_clip: max gradient norm (0 disables).
        amp: mixed precision on CUDA (ignored on CPU).
        log_csv: path of the CSV log ('' for none).
        channels_last: train in the channels-last memory format (NHWC); the model is back
            in the default format when :func:`train` returns.
        bf16: bfloat16 autocast on a CPU (needs native BF16, e.g. AVX-512 BF16, to pay);
            weights, optimizer state and the loss stay float32. Which models use these two
            is chosen by measurement (``benchmarks/bench_train_speed.py``,
            :data:`study.sections.common.TRAIN_MODES`).
    """

    steps: int = 100
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int | None = None
    poly_power: float = 0.9
    loss: str = "ohem"
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 4096
    eval_every: int = 0
    grad_clip: float = 5.0
    amp: bool = True
    log_csv: str = ""
    channels_last: bool = False
    bf16: bool = False


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7,
                       min_kept: int = 4096, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """OHEM cross-entropy (source 000's training loss).

    Args:
        logits: float (N, C, H, W).
        target: int64 (N, H, W) with ``ignore_index`` for pixels to skip.
        thresh: pixels whose predicted probability of the true class is below ``thresh``
            are "hard" and kept.
        min_kept: at least this many (hardest) pixels are kept.

    Returns:
        scalar loss (mean CE over kept pixels).
    """
    pix = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten()
    valid = target.flatten() != ignore_index
    pix = pix[valid]
    if pix.numel() == 0:
        return logits.sum() * 0.0
    hard = pix > -float(np.log(thresh))  # p_true < thresh  <=>  CE > -log(thresh)
    k = min(pix.numel(), max(int(min_kept), int(hard.sum())))
    if int(hard.sum()) >= k:
        return pix[hard].mean()
    return pix.topk(k).values.mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """CE or OHEM CE (per ``cfg.loss``) with the ignore index. Shapes as :func:`ohem_cross_entropy`.

    Raises:
        ValueError: unknown ``cfg.loss``.
    """
    if cfg.loss == "ce":
        return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    if cfg.loss == "ohem":
        return ohem_cross_entropy(logits, target, cfg.ohem_thresh, cfg.ohem_min_kept)
    raise ValueError(f"TrainConfig.loss must be 'ce' or 'ohem', got {cfg.loss!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then poly decay."""
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (1.0 - min(t, 1.0)) ** cfg.poly_power


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple]


def train(model: nn.Module, train_loader, val_loader, cfg: TrainConfig, loss_fn: LossFn | None = None,
          progress: bool = True, desc: str = "train") -> dict:
    """Train ``model`` in place.

    Args:
        model: segmentation model, (N, 3, H, W) float32 -> (N, C, H, W) logits.
        train_loader: yields ``(images float32 (N,3,H,W), masks int64 (N,H,W))``.
        val_loader: same format, or None to skip evaluation.
        cfg: :class:`TrainConfig`.
        loss_fn: optional ``loss_fn(model, images, masks) -> (loss, logs: dict of floats)``
            replacing the default CE/OHEM loss (used by KD and the bi-level search).
        progress: show a tqdm bar.
        desc: label of the bar and log.

    Returns:
        history dict: ``steps`` (list), ``loss`` (list of floats), ``lr``, ``evals``
        (list of dicts with step, miou, mdice), ``seconds`` (wall time, s), ``config``.
    """

    device = _model_device(model)
    rank, world = _dist_info()
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = cfg.amp and device.type == "cuda"
    cpu_bf16 = bool(cfg.bf16) and device.type == "cpu"
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    hist = {"steps": [], "loss": [], "lr": [], "evals": [], "logs": [], "config": asdict(cfg)}
    stream = batch_stream(train_loader, rank, world)
    t0 = time.perf_counter()
    bar = progress_bar(range(cfg.steps), desc, enabled=progress and rank == 0)
    model.train()
    for step in bar:
        images, masks = next(stream)
        images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
        masks = masks.to(device, non_blocking=True)
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16 if cpu_bf16 else None, enabled=use_amp or cpu_bf16):
            if loss_fn is None:
                loss, logs = segmentation_loss(net(images), masks, cfg), {}
            else:
                loss, logs = loss_fn(net, images, masks)
        loss = loss.float()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        lv = float(loss.detach())
        if not np.isfinite(lv):
            raise FloatingPointError(f"{desc}: loss became {lv} at step {step} (lr {lr:.3g})")
        hist["steps"].append(step)
        hist["loss"].append(lv)
        hist["lr"].append(lr)
        hist["logs"].append({k: float(v) for k, v in logs.items()})
        bar.set_postfix(loss=f"{lv:.3f}")
        last = step == cfg.steps - 1
        if val_loader is not None and rank == 0 and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
            s = evaluate(model, val_loader, progress=False)
            hist["evals"].append({"step": step + 1, "miou": s["miou"], "mdice": s["mdice"]})
            model.train()
    model.eval()
    if cfg.channels_last:
        model.to(memory_format=torch.contiguous_format)
    hist["seconds"] = time.perf_counter() - t0
    if progress and rank == 0 and os.environ.get(BATCH_ENV) == "1" and cfg.steps:
        last_eval = f", val mIoU {hist['evals'][-1]['miou']:.4f}" if hist["evals"] else ""
        print(f"{desc}: {cfg.steps} steps in {hist['seconds']:.0f} s, final loss "
              f"{np.mean(hist['loss'][-10:]):.3f}{last_eval}", flush=True)
    if cfg.log_csv and rank == 0:
        _write_log(cfg.log_csv, hist)
    return hist


def last_quarter_gain(evals, steps: int) -> float:
    """Final validation mIoU minus its value at 75 % of training (issue #13's learning-curve check).

    A clearly positive value says the model was still learning when training stopped.

    Args:
        evals: ``history["evals"]`` of :func:`train` (dicts with ``step`` and ``miou``), in
            step order, the last one at the final step.
        steps: the training's total optimizer steps.

    Returns:
        the gain in mIoU (float, 0-1 scale); the value at ``0.75 * steps`` is linearly
        interpolated between the two nearest evaluations; NaN with fewer than 2 evaluations
        or none at or before 75 % of training.
    """
    pts = [(int(e["step"]), float(e["miou"])) for e in evals]
    if len(pts) < 2 or steps <= 0:
        return float("nan")
    x = 0.75 * steps
    if pts[0][0] > x:
        return float("nan")
    xs, ys = zip(*pts)
    return float(ys[-1] - np.interp(x, xs, ys))


def _write_log(path: str, hist: dict) -> None:
    buf = io.StringIO()
    keys = sorted({k for d in hist["logs"] for k in d})
    w = csv.writer(buf)
    w.writerow(["step", "loss", "lr", *keys])
    for s, l, r, d in zip(hist["steps"], hist["loss"], hist["lr"], hist["logs"]):
        w.writerow([s, f"{l:.6g}", f"{r:.6g}", *[f"{d.get(k, float('nan')):.6g}" for k in keys]])
    atomic_write_text(path, buf.getvalue())


@torch.inference_mode()
def predict(model: nn.Module, loader, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true label maps: two uint8 arrays (N, H, W) over the whole loader."""

    device = _model_device(model)
    model.eval()
    preds, targets = [], []
    for images, masks in progress_bar(loader, "predict", enabled=progress):
        preds.append(model(images.to(device)).argmax(1).cpu().numpy().astype(np.uint8))
        targets.append(masks.numpy().astype(np.uint8))
    return np.concatenate(preds), np.concatenate(targets)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, num_classes: int = NUM_CLASSES, progress: bool = True) -> dict:
    """Scores of ``model`` on ``loader`` (see :func:`study.metrics.segmentation_scores`).

    Returns:
        dict with ``miou``, ``mdice``, ``pixel_acc``, ``per_class_iou`` (list of C floats,
        NaN where a class is absent), ``confusion`` (C x C nested list), ``seconds``.
    """

    device = _model_device(model)
    was_training = model.training
    model.eval()
    meter = SegmentationMeter(num_classes)
    t0 = time.perf_counter()
    for images, masks in progress_bar(loader, "eval", enabled=progress):
        logits = model(images.to(device))
        meter.update(logits.argmax(1).cpu().numpy(), masks.numpy())
    s = meter.compute()
    model.train(was_training)
    return {"miou": s["miou"], "mdice": s["mdice"], "pixel_acc": s["pixel_acc"],
            "per_class_iou": [float(x) for x in s["per_class_iou"]],
            "confusion": s["confusion"].tolist(), "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- torchrun jobs
#
# A training becomes a file (:func:`write_job`) that every rank of a ``torchrun`` job loads
# (:func:`run_job`). The file holds the initial model, the train / val loaders, the
# :class:`TrainConfig` and the loss function as Python objects (``torch.save``). Loss
# functions are usually closures (``study.distill.make_kd_loss`` returns one over the
# teacher), which the standard pickle refuses; :class:`_JobPickler` stores a function
# defined inside another function, or a lambda, *by value* - its marshalled code, its
# module's name (globals are that module's, imported on the rank) and its closure cells
# (pickled in turn: a teacher module travels inside the KD loss). This is the technique
# of cloudpickle, reduced to what the study's jobs contain. Marshalled code is specific to
# the Python version: every node of a job must run the same environment (the pinned one).


class _EmptyCell:
    """Marker of a closure cell without a value."""


def _rebuild_function(code: bytes, module: str, name: str, qualname: str, defaults, kwdefaults, cells):
    """Inverse of :meth:`_JobPickler.reducer_override` for functions."""
    closure = tuple(types.CellType() if isinstance(v, _EmptyCell) else types.CellType(v) for v in cells)
    fn = types.FunctionType(marshal.loads(code), importlib.import_module(module).__dict__, name, defaults,
                            closure or None)
    fn.__kwdefaults__ = kwdefaults
    fn.__qualname__ = qualname
    return fn


class _JobPickler(pickle.Pickler):
    """Pickler that stores nested functions and lambdas by value (see the comment above)."""

    def reducer_override(self, obj):
        if isinstance(obj, types.FunctionType) and ("<locals>" in obj.__qualname__ or obj.__name__ == "<lambda>"):
            if obj.__module__ in (None, "__main__"):
                raise pickle.PicklingError(
                    f"{obj.__qualname__} is defined in __main__ (a notebook or script): a torchrun job "
                    "cannot import it; define it in a module of the study package")
            cells = []
            for c in obj.__closure__ or ():
                try:
                    cells.append(c.cell_contents)
                except ValueError:
                    cells.append(_EmptyCell())
            return (_rebuild_function, (marshal.dumps(obj.__code__), obj.__module__, obj.__name__,
                                        obj.__qualname__, obj.__defaults__, obj.__kwdefaults__, tuple(cells)))
        return NotImplemented


_JOB_PICKLE = types.SimpleNamespace(Pickler=_JobPickler, Unpickler=pickle.Unpickler, load=pickle.load,
                                    dump=pickle.dump, __name__="study.train._JOB_PICKLE")


def write_job(path, *, model: nn.Module, train_loader, val_loader, cfg: TrainConfig, out, seed: int,
              world: int, loss_fn: LossFn | None = None, desc: str = "train") -> Path:
    """Write one training as a job file for :func:`launch_job` / :func:`run_job`.

    Args:
        path: the job file to write (``*.pt``).
        model: the initial model (every rank starts from these weights; DDP also broadcasts
            rank 0's at start).
        train_loader: the loader every rank iterates; rank ``r`` of ``world`` keeps every
            ``world``-th batch (:func:`study.data.batch_stream`), so its batch size must be
            the global batch divided by ``world``.
        val_loader: evaluated by rank 0 (during training per ``cfg.eval_every`` and at the
            end), or None.
        cfg: the training settings (global-batch semantics; see :func:`run_job`).
        out: where rank 0 writes the result (atomically): a dict ``state_dict``, ``scores``
            (:func:`evaluate` on ``val_loader``, {} without one) and ``history`` (``loss``,
            ``evals``, ``seconds``, ``ddp``), the record of
            :func:`study.sections.common.train_cached`.
        seed: seed of every rank (:func:`seed_everything`).
        world: total number of processes the job must have (checked on every rank).
        loss_fn: as for :func:`train` (closures allowed, see :class:`_JobPickler`).
        desc: label of the training's log line.

    Returns:
        ``Path(path)``.

    Raises:
        pickle.PicklingError: something in the job cannot travel (e.g. a function defined
            in a notebook).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {"model": model, "train_loader": train_loader, "val_loader": val_loader, "cfg": cfg, "out": str(out),
            "seed": int(seed), "world": int(world), "loss_fn": loss_fn, "desc": desc,
            "python": list(sys.version_info[:3])}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        torch.save(spec, tmp, pickle_module=_JOB_PICKLE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def torchrun_command(job, nproc: int = 1, nnodes: int = 1, rdzv_endpoint: str = "", rdzv_id: str = "") -> list[str]:
    """The ``torchrun`` command line of ``job`` (a :func:`write_job` file).

    One node: ``--standalone`` (a free local port). Several nodes (``nnodes > 1``): c10d
    rendezvous at ``rdzv_endpoint`` (``host:port``) with id ``rdzv_id``; every node must run
    the same command (the job file on a shared file system).

    Raises:
        ValueError: ``nproc`` / ``nnodes`` < 1, or ``nnodes > 1`` without ``rdzv_endpoint``.
    """
    if int(nproc) < 1 or int(nnodes) < 1:
        raise ValueError(f"nproc and nnodes must be >= 1, got {nproc}, {nnodes}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(int(nproc))]
    if int(nnodes) > 1 or rdzv_endpoint:
        if not rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port of the rendezvous)")
        cmd += ["--nnodes", str(int(nnodes)), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
                "--rdzv-id", rdzv_id or Path(job).stem]
    else:
        cmd += ["--standalone", "--nnodes", "1"]
    return cmd + ["-m", "study.train", "job", str(job)]


def launch_job(job, nproc: int = 1, nnodes: int = 1, rdzv_endpoint: str = "", rdzv_id: str = "",
               timeout: float | None = None) -> dict:
    """Run ``job`` with ``torchrun`` (:func:`torchrun_command`), wait, return rank 0's result.

    The ranks inherit this process's environment with the repository root put first on
    ``PYTHONPATH`` (they import this same ``study``), and ``OMP_NUM_THREADS`` set to
    ``max(1, cores // nproc)`` unless already set. Rank 0's summary line is printed.

    Returns:
        the result dict :func:`run_job` wrote to the job's ``out``.

    Raises:
        RuntimeError: ``torchrun`` failed (the message holds the end of its output), or it
            succeeded without writing ``out``.
    """
    spec_out = None
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, int(nproc)))))
    cmd = torchrun_command(job, nproc, nnodes, rdzv_endpoint, rdzv_id)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    for ln in lines:
        if not ln.startswith("job-output: "):
            print(ln, flush=True)
    if r.returncode != 0:
        tail = (r.stdout[-2000:] + "\n" + r.stderr[-4000:]).strip()
        raise RuntimeError(f"torchrun job {job} failed (exit {r.returncode}): {' '.join(cmd)}\n{tail}")
    for ln in lines:
        if ln.startswith("job-output: "):
            spec_out = ln.split(": ", 1)[1]
    if not spec_out or not Path(spec_out).exists():
        raise RuntimeError(f"torchrun job {job} exited 0 but wrote no result ({spec_out!r})\n{r.stderr[-2000:]}")
    return torch.load(spec_out, map_location="cpu", weights_only=True)


def _modules_to(obj, device, seen: set) -> None:
    """Move every ``nn.Module`` reachable through ``obj``'s closure cells to ``device`` (in place)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        obj.to(device)
    elif isinstance(obj, types.FunctionType):
        for c in obj.__closure__ or ():
            try:
                _modules_to(c.cell_contents, device, seen)
            except ValueError:
                pass


def _weights_digest(model: nn.Module) -> str:
    """SHA-256 (16 hex chars) of every tensor of ``model.state_dict()`` (names, values)."""
    h = hashlib.sha256()
    for k, t in model.state_dict().items():
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_job(path) -> None:  # pragma: no cover - runs on torchrun's ranks (tests/test_ddp.py)
    """One rank of a job: train under DDP with :func:`train`, check, write the result on rank 0.

    Backend: NCCL on GPUs (rank ``LOCAL_RANK`` on ``cuda:LOCAL_RANK``), gloo on CPUs. Global
    batch semantics: the loader in the job has batch size ``global / world`` and every rank
    keeps every ``world``-th batch, so one optimizer step sees the profile's global batch
    and the profile's learning rate applies unchanged; DDP averages the gradients. OHEM's
    ``ohem_min_kept`` (a count of pixels of the global batch) is divided by ``world`` (the
    job's :class:`TrainConfig` object, so a loss function holding the same object sees it
    too). BatchNorm statistics are per rank (no SyncBatchNorm), as in plain DDP.

    At the end every rank's parameters are gathered and BatchNorm buffers are broadcast
    from rank 0 (what DDP does at every forward): ``history["ddp"]`` holds ``world``,
    ``backend``, ``max_abs_diff`` (largest difference of any parameter between rank 0 and
    another rank, before that broadcast) and ``rank_digests`` (SHA-256 of each rank's
    ``state_dict`` after it); rank 0 writes the result to the job's ``out`` (atomically)
    and prints ``job-output: <path>``.

    Raises:
        RuntimeError: the job was written for another number of processes.
    """
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend)
    try:
        rank, world = _dist_info()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        try:
            spec = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise RuntimeError(f"rank {rank}: cannot load job {path} ({exc!r}); every node must run the same "
                               f"Python and package versions (this is Python {sys.version.split()[0]})") from exc
        if int(spec["world"]) != world:
            raise RuntimeError(f"job {path} was written for {spec['world']} processes, torchrun started {world}")
        seed_everything(int(spec["seed"]))
        model = spec["model"].to(device)
        loss_fn = spec["loss_fn"]
        if loss_fn is not None:
            _modules_to(loss_fn, device, set())
        cfg = spec["cfg"]
        cfg.ohem_min_kept = max(1, int(cfg.ohem_min_kept) // world)
        desc = f"{spec['desc']} [{world} processes, {backend}]"
        hist = train(model, spec["train_loader"], spec["val_loader"], cfg, loss_fn=loss_fn, progress=False, desc=desc)
        params = torch.cat([q.detach().double().flatten() for q in model.parameters()])
        gathered = [torch.empty_like(params) for _ in range(world)]
        dist.all_gather(gathered, params)
        # BatchNorm running statistics are per rank; DDP (broadcast_buffers) makes rank 0's the
        # model's at every forward: do the same once more, so every rank holds the saved model
        for b in model.buffers():
            dist.broadcast(b, 0)
        digests = [None] * world
        dist.all_gather_object(digests, _weights_digest(model))
        if rank == 0:
            max_diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
            va = spec["val_loader"]
            scores = evaluate(model, va, progress=False) if va is not None else {}
            rec = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "scores": scores,
                   "history": {"loss": hist["loss"], "evals": hist["evals"], "seconds": hist["seconds"],
                               "ddp": {"world": world, "backend": backend, "rank_digests": digests,
                                       "max_abs_diff": max_diff}}}
            atomic_torch_save(rec, spec["out"])
            last_eval = f", val mIoU {scores['miou']:.4f}" if scores else ""
            print(f"{desc}: {cfg.steps} steps in {hist['seconds']:.0f} s, final loss "
                  f"{np.mean(hist['loss'][-10:]):.3f}{last_eval}", flush=True)
            print(f"job-output: {spec['out']}", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ddp_main() -> None:  # pragma: no cover - exercised through torchrun in tests
    """``torchrun --nproc_per_node 2 -m study.train OUT``: train a tiny model under DDP (gloo)
    on synthetic data and write each rank's flattened weights to ``OUT/rank<r>.pt``."""
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, _ = _dist_info()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, NUM_CLASSES, 1))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, NUM_CLASSES, (2, 16, 16), generator=g))
            for _ in range(4)]
    train(model, data, None, TrainConfig(steps=6, lr=1e-2, loss="ce"), progress=False)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    out = Path(sys.argv[1])
    torch.save(flat, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) == 3 and sys.argv[1] == "job":
        run_job(sys.argv[2])
    else:
        _ddp_main()
