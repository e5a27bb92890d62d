"""Quantization for deployment: ONNX export, fp16, INT8 post-training quantization, TensorRT.

The study question of this module is *which precision, on which runtime, earns speed on an
edge device without losing accuracy* - measured, not assumed. It provides:

- :func:`export_onnx` / :func:`verify_onnx`: a checked, simplified ONNX export of any
  segmentation ``nn.Module`` (zoo models and physically pruned ones), compared with torch
  on real images.
- :func:`convert_fp16` (ONNX Runtime's ``float16`` converter, fp32 I/O kept) and
  :func:`torch_lowp` (torch ``half`` / ``bfloat16`` on CPU).
- :func:`quantize_int8` (static post-training quantization with ONNX Runtime's
  ``quantize_static``: affine INT8, Jacob et al. 2018, "Quantization and Training of Neural
  Networks for Efficient Integer-Arithmetic-Only Inference") and
  :func:`quantize_dynamic_int8` (dynamic quantization baseline).
- The INT8 recipes of issue #15 (:class:`Int8Recipe`, :data:`INT8_RECIPES`,
  :func:`quantize_recipe`): every ORT-documented way to build the graph -
  ``quant_pre_process`` or not, ORT's extended fusions or the transformer optimizer first
  (:func:`prepare_graph`), QDQ / QOperator, U8S8 / S8S8, per-channel / per-tensor, only
  Conv/MatMul/Gemm (``op_types_to_quantize``), SiLU / Softmax / LayerNorm kept float by op
  type (:func:`float_nodes` -> ``nodes_to_exclude``); ONE calibration set for all of them
  (:func:`calibration_set`).
- Selective quantization: :func:`node_sensitivity` (quantize one op-type group at a time,
  or exclude one, and measure output error / mIoU change) and
  :func:`select_nodes_to_exclude` (by accuracy only, deterministic).
- Where the time goes: :func:`profile_ops` (ORT profiler, time per node),
  :func:`op_time_by_type`, :func:`op_time_categories` (Conv/MatMul/Gemm float or int8,
  Q/DQ, layout, other), :func:`amdahl_bound`; :func:`kernel_counts` (which kernels the
  ORT-optimised graph really runs, and the Q / DQ / Transpose nodes left over).
- Stale-vs-fresh calibration of pruned models (source 001's warning):
  :func:`calibration_table`, :func:`stale_calibration_table`.
- :func:`build_tensorrt_engine`: TensorRT fp16 / INT8 engines (INT8 with an entropy
  calibrator over the same images) where ``tensorrt`` and a CUDA device exist; elsewhere it
  raises :class:`QuantUnavailable`. (:func:`study.device_runner.load_trt_engine` is the
  device runner's own self-contained builder: in memory, for timing, no calibrator.)
- :func:`onnx_scores` / :func:`scores_from_logits`: mIoU / mDice of an ONNX model or of
  logits on image / mask arrays.

Example (a screen's worth)::

    from study import quant
    fp32 = quant.export_onnx(model, "m.onnx", (96, 96))              # checked, simplified
    quant.verify_onnx(model, fp32, val_x)                             # {"max_abs_diff": ...}
    table = quant.calibration_table(fp32, calib_x, "m.calib.json")    # calibrate once
    int8 = quant.quantize_int8(fp32, "m.int8.onnx", calibration_cache=table)
    fast = quant.quantize_recipe(fp32, "m.mac.onnx", "qdq_mac_only", calib_x)   # one INT8 recipe
    sens = quant.node_sensitivity(fp32, calib_x, val_x, val_masks=val_y)
    exclude, decisions = quant.select_nodes_to_exclude(sens)                  # by accuracy only
    sel = quant.quantize_int8(fp32, "m.sel.onnx", calibration_cache=table, nodes_to_exclude=exclude)
    quant.onnx_scores(sel, val_x, val_y)                              # {"miou": ..., "mdice": ...}
    quant.kernel_counts(sel)["int8_nodes"]                            # what ORT really runs

Affine quantization maps a real tensor ``x`` to ``x_q = clamp(round(x / s) + z, q_min, q_max)``
with scale ``s`` and zero point ``z`` chosen from the calibration range of ``x``; the
dequantized value is ``s * (x_q - z)``. QDQ format (ORT docs, "Quantize ONNX models") inserts
``QuantizeLinear``/``DequantizeLinear`` pairs that ORT's graph optimiser fuses into integer
kernels (``QLinearConv``, ``QLinearMatMul``, ...) where a kernel exists; QOperator format
writes the integer operators directly.

All ONNX Runtime sessions here come from :func:`study.bench.ort_session` with a fixed
number of intra-op threads (``threads``, default :data:`DEFAULT_THREADS` = 2) and one
inter-op thread. Nothing here times a model: every latency of the study comes from its one
protocol, :func:`study.bench.compare_latency` (fresh process per model, interleaved rounds).
Nothing here takes a study context: the notebook's data and cache live in
:mod:`study.sections.quantization`.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
import pandas as pd
import torch
from onnxruntime import quantization as ortq
from onnxruntime.quantization.calibrate import (TensorsData, create_calibrator, load_tensors_data,
                                                save_tensors_data)
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from .bench import ort_session
from .cache import atomic_write_bytes
from .metrics import segmentation_scores

#: Input / output names of every exported model.
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: Default ORT intra-op threads (profile-independent so timings stay comparable).
DEFAULT_THREADS = 2


class QuantUnavailable(RuntimeError):
    """A runtime or device the requested path needs is absent (e.g. TensorRT, CUDA)."""


class ExportError(RuntimeError):
    """Both ONNX exporters failed, or the exported graph does not pass ``onnx.checker``."""


# --------------------------------------------------------------------------------------
# Export and verification
# --------------------------------------------------------------------------------------

class _LogitsOnly(torch.nn.Module):
    """Wrap a segmenter so that it returns one tensor (the logits), whatever it returns."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return _as_logits(self.model(x))


def _as_logits(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        for k in ("out", "logits", "seg"):
            if k in out:
                return out[k]
        return next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor, tuple or dict of logits")


def _hw(input_hw) -> tuple[int, int]:
    if isinstance(input_hw, int):
        return int(input_hw), int(input_hw)
    try:
        h, w = (int(v) for v in input_hw)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"input_hw must be an int or (H, W); got {input_hw!r}") from exc
    if h <= 0 or w <= 0:
        raise ValueError(f"input_hw must be positive; got {input_hw!r}")
    return h, w


