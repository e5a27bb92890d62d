"""Pruning that really shrinks tensors, and the masked baselines it is compared with.

Three families, clearly separated because only one of them can make a model faster on
dense hardware:

* **Structured (physical) pruning** - :func:`prune_structured` removes whole output
  channels (conv filters, linear rows, attention head dimensions or whole heads) with
  torch-pruning 1.6.1's dependency graph (DepGraph, Fang et al., CVPR 2023), which also
  removes the matching input channels of every consumer (residual adds, concats, BN,
  LayerNorm, the decoder's lateral convs). Tensor shapes shrink, so params, MACs,
  latency and memory are measured on the smaller model.
* **Head pruning** (Michel et al., NeurIPS 2019) - :func:`head_importance`,
  :func:`prune_heads`, :func:`prune_head_dim` operate on timm ``Attention`` blocks (fused
  ``qkv`` Linear + ``proj`` Linear, as in timm MobileViT's transformer): rows of ``qkv``
  and columns of ``proj`` are removed and ``num_heads`` / ``head_dim`` / ``attn_dim``
  updated. :func:`repartition_heads` is source 000's "4 -> 2 heads", which only
  re-partitions the same width (no parameter or MAC removed).
* **Masked pruning ("masked (zeros only)")** - :func:`prune_unstructured` (global
  magnitude) and :func:`prune_filter_norm_masks` (source 000's per-conv ``ln_structured``
  L2 filter masks). Weights are set to zero, shapes never change, so dense params and
  MACs (and dense-kernel latency) stay the same.

Every physical change is recorded on the model (``model.segcompress_prune``: a list of
replayable steps - torch-pruning's ``pruning_history()`` plus this module's own head /
head-dim / MLP-hidden surgeries) so that :func:`save_pruned` / :func:`load_pruned` can
store a pruned model as *history + state_dict* and rebuild it with
``torch.load(weights_only=True)``.

Importance criteria:

* ``"magnitude"`` - L1 norm of each filter, summed over the coupled group (Li et al.,
  ICLR 2017, "Pruning Filters for Efficient ConvNets"): :math:`I_c = \\sum_{W\\in G}\\|W_c\\|_1`.
* ``"taylor"`` - first-order Taylor estimate of the loss change (Molchanov et al., CVPR
  2019): :math:`I_c = \\sum_{W\\in G}\\sum_i |g_i w_i|` with :math:`g = \\partial L/\\partial w`
  accumulated over a few calibration batches (cross-entropy loss).
* ``"random"`` - uniform random scores (a control).

Iterative pruning (prune a little, re-rank, prune again) is :func:`prune_iteratively`
with the schedules of :func:`sparsity_schedule` (one-shot, linear, cubic / AGP) and the
equal fine-tune budget split of :func:`finetune_split`; the caller fine-tunes between
steps through a callback. :func:`keep_pruned_zeros` fine-tunes a masked model without
letting its zeros grow back.

Example (no data set, no cache needed)::

    import copy, torch
    from study import models, prune

    dense = models.create_model("upernet_mobilevit_s").eval()
    small = prune.prune_structured(copy.deepcopy(dense), (128, 128), 0.45)   # DepGraph, L1
    print(models.gmacs(dense, (128, 128)), "->", models.gmacs(small, (128, 128)))
    prune.save_pruned(small, path="small.pt")
    again = prune.load_pruned(lambda: models.create_model("upernet_mobilevit_s"), "small.pt")

    masked = prune.prune_unstructured(copy.deepcopy(dense), 0.6)             # zeros only
    with prune.keep_pruned_zeros(masked):
        ...  # any optimizer loop: the zeros stay zero

    it = prune.prune_iteratively(copy.deepcopy(dense), (128, 128),
                                 prune.sparsity_schedule(0.45, 4, "cubic"),
                                 between=lambda t, m: finetune(m))        # your fine-tune
"""
from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch.nn.utils import prune as tprune

from . import IGNORE_INDEX
from .cache import atomic_torch_save

RECORD_ATTR = "segcompress_prune"
FORMAT = "segcompress-prune-v1"
#: Channel importance criteria of :func:`prune_structured` and :func:`prune_iteratively`.
IMPORTANCES = ("magnitude", "taylor", "random")
#: Sparsity schedules of :func:`sparsity_schedule`.
SCHEDULES = ("oneshot", "linear", "cubic")