def _existing(path: str | os.PathLike, what: str = "ONNX model") -> Path:
    """``Path(path)``; raises FileNotFoundError naming ``what`` and the path if it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, input_hw, opset: int = 17,
                simplify: bool = True, dynamic_batch: bool = False) -> Path:
    """Export a segmentation model to a checked, simplified ONNX file.

    The model is exported in eval mode (its training flag is restored afterwards) from a
    fixed float32 input of shape ``(1, 3, H, W)`` named ``image``; the output ``logits`` is
    ``(1, C, H', W')`` float32 (tuple / dict outputs are reduced to their first / ``out``
    entry). The legacy TorchScript exporter (``dynamo=False``) is tried first; if it fails
    (it refuses e.g. ``adaptive_avg_pool2d`` whose output size does not divide the input,
    as in PSP bins 3 and 6 on an 8x8 map) the dynamo exporter is used. The graph is then
    simplified with onnxslim, checked with ``onnx.checker.check_model`` and written
    atomically (temp file in the same folder, then rename). The exporter used is stored in
    the model's ``metadata_props`` (key ``exporter``).

    Works for ordinary ``nn.Module`` instances, including physically pruned models.

    Args:
        model: the segmenter; any device (exported on its device).
        path: output ``.onnx`` file; parent folders are created.
        input_hw: int or ``(H, W)`` of the example input, pixels.
        opset: ONNX opset (default 17: LayerNormalization is native).
        simplify: run onnxslim (constant folding, shape simplification, fusion).
        dynamic_batch: make the batch dimension symbolic (``batch``).

    Returns:
        ``Path`` of the written file.

    Raises:
        ValueError: bad ``input_hw``.
        ExportError: both exporters failed (the message holds both errors) or the checked
            graph is invalid.
    """
    h, w = _hw(input_hw)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    wrapped = _LogitsOnly(model).eval()
    x = torch.randn(1, 3, h, w, device=_model_device(model))
    dyn = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    errors = []
    proto = None
    exporter = ""
    with tempfile.TemporaryDirectory(prefix="onnx_export_", dir=path.parent) as tmpd, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp = Path(tmpd) / "model.onnx"
        try:
            with torch.no_grad():
                torch.onnx.export(wrapped, (x,), str(tmp), opset_version=opset, dynamo=False,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes=dyn, do_constant_folding=True)
            proto = onnx.load(str(tmp))
            exporter = "torchscript"
        except Exception as exc:  # noqa: BLE001 - reported if the fallback fails too
            errors.append(f"legacy exporter: {type(exc).__name__}: {str(exc)[:500]}")
        if proto is None:
            try:
                dshapes = ({"x": {0: torch.export.Dim("batch", min=1, max=64)}},) if dynamic_batch else None
                # the dynamo exporter emits opset >= 18 natively; asking it for less runs a
                # version converter that fails on Reduce* axes inputs, so use max(opset, 18).
                with torch.no_grad():
                    prog = torch.onnx.export(wrapped, (x,), dynamo=True, opset_version=max(opset, 18),
                                             input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                             dynamic_shapes=dshapes[0] if dshapes else None,
                                             optimize=True, verbose=False)
                prog.save(str(tmp))
                proto = onnx.load(str(tmp))
                exporter = "dynamo"
            except Exception as exc:  # noqa: BLE001
                errors.append(f"dynamo exporter: {type(exc).__name__}: {str(exc)[:500]}")
    model.train(was_training)
    if proto is None:
        raise ExportError(f"could not export {type(model).__name__} to {path}:\n" + "\n".join(errors))
    if simplify:
        import onnxslim  # in-function: ~1 s to import, needed only when simplifying
        try:
            proto = onnxslim.slim(proto)
        except Exception as exc:  # noqa: BLE001 - keep the unsimplified (valid) graph
            print(f"export_onnx: onnxslim failed on {path.name} ({exc!r}); keeping the unsimplified graph")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"exported graph for {path} fails onnx.checker: {exc}") from exc
    meta = {p.key: p for p in proto.metadata_props}
    for k, v in (("exporter", exporter), ("input_hw", f"{h}x{w}"), ("source_class", type(model).__name__)):
        if k in meta:
            meta[k].value = v
        else:
            proto.metadata_props.add(key=k, value=v)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def _check_images(images, what: str = "images") -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"{what} must be float32 (N, 3, H, W); got shape {arr.shape}")
    if len(arr) == 0:
        raise ValueError(f"{what} is empty")
    return np.ascontiguousarray(arr, dtype=np.float32)


def ort_predict(model_or_session, images, threads: int = DEFAULT_THREADS) -> np.ndarray:
    """Run an ONNX model on images, one image at a time when the batch dimension is fixed.

    Args:
        model_or_session: ``.onnx`` path or an ``InferenceSession``.
        images: float32 ``(N, 3, H, W)`` (numpy or torch), ImageNet-normalised.
        threads: intra-op threads when a path is given.

    Returns:
        float32 logits ``(N, C, H', W')``.
    """
    sess = model_or_session if hasattr(model_or_session, "run") else ort_session(model_or_session, threads)
    arr = _check_images(images)
    inp = sess.get_inputs()[0]
    fixed = isinstance(inp.shape[0], int) and inp.shape[0] == 1
    if fixed:
        outs = [sess.run(None, {inp.name: arr[i:i + 1]})[0] for i in range(len(arr))]
        return np.concatenate(outs).astype(np.float32, copy=False)
    return sess.run(None, {inp.name: arr})[0].astype(np.float32, copy=False)


@torch.no_grad()
def torch_predict(model: torch.nn.Module, images, batch: int = 8, dtype: torch.dtype | None = None) -> np.ndarray:
    """Logits of a torch segmenter, float32 ``(N, C, H, W)``; ``dtype`` casts the inputs (half / bf16)."""
    arr = _check_images(images)
    model.eval()
    dev = _model_device(model)
    outs = []
    for i in range(0, len(arr), batch):
        x = torch.from_numpy(arr[i:i + batch]).to(dev)
        if dtype is not None:
            x = x.to(dtype)
        outs.append(_as_logits(model(x)).float().cpu().numpy())
    return np.concatenate(outs)


def verify_onnx(model: torch.nn.Module, path: str | os.PathLike, images, threads: int = DEFAULT_THREADS) -> dict:
    """Compare an exported ONNX model with its torch model on real images.

    Args:
        model: the torch segmenter that was exported.
        path: its ``.onnx`` file.
        images: float32 ``(N, 3, H, W)`` (ImageNet-normalised), the export's H, W.
        threads: ORT intra-op threads.

    Returns:
        dict with ``max_abs_diff`` and ``mean_abs_diff`` (logit units), ``argmax_agreement``
        (fraction of pixels whose arg-max class agrees, in [0, 1]) and ``n_images``.

    Raises:
        ValueError: images of the wrong shape.
        FileNotFoundError: no such ONNX file.
    """
    arr = _check_images(images)
    ref = torch_predict(model, arr)
    got = ort_predict(path, arr, threads=threads)
    if ref.shape != got.shape:
        raise ValueError(f"torch output {ref.shape} and ONNX output {got.shape} of {path} differ in shape")
    diff = np.abs(ref - got)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "argmax_agreement": float((ref.argmax(1) == got.argmax(1)).mean()), "n_images": int(len(arr))}


def model_size_mb(path: str | os.PathLike) -> float:
    """Size of a model file in MB (10^6 bytes).

    Raises:
        FileNotFoundError: no such file.
    """
    path = _existing(path, "model file")
    return path.stat().st_size / 1e6


# --------------------------------------------------------------------------------------
# fp16 / bf16
# --------------------------------------------------------------------------------------

def convert_fp16(fp32_path: str | os.PathLike, out_path: str | os.PathLike, keep_io_types: bool = True,
                 op_block_list: Sequence[str] | None = None) -> Path:
    """Convert an fp32 ONNX model to fp16 weights and activations (ORT ``float16`` converter).

    Uses ``onnxruntime.transformers.float16.convert_float_to_float16``; with
    ``keep_io_types=True`` the graph input ``image`` and output ``logits`` stay float32 (Cast
    nodes are inserted), so callers feed and read float32 as for the fp32 model. Whether it
    is faster depends on the execution provider: ORT's CPU provider has few fp16 kernels
    (it inserts Casts back to float32 around the rest), GPUs (source 000's Jetson) have
    native fp16 arithmetic.

    Args:
        fp32_path: float32 ``.onnx`` file.
        out_path: output ``.onnx`` file (written atomically).
        keep_io_types: keep float32 graph inputs / outputs.
        op_block_list: op types left in float32 (default: the converter's own list).

    Returns:
        ``Path`` of the fp16 model.

    Raises:
        FileNotFoundError: ``fp32_path`` does not exist.
    """
    fp32_path = _existing(fp32_path, "fp32 ONNX model")
    proto = onnx.load(str(fp32_path))
    blocks = list(op_block_list) if op_block_list is not None else list(DEFAULT_OP_BLOCK_LIST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(proto, keep_io_types=keep_io_types, op_block_list=blocks)
    atomic_write_bytes(out_path, half.SerializeToString())
    return Path(out_path)


class _LowPrecision(torch.nn.Module):
    """Run ``model`` in ``dtype``: cast the float32 input in and the logits back to float32."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x):
        return _as_logits(self.model(x.to(self.dtype))).float()


def torch_lowp(model: torch.nn.Module, dtype: torch.dtype, input_hw=64) -> tuple[torch.nn.Module | None, str]:
    """A copy of ``model`` running in ``torch.half`` or ``torch.bfloat16`` on CPU, if torch can.

    The copy takes float32 ``(N, 3, H, W)`` inputs and returns float32 logits, so it drops
    into the same evaluation and benchmark code as the fp32 model.

    Args:
        model: the fp32 segmenter (not modified).
        dtype: ``torch.float16`` or ``torch.bfloat16``.
        input_hw: size of the probe forward pass used to check kernel support, px.

    Returns:
        ``(wrapped_model, "")`` when a forward pass works, else ``(None, reason)`` with the
        error torch raised (e.g. a missing CPU half kernel).
    """
    h, w = _hw(input_hw)
    m = copy.deepcopy(model).cpu().eval().to(dtype)
    wrapped = _LowPrecision(m, dtype).eval()
    try:
        with torch.no_grad():
            out = wrapped(torch.randn(1, 3, h, w))
        if not torch.isfinite(out).all():
            return None, f"{dtype} forward produced non-finite logits"
    except Exception as exc:  # noqa: BLE001 - reported to the caller
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"
    return wrapped, ""


# --------------------------------------------------------------------------------------
# INT8 post-training quantization (ONNX Runtime)
# --------------------------------------------------------------------------------------

class _quiet_root_logger:
    """Silence the root-logger WARNINGs ORT's quantizer prints per tensor (e.g. LayerNorm
    per-channel axis) and the lines its histogram calibrator prints to stdout per pass
    ("Collecting tensor data and making histogram ...": one per image at 512 px)."""

    def __enter__(self):
        import contextlib
        import io

        self._prev = logging.root.manager.disable
        logging.disable(logging.WARNING)
        self._out = contextlib.redirect_stdout(io.StringIO())
        self._out.__enter__()

    def __exit__(self, *exc):
        self._out.__exit__(*exc)
        logging.disable(self._prev)


def calibration_set(images, n: int | None = None, input_hw=None) -> np.ndarray:
    """THE calibration set of every INT8 path of the study: the first ``n`` of ``images``.

    Static INT8 needs activation ranges measured on inputs like the deployed ones (ORT docs,
    "Quantize ONNX Models", *Static Quantization*: "runs the model using a set of inputs
    called calibration data"). The study's rule: clean images (resized to the export size,
    ImageNet-normalised, no augmentation) from the TRAIN split - never the evaluation split
    -, the first ``n`` in the split's sorted file order, so every run and every quantizer
    (static INT8 of every recipe, calibration tables, TensorRT INT8) sees the same images.
    The lab bench's loader is :func:`study.sections.quantization.calibration_images`.

    Args:
        images: float32 ``(N, 3, H, W)`` (numpy or torch; a single ``(3, H, W)`` image is
            promoted), ImageNet-normalised.
        n: how many (default all); must be >= 1. Fewer available images is an error, not a
            silent shrink, so a table row's ``calib_images`` is what was used.
        input_hw: ``(H, W)`` (or int) of the model's fixed input; checked when given.

    Returns:
        float32 C-contiguous ``(n, 3, H, W)`` copy (the caller's array is never aliased).

    Raises:
        ValueError: wrong shape, empty, ``n < 1``, ``n`` larger than the images available,
            or images whose size is not ``input_hw``.
    """
    arr = _check_images(images, "calibration images")
    if n is not None:
        n = int(n)
        if n < 1:
            raise ValueError(f"calibration_set: n must be >= 1; got {n}")
        if n > len(arr):
            raise ValueError(f"calibration_set: {n} calibration images requested, {len(arr)} given")
        arr = arr[:n]
    if input_hw is not None and tuple(arr.shape[-2:]) != _hw(input_hw):
        raise ValueError(f"calibration images are {arr.shape[-2]}x{arr.shape[-1]} px; the model takes "
                         f"{_hw(input_hw)[0]}x{_hw(input_hw)[1]} (calibrate at the export size)")
    return np.array(arr, dtype=np.float32, order="C", copy=True)


def calibration_fingerprint(images) -> str:
    """12 hex digits of SHA-1 over the calibration images' shape and float32 bytes (names
    cached calibration tables, so a table is never reused for other images)."""
    import hashlib  # in-function: only for table names
    arr = _check_images(images, "calibration images")
    h = hashlib.sha1(str(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()[:12]


class ImageCalibrationReader(ortq.CalibrationDataReader):
    """ORT ``CalibrationDataReader`` over float32 images, fed one image (batch 1) at a time.

    ``get_next()`` returns ``{input_name: images[i:i+1]}`` (float32 ``(1, 3, H, W)``) for
    ``i`` in ``[start, end)`` and then ``None``; ``rewind()`` starts again; ``set_range``
    restricts the images (ORT's batched calibration uses it).

    Args:
        images: float32 ``(N, 3, H, W)`` (numpy or torch), ImageNet-normalised like the
            model's input.
        input_name: the model's input name (default ``image``).

    Raises:
        ValueError: wrong shape or empty.
    """

    def __init__(self, images, input_name: str = INPUT_NAME):
        self.images = _check_images(images, "calib_images")
        self.input_name = input_name
        self.start, self.end = 0, len(self.images)
        self._it = None

    def __len__(self):
        return len(self.images)

    def set_range(self, start_index: int, end_index: int):
        self.start, self.end = start_index, end_index
        self._it = None

    def get_next(self):
        if self._it is None:
            self._it = iter(range(self.start, min(self.end, len(self.images))))
        i = next(self._it, None)
        if i is None:
            return None
        return {self.input_name: self.images[i:i + 1]}

    def rewind(self):
        self._it = None


def calibration_reader(images, input_name: str = INPUT_NAME):
    """An ORT ``CalibrationDataReader`` yielding ``{input_name: images[i:i+1]}`` for each image.

    Args:
        images: float32 ``(N, 3, H, W)`` (numpy or torch).

    Raises:
        ValueError: wrong shape or empty.
    """
    return ImageCalibrationReader(images, input_name)


_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile", "distribution": "Distribution"}
_QTYPES = {"u8": "QUInt8", "s8": "QInt8", "uint8": "QUInt8", "int8": "QInt8"}


def _calib_method(method):
    if isinstance(method, ortq.CalibrationMethod):
        return method
    key = str(method).lower()
    if key not in _METHODS:
        raise ValueError(f"calibration method must be one of {list(_METHODS)}; got {method!r}")
    return getattr(ortq.CalibrationMethod, _METHODS[key])


def _quant_format(fmt):
    if isinstance(fmt, ortq.QuantFormat):
        return fmt
    key = str(fmt).lower()
    if key not in ("qdq", "qoperator"):
        raise ValueError(f"quant_format must be 'qdq' or 'qoperator' (or a QuantFormat); got {fmt!r}")
    return ortq.QuantFormat.QDQ if key == "qdq" else ortq.QuantFormat.QOperator


def _qtype(t):
    if isinstance(t, ortq.QuantType):
        return t
    key = str(t).lower()
    if key not in _QTYPES:
        raise ValueError(f"quantization type must be one of {list(_QTYPES)}; got {t!r}")
    return getattr(ortq.QuantType, _QTYPES[key])


def preprocess_onnx(fp32_path: str | os.PathLike, out_path: str | os.PathLike | None = None) -> Path:
    """Run ORT's ``quant_pre_process`` (shape inference + basic graph optimisation) once.

    The result is ``<stem>.pre.onnx`` beside the input unless ``out_path`` is given; it is
    reused while it is newer than the input. Quantization, calibration tables, node names
    for exclusion and sensitivity all refer to this pre-processed graph.

    Raises:
        FileNotFoundError: ``fp32_path`` does not exist.
    """
    fp32_path = _existing(fp32_path, "fp32 ONNX model")
    out = Path(out_path) if out_path else fp32_path.with_name(fp32_path.stem + ".pre.onnx")
    if out.is_file() and out.stat().st_mtime >= fp32_path.stat().st_mtime:
        return out
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".onnx", dir=out.parent)
    os.close(fd)
    try:
        try:
            quant_pre_process(str(fp32_path), tmp)
        except Exception:  # noqa: BLE001 - symbolic shape inference fails on some graphs
            quant_pre_process(str(fp32_path), tmp, skip_symbolic_shape=True)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


#: Graph preparations before ``quantize_static`` (:func:`prepare_graph`).
GRAPH_PREPS = ("quant_pre_process", "none", "ort_extended", "transformer_optimizer")


def _ort_optimized(src: Path, out: Path, level) -> Path:
    import onnxruntime as ort  # in-function: the GraphOptimizationLevel enum only
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".onnx", dir=out.parent)
    os.close(fd)
    try:
        ort_session(src, threads=1, optimized_model_path=tmp, session_options=so)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def prepare_graph(fp32_path: str | os.PathLike, how: str = "quant_pre_process") -> Path:
    """The float32 graph that ``quantize_static`` is given, prepared one of :data:`GRAPH_PREPS` ways.

    - ``"quant_pre_process"`` (the study's default; :func:`preprocess_onnx`): ORT's
      ``onnxruntime.quantization.shape_inference.quant_pre_process`` - symbolic shape
      inference, ORT *basic* graph optimisation (constant folding, Conv+BN fusion,
      redundancy elimination) and ONNX shape inference. ORT docs, "Quantize ONNX Models",
      *Pre-processing*: "Our quantization tool works best when the tensor's shape is known"
      and "it is best to perform model optimization during pre-processing".
    - ``"none"``: the exported graph as it is (the control: what pre-processing buys;
      ``quantize_static`` still runs ONNX shape inference on it).
    - ``"ort_extended"``: ``quant_pre_process``, then ORT's *extended* graph optimisations
      saved offline (``SessionOptions.optimized_model_filepath``, ORT_ENABLE_EXTENDED; ORT
      docs, "Graph Optimizations in ONNX Runtime"): SiLU's Sigmoid + Mul become one
      ``QuickGelu``, Conv + Relu ``FusedConv``, LayerNorm / SkipLayerNorm / FusedMatMul
      contrib ops - all of which the quantizer leaves in float (they are not in its registry),
      so they run fused, with Q/DQ only at the quantized Conv / MatMul / Gemm around them.
    - ``"transformer_optimizer"``: ``quant_pre_process``, then ORT's Transformer Model
      Optimization Tool (``onnxruntime.transformers.optimizer.optimize_model``,
      ``model_type="vit"``, python fusions only, ``opt_level=0``). ORT docs, "Quantize ONNX
      Models", *Transformer-based models*: optimise with this tool "before quantizing the
      model" to get e.g. QAttention. (On the MobileViT student it fuses SkipLayerNorm; its
      unfold/fold attention matches none of the tool's attention patterns.)

    The prepared graph is written beside the input (``<stem>.pre.onnx``, ``<stem>.ortext.onnx``,
    ``<stem>.trf.onnx``) and reused while it is newer than the input.

    Returns:
        ``Path`` of the prepared float32 graph (``fp32_path`` itself for ``"none"``).

    Raises:
        FileNotFoundError: ``fp32_path`` does not exist.
        ValueError: ``how`` is not one of :data:`GRAPH_PREPS`.
    """
    if how not in GRAPH_PREPS:
        raise ValueError(f"prepare_graph: how must be one of {GRAPH_PREPS}; got {how!r}")
    fp32_path = _existing(fp32_path, "fp32 ONNX model")
    if how == "none":
        return fp32_path
    pre = preprocess_onnx(fp32_path)
    if how == "quant_pre_process":
        return pre
    suffix = {"ort_extended": ".ortext.onnx", "transformer_optimizer": ".trf.onnx"}[how]
    out = fp32_path.with_name(fp32_path.stem + suffix)
    if out.is_file() and out.stat().st_mtime >= pre.stat().st_mtime:
        return out
    if how == "ort_extended":
        import onnxruntime as ort  # in-function: the enum only
        return _ort_optimized(pre, out, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    from onnxruntime.transformers.optimizer import optimize_model  # in-function: ~1 s import, this prep only
    with warnings.catch_warnings(), _quiet_root_logger():
        warnings.simplefilter("ignore")
        opt = optimize_model(str(pre), model_type="vit", num_heads=0, hidden_size=0, opt_level=0)
    atomic_write_bytes(out, opt.model.SerializeToString())
    return out


#: Pseudo op types understood by :func:`float_nodes` (pattern -> what it names).
FLOAT_PATTERNS = {"SiLU": "Sigmoid(x) and the Mul(x, Sigmoid(x)) it feeds (nn.SiLU exported)",
                  "LayerNorm": "LayerNormalization and SkipLayerNormalization",
                  "ActMatMul": "MatMul whose inputs are both activations (attention q@k^T, attn@v)"}


def float_nodes(graph_path: str | os.PathLike, op_types: Sequence[str]) -> list[str]:
    """Names of the nodes of a graph that are kept in float32 by op type (deterministic).

    The choice depends on the graph only - never on a timing - so two runs exclude the same
    nodes. Besides plain op types (``"Softmax"``, ``"Mul"`` ...) it understands the patterns
    of :data:`FLOAT_PATTERNS`: ``"SiLU"`` (the Sigmoid and the Mul of ``x * sigmoid(x)``,
    not other Muls) and ``"LayerNorm"``. Excluded nodes get no QuantizeLinear /
    DequantizeLinear pair of their own (``nodes_to_exclude`` of ``quantize_static``, ORT
    docs, "Quantize ONNX Models"); a Q/DQ remains only where a neighbour is quantized.

    Args:
        graph_path: the prepared graph (:func:`prepare_graph`) whose node names
            ``quantize_static`` sees.
        op_types: op types and / or pattern names.

    Returns:
        sorted node names (empty for no ``op_types``).

    Raises:
        FileNotFoundError: no such graph.
    """
    wanted = set(op_types or ())
    if not wanted:
        return []
    g = onnx.load(str(_existing(graph_path, "ONNX graph")), load_external_data=False).graph
    if "LayerNorm" in wanted:
        wanted |= {"LayerNormalization", "SkipLayerNormalization"}
    names = {n.name for n in g.node if n.op_type in wanted and n.name}
    if "ActMatMul" in wanted:
        consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
        names |= {n.name for n in g.node if n.op_type == "MatMul" and n.name and not (set(n.input) & consts)}
    if "SiLU" in wanted:
        consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        for n in g.node:
            if n.op_type != "Sigmoid" or not n.name:
                continue
            muls = [c for c in consumers.get(n.output[0], []) if c.op_type == "Mul" and n.input[0] in c.input]
            if muls:
                names.add(n.name)
                names.update(m.name for m in muls if m.name)
    return sorted(names)


#: Most MB of intermediate tensors a histogram calibrator (Entropy, Percentile,
#: Distribution) is given at once. ORT's ``HistogramCalibrater.collect_data`` keeps every
#: float tensor of every image it reads until the pass ends: a 512 x 512 MobileViT-S +
#: UPerNet graph has 1.3 GB of them per image, so the paper profile's 16-image dry-run
#: calibration held 23 GB and was OOM-killed (issue #17). Larger sets are fed in passes
#: (:func:`calibration_chunk`). A fixed number, not a share of this machine's RAM, so the
#: passes - and the ranges - are the same on every machine.
CALIB_MAX_MB = 2048.0

_HISTOGRAM_METHODS = ("entropy", "percentile", "distribution")


def activation_mb(graph_path: str | os.PathLike) -> float:
    """MB (2**20 bytes) of every float node output of one image, from the graph's shapes.

    Read from ``value_info`` (``quant_pre_process`` writes it; :func:`prepare_graph`):
    float32 counts 4 bytes, float16 2. Outputs without a static shape are counted at the
    mean size of those with one.

    Args:
        graph_path: ``.onnx`` with batch 1.

    Raises:
        FileNotFoundError: no ``graph_path``.
    """
    g = onnx.load(str(_existing(graph_path, "ONNX graph")), load_external_data=False).graph
    info = {v.name: v.type.tensor_type for v in (*g.value_info, *g.output, *g.input)}
    size = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2}
    known, unknown = [], 0
    for out in (o for n in g.node for o in n.output if o):
        t = info.get(out)
        if t is None or not t.HasField("shape") or any(not d.HasField("dim_value") for d in t.shape.dim):
            unknown += 1
        elif t.elem_type in size:
            known.append(float(np.prod([d.dim_value for d in t.shape.dim])) * size[t.elem_type])
    total = sum(known) + (unknown * sum(known) / len(known) if known else 0.0)
    return total / 2**20


def calibration_chunk(graph_path: str | os.PathLike, n_images: int, method: str = "minmax",
                      max_mb: float = CALIB_MAX_MB) -> int:
    """Images per calibrator pass: all ``n_images`` unless a histogram method would hold
    more than ``max_mb`` of intermediate tensors at once.

    MinMax keeps only per-image ReduceMin / ReduceMax scalars (ORT's ``MinMaxCalibrater``),
    so it always takes the whole set in one pass. Entropy, Percentile and Distribution keep
    every float tensor (:func:`activation_mb` per image); they get the largest divisor of
    ``n_images`` whose passes stay within ``max_mb`` (at least 1 image), so every pass has
    the same size. The passes go to one calibrator, whose histogram collector merges them
    (ORT's ``HistogramCollector``: the range widens and old counts are re-binned), so a
    chunked histogram equals ORT's own multi-pass result, not bit-for-bit the one-pass one.

    Args:
        graph_path: the prepared graph the calibrator runs (:func:`prepare_graph`).
        n_images: calibration images (> 0).
        method: calibration method (see :func:`calibration_table`).
        max_mb: memory budget of one pass, MB (> 0).

    Returns:
        the pass size, a divisor of ``n_images``.

    Raises:
        ValueError: ``n_images`` or ``max_mb`` not positive; unknown ``method``.
    """
    _calib_method(method)
    if int(n_images) < 1 or not max_mb > 0:
        raise ValueError(f"calibration_chunk: n_images ({n_images}) and max_mb ({max_mb}) must be positive")
    n = int(n_images)
    if str(method).lower() not in _HISTOGRAM_METHODS:
        return n
    fit = max(1, int(max_mb // max(activation_mb(graph_path), 1e-9)))
    return max(d for d in range(1, min(n, fit) + 1) if n % d == 0)


def calibration_table(fp32_path: str | os.PathLike, calib_images, out_path: str | os.PathLike,
                      method: str = "minmax", activation_symmetric: bool = False,
                      percentile: float = 99.999, graph_prep: str = "quant_pre_process",
                      max_mb: float = CALIB_MAX_MB) -> Path:
    """Calibrate once: run the pre-processed model on ``calib_images`` and store tensor ranges.

    The JSON written is ORT's calibration cache (``save_tensors_data``): tensor name ->
    (min, max) for MinMax, histogram-derived ranges for Entropy / Percentile. Passing it as
    ``calibration_cache`` to :func:`quantize_int8` skips the calibration runs, so many
    quantized variants (sensitivity analysis) share one calibration, and a table computed on
    one model can be applied to another whose tensor names match (stale calibration).

    Args:
        fp32_path: float32 ``.onnx``.
        calib_images: float32 ``(N, 3, H, W)``; N is the calibration size.
        out_path: JSON file (written atomically).
        method: ``minmax``, ``entropy``, ``percentile`` or ``distribution``.
        activation_symmetric: symmetric ranges (needed with signed activations).
        percentile: kept percentile for ``percentile`` calibration.
        graph_prep: the graph the table is computed on (:func:`prepare_graph`); a table
            fits only models quantized from the same prepared graph (tensor names).
        max_mb: memory budget of one calibrator pass, MB; histogram methods read the
            images in passes of :func:`calibration_chunk` images.

    Returns:
        ``Path`` of the JSON table.

    Raises:
        FileNotFoundError: no ``fp32_path``.
        ValueError: bad images, method or ``max_mb``.
    """
    pre = prepare_graph(fp32_path, graph_prep)
    reader = calibration_reader(calibration_set(calib_images))
    step = calibration_chunk(pre, len(reader), method, max_mb)
    opts = {"symmetric": bool(activation_symmetric)}
    if str(method).lower() == "percentile":
        opts["percentile"] = float(percentile)
    with tempfile.TemporaryDirectory(prefix="ort_calib_") as tmpd, _quiet_root_logger():
        cal = create_calibrator(pre, None, augmented_model_path=str(Path(tmpd) / "augmented.onnx"),
                                calibrate_method=_calib_method(method), extra_options=opts)
        for start in range(0, len(reader), step):      # one pass unless a histogram is too big
            reader.set_range(start, start + step)
            cal.collect_data(reader)
        ranges = cal.compute_data()
        del cal
    out = Path(out_path)
    save_tensors_data(ranges, out)
    return out


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calib_images=None,
                  method: str = "minmax", per_channel: bool = True, nodes_to_exclude: Iterable[str] = (),
                  op_types_to_quantize: Sequence[str] | None = None, quant_format="qdq",
                  activation_type: str = "u8", weight_type: str = "s8", activation_symmetric: bool = False,
                  weight_symmetric: bool = True, reduce_range: bool = False, percentile: float = 99.999,
                  calibration_cache: str | os.PathLike | None = None, nodes_to_quantize: Sequence[str] | None = None,
                  extra_options: dict | None = None, graph_prep: str = "quant_pre_process",
                  float_op_types: Sequence[str] = (), max_mb: float = CALIB_MAX_MB) -> Path:
    """Static INT8 post-training quantization with ONNX Runtime's ``quantize_static``.

    Affine quantization (Jacob et al. 2018): ``x_q = clamp(round(x / s) + z)``; activations
    use ranges measured on ``calib_images`` (calibration), weights their own min/max, per
    output channel when ``per_channel``. The graph is prepared first (:func:`prepare_graph`;
    default ``quant_pre_process``, :func:`preprocess_onnx`); the output is written to a temp
    file and renamed (atomic). Calibration images pass through :func:`calibration_set`.

    Args:
        fp32_path: float32 ``.onnx`` (from :func:`export_onnx`).
        out_path: INT8 ``.onnx`` to write.
        calib_images: float32 ``(N, 3, H, W)`` calibration images (ImageNet-normalised).
            Optional when ``calibration_cache`` is an existing table.
        method: calibration: ``minmax``, ``entropy``, ``percentile`` (or ``distribution``).
        per_channel: per-output-channel weight scales.
        nodes_to_exclude: node names (of the prepared graph) left in float32.
        op_types_to_quantize: e.g. ``["Conv", "MatMul"]``; None quantizes every op type
            ORT supports.
        graph_prep: how the fp32 graph is prepared before quantizing, one of
            :data:`GRAPH_PREPS` (:func:`prepare_graph`).
        float_op_types: op types whose nodes are added to ``nodes_to_exclude``, chosen by
            op type only (deterministic; :func:`float_nodes`; ``"SiLU"`` names the
            Sigmoid + Mul pair).
        quant_format: ``"qdq"`` (QuantizeLinear/DequantizeLinear pairs, ORT fuses them) or
            ``"qoperator"`` (QLinearConv etc. written directly), or a ``QuantFormat``.
        activation_type, weight_type: ``"u8"`` or ``"s8"`` (u8 activations + s8 weights is
            ORT's recommended x86 combination).
        activation_symmetric, weight_symmetric: symmetric ranges (zero point 0).
        reduce_range: 7-bit weights (helps non-VNNI x86 CPUs).
        percentile: kept percentile of ``percentile`` calibration.
        calibration_cache: JSON from :func:`calibration_table`; used if it exists, else the
            calibration computed here is stored there.
        nodes_to_quantize: quantize only these nodes (None: all).
        extra_options: further ``quantize_static`` ``extra_options`` (override the above).
        max_mb: memory budget of one calibrator pass, MB: histogram methods calibrate in
            passes of :func:`calibration_chunk` images (``CalibStridedMinMax``, which ORT
            applies to every calibrator).

    Returns:
        ``Path`` of the INT8 model.

    Raises:
        FileNotFoundError: no ``fp32_path``.
        ValueError: no calibration data and no existing calibration cache; bad option names.
    """
    cache = Path(calibration_cache) if calibration_cache is not None else None
    if calib_images is None and (cache is None or not cache.is_file()):
        raise ValueError(f"quantize_int8({fp32_path}): give calib_images or an existing calibration_cache")
    if calib_images is not None:
        calib_images = calibration_set(calib_images)
    pre = prepare_graph(fp32_path, graph_prep)
    nodes_to_exclude = sorted(set(nodes_to_exclude) | set(float_nodes(pre, float_op_types)))
    opts = {"ActivationSymmetric": bool(activation_symmetric), "WeightSymmetric": bool(weight_symmetric),
            "CalibTensorRangeSymmetric": bool(activation_symmetric)}
    if str(method).lower() == "percentile":
        opts["CalibPercentile"] = float(percentile)
    if calib_images is not None and (step := calibration_chunk(pre, len(calib_images), method, max_mb)) < len(calib_images):
        opts["CalibStridedMinMax"] = step
    opts.update(extra_options or {})
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".onnx", dir=out.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), _quiet_root_logger():
            warnings.simplefilter("ignore")
            ortq.quantize_static(
                str(pre), tmp,
                calibration_data_reader=calibration_reader(calib_images) if calib_images is not None else None,
                quant_format=_quant_format(quant_format), op_types_to_quantize=op_types_to_quantize,
                per_channel=per_channel, reduce_range=reduce_range,
                activation_type=_qtype(activation_type), weight_type=_qtype(weight_type),
                nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize is not None else None,
                nodes_to_exclude=list(nodes_to_exclude), calibrate_method=_calib_method(method),
                extra_options=opts, calibration_cache_path=cache)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def quantize_dynamic_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, per_channel: bool = False,
                          op_types_to_quantize: Sequence[str] | None = None, nodes_to_exclude: Iterable[str] = (),
                          weight_type: str = "u8") -> Path:
    """Dynamic INT8 quantization baseline (ORT ``quantize_dynamic``): no calibration.

    Weights are quantized offline; activation scales are computed at run time per tensor
    (``DynamicQuantizeLinear``), so Conv becomes ``ConvInteger`` and MatMul
    ``MatMulInteger``/``DynamicQuantizeMatMul``. ORT's CPU ``ConvInteger`` wants uint8
    weights, hence the ``u8`` default. Written atomically.

    Returns:
        ``Path`` of the INT8 model.

    Raises:
        FileNotFoundError: no ``fp32_path``.
    """
    pre = preprocess_onnx(fp32_path)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".onnx", dir=out.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ortq.quantize_dynamic(str(pre), tmp, op_types_to_quantize=op_types_to_quantize, per_channel=per_channel,
                               nodes_to_exclude=list(nodes_to_exclude), weight_type=_qtype(weight_type))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


# --------------------------------------------------------------------------------------
# INT8 recipes: the ORT graphs issue #15 compares on the MobileViT student
# --------------------------------------------------------------------------------------

#: ORT's quantization guide, cited by every recipe.
ORT_QUANT_DOC = "https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html"
#: The op types that carry the multiply-accumulates (what INT8 is for).
MAC_OP_TYPES = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class Int8Recipe:
    """One way to build a static INT8 ONNX graph with ORT's ``quantize_static`` (a table row).

    Every field maps to one documented ORT knob; :func:`quantize_recipe` applies it. The
    session's thread settings are not part of the graph: the section measures every recipe
    at the study's thread count and the winner again at the other thread counts.

    Attributes:
        name: short id (file names, table ``recipe`` column).
        label: the table's ``method`` text.
        graph_prep: :func:`prepare_graph` mode (``quant_pre_process``, ``none``,
            ``ort_extended``, ``transformer_optimizer``).
        quant_format: ``"qdq"`` or ``"qoperator"``.
        activation_type, weight_type: ``"u8"`` / ``"s8"`` (U8S8, S8S8 ...).
        per_channel: per-output-channel weight scales.
        op_types_to_quantize: only these op types get INT8 (None: every op type ORT's
            registry supports).
        float_op_types: op types / patterns kept in float without Q/DQ of their own
            (:func:`float_nodes`, passed as ``nodes_to_exclude``).
        extra_options: further ``quantize_static`` ``extra_options`` (sorted ``(key,
            value)`` pairs, so the recipe stays hashable).
        doc: what the ORT documentation says about this knob (with the section name).
    """

    name: str
    label: str
    graph_prep: str = "quant_pre_process"
    quant_format: str = "qdq"
    activation_type: str = "u8"
    weight_type: str = "s8"
    per_channel: bool = True
    op_types_to_quantize: tuple | None = None
    float_op_types: tuple = ()
    extra_options: tuple = ()
    doc: str = ""

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`quantize_int8` for this recipe (S8 activations are symmetric)."""
        extra = dict(self.extra_options)
        sym = _qtype(self.activation_type) == ortq.QuantType.QInt8
        return dict(graph_prep=self.graph_prep, quant_format=self.quant_format, activation_type=self.activation_type,
                    weight_type=self.weight_type, per_channel=self.per_channel, activation_symmetric=sym,
                    op_types_to_quantize=list(self.op_types_to_quantize) if self.op_types_to_quantize else None,
                    float_op_types=tuple(self.float_op_types), extra_options=extra or None)


#: The recipes of issue #15, point 3, in table order (the first is the study's default).
INT8_RECIPES: dict[str, Int8Recipe] = {r.name: r for r in (
    Int8Recipe("qdq_u8s8_pc", "QDQ U8S8 per-channel, all ops (quant_pre_process)",
               doc="QDQ format (*ONNX quantization representation format*; quantize_static: 'QDQ has been the "
                   "recommended format since 1.11'); U8S8 with reduce_range=False on x86 with VNNI "
                   "(quantize_static docstring, 'Choosing parameters for CPU inference'); per-channel weights "
                   "(*FAQ: When to use reduce-range and per-channel quantization?*); quant_pre_process first "
                   "(*Pre-processing*)."),
    Int8Recipe("qdq_u8s8_pt", "QDQ U8S8 per-tensor, all ops", per_channel=False,
               doc="per_channel=False: 'gives the best throughput on CPU' (quantize_static docstring); per-channel "
                   "'can improve the accuracy for models whose weight ranges are large' (*FAQ*)."),
    Int8Recipe("qdq_s8s8_pc", "QDQ S8S8 per-channel, all ops", activation_type="s8",
               doc="'S8S8 with QDQ is the default setting and balances performance and accuracy. It should be the "
                   "first choice' (*Data type selection*); activations symmetric (zero point 0)."),
    Int8Recipe("qoperator_u8s8_pc", "QOperator U8S8 per-channel, all ops", quant_format="qoperator",
               doc="QOperator format: QLinearConv etc. written directly (*ONNX quantization representation "
                   "format*); 'QDQ is strongly preferred over QOperator for CPU' (quantize_static docstring)."),
    Int8Recipe("qdq_no_preprocess", "QDQ U8S8 per-channel, all ops, without quant_pre_process", graph_prep="none",
               doc="control for *Pre-processing*: symbolic shape inference + model optimisation skipped "
                   "(quantize_static still runs ONNX shape inference itself; the study's export is already "
                   "constant-folded and onnxslim-simplified)."),
    Int8Recipe("qdq_mac_only", "QDQ U8S8 per-channel, Conv/MatMul/Gemm only", op_types_to_quantize=MAC_OP_TYPES,
               doc="op_types_to_quantize=['Conv', 'MatMul', 'Gemm'] (quantize_static docstring: 'specify the "
                   "types of operators to quantize'); everything else float."),
    Int8Recipe("qdq_mac_constb", "QDQ U8S8 per-channel, Conv/Gemm + MatMul with a constant operand",
               op_types_to_quantize=MAC_OP_TYPES, float_op_types=("ActMatMul",),
               doc="the attention MatMuls (activation x activation: q@k^T, attn@v) stay float. The docstring's "
                   "extra_options MatMulConstBOnly=True would say so, but onnxruntime 1.31.1's QDQ quantizer "
                   "ignores it (measured: byte-identical graph), so they are listed in nodes_to_exclude."),
    Int8Recipe("qdq_float_silu_softmax_ln", "QDQ U8S8 per-channel, SiLU/Softmax/LayerNorm (+ attention MatMuls) float",
               float_op_types=("SiLU", "Softmax", "LayerNorm", "ActMatMul"),
               doc="nodes_to_exclude = every SiLU (Sigmoid + Mul), Softmax and LayerNorm node, chosen by op type "
                   "(deterministic; quantize_static docstring). The attention MatMuls around Softmax are excluded "
                   "too: an excluded node between two quantized ones still sits in a DQ -> op -> Q sandwich, which "
                   "ORT fuses into an integer kernel anyway (measured: QLinearSoftmax)."),
    Int8Recipe("qdq_ortext_mac", "ORT extended fusions, then QDQ U8S8 per-channel Conv/MatMul/Gemm",
               graph_prep="ort_extended", op_types_to_quantize=MAC_OP_TYPES,
               doc="ORT graph optimisation (extended: QuickGelu = fused SiLU, FusedConv, LayerNorm) before "
                   "quantizing (*Pre-processing*: 'Model optimization performs certain operator fusion that makes "
                   "quantization tool's job easier'); fused ops stay float."),
    Int8Recipe("qdq_transformer_opt", "Transformer optimizer (vit), then QDQ U8S8 per-channel, all ops",
               graph_prep="transformer_optimizer",
               doc="*Transformer-based models*: 'optimize your models using the Transformer Model Optimization "
                   "Tool before quantizing the model'."),
)}


def quantize_recipe(fp32_path: str | os.PathLike, out_path: str | os.PathLike, recipe: Int8Recipe | str,
                    calib_images, method: str = "minmax", table_dir: str | os.PathLike | None = None,
                    nodes_to_exclude: Iterable[str] = ()) -> Path:
    """Build one INT8 recipe (:class:`Int8Recipe`) of an fp32 model with :func:`quantize_int8`.

    The calibration table (ranges of every tensor of the recipe's prepared graph, computed
    on :func:`calibration_set` ``(calib_images)``) is stored once per (prepared graph,
    method, images) in ``table_dir`` (default: beside the fp32 file) as
    ``<graph stem>.calib.<method>.<calibration_fingerprint>.json`` and shared by every
    recipe on the same prepared graph.

    Args:
        fp32_path: float32 ``.onnx`` (batch 1, fixed H, W).
        out_path: INT8 ``.onnx`` to write (atomically).
        recipe: an :class:`Int8Recipe` or a key of :data:`INT8_RECIPES`.
        calib_images: float32 ``(N, 3, H, W)``: the study's calibration set.
        method: calibration method (``minmax``, ``entropy``, ``percentile``).
        table_dir: folder of the calibration tables.
        nodes_to_exclude: further node names (of the prepared graph) kept in float.

    Returns:
        ``Path`` of the INT8 model.

    Raises:
        KeyError: unknown recipe name.
        FileNotFoundError: no ``fp32_path``.
        ValueError: bad calibration images.
    """
    r = INT8_RECIPES[recipe] if isinstance(recipe, str) else recipe
    calib = calibration_set(calib_images)
    graph = prepare_graph(fp32_path, r.graph_prep)
    tdir = Path(table_dir) if table_dir is not None else Path(fp32_path).parent
    tdir.mkdir(parents=True, exist_ok=True)
    table = tdir / f"{graph.stem}.calib.{str(method).lower()}.{calibration_fingerprint(calib)}.json"
    if not table.is_file():
        calibration_table(fp32_path, calib, table, method=method, graph_prep=r.graph_prep)
    return quantize_int8(fp32_path, out_path, None, method=method, calibration_cache=table,
                         nodes_to_exclude=nodes_to_exclude, **r.kwargs())


# --------------------------------------------------------------------------------------
# What runs, and where the time goes
# --------------------------------------------------------------------------------------

#: Op types that compute in integer arithmetic on ORT's CPU provider.
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
                "DynamicQuantizeMatMul", "QGemm", "QAttention", "QLinearAdd", "QLinearMul", "QLinearConcat",
                "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool",
                "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "QLinearConvTranspose")
#: Float op types that carry the multiply-accumulates (what INT8 would replace).
FLOAT_COMPUTE = ("Conv", "FusedConv", "NchwcConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "ConvTranspose",
                 "Attention", "MultiHeadAttention")


def graph_op_counts(path: str | os.PathLike) -> Counter:
    """Count op types in an ONNX file as written (before ORT's graph optimisation).

    Raises:
        FileNotFoundError: no such file.
    """
    path = _existing(path, "ONNX model")
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def kernel_counts(path: str | os.PathLike, threads: int = DEFAULT_THREADS) -> dict:
    """Which kernels ORT's CPU provider really runs: op types of the ORT-optimised graph.

    ORT fuses QuantizeLinear -> op -> DequantizeLinear patterns of a QDQ model into integer
    kernels (``QLinearConv`` ...) only where such a kernel exists; the rest runs in float
    with the Q/DQ pairs left as extra work. The optimised graph is obtained with
    ``SessionOptions.optimized_model_filepath`` (ORT_ENABLE_ALL).

    Returns:
        dict with ``ops`` (Counter of op types), ``int8_nodes`` (nodes in
        :data:`INT8_KERNELS`), ``float_nodes`` (float multiply-accumulate nodes,
        :data:`FLOAT_COMPUTE`), ``qdq_nodes`` (remaining QuantizeLinear/DequantizeLinear/
        DynamicQuantizeLinear), ``q_nodes`` / ``dq_nodes`` (QuantizeLinear /
        DequantizeLinear alone), ``transpose_nodes``, ``leftover_nodes`` (Q + DQ +
        Transpose: the overhead nodes issue #15 counts) and ``total_nodes``.

    Raises:
        FileNotFoundError: no such file.
    """
    with tempfile.TemporaryDirectory(prefix="ort_opt_") as tmpd:
        opt = Path(tmpd) / "optimized.onnx"
        ort_session(path, threads=threads, optimized_model_path=opt)
        ops = Counter(n.op_type for n in onnx.load(str(opt), load_external_data=False).graph.node)
    q, dq, t = ops["QuantizeLinear"], ops["DequantizeLinear"], ops["Transpose"]
    return {"ops": ops, "int8_nodes": sum(ops[k] for k in INT8_KERNELS),
            "float_nodes": sum(ops[k] for k in FLOAT_COMPUTE),
            "qdq_nodes": q + dq + ops["DynamicQuantizeLinear"], "q_nodes": q, "dq_nodes": dq,
            "transpose_nodes": t, "leftover_nodes": q + dq + t, "total_nodes": sum(ops.values())}


def profile_ops(onnx_path: str | os.PathLike, input_hw, runs: int = 20, warmup: int = 5,
                threads: int = DEFAULT_THREADS, images=None):
    """Time every node of an ONNX model with ORT's profiler (``enable_profiling``).

    Runs ``warmup + runs`` batch-1 inferences (on ``images`` cycled, else a fixed random
    input), parses the profiler's JSON trace and keeps the kernel events of the timed runs.

    Args:
        onnx_path: ``.onnx`` file.
        input_hw: int or (H, W) of the input, px.
        runs: timed runs.
        warmup: untimed runs first.
        threads: ORT intra-op threads.
        images: optional float32 ``(N, 3, H, W)`` to run on.

    Returns:
        pandas DataFrame, one row per node of the optimised graph: ``node``, ``op_type``,
        ``provider``, ``ms_per_run`` (mean kernel time per inference, ms), ``share``
        (fraction of the summed kernel time), sorted by time. Aggregate per op type with
        :func:`op_time_by_type`.

    Raises:
        FileNotFoundError: no such model.
        ValueError: ``runs < 1`` or a bad ``input_hw``.
    """
    if runs < 1:
        raise ValueError(f"profile_ops: runs must be >= 1; got {runs}")
    h, w = _hw(input_hw)
    with tempfile.TemporaryDirectory(prefix="ort_prof_") as tmpd:
        sess = ort_session(onnx_path, threads=threads, enable_profiling=True,
                           profile_prefix=str(Path(tmpd) / "prof"))
        name = sess.get_inputs()[0].name
        arr = _check_images(images) if images is not None else \
            np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)
        for i in range(warmup + runs):
            sess.run(None, {name: arr[i % len(arr)][None]})
        trace = json.loads(Path(sess.end_profiling()).read_text())
    run_events = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])
    timed = run_events[warmup:]
    if not timed:
        raise RuntimeError(f"ORT profiler recorded no runs for {onnx_path}")
    t0 = timed[0]["ts"]
    rows: dict[str, dict] = {}
    for e in trace:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time") or e["ts"] < t0:
            continue
        node = e["name"][: -len("_kernel_time")]
        args = e.get("args", {})
        r = rows.setdefault(node, {"node": node, "op_type": args.get("op_name", "?"),
                                   "provider": args.get("provider", "?"), "us": 0.0})
        r["us"] += float(e["dur"])
    df = pd.DataFrame(list(rows.values()))
    if df.empty:
        return pd.DataFrame(columns=["node", "op_type", "provider", "ms_per_run", "share"])
    df["ms_per_run"] = df.pop("us") / 1e3 / len(timed)
    df["share"] = df["ms_per_run"] / df["ms_per_run"].sum()
    return df.sort_values("ms_per_run", ascending=False).reset_index(drop=True)


def op_time_by_type(node_df):
    """Aggregate :func:`profile_ops` rows per op type: ``op_type, nodes, ms_per_run, share``."""
    g = node_df.groupby("op_type").agg(nodes=("node", "count"), ms_per_run=("ms_per_run", "sum"))
    g["share"] = g["ms_per_run"] / g["ms_per_run"].sum()
    return g.sort_values("ms_per_run", ascending=False).reset_index()


#: Op-type categories of :func:`op_time_categories` (checked in this order; the rest is
#: ``other float`` or ``other int8`` by the ``QLinear`` prefix).
OP_CATEGORIES = {
    "Conv/MatMul/Gemm int8": ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                              "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "QLinearConvTranspose"),
    "Conv/MatMul/Gemm float": FLOAT_COMPUTE,
    "Q/DQ": ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"),
    "layout (Transpose/Reshape/...)": ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Split", "Concat",
                                       "QLinearConcat", "ReorderInput", "ReorderOutput", "Slice", "Gather",
                                       "Flatten", "Identity", "Expand"),
}


def op_category(op_type: str) -> str:
    """Category of an op type for :func:`op_time_categories` (:data:`OP_CATEGORIES`)."""
    for cat, ops in OP_CATEGORIES.items():
        if op_type in ops:
            return cat
    return "other int8" if op_type.startswith("QLinear") else "other float"


def op_time_categories(node_df) -> pd.DataFrame:
    """Where the time goes, by category: :func:`profile_ops` rows summed per :func:`op_category`.

    The question it answers for INT8: what fraction of an inference is the Conv / MatMul /
    Gemm work INT8 can accelerate (Amdahl: with a fraction ``f`` of the time sped up by
    ``k``, the whole is at most ``1 / (1 - f + f / k)`` faster), and how much is added by
    Q/DQ and layout ops.

    Args:
        node_df: DataFrame of :func:`profile_ops` (``op_type``, ``ms_per_run``).

    Returns:
        DataFrame ``category, nodes, ms_per_run (ms), share`` (fraction of the summed
        kernel time), every category of :data:`OP_CATEGORIES` plus ``other float`` /
        ``other int8`` (0 when absent), in a fixed order.
    """
    cats = list(OP_CATEGORIES) + ["other float", "other int8"]
    d = node_df.assign(category=node_df["op_type"].map(op_category))
    g = d.groupby("category").agg(nodes=("op_type", "count"), ms_per_run=("ms_per_run", "sum"))
    g = g.reindex(cats, fill_value=0)
    total = g["ms_per_run"].sum()
    g["share"] = g["ms_per_run"] / total if total > 0 else 0.0
    return g.reset_index().rename(columns={"index": "category"})


def amdahl_bound(mac_share: float, mac_speedup: float) -> float:
    """Whole-model speed-up when a fraction ``mac_share`` of the time runs ``mac_speedup``
    times faster and the rest is unchanged: ``1 / (1 - f + f / k)`` (Amdahl 1967).

    Raises:
        ValueError: ``mac_share`` outside [0, 1] or ``mac_speedup <= 0``.
    """
    if not 0.0 <= mac_share <= 1.0 or mac_speedup <= 0:
        raise ValueError(f"amdahl_bound: need 0 <= share <= 1 and speedup > 0; got {mac_share}, {mac_speedup}")
    return 1.0 / (1.0 - mac_share + mac_share / mac_speedup)


def quantizable_nodes(fp32_path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(node_name, op_type)`` of the pre-processed graph's nodes ORT's QDQ quantizer handles."""
    kinds = set(QDQRegistry) | set(QLinearOpsRegistry)
    g = onnx.load(str(preprocess_onnx(fp32_path)), load_external_data=False).graph
    return [(n.name, n.op_type) for n in g.node if n.op_type in kinds and n.name]


def _scope(name: str, depth: int) -> str:
    parts = [p for p in name.split("/") if p]
    return "/" + "/".join(parts[:depth]) if len(parts) > depth else "/" + "/".join(parts[:-1] or parts)


def node_groups(fp32_path: str | os.PathLike, by: str = "op_type", depth: int = 3,
                min_nodes: int = 1) -> dict[str, list[str]]:
    """Group the quantizable nodes of a model, for sensitivity analysis.

    Args:
        by: ``"op_type"`` (all Conv, all Mul, ...), ``"pattern"`` (as ``op_type``, but the
            Sigmoid + Mul pairs of SiLU form one group ``SiLU``, :func:`float_nodes`),
            ``"scope"`` (the exporter's module path cut at ``depth`` levels, e.g.
            ``/model/backbone/stages.3``) or ``"node"``.
        depth: scope depth for ``by="scope"``.
        min_nodes: drop groups with fewer nodes.

    Returns:
        group name -> node names (pre-processed graph).

    Raises:
        ValueError: unknown ``by``.
    """
    if by not in ("op_type", "pattern", "scope", "node"):
        raise ValueError(f"node_groups: by must be 'op_type', 'pattern', 'scope' or 'node'; got {by!r}")
    silu = set(float_nodes(preprocess_onnx(fp32_path), ["SiLU"])) if by == "pattern" else set()
    groups: dict[str, list[str]] = {}
    for name, op in quantizable_nodes(fp32_path):
        if by in ("op_type", "pattern"):
            key = "SiLU" if name in silu else op
        else:
            key = _scope(name, depth) if by == "scope" else name
        groups.setdefault(key, []).append(name)
    return {k: v for k, v in groups.items() if len(v) >= min_nodes}


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.mean((ref - got) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(float(np.mean(ref ** 2)) / noise))


def _miou(logits: np.ndarray, masks) -> float | None:
    if masks is None:
        return None
    pred = logits.argmax(1)
    if pred.shape[-2:] != np.asarray(masks).shape[-2:]:
        raise ValueError(f"val_masks shape {np.asarray(masks).shape} does not match predictions {pred.shape}")
    return float(segmentation_scores(pred, np.asarray(masks))["miou"])


def node_sensitivity(fp32_path: str | os.PathLike, calib_images, val_images, val_masks=None,
                     work_dir: str | os.PathLike | None = None, groups: dict[str, list[str]] | str = "op_type",
                     mode: str = "exclude", method: str = "minmax", per_channel: bool = True,
                     quant_format="qdq", threads: int = DEFAULT_THREADS, **quant_kwargs):
    """Measure what quantizing each node group costs in accuracy.

    One calibration table is computed on ``calib_images`` and shared by every variant.
    With ``mode="exclude"`` each variant is the whole-model INT8 model with one group left in
    float32 (what does excluding it *gain*?); with ``mode="only"`` each variant quantizes just
    that group (what does quantizing it *cost*?). Each variant is scored against the fp32
    model on ``val_images``: SQNR of the logits (dB), arg-max agreement and mIoU (with
    ``val_masks``). No timing: a choice made from this table is deterministic, and the
    chosen model is timed by the study's protocol (:func:`study.bench.compare_latency`).

    Args:
        fp32_path: float32 ``.onnx``.
        calib_images: float32 ``(N, 3, H, W)`` calibration images.
        val_images: float32 ``(M, 3, H, W)`` evaluation images.
        val_masks: optional int ``(M, H, W)`` labels (255 ignored) for mIoU.
        work_dir: folder of the variant models (default: a temp folder, deleted).
        groups: ``{name: [node names]}`` or a :func:`node_groups` ``by`` value.
        mode: ``"exclude"`` or ``"only"``.
        method, per_channel, quant_format, **quant_kwargs: passed to :func:`quantize_int8`.
        threads: ORT intra-op threads.

    Returns:
        pandas DataFrame with one row per variant: ``group``, ``mode``, ``n_nodes``,
        ``nodes`` (list), ``sqnr_db``, ``argmax_agreement``, ``miou``, and deltas
        ``d_argmax``, ``d_miou`` relative to the reference row
        (``int8_all`` for ``exclude``, ``fp32`` for ``only``). Reference rows ``fp32`` and
        ``int8_all`` come first.

    Raises:
        ValueError: bad ``mode`` / ``groups``, or images of the wrong shape.
    """
    if mode not in ("exclude", "only"):
        raise ValueError(f"node_sensitivity: mode must be 'exclude' or 'only'; got {mode!r}")
    val = _check_images(val_images, "val_images")
    if isinstance(groups, str):
        groups = node_groups(fp32_path, by=groups)
    if not groups:
        raise ValueError(f"node_sensitivity: no quantizable node groups in {fp32_path}")
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="quant_sens_")
        work_dir = tmp.name
    wd = Path(work_dir)
    wd.mkdir(parents=True, exist_ok=True)
    try:
        table = calibration_table(fp32_path, calib_images, wd / f"calib_{method}.json", method=method,
                                  activation_symmetric=quant_kwargs.get("activation_symmetric", False))
        ref = ort_predict(fp32_path, val, threads)
        all_nodes = [n for n, _ in quantizable_nodes(fp32_path)]

        def score(name, path, nodes, m):
            out = ort_predict(path, val, threads)
            return {"group": name, "mode": m, "n_nodes": len(nodes), "nodes": list(nodes),
                    "sqnr_db": _sqnr_db(ref, out), "argmax_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
                    "miou": _miou(out, val_masks)}

        full = quantize_int8(fp32_path, wd / "int8_all.onnx", None, method=method, per_channel=per_channel,
                             quant_format=quant_format, calibration_cache=table, **quant_kwargs)
        rows = [score("fp32", fp32_path, [], "reference"), score("int8_all", full, all_nodes, "reference")]
        for i, (name, nodes) in enumerate(groups.items()):
            kw = dict(nodes_to_exclude=nodes) if mode == "exclude" else dict(nodes_to_quantize=nodes)
            p = quantize_int8(fp32_path, wd / f"variant_{i:03d}.onnx", None, method=method, per_channel=per_channel,
                              quant_format=quant_format, calibration_cache=table, **kw, **quant_kwargs)
            rows.append(score(name, p, nodes, mode))
            if tmp is not None:
                p.unlink()
    finally:
        if tmp is not None:
            tmp.cleanup()
    df = pd.DataFrame(rows)
    base = df.iloc[1] if mode == "exclude" else df.iloc[0]
    df["d_argmax"] = df["argmax_agreement"] - base["argmax_agreement"]
    df["d_miou"] = (df["miou"] - base["miou"]) if val_masks is not None else float("nan")
    return df


def select_nodes_to_exclude(sens, min_argmax_gain: float = 0.005) -> tuple[list[str], "object"]:
    """Pick the node groups to keep in float32 from a :func:`node_sensitivity` (``exclude``) table.

    By accuracy only, so the choice is deterministic (quantization and ORT's CPU kernels are;
    latencies on a shared machine are not, and a timing-based choice once picked different
    nodes in two runs). A group is excluded when keeping it in float raised the arg-max
    agreement with fp32 by at least ``min_argmax_gain`` (or raised mIoU by as much, when
    measured). The resulting model is timed by the study's protocol (the section's variant
    table).

    Args:
        sens: DataFrame returned by :func:`node_sensitivity` with ``mode="exclude"``.
        min_argmax_gain: arg-max agreement (or mIoU) gain, fraction, that earns float.

    Returns:
        ``(node_names, decisions)``: the union of excluded nodes (sorted), and a DataFrame
        ``group, n_nodes, d_argmax, d_miou, excluded, reason`` for the notebook.

    Raises:
        ValueError: the table is not an ``exclude`` sensitivity table.
    """
    if "int8_all" not in set(sens["group"]) or not (sens["mode"] == "exclude").any():
        raise ValueError("select_nodes_to_exclude needs a node_sensitivity(..., mode='exclude') table")
    nodes: list[str] = []
    rows = []
    for _, r in sens[sens["mode"] == "exclude"].iterrows():
        gain = r["d_argmax"]
        if pd.notna(r.get("d_miou")) and np.isfinite(r.get("d_miou")):
            gain = max(gain, r["d_miou"])
        accurate = bool(gain >= min_argmax_gain)
        if accurate:
            nodes.extend(r["nodes"])
        rows.append({"group": r["group"], "n_nodes": r["n_nodes"], "d_argmax": r["d_argmax"],
                     "d_miou": r.get("d_miou"), "excluded": accurate,
                     "reason": "more accurate in float" if accurate else "kept INT8"})
    return sorted(set(nodes)), pd.DataFrame(rows)


# --------------------------------------------------------------------------------------
# Stale vs fresh calibration (source 001's warning)
# --------------------------------------------------------------------------------------

def stale_calibration_table(dense_table: str | os.PathLike, fresh_table: str | os.PathLike,
                            out_path: str | os.PathLike) -> tuple[Path, dict]:
    """Emulate reusing a dense model's calibration cache on its pruned model.

    TensorRT calibration caches (and ORT's JSON tables) are keyed by tensor name. After
    structured pruning the exporter gives the pruned model's tensors the same names where
    the module path is unchanged, so a cache computed on the dense model *loads*, but its
    ranges describe the dense model's activations. This writes the pruned model's table
    with every tensor present in the dense table replaced by the dense range (stale); tensors
    the dense table lacks keep their fresh range (reported as ``unmatched``).

    Args:
        dense_table: JSON from :func:`calibration_table` on the dense model.
        fresh_table: JSON from :func:`calibration_table` on the pruned model (same method).
        out_path: JSON to write (atomically).

    Returns:
        ``(path, stats)`` with ``stats = dict(tensors, stale, unmatched, stale_fraction)``.

    Raises:
        FileNotFoundError: a table does not exist.
        ValueError: the two tables use different calibration methods.
    """
    dense, fresh = load_tensors_data(dense_table), load_tensors_data(fresh_table)
    if dense.calibration_method != fresh.calibration_method:
        raise ValueError(f"{dense_table} uses {dense.calibration_method}, {fresh_table} uses "
                         f"{fresh.calibration_method}; calibrate both with the same method")
    merged, stale = {}, 0
    for name, td in fresh.items():
        if name in dense:
            merged[name], stale = dense[name], stale + 1
        else:
            merged[name] = td
    out = Path(out_path)
    save_tensors_data(TensorsData(fresh.calibration_method, merged), out)
    n = len(merged)
    return out, {"tensors": n, "stale": stale, "unmatched": n - stale, "stale_fraction": stale / max(n, 1)}


# --------------------------------------------------------------------------------------
# TensorRT (GPU / Jetson)
# --------------------------------------------------------------------------------------

def trt_available() -> tuple[bool, str]:
    """``(True, "")`` when ``tensorrt`` imports and a CUDA device is present, else ``(False, why)``."""
    try:
        import tensorrt  # noqa: F401  - in-function: optional, only on CUDA hosts
    except ImportError:
        return False, ("tensorrt is not installed: TensorRT engines are built on a CUDA machine "
                       "(a Jetson ships it with JetPack; on x86 `pip install tensorrt`)")
    if not torch.cuda.is_available():
        return False, "no CUDA device: TensorRT builds engines only for an NVIDIA GPU"
    return True, ""


def build_tensorrt_engine(onnx_path: str | os.PathLike, precision: str = "fp16", calib_images=None,
                     out_path: str | os.PathLike | None = None, workspace_mb: int = 1024,
                     calib_cache: str | os.PathLike | None = None) -> Path:
    """Build a serialized TensorRT engine (fp32 / fp16 / INT8) from an ONNX model, on this host.

    Not to be confused with :func:`study.device_runner.load_trt_engine`, the device
    runner's own self-contained builder (it must run on a device with nothing but the
    runner file): that one deserializes an engine or builds one in memory for timing, INT8
    only from Q/DQ models (no calibrator); this one calibrates INT8 itself and writes the
    engine and the calibration cache to files.

    INT8 uses an ``IInt8EntropyCalibrator2`` over ``calib_images`` (the same images as the
    ORT calibration), feeding batch-1 device buffers allocated with torch; the calibration
    cache is written to ``calib_cache`` (TensorRT keys it by tensor name - the cache source
    001 found useless after pruning). The engine file is written atomically.

    Args:
        onnx_path: fp32 ``.onnx`` (fixed batch 1).
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"`` (INT8 also enables fp16 fallback).
        calib_images: float32 ``(N, 3, H, W)``; required for ``int8``.
        out_path: engine file (default ``<onnx stem>.<precision>.engine``).
        workspace_mb: builder workspace limit, MB.
        calib_cache: calibration cache file (default beside the engine).

    Returns:
        ``Path`` of the engine.

    Raises:
        QuantUnavailable: ``tensorrt`` is not installed or no CUDA device is present.
        ValueError: bad ``precision`` or ``int8`` without ``calib_images``.
        RuntimeError: the ONNX parser or the builder failed (parser errors included).
    """
    ok, why = trt_available()
    if not ok:
        raise QuantUnavailable(why)
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"build_tensorrt_engine: precision must be fp32, fp16 or int8; got {precision!r}")
    if precision == "int8" and calib_images is None:
        raise ValueError("build_tensorrt_engine: precision='int8' needs calib_images")
    import tensorrt as trt  # in-function: optional, only on CUDA hosts (checked by trt_available)

    onnx_path = Path(onnx_path)
    out = Path(out_path) if out_path else onnx_path.with_name(f"{onnx_path.stem}.{precision}.engine")
    cache_path = Path(calib_cache) if calib_cache else out.with_suffix(".calib")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt, "NetworkDefinitionCreationFlag") and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    else:  # TensorRT 8.2 (Jetson Nano, JetPack 4.6)
        config.max_workspace_size = workspace_mb << 20
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        imgs = _check_images(calib_images, "calib_images")

        class _Calibrator(trt.IInt8EntropyCalibrator2):
            def __init__(self):
                super().__init__()
                self.i = 0
                self.buf = torch.empty((1,) + imgs.shape[1:], dtype=torch.float32, device="cuda")

            def get_batch_size(self):
                return 1

            def get_batch(self, names):
                if self.i >= len(imgs):
                    return None
                self.buf.copy_(torch.from_numpy(imgs[self.i:self.i + 1]))
                self.i += 1
                return [int(self.buf.data_ptr())]

            def read_calibration_cache(self):
                return cache_path.read_bytes() if cache_path.is_file() else None

            def write_calibration_cache(self, cache):
                atomic_write_bytes(cache_path, bytes(cache))

        calibrator = _Calibrator()
        config.int8_calibrator = calibrator
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build a {precision} engine from {onnx_path}")
    atomic_write_bytes(out, bytes(serialized))
    return out