# --------------------------------------------------------------------------- helpers
def _check_sparsity(value, name: str = "sparsity") -> float:
    """Validate a pruning ratio in [0, 1); raise ValueError naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not (0.0 <= v < 1.0) or math.isnan(v):
        raise ValueError(f"{name} must be in [0, 1) (fraction of channels removed), got {value!r}")
    return v


def _check_steps(value, name: str = "steps") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int (number of prune/fine-tune steps k), got {value!r}")
    return value


def _record(model: nn.Module) -> list:
    rec = getattr(model, RECORD_ATTR, None)
    if rec is None:
        rec = []
        # plain attribute (not a buffer/parameter): travels with deepcopy, not with state_dict
        object.__setattr__(model, RECORD_ATTR, rec)
    return rec


def pruning_record(model: nn.Module) -> list:
    """The list of replayable pruning steps applied to ``model`` (empty if none).

    Each step is a dict with ``kind`` in ``{"tp", "heads", "head_dim", "mlp_hidden"}``;
    ``"tp"`` steps hold torch-pruning's ``pruning_history()`` (module name, out-channel
    flag, indices) and the ``input_hw`` used to trace the dependency graph.
    """
    return list(getattr(model, RECORD_ATTR, []) or [])


def _get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def attention_modules(model: nn.Module) -> dict:
    """timm-style attention blocks of ``model``: ``{name: module}``.

    A block qualifies when it has a fused ``qkv`` ``nn.Linear`` (out = 3 * num_heads *
    head_dim), a ``proj`` ``nn.Linear`` and ``num_heads`` / ``head_dim`` attributes - i.e.
    ``timm.models.vision_transformer.Attention`` as used in MobileViT's transformer.
    """
    out = {}
    for name, m in model.named_modules():
        if (isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "proj", None), nn.Linear)
                and hasattr(m, "num_heads") and hasattr(m, "head_dim")):
            out[name] = m
    return out


def _default_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    if logits.shape[-2:] != masks.shape[-2:]:
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, masks.long(), ignore_index=IGNORE_INDEX)


def _first_param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def _accumulate_grads(model: nn.Module, batches: Iterable, loss_fn: Callable | None, name: str) -> int:
    """Forward/backward ``batches`` of (images, masks); gradients accumulate in ``.grad``."""
    loss_fn = loss_fn or _default_loss
    p = _first_param(model)
    n = 0
    was_training = model.training
    model.eval()  # BN statistics and dropout frozen: the importance is for the deployed model
    model.zero_grad(set_to_none=True)
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"{name} must yield (images, masks) pairs, got {type(batch).__name__}")
        x, y = batch[0].to(p.device), batch[1].to(p.device)
        loss = loss_fn(model(x), y)
        loss.backward()
        n += 1
    model.train(was_training)
    if n == 0:
        raise ValueError(f"{name} is empty: give at least one (images, masks) batch")
    return n


def _make_importance(importance: str):
    if importance == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=1)  # L1 filter norm (Li et al. 2017)
    if importance == "taylor":
        return tp.importance.GroupTaylorImportance()  # |g * w| (Molchanov et al. 2019)
    if importance == "random":
        return tp.importance.RandomImportance()
    raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")


def _snapshot_attention(model: nn.Module) -> dict:
    return {n: (m.num_heads, m.head_dim, float(m.scale) if hasattr(m, "scale") else None)
            for n, m in attention_modules(model).items()}


def _fix_attention(model: nn.Module, before: dict, num_heads: dict | None = None, keep_scale: bool = True) -> None:
    """After a qkv/proj change: set ``num_heads``, ``head_dim``, ``attn_dim``; keep the temperature.

    timm's fused path calls ``F.scaled_dot_product_attention`` whose default scale is
    ``1/sqrt(head_dim)`` of the *current* head_dim, while the manual path uses the stored
    ``scale``. With ``keep_scale`` the original temperature ``s0`` is kept for both paths by
    folding ``s0 / s_new`` into the q rows (weight and bias) and setting ``scale = s_new``.
    """
    for name, m in attention_modules(model).items():
        if name not in before:
            continue
        h0, d0, s0 = before[name]
        h = int(num_heads.get(m.qkv, h0)) if num_heads else h0
        total = m.qkv.out_features
        if total % (3 * h):
            raise RuntimeError(f"{name}: qkv out_features {total} is not 3 x num_heads ({h}) x head_dim")
        d = total // (3 * h)
        m.num_heads, m.head_dim = h, d
        if hasattr(m, "attn_dim"):
            m.attn_dim = h * d
        if m.proj.in_features != h * d:
            raise RuntimeError(f"{name}: proj.in_features {m.proj.in_features} != num_heads*head_dim {h * d}")
        if s0 is not None and keep_scale and d != d0:
            s_new = d ** -0.5
            _fold_q_scale(m, s0 / s_new)
            m.scale = s_new


@torch.no_grad()
def _fold_q_scale(attn: nn.Module, factor: float) -> None:
    q = attn.num_heads * attn.head_dim
    attn.qkv.weight[:q].mul_(factor)
    if attn.qkv.bias is not None:
        attn.qkv.bias[:q].mul_(factor)


# --------------------------------------------------------------------------- structured
def _example_inputs(example_inputs, model) -> torch.Tensor:
    if isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 2 and all(
            isinstance(v, int) for v in example_inputs):
        example_inputs = torch.randn(1, 3, *example_inputs)
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 4:
        raise ValueError("example_inputs must be a float tensor (N,3,H,W) or an (H, W) pair, "
                         f"got {type(example_inputs).__name__}")
    return example_inputs.to(_first_param(model).device)


def _tp_step(x: torch.Tensor, history, **info) -> dict:
    """A replayable ``"tp"`` record step: torch-pruning history + traced input size."""
    return {"kind": "tp", "input_hw": [int(x.shape[-2]), int(x.shape[-1])],
            "history": [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in history], **info}


def prune_structured(model: nn.Module, example_inputs, sparsity: float, importance: str = "magnitude",
                     global_pruning: bool = False, ignored_layers: Sequence[nn.Module] | None = None,
                     round_to: int | None = None, calib_batches: Iterable | None = None,
                     loss_fn: Callable | None = None, prune_heads: bool = False,
                     keep_attention_scale: bool = True) -> nn.Module:
    """Physically remove a fraction ``sparsity`` of the channels of every prunable group.

    DepGraph (Fang et al., CVPR 2023, torch-pruning 1.6.1 ``MetaPruner``) groups the
    coupled layers; each group loses the channels of lowest importance (see module doc:
    L1 filter norm, Taylor ``|g*w|`` or random). ``model.classifier`` (the final conv) is
    never pruned, so the output keeps its 14 classes. Attention blocks (timm ``Attention``
    with a fused qkv) are declared with ``num_heads`` so q, k and v lose the *same* dims in
    every head (``prune_heads=False``: head_dim shrinks, heads kept) or whole heads
    (``prune_heads=True``: ``head_pruning_ratio = sparsity``); ``num_heads``, ``head_dim``,
    ``attn_dim`` are then fixed and, with ``keep_attention_scale``, the original softmax
    temperature is folded into q.

    Args:
        model: float model, modified **in place** and returned. Output (N, C, H, W) logits.
        example_inputs: float32 tensor (N, 3, H, W) used to trace the graph, or an (H, W)
            pair (a random (1, 3, H, W) tensor is made).
        sparsity: channel pruning ratio in [0, 1): 0.5 keeps half of the channels of each
            group (global_pruning=False) or of the whole network (global_pruning=True).
        importance: ``"magnitude"`` | ``"taylor"`` | ``"random"``.
        global_pruning: rank channels across groups instead of per group.
        ignored_layers: extra modules never pruned (``model.classifier`` is always added).
        round_to: keep channel counts multiples of this (e.g. 8 for SIMD-friendly widths).
        calib_batches: iterable of (images float32 (N,3,H,W), masks int64 (N,H,W)); required
            for ``"taylor"`` (gradients of ``loss_fn``).
        loss_fn: ``loss_fn(logits, masks) -> scalar``; default cross-entropy ignoring 255.
        prune_heads: remove whole attention heads instead of head dimensions.
        keep_attention_scale: keep the original 1/sqrt(head_dim) temperature (see above).

    Returns:
        The same ``model`` object with smaller tensors; the step is appended to
        :func:`pruning_record`.

    Raises:
        ValueError: ``sparsity`` outside [0, 1) (message names ``sparsity``), unknown
            ``importance``, ``"taylor"`` without ``calib_batches``, bad ``example_inputs``.
    """
    sparsity = _check_sparsity(sparsity, "sparsity")
    imp = _make_importance(importance)
    if importance == "taylor" and calib_batches is None:
        raise ValueError("importance='taylor' needs calib_batches: a few (images, masks) batches for gradients")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive int or None, got {round_to!r}")
    x = _example_inputs(example_inputs, model)
    if sparsity == 0.0:
        return model
    ignored = list(ignored_layers or [])
    cls = getattr(model, "classifier", None)
    if isinstance(cls, nn.Module) and all(cls is not m for m in ignored):
        ignored.append(cls)
    attns = attention_modules(model)
    before = _snapshot_attention(model)
    num_heads = {m.qkv: m.num_heads for m in attns.values()}
    was_training = model.training
    model.eval()
    pruner = tp.pruner.MetaPruner(
        model, x, importance=imp, pruning_ratio=sparsity, global_pruning=global_pruning,
        ignored_layers=ignored, round_to=round_to, num_heads=num_heads,
        prune_num_heads=prune_heads, prune_head_dims=not prune_heads,
        head_pruning_ratio=sparsity if prune_heads else 0.0)
    if importance == "taylor":
        _accumulate_grads(model, calib_batches, loss_fn, "calib_batches")
    pruner.step()
    model.zero_grad(set_to_none=True)
    _fix_attention(model, before, pruner.num_heads, keep_scale=keep_attention_scale)
    model.train(was_training)
    _record(model).append(_tp_step(
        x, pruner.pruning_history(),
        attention={n: [m.num_heads, m.head_dim] for n, m in attention_modules(model).items()},
        sparsity=sparsity, importance=importance, prune_heads=bool(prune_heads)))
    return model


# --------------------------------------------------------------------------- masked
def _maskable(model: nn.Module, include_classifier: bool) -> list:
    cls = getattr(model, "classifier", None)
    return [m for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and (include_classifier or m is not cls)]


def prune_unstructured(model: nn.Module, sparsity: float, include_classifier: bool = False) -> nn.Module:
    """Global magnitude pruning - **masked (zeros only)**: shapes and dense MACs unchanged.

    The ``sparsity`` fraction of smallest-|w| weights over all Conv2d/Linear weights
    (the classifier excluded unless ``include_classifier``) is set to zero with
    ``torch.nn.utils.prune.global_unstructured(L1Unstructured)``, then made permanent
    (``prune.remove``). This is source 001's "unstructured 60%" baseline: dense kernels
    still multiply the zeros, so no speedup is expected.

    Args:
        model: modified in place and returned.
        sparsity: fraction of those weights zeroed, in [0, 1).

    Raises:
        ValueError: ``sparsity`` outside [0, 1).
    """
    sparsity = _check_sparsity(sparsity, "sparsity")
    mods = _maskable(model, include_classifier)
    if sparsity > 0 and mods:
        tprune.global_unstructured([(m, "weight") for m in mods], pruning_method=tprune.L1Unstructured,
                                   amount=sparsity)
        for m in mods:
            tprune.remove(m, "weight")
    return model


def prune_filter_norm_masks(model: nn.Module, sparsity: float, include_classifier: bool = False) -> nn.Module:
    """Source 000's "structured" pruning - **masked (zeros only)**.

    For every ``nn.Conv2d`` (classifier excluded unless asked),
    ``torch.nn.utils.prune.ln_structured(module, "weight", amount=sparsity, n=2, dim=0)``
    zeroes the output filters of smallest L2 norm, then ``prune.remove`` makes it
    permanent. Filters are zeros but still computed: same shapes, params and MACs.

    Raises:
        ValueError: ``sparsity`` outside [0, 1).
    """
    sparsity = _check_sparsity(sparsity, "sparsity")
    if sparsity == 0:
        return model
    for m in _maskable(model, include_classifier):
        if isinstance(m, nn.Conv2d) and m.out_channels > 1:
            tprune.ln_structured(m, "weight", amount=sparsity, n=2, dim=0)
            tprune.remove(m, "weight")
    return model


def zero_fraction(model: nn.Module, include_classifier: bool = False) -> float:
    """Fraction of exactly-zero weights over the Conv2d/Linear weights (classifier excluded)."""
    tot = zeros = 0
    for m in _maskable(model, include_classifier):
        tot += m.weight.numel()
        zeros += int((m.weight == 0).sum())
    return zeros / max(tot, 1)


@contextlib.contextmanager
def keep_pruned_zeros(model: nn.Module) -> Iterator[dict]:
    """Fine-tune a masked model without letting its zeros grow back.

    On entry, every weight tensor (``dim > 1``) that holds exact zeros gets the mask
    ``p != 0`` and a post-accumulate-grad hook that multiplies its gradient by the mask.
    Under SGD / Adam / AdamW a zero weight then stays exactly zero at every step: zero
    gradient, zero moments, and decoupled weight decay scales 0 to 0. On exit the hooks are
    removed and the masks re-applied (a safety net for optimizers that would move a weight
    without a gradient).

    Example::

        prune.prune_unstructured(model, 0.6)
        with prune.keep_pruned_zeros(model):
            train(model, ...)          # any optimizer loop
        assert prune.zero_fraction(model) >= 0.6

    Args:
        model: a model pruned by :func:`prune_unstructured` / :func:`prune_filter_norm_masks`
            (or any model; tensors without zeros are left alone).

    Yields:
        ``{param_name: bool tensor}``, the masks (True = weight kept), same shapes and
        devices as the parameters.
    """
    params = dict(model.named_parameters())
    masks = {n: (p != 0) for n, p in params.items() if p.dim() > 1 and (p == 0).any()}

    def keep_zero(mask):
        def hook(p):
            p.grad.mul_(mask)
        return hook

    handles = [params[n].register_post_accumulate_grad_hook(keep_zero(m)) for n, m in masks.items()]
    try:
        yield masks
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, m in masks.items():
                params[n].mul_(m)


# --------------------------------------------------------------------------- heads
def _check_attention(model: nn.Module) -> dict:
    attns = attention_modules(model)
    if not attns:
        raise ValueError("model has no timm-style attention blocks (qkv + proj Linear) to prune")
    for n, m in attns.items():
        if not isinstance(getattr(m, "q_norm", nn.Identity()), nn.Identity) or getattr(m, "gate", None) is not None:
            raise NotImplementedError(f"{n}: q/k norm or gated attention is not supported by the head surgery")
    return attns


def _qkv_rows(h_idx: Sequence[int], dims: Sequence[int] | None, H: int, d: int) -> list:
    dims = list(range(d)) if dims is None else list(dims)
    return [t * H * d + h * d + j for t in range(3) for h in h_idx for j in dims]


@torch.no_grad()
def _select_attention(attn: nn.Module, keep_heads: Sequence[int], keep_dims: Sequence[int] | None) -> None:
    """Keep heads ``keep_heads`` and, inside each, dims ``keep_dims`` (same for q, k, v)."""
    H, d = attn.num_heads, attn.head_dim
    dims = list(range(d)) if keep_dims is None else sorted(int(j) for j in keep_dims)
    heads = sorted(int(h) for h in keep_heads)
    rows = torch.tensor(_qkv_rows(heads, dims, H, d), dtype=torch.long, device=attn.qkv.weight.device)
    cols = torch.tensor([h * d + j for h in heads for j in dims], dtype=torch.long, device=attn.proj.weight.device)
    old_scale = float(attn.scale) if hasattr(attn, "scale") else d ** -0.5
    _slice_qkv_proj(attn, rows, cols)
    attn.num_heads, attn.head_dim = len(heads), len(dims)
    if hasattr(attn, "attn_dim"):
        attn.attn_dim = len(heads) * len(dims)
    if len(dims) != d:  # keep the original temperature for both fused and manual paths
        new_scale = len(dims) ** -0.5
        _fold_q_scale(attn, old_scale / new_scale)
        attn.scale = new_scale


def weight_head_importance(model: nn.Module) -> dict:
    """Data-free head score: L2 norm of each head's q, k, v rows and proj columns.

    Returns ``{module_name: float32 tensor (num_heads,)}``.
    """
    out = {}
    for n, m in _check_attention(model).items():
        H, d = m.num_heads, m.head_dim
        w = m.qkv.weight.detach().view(3, H, d, -1)
        p = m.proj.weight.detach().view(-1, H, d)
        out[n] = (w.pow(2).sum(dim=(0, 2, 3)) + p.pow(2).sum(dim=(0, 2))).sqrt().float().cpu()
    return out


def head_gates(model: nn.Module, gates: dict) -> list:
    """Multiply each head's output by a gate (before ``proj``); returns hook handles.

    Args:
        gates: ``{module_name: tensor (num_heads,)}`` - 0 masks a head, 1 keeps it. Used for
            Michel et al.'s importance (gates = ones with ``requires_grad``) and for the
            "masked heads" reference in tests. Remove with ``[h.remove() for h in handles]``.
    """
    attns = attention_modules(model)
    handles = []
    for n, g in gates.items():
        if n not in attns:
            raise ValueError(f"gates names {n!r}, which is not an attention block of the model")
        m = attns[n]

        def pre_hook(mod, args, m=m, g=g):
            (x,) = args
            shp = x.shape
            y = x.reshape(*shp[:-1], m.num_heads, m.head_dim) * g.to(x.dtype).view(m.num_heads, 1)
            return (y.reshape(shp),)

        handles.append(m.proj.register_forward_pre_hook(pre_hook))
    return handles


def head_importance(model: nn.Module, batches: Iterable, loss_fn: Callable | None = None) -> dict:
    """Michel et al. (2019) head importance: :math:`I_h = \\sum_b |\\partial L_b / \\partial \\xi_h|`.

    Each head's output is multiplied by a gate :math:`\\xi_h = 1` (:func:`head_gates`); the
    importance is the absolute gradient of the cross-entropy loss w.r.t. the gate,
    accumulated per *batch* (Michel et al. take it per example), then divided by its L2
    norm inside each layer (their layer-wise normalization). Equivalently
    :math:`|\\sum_{tokens} \\langle \\partial L/\\partial o_h, o_h \\rangle|`: the first-order
    loss change when the head is removed.

    Args:
        model: segmenter with timm attention blocks; not modified (gradients are cleared).
        batches: iterable of (images float32 (N,3,H,W), masks int64 (N,H,W)).
        loss_fn: ``loss_fn(logits, masks)``; default cross-entropy ignoring 255.

    Returns:
        ``{module_name: float32 tensor (num_heads,)}`` (larger = more important).

    Raises:
        ValueError: no attention blocks, or ``batches`` empty / malformed.
    """
    attns = _check_attention(model)
    dev = _first_param(model).device
    gates = {n: torch.ones(m.num_heads, device=dev, requires_grad=True) for n, m in attns.items()}
    acc = {n: torch.zeros(m.num_heads) for n, m in attns.items()}
    handles = head_gates(model, gates)
    loss_fn = loss_fn or _default_loss
    was_training = model.training
    model.eval()
    n_b = 0
    try:
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("batches must yield (images, masks) pairs")
            x, y = batch[0].to(dev), batch[1].to(dev)
            grads = torch.autograd.grad(loss_fn(model(x), y), list(gates.values()))
            for n, g in zip(gates, grads):
                acc[n] += g.detach().abs().cpu()
            n_b += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_b == 0:
        raise ValueError("batches is empty: give at least one (images, masks) batch")
    return {n: (v / v.norm().clamp_min(1e-12)).float() for n, v in acc.items()}


def _slice_qkv_proj(attn: nn.Module, rows, cols) -> None:
    """Replace ``attn.qkv`` by its output rows ``rows`` and ``attn.proj`` by its input columns
    ``cols`` (new, smaller ``nn.Linear`` modules; weights copied, biases kept)."""
    qkv, proj = attn.qkv, attn.proj
    new_qkv = nn.Linear(qkv.in_features, len(rows), bias=qkv.bias is not None,
                        device=qkv.weight.device, dtype=qkv.weight.dtype)
    new_proj = nn.Linear(len(cols), proj.out_features, bias=proj.bias is not None,
                         device=proj.weight.device, dtype=proj.weight.dtype)
    with torch.no_grad():
        new_qkv.weight.copy_(qkv.weight[rows])
        if qkv.bias is not None:
            new_qkv.bias.copy_(qkv.bias[rows])
        new_proj.weight.copy_(proj.weight[:, cols])
        if proj.bias is not None:
            new_proj.bias.copy_(proj.bias)
    attn.qkv, attn.proj = new_qkv, new_proj


def prune_heads(model: nn.Module, keep_heads: int, importance: dict | None = None) -> nn.Module:
    """Remove the least important heads of every attention block - for real.

    ``qkv`` goes from 3*H*d to 3*h*d output rows (q, k and v rows of the removed heads),
    ``proj`` loses the matching h*d input columns, and ``num_heads``, ``head_dim``,
    ``attn_dim`` are updated. Before fine-tuning the output equals the unpruned model with
    the removed heads' outputs zeroed (:func:`head_gates`), since head_dim and hence the
    softmax scale are unchanged.

    Args:
        model: modified in place and returned.
        keep_heads: heads kept per block, 1 <= keep_heads <= num_heads (blocks that have
            fewer heads are left alone).
        importance: ``{module_name: tensor (num_heads,)}`` from :func:`head_importance`;
            None uses the data-free :func:`weight_head_importance`.

    Raises:
        ValueError: ``keep_heads`` < 1 or not an int, no attention blocks, or an importance
            tensor of the wrong length.
    """
    if not isinstance(keep_heads, int) or keep_heads < 1:
        raise ValueError(f"keep_heads must be an int >= 1, got {keep_heads!r}")
    attns = _check_attention(model)
    importance = importance if importance is not None else weight_head_importance(model)
    for n, m in attns.items():
        H = m.num_heads
        if keep_heads >= H:
            continue
        imp = importance.get(n)
        if imp is None or len(imp) != H:
            raise ValueError(f"importance[{n!r}] must be a tensor of {H} head scores, got {imp!r}")
        keep = sorted(torch.topk(torch.as_tensor(imp, dtype=torch.float32), keep_heads).indices.tolist())
        _select_attention(m, keep, None)
        _record(model).append({"kind": "heads", "module": n, "keep": keep})
    return model


def head_dim_importance(model: nn.Module) -> dict:
    """Data-free score of each head dimension j of head h (same index for q, k, v).

    :math:`I_{h,j} = \\|W^q_{hj}\\|\\,\\|W^k_{hj}\\| + \\|W^v_{hj}\\|\\,\\|W^{proj}_{:,hj}\\|` - the two
    products bound that dimension's contribution to the q.k logits and to the output.
    Returns ``{module_name: tensor (num_heads, head_dim)}``.
    """
    out = {}
    for n, m in _check_attention(model).items():
        H, d = m.num_heads, m.head_dim
        w = m.qkv.weight.detach().view(3, H, d, -1).norm(dim=-1)
        p = m.proj.weight.detach().view(-1, H, d).norm(dim=0)
        out[n] = (w[0] * w[1] + w[2] * p).float().cpu()
    return out


def prune_head_dim(model: nn.Module, keep_ratio: float, importance: dict | None = None) -> nn.Module:
    """Head-dimension pruning: every head keeps d' = max(1, round(keep_ratio*d)) channels.

    The same d' indices (per head, highest :func:`head_dim_importance` summed over heads
    is *not* used: each head picks its own top-d') are kept in q, k and v, and in the
    ``proj`` input columns. The original softmax temperature 1/sqrt(d) is kept (folded into
    the q rows, ``scale`` set to 1/sqrt(d')), so the pruned model computes exactly what the
    unpruned model computes with those q/k/v channels zeroed.

    Args:
        keep_ratio: fraction of each head's dims kept, in (0, 1].
        importance: ``{name: tensor (num_heads, head_dim)}``; None uses
            :func:`head_dim_importance`.

    Raises:
        ValueError: ``keep_ratio`` outside (0, 1]; no attention blocks.
    """
    try:
        kr = float(keep_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}") from None
    if not (0.0 < kr <= 1.0):
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    attns = _check_attention(model)
    importance = importance if importance is not None else head_dim_importance(model)
    for n, m in attns.items():
        H, d = m.num_heads, m.head_dim
        dp = max(1, int(round(kr * d)))
        if dp >= d:
            continue
        imp = torch.as_tensor(importance[n], dtype=torch.float32).view(H, d)
        keep = [sorted(torch.topk(imp[h], dp).indices.tolist()) for h in range(H)]
        _select_attention_per_head(m, keep)
        _record(model).append({"kind": "head_dim", "module": n, "keep": keep})
    return model


@torch.no_grad()
def _select_attention_per_head(attn: nn.Module, keep: list) -> None:
    """Like :func:`_select_attention` with a (possibly different) dim set per head."""
    H, d = attn.num_heads, attn.head_dim
    dp = len(keep[0])
    if any(len(k) != dp for k in keep) or len(keep) != H:
        raise ValueError("every head must keep the same number of dims")
    rows = [t * H * d + h * d + j for t in range(3) for h in range(H) for j in keep[h]]
    cols = [h * d + j for h in range(H) for j in keep[h]]
    old_scale = float(attn.scale) if hasattr(attn, "scale") else d ** -0.5
    _slice_qkv_proj(attn, rows, cols)
    attn.head_dim = dp
    if hasattr(attn, "attn_dim"):
        attn.attn_dim = H * dp
    if dp != d:
        new_scale = dp ** -0.5
        _fold_q_scale(attn, old_scale / new_scale)
        attn.scale = new_scale


def repartition_heads(model: nn.Module, new_heads: int) -> nn.Module:
    """Source 000's "head pruning 4 -> 2": same q/k/v width split into ``new_heads`` heads.

    Only ``num_heads``, ``head_dim`` (= attn_dim / new_heads) and ``scale`` change; no
    weight is removed, so params are identical and MACs of the projections identical (the
    attention matmuls keep the same total size). Labelled "re-partition (width unchanged)".

    Raises:
        ValueError: ``new_heads`` < 1 or not dividing a block's attn_dim.
    """
    if not isinstance(new_heads, int) or new_heads < 1:
        raise ValueError(f"new_heads must be an int >= 1, got {new_heads!r}")
    for n, m in _check_attention(model).items():
        width = m.num_heads * m.head_dim
        if width % new_heads:
            raise ValueError(f"new_heads={new_heads} does not divide {n}'s attention width {width}")
        m.num_heads, m.head_dim = new_heads, width // new_heads
        m.scale = m.head_dim ** -0.5
        if hasattr(m, "attn_dim"):
            m.attn_dim = width
        _record(model).append({"kind": "repartition", "module": n, "num_heads": new_heads})
    return model


def head_config(model: nn.Module) -> dict:
    """``{module_name: (num_heads, head_dim)}`` of every attention block."""
    return {n: (m.num_heads, m.head_dim) for n, m in attention_modules(model).items()}


# --------------------------------------------------------------------------- MLP hidden (Swin)
def mlp_modules(model: nn.Module) -> dict:
    """Transformer MLPs: modules with ``fc1``/``fc2`` ``nn.Linear`` (fc1.out == fc2.in)."""
    out = {}
    for name, m in model.named_modules():
        f1, f2 = getattr(m, "fc1", None), getattr(m, "fc2", None)
        if isinstance(f1, nn.Linear) and isinstance(f2, nn.Linear) and f1.out_features == f2.in_features:
            out[name] = m
    return out


@torch.no_grad()
def _select_mlp(m: nn.Module, keep: Sequence[int]) -> None:
    keep_t = torch.tensor(sorted(int(i) for i in keep), dtype=torch.long, device=m.fc1.weight.device)
    f1, f2 = m.fc1, m.fc2
    n1 = nn.Linear(f1.in_features, len(keep_t), bias=f1.bias is not None, device=f1.weight.device, dtype=f1.weight.dtype)
    n1.weight.copy_(f1.weight[keep_t])
    if f1.bias is not None:
        n1.bias.copy_(f1.bias[keep_t])
    n2 = nn.Linear(len(keep_t), f2.out_features, bias=f2.bias is not None, device=f2.weight.device, dtype=f2.weight.dtype)
    n2.weight.copy_(f2.weight[:, keep_t])
    if f2.bias is not None:
        n2.bias.copy_(f2.bias)
    m.fc1, m.fc2 = n1, n2


def prune_mlp_hidden(model: nn.Module, sparsity: float, importance: str = "magnitude",
                     prefix: str = "") -> nn.Module:
    """Remove a fraction of the hidden units of every transformer MLP (fc1 rows, fc2 cols).

    A self-contained structured pruning that works where DepGraph does not (timm Swin /
    Swin-V2, see REFERENCE.md): the hidden layer of ``fc1 -> act -> (norm) -> fc2`` is
    internal to each block, so removing unit i only touches fc1 row i (and bias i) and
    fc2 column i. Importance ``"magnitude"``: :math:`\\|W^{fc1}_{i,:}\\|_1 + \\|W^{fc2}_{:,i}\\|_1`
    (Li et al. 2017 applied to the group); ``"random"``: random.

    Args:
        model: modified in place and returned.
        sparsity: fraction of hidden units removed per MLP, in [0, 1).
        prefix: only MLPs whose module name starts with this.

    Raises:
        ValueError: ``sparsity`` outside [0, 1), unknown importance, no MLP found, or an
            MLP with a norm over the hidden units (not supported).
    """
    sparsity = _check_sparsity(sparsity, "sparsity")
    if importance not in ("magnitude", "random"):
        raise ValueError(f"importance must be 'magnitude' or 'random' for MLP pruning, got {importance!r}")
    mlps = {n: m for n, m in mlp_modules(model).items() if n.startswith(prefix)}
    if not mlps:
        raise ValueError(f"no fc1/fc2 MLP modules found under prefix {prefix!r}")
    if sparsity == 0:
        return model
    g = torch.Generator().manual_seed(0)
    for n, m in mlps.items():
        if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
            raise ValueError(f"{n}: MLP with a norm over the hidden units is not supported")
        hid = m.fc1.out_features
        k = max(1, hid - int(round(sparsity * hid)))
        if importance == "magnitude":
            s = m.fc1.weight.detach().abs().sum(1) + m.fc2.weight.detach().abs().sum(0)
        else:
            s = torch.rand(hid, generator=g)
        keep = sorted(torch.topk(s.float().cpu(), k).indices.tolist())
        _select_mlp(m, keep)
        _record(model).append({"kind": "mlp_hidden", "module": n, "keep": keep})
    return model


# --------------------------------------------------------------------------- save / load
def _replay(model: nn.Module, steps: list) -> None:
    for st in steps:
        kind = st["kind"]
        if kind == "tp":
            before = _snapshot_attention(model)
            x = torch.randn(1, 3, *st["input_hw"], device=_first_param(model).device)
            model.eval()
            dg = tp.DependencyGraph().build_dependency(model, x)
            dg.load_pruning_history([(n, o, list(idx)) for n, o, idx in st["history"]])
            nh = {model.get_submodule(n).qkv: int(h) for n, (h, _d) in st["attention"].items()}
            # weights are overwritten by load_state_dict: only the attributes matter here
            _fix_attention(model, before, nh, keep_scale=True)
        elif kind == "heads":
            _select_attention(_get_module(model, st["module"]), st["keep"], None)
        elif kind == "head_dim":
            _select_attention_per_head(_get_module(model, st["module"]), st["keep"])
        elif kind == "repartition":
            m = _get_module(model, st["module"])
            width = m.num_heads * m.head_dim
            m.num_heads, m.head_dim = st["num_heads"], width // st["num_heads"]
            m.scale = m.head_dim ** -0.5
        elif kind == "mlp_hidden":
            _select_mlp(_get_module(model, st["module"]), st["keep"])
        else:
            raise ValueError(f"unknown pruning step kind {kind!r}")
        _record(model).append(st)


def _attention_attrs(model: nn.Module) -> dict:
    return {n: [int(m.num_heads), int(m.head_dim), float(getattr(m, "scale", m.head_dim ** -0.5))]
            for n, m in attention_modules(model).items()}


def _history_of(model: nn.Module, pruner_or_history) -> list:
    if pruner_or_history is None:
        return pruning_record(model)
    if hasattr(pruner_or_history, "pruning_history"):  # a torch-pruning pruner used by hand
        raise ValueError("pass the model (its record holds the input size); pruner objects of "
                         "hand-made pruning are not supported - use prune_structured")
    if isinstance(pruner_or_history, list):
        return pruner_or_history
    raise ValueError(f"pruner_or_history must be None or a list of steps, got {type(pruner_or_history).__name__}")


def pruned_payload(model: nn.Module, pruner_or_history=None) -> dict:
    """``{"format", "history", "attention", "state_dict"}`` - loadable with weights_only=True."""
    return {"format": FORMAT, "history": _history_of(model, pruner_or_history),
            "attention": _attention_attrs(model),
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}


def save_pruned(model: nn.Module, pruner_or_history=None, path: str | Path = "pruned.pt") -> Path:
    """Store a pruned model as pruning history + state_dict, atomically.

    Args:
        model: a model pruned by this module (its :func:`pruning_record` is used when
            ``pruner_or_history`` is None).
        pruner_or_history: None or an explicit list of steps.
        path: target file (written via a temp file + rename).

    Returns:
        ``Path(path)``.
    """
    path = Path(path)
    atomic_torch_save(pruned_payload(model, pruner_or_history), path)
    return path


def rebuild_pruned(builder_fn: Callable[[], nn.Module], payload: dict) -> nn.Module:
    """Dense model from ``builder_fn()``, replay the history, load the weights (strict)."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} payload")
    model = builder_fn()
    _replay(model, payload["history"])
    attns = attention_modules(model)
    for n, (h, d, s) in payload.get("attention", {}).items():
        m = attns[n]
        m.num_heads, m.head_dim, m.scale = int(h), int(d), float(s)
        if hasattr(m, "attn_dim"):
            m.attn_dim = int(h) * int(d)
    model.load_state_dict(payload["state_dict"], strict=True)
    return model


def load_pruned(builder_fn: Callable[[], nn.Module], path: str | Path) -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned`.

    ``builder_fn()`` must return the dense, unpruned architecture (weights irrelevant);
    the recorded steps are replayed (torch-pruning ``DependencyGraph.load_pruning_history``
    for DepGraph steps, this module's surgeries for the others), attention attributes
    restored, then ``load_state_dict(torch.load(path, weights_only=True))``.

    Raises:
        FileNotFoundError: ``path`` missing. ValueError: not a file written by save_pruned.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path {path} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return rebuild_pruned(builder_fn, payload)


# --------------------------------------------------------------------------- sensitivity
def prunable_layers(model: nn.Module) -> list:
    """(name, module) of Conv2d / Linear layers (candidate roots for DepGraph)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def prune_stage(model: nn.Module, example_inputs, sparsity: float, prefix: str,
                importance: str = "magnitude", **kw) -> nn.Module:
    """:func:`prune_structured` restricted to layers whose name starts with ``prefix``.

    Every other Conv2d/Linear is passed as ``ignored_layers`` (their input channels still
    shrink where they consume a pruned stage). Raises ValueError if nothing matches.
    """
    layers = prunable_layers(model)
    inside = [m for n, m in layers if n.startswith(prefix)]
    if not inside:
        raise ValueError(f"prefix {prefix!r} matches no Conv2d/Linear layer")
    ignored = [m for n, m in layers if not n.startswith(prefix)]
    return prune_structured(model, example_inputs, sparsity, importance=importance, ignored_layers=ignored, **kw)


def stage_sensitivity(model: nn.Module, eval_fn: Callable[[nn.Module], float], sparsity: float,
                      stages, example_inputs, importance: str = "magnitude"):
    """Prune one stage at a time (no fine-tuning) and report the mIoU drop.

    Args:
        model: the trained model (not modified; each stage prunes a deep copy).
        eval_fn: ``eval_fn(model) -> miou`` (float in [0, 1]).
        sparsity: channel ratio removed inside the stage, [0, 1).
        stages: ``{label: module-name prefix}`` or a list of prefixes.
        example_inputs: (N,3,H,W) tensor or (H, W).

    Returns:
        DataFrame with columns ``stage, prefix, sparsity, params_m, params_m_base,
        miou_base, miou, miou_drop`` (params in millions).
    """
    sparsity = _check_sparsity(sparsity, "sparsity")
    if not isinstance(stages, dict):
        stages = {str(s): s for s in stages}
    base = float(eval_fn(model))
    p0 = sum(p.numel() for p in model.parameters()) / 1e6
    rows = []
    for label, prefix in stages.items():
        m = copy.deepcopy(model)
        prune_stage(m, example_inputs, sparsity, prefix, importance=importance)
        s = float(eval_fn(m))
        rows.append({"stage": label, "prefix": prefix, "sparsity": sparsity,
                     "params_m": sum(p.numel() for p in m.parameters()) / 1e6, "params_m_base": p0,
                     "miou_base": base, "miou": s, "miou_drop": base - s})
        del m
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- iterative
def sparsity_schedule(final_sparsity: float, steps: int, kind: str = "linear") -> list[float]:
    r"""Cumulative channel sparsity after each of ``steps`` pruning steps.

    Sparsity is the fraction of each group's channels removed, relative to the original
    widths. ``"linear"``: :math:`s_t = s_f t/n`; ``"cubic"`` (automated gradual pruning,
    AGP, Zhu & Gupta 2017, "To prune, or not to prune"):
    :math:`s_t = s_f + (s_i - s_f)(1 - t/n)^3` with :math:`s_i = 0`, which removes most
    channels early; ``"oneshot"``: :math:`s_t = s_f` for all t (with ``steps > 1`` the
    later steps only fine-tune). The last entry is exactly ``final_sparsity``; the list is
    non-decreasing.

    Args:
        final_sparsity: :math:`s_f` in [0, 1).
        steps: number of steps :math:`n \ge 1`.
        kind: ``"linear"`` | ``"cubic"`` | ``"oneshot"``.

    Returns:
        list of ``steps`` floats in [0, final_sparsity].

    Raises:
        ValueError: ``final_sparsity`` outside [0, 1), ``steps`` not a positive int, or
            unknown ``kind`` (the message names the parameter).
    """
    sf = _check_sparsity(final_sparsity, "final_sparsity")
    n = _check_steps(steps)
    if kind == "oneshot":
        out = [sf] * n
    elif kind == "linear":
        out = [sf * t / n for t in range(1, n + 1)]
    elif kind == "cubic":
        out = [sf + (0.0 - sf) * (1.0 - t / n) ** 3 for t in range(1, n + 1)]
    else:
        raise ValueError(f"kind must be one of {SCHEDULES}, got {kind!r}")
    out[-1] = sf  # exact, whatever the float arithmetic
    return [float(min(max(v, 0.0), sf)) for v in out]


def finetune_split(total_steps: int, steps: int) -> list[int]:
    """Fine-tune steps after each pruning step: ``total // k`` each, remainder to the last.

    So every schedule of ``k`` steps gets the same total fine-tune budget.

    Args:
        total_steps: total optimizer steps (>= 0).
        steps: number of pruning steps k (>= 1).

    Returns:
        list of ``steps`` non-negative ints summing to ``total_steps``.

    Raises:
        ValueError: ``total_steps`` negative / not an int (names ``total_finetune_steps``),
            or bad ``steps``.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 0:
        raise ValueError(f"total_finetune_steps must be a non-negative int, got {total_steps!r}")
    n = _check_steps(steps)
    out = [total_steps // n] * n
    out[-1] += total_steps - sum(out)
    return out


def channel_widths(model: nn.Module) -> dict:
    """``{param_name: shape}`` of every parameter: compares the widths of two pruned models."""
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


def prune_iteratively(model: nn.Module, example_inputs, sparsities: Iterable[float], importance: str = "magnitude",
                      between: Callable[[int, nn.Module], None] | None = None,
                      before: Callable[[int, nn.Module], None] | None = None,
                      calib_batches: Callable[[int], Iterable] | None = None,
                      loss_fn: Callable | None = None) -> nn.Module:
    """Prune ``model`` in place through cumulative sparsities, re-ranking channels at each step.

    One torch-pruning ``MetaPruner`` (DepGraph, Fang et al. 2023) with
    ``iterative_steps = len(sparsities)`` and a scheduler returning ``[0, *sparsities]``: at
    step t every group keeps ``int(C0 * (1 - sparsities[t]))`` channels, ``C0`` its width
    *before step 1*, so the final widths equal one-shot :func:`prune_structured` at
    ``sparsities[-1]``. (Composing one-shot calls with per-step ratios
    ``1 - (1-s_t)/(1-s_{t-1})`` would not: flooring at every step drifts, e.g. 64 channels
    at ``s_f = 0.45`` in two linear steps give 34, not 35.) The importance is re-estimated
    on the current, already pruned model at every step. Settings mirror
    ``prune_structured`` (classifier never pruned, attention blocks pruned by head
    dimension with ``num_heads`` kept, the softmax temperature folded into q); each step is
    appended to :func:`pruning_record`, so the result can be saved with :func:`save_pruned`.

    Example::

        sched = prune.sparsity_schedule(0.45, 4, "cubic")     # [0.260, 0.394, 0.443, 0.45]
        prune.prune_iteratively(model, (128, 128), sched, between=lambda t, m: finetune(m, 50))

    Args:
        model: float segmenter ``(N,3,H,W) -> (N,C,H,W)``; modified in place and returned.
        example_inputs: ``(N,3,H,W)`` float tensor or ``(H, W)`` for tracing.
        sparsities: non-decreasing cumulative channel sparsities in [0, 1), one per step
            (e.g. :func:`sparsity_schedule`). A step whose sparsity equals the previous one
            removes nothing (it only calls ``before`` / ``between``).
        importance: one of :data:`IMPORTANCES`.
        between: ``between(t, model)`` called after step t's pruning (fine-tune, evaluate).
        before: ``before(t, model)`` called before step t's importance estimate.
        calib_batches: ``calib_batches(t) -> iterable of (images float32 (N,3,H,W), masks
            int64 (N,H,W))``; required for ``"taylor"`` (gradients on the current model).
        loss_fn: ``loss_fn(logits, masks)`` of the Taylor gradients; default cross-entropy
            ignoring 255.

    Returns:
        the same ``model`` object, pruned to ``sparsities[-1]``.

    Raises:
        ValueError: empty / decreasing / out-of-range ``sparsities`` (names ``sparsities``),
            unknown ``importance``, ``"taylor"`` without ``calib_batches``, bad
            ``example_inputs``.
    """
    sched = [float(s) for s in sparsities]
    if not sched:
        raise ValueError("sparsities must hold at least one step")
    for s in sched:
        _check_sparsity(s, "sparsities")
    if any(b < a for a, b in zip(sched, sched[1:])):
        raise ValueError(f"sparsities must be non-decreasing, got {sched}")
    imp = _make_importance(importance)
    if importance == "taylor" and calib_batches is None:
        raise ValueError("importance='taylor' needs calib_batches (gradients of a few batches per step)")
    x = _example_inputs(example_inputs, model)
    final = sched[-1]

    def scheduler(ratio, n):
        # called for pruning_ratio (== final) and head_pruning_ratio (0 here); another
        # ratio keeps the shape of the schedule
        if ratio == final:
            return [0.0, *sched]
        return [0.0, *[ratio * s / final for s in sched]]

    ignored = []
    cls = getattr(model, "classifier", None)
    if isinstance(cls, nn.Module):
        ignored.append(cls)
    num_heads = {m.qkv: m.num_heads for m in attention_modules(model).values()}
    was_training = model.training
    model.eval()
    pruner = None
    if final > 0:
        pruner = tp.pruner.MetaPruner(
            model, x, importance=imp, pruning_ratio=final, iterative_steps=len(sched),
            iterative_pruning_ratio_scheduler=scheduler,
            ignored_layers=ignored, num_heads=num_heads, prune_num_heads=False, prune_head_dims=True,
            head_pruning_ratio=0.0)
    for t, s in enumerate(sched):
        if before is not None:
            before(t, model)
        if pruner is not None and (t == 0 or s > sched[t - 1]):
            model.eval()
            snap = _snapshot_attention(model)
            n_hist = len(pruner.pruning_history())
            if importance == "taylor":
                _accumulate_grads(model, calib_batches(t), loss_fn, "calib_batches")
            pruner.step()
            model.zero_grad(set_to_none=True)
            _fix_attention(model, snap, pruner.num_heads, keep_scale=True)
            _record(model).append(_tp_step(
                x, pruner.pruning_history()[n_hist:],
                attention={n: [m.num_heads, m.head_dim] for n, m in attention_modules(model).items()},
                sparsity=s, importance=importance, prune_heads=False, iterative_step=t + 1))
        elif pruner is not None:
            pruner.current_step += 1  # same target as before: nothing to remove at this step
        model.train(was_training)
        if between is not None:
            between(t, model)
    return model


__all__ = [
    "IMPORTANCES", "SCHEDULES", "RECORD_ATTR", "FORMAT",
    # structured (physical)
    "prune_structured", "prune_stage", "stage_sensitivity", "prunable_layers",
    # masked (zeros only)
    "prune_unstructured", "prune_filter_norm_masks", "zero_fraction", "keep_pruned_zeros",
    # heads
    "attention_modules", "head_config", "head_importance", "weight_head_importance", "head_gates",
    "prune_heads", "head_dim_importance", "prune_head_dim", "repartition_heads",
    # MLP hidden (Swin)
    "mlp_modules", "prune_mlp_hidden",
    # iterative
    "sparsity_schedule", "finetune_split", "prune_iteratively", "channel_widths",
    # save / load
    "pruning_record", "pruned_payload", "save_pruned", "rebuild_pruned", "load_pruned",
]