# --------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------

def scores_from_logits(logits: np.ndarray, masks: np.ndarray) -> dict:
    """Scores of arg-max predictions: :func:`study.metrics.segmentation_scores`.

    Args:
        logits: float ``(N, C, H, W)``.
        masks: int ``(N, H, W)`` labels (255 ignored).

    Returns:
        dict with ``miou``, ``mdice``, ``per_class_iou`` ... (see
        :func:`study.metrics.segmentation_scores`).
    """
    return segmentation_scores(np.asarray(logits).argmax(1), np.asarray(masks))


def onnx_scores(path: str | os.PathLike, images, masks, threads: int = DEFAULT_THREADS) -> dict:
    """mIoU / mDice / per-class IoU of an ONNX model on image and mask arrays.

    Runs :func:`ort_predict` (batch 1 when the model's batch dimension is fixed) and scores
    the arg-max predictions with :func:`scores_from_logits`; the logits must already have
    the masks' H, W (no resizing).

    Args:
        path: ``.onnx`` file with a float32 input.
        images: float32 ``(N, 3, H, W)``, ImageNet-normalised.
        masks: int ``(N, H, W)`` labels (255 ignored).
        threads: ORT intra-op threads.

    Returns:
        dict as :func:`study.metrics.segmentation_scores` (``miou``, ``mdice``,
        ``per_class_iou`` ...).

    Raises:
        FileNotFoundError: no such model.
        ValueError: images of the wrong shape, or predictions and masks of different sizes.
    """
    return scores_from_logits(ort_predict(path, images, threads), masks)
