r"""Bi-level pruning parameterization: searching per-layer widths under a MACs budget.

Source 002 (Yang, Zhao, et al., "Pruning Parameterization with Bi-level Optimization for
Efficient Semantic Segmentation on the Edge", CVPR 2023) parameterises channel pruning
with one scale :math:`s_c` per output channel (a depth-wise 1x1 conv after each conv,
initialised to 1). The forward pass uses the hard mask :math:`b = \mathbb{1}[s > \tau]`,

.. math::  a_l = b_l \odot (w_l \circledast a_{l-1}),

and the mask is found by the bi-level problem

.. math::
    \min_s \; L_m(w^*(s), s) = \mathrm{CE}(w^*, s) + \beta\, L_{reg}(s), \qquad
    w^*(s) = \arg\min_w \; \mathrm{CE}(w, s) + \tfrac{1}{2\lambda} \lVert w \rVert_2^2,

with :math:`L_{reg} = |\mathrm{MACs}(b) - C|^2` (here normalised by :math:`C^2`, see
:func:`macs_regulariser`) and the implicit-gradient approximation

.. math::
    \frac{dL_m}{ds} \approx \nabla_s L_m - \lambda\, b \odot [\nabla_w L_m]^2 .

Only the slides are public (no code). The closest public method with code is BiP (Zhang
et al., "Advancing Model Pruning via Bi-level Optimization", NeurIPS 2022): one (or k)
weight step(s), then one mask step on a different batch. This module implements the
method from scratch:

- :class:`ChannelMask` - the per-channel scale ``s`` with the straight-through hard mask.
- :func:`attach_masks` - one mask per torch-pruning dependency group (coupled channels
  of residual adds / concats share one mask, so the result can be removed physically).
- :func:`masked_macs` - differentiable MACs of the masked network.
- :func:`implicit_term` / :func:`exact_implicit_term` - the approximation and the exact
  first-order implicit term (double backward), for comparison.
- :func:`bilevel_search` - the alternating search.
- :func:`apply_masks` - masks -> physical channel removal (torch-pruning).
- baselines at matched MACs: :func:`magnitude_prune_to_macs`, :func:`uniform_width`,
  :func:`random_masks_to_macs` (all through the same groups and the same physical path).

Example (any CNN whose convs torch-pruning can trace; ``loader`` yields
``(image float32 (N,3,H,W), mask int64 (N,H,W))``)::

    from study import bilevel, models
    x = torch.zeros(1, 3, 128, 128)
    target = 0.5 * models.gmacs(model, (128, 128))                   # GMACs budget C
    res = bilevel.bilevel_search(model, loader, target, input_hw=(128, 128), steps=100)
    small = bilevel.apply_masks(model, res.masks, x)                # physically smaller
    mag, keep = bilevel.magnitude_prune_to_macs(model, target, (128, 128))  # baseline

    mm = bilevel.attach_masks(model, x)                             # the pieces
    bilevel.masked_macs(mm).backward()                              # d MACs / d s
    mm.remove()

Units: MACs are multiply-accumulates for ONE image at ``input_hw``; ``*_gmacs`` are in
units of 1e9 MACs (GMACs), counted by :func:`study.models.gmacs` (the study's one MACs
counter, the ``gmacs`` column of every table).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from . import IGNORE_INDEX
from .data import batch_stream
from .models import create_model, gmacs

#: Sub-module names whose output channels are never masked by default: attention q / k /
#: v projections are coupled through ``matmul`` + head ``reshape`` (REFERENCE.md:
#: torch-pruning cannot prune them channel-wise without breaking the head layout).
DEFAULT_IGNORED_NAME_PARTS = ("to_q", "to_k", "to_v", "qkv")


# --------------------------------------------------------------------------- the mask


class _HardThresholdSTE(torch.autograd.Function):
    """Forward ``1[s > tau]`` (float), backward identity (``db/ds := 1``).

    The backward is a plain identity, so it is itself differentiable (double backward
    through the mask works, see :func:`exact_implicit_term`).
    """

    @staticmethod
    def forward(fn_ctx, s: torch.Tensor, tau: float) -> torch.Tensor:  # noqa: D401
        return (s > tau).to(s.dtype)

    @staticmethod
    def backward(fn_ctx, grad: torch.Tensor):
        return grad, None


class ChannelMask(nn.Module):
    r"""Per-channel scale ``s`` (float32 ``(C,)``, init 1) with a straight-through hard mask.

    ``gate()`` returns the mask the forward pass multiplies a module's output channels by:

    - ``mode="ste"`` (default, source 002): value :math:`b = \mathbb{1}[s > \tau]`;
      backward is the *identity* straight-through estimator :math:`\partial b/\partial s
      := 1`. Hence :math:`\partial L/\partial s = \partial L/\partial m\,|_{m=b}`: exactly
      the gradient, with respect to the mask values, of the same network with a
      *continuous* mask ``m`` evaluated at ``m = b``. When ``s`` is binary (e.g. at
      initialisation, ``s = 1``) this is exactly the gradient of the continuous-mask
      network at ``s``. Channels with ``b = 0`` still receive a gradient (the output they
      would have produced times the incoming gradient), so they can come back.
    - ``mode="continuous"``: the mask is ``s`` itself (used in tests and for reference).

    ``s`` is the upper-level variable of the bi-level search.

    Args:
        channels: number of channels C (>= 1).
        tau: threshold (default 0.5).
        init: initial value of every ``s`` (default 1, source 002); must be > ``tau``
            (everything kept at the start).

    Raises:
        ValueError: ``channels < 1`` or ``init <= tau``.
    """

    def __init__(self, channels: int, tau: float = 0.5, init: float = 1.0):
        super().__init__()
        if channels < 1:
            raise ValueError(f"ChannelMask: channels must be >= 1, got {channels}")
        if not init > tau:
            raise ValueError(f"ChannelMask: init={init} must be above tau={tau} (start with every channel kept)")
        self.s = nn.Parameter(torch.full((channels,), float(init)))
        self.tau = float(tau)
        self.mode = "ste"

    def gate(self) -> torch.Tensor:
        """The (C,) mask used in the forward pass (see class doc)."""
        if self.mode == "continuous":
            return self.s
        return _HardThresholdSTE.apply(self.s, self.tau)

    def hard(self) -> torch.Tensor:
        """Boolean ``(C,)`` keep mask ``s > tau`` (no gradient)."""
        return (self.s.detach() > self.tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale the channel dim (dim 1 for ``(N, C, ...)``) of ``x`` by :meth:`gate`."""
        g = self.gate()
        return x * g.view(1, -1, *([1] * (x.dim() - 2)))


# --------------------------------------------------------------------------- groups


@dataclass
class _Member:
    """One module of a dependency group: which of its channels map to which mask entries."""

    name: str
    module: nn.Module
    idxs: torch.Tensor  # channel indices in the module (int64)
    root_idxs: torch.Tensor  # matching indices in the group's mask (int64)


@dataclass
class MaskGroup:
    """A torch-pruning dependency group and its shared :class:`ChannelMask`.

    Attributes:
        key: name of the root conv (stable across copies of the same architecture).
        channels: number of coupled channels (length of the mask).
        out_members: modules whose OUTPUT channels are the group's channels (convs,
            linears, BNs).
        in_members: convs / linears whose INPUT channels are the group's channels.
        gated: the subset of ``out_members`` whose output is multiplied by the mask (a
            BN that directly follows a conv is gated instead of the conv).
        tp_group: the torch-pruning ``Group`` (for importance scores).
    """

    key: str
    channels: int
    out_members: list
    in_members: list
    gated: list
    tp_group: object = None


def _is_conv_or_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Linear))


def default_ignored_layers(model: nn.Module) -> list:
    """Layers whose output channels are not searched: ``model.classifier`` (if any) and
    the attention projections named in :data:`DEFAULT_IGNORED_NAME_PARTS`."""
    ignored = []
    if isinstance(getattr(model, "classifier", None), nn.Module):
        ignored += [m for m in model.classifier.modules() if _is_conv_or_linear(m)]
    for name, m in model.named_modules():
        if _is_conv_or_linear(m) and any(p in name.split(".") for p in DEFAULT_IGNORED_NAME_PARTS):
            ignored.append(m)
        elif _is_conv_or_linear(m) and any(part in DEFAULT_IGNORED_NAME_PARTS
                                          for part in name.split(".")[:-1]):
            ignored.append(m)
    return ignored


def _build_dg(model: nn.Module, example_inputs: torch.Tensor):
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)
    finally:
        model.train(was)
    return dg


def find_groups(model: nn.Module, example_inputs: torch.Tensor, ignored_layers=None) -> list[MaskGroup]:
    """Coupled channel groups of ``model`` from torch-pruning's DependencyGraph.

    ``DG.get_all_groups(ignored_layers, root_module_types=[nn.Conv2d, nn.Linear])``: each
    group is the set of channels that must be removed together (a residual stream, a
    concat input, a depth-wise conv and its producer). Groups that would prune an ignored
    layer's outputs (classifier, attention q/k/v) are skipped by torch-pruning.

    Args:
        model: the network (no masks attached).
        example_inputs: float32 ``(1, 3, H, W)``.
        ignored_layers: modules never pruned (default :func:`default_ignored_layers`).

    Returns:
        list of :class:`MaskGroup` (without masks).
    """
    dg = _build_dg(model, example_inputs)
    if ignored_layers is None:
        ignored_layers = default_ignored_layers(model)
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for g in dg.get_all_groups(ignored_layers=list(ignored_layers),
                               root_module_types=[nn.Conv2d, nn.Linear]):
        root = g[0].dep.target.module
        n = len(g[0].idxs)
        outs, ins = [], []
        for item in g:
            dep = item.dep
            mod = dep.target.module
            if not isinstance(mod, nn.Module) or mod not in names:
                continue  # element-wise / reshape / concat nodes
            idxs = torch.as_tensor(list(item.idxs), dtype=torch.long)
            ridx = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
            mem = _Member(names[mod], mod, idxs, ridx)
            is_out = dg.is_out_channel_pruning_fn(dep.handler)
            is_in = dg.is_in_channel_pruning_fn(dep.handler)
            dw = isinstance(mod, nn.Conv2d) and mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
            if is_out and (isinstance(mod, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)) or dw):
                if not any(o.module is mod for o in outs):
                    outs.append(mem)
            elif is_in and _is_conv_or_linear(mod) and not dw:
                if not any(o.module is mod for o in ins):
                    ins.append(mem)
        if not outs:
            continue
        # gate BNs, and convs / linears that are not directly followed by a BN of the group
        out_mods = {o.module for o in outs}
        gated = []
        for o in outs:
            if isinstance(o.module, nn.modules.batchnorm._BatchNorm):
                gated.append(o)
                continue
            node = dg.module2node.get(o.module)
            nxt = [nd.module for nd in (node.outputs if node is not None else [])]
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m in out_mods for m in nxt):
                continue
            gated.append(o)
        groups.append(MaskGroup(key=names[root], channels=n, out_members=outs, in_members=ins,
                                gated=gated, tp_group=g))
    return groups


# --------------------------------------------------------------------------- masked model


@dataclass
class _ConvSpec:
    name: str
    module: nn.Module
    k: int  # kernel area (1 for Linear)
    groups: int
    cin: int
    cout: int
    positions: int  # output positions per image (H_out * W_out, or tokens for Linear)
    out_src: list = field(default_factory=list)  # (group index, idxs, root_idxs)
    in_src: list = field(default_factory=list)
    depthwise: bool = False


class MaskedModel:
    """A model with one :class:`ChannelMask` per dependency group, applied by forward hooks.

    Attributes:
        model: the wrapped network (its forward is masked while hooks are attached).
        groups: list of :class:`MaskGroup`.
        masks: ``nn.ModuleList`` of :class:`ChannelMask`, ``masks[i]`` for ``groups[i]``.
        input_hw: the (H, W) the MACs are computed for.
        dense_gmacs: MACs of the unmasked model (GMACs, :func:`study.models.gmacs`).
        other_macs: MACs that no mask changes (attention matmuls, convs of ignored
            layers whose in/out channels are not in any group are still in the conv sum);
            ``dense - sum(conv/linear MACs)``, a constant.
    """

    def __init__(self, model: nn.Module, groups: list, input_hw, tau: float = 0.5, s_init: float = 1.0):
        self.model = model
        self.groups = groups
        self.input_hw = tuple(int(v) for v in input_hw)
        dev = next(model.parameters()).device
        self.masks = nn.ModuleList([ChannelMask(g.channels, tau, s_init) for g in groups]).to(dev)
        self._hooks = []
        self._specs = self._conv_specs()
        self.dense_gmacs = gmacs(model, self.input_hw)
        conv_dense = sum(self._spec_macs(sp, None) for sp in self._specs)
        self.other_macs = self.dense_gmacs * 1e9 - float(conv_dense)
        self.attach()

    # -- hooks
    def attach(self) -> None:
        """(Re-)install the masking forward hooks."""
        self.remove()
        for gi, g in enumerate(self.groups):
            for mem in g.gated:
                self._hooks.append(mem.module.register_forward_hook(self._make_hook(gi, mem)))

    def _make_hook(self, gi: int, mem: _Member):
        mask = self.masks[gi]

        def hook(module, inputs, out):
            gate = mask.gate()
            c = out.shape[1] if not isinstance(module, nn.Linear) else out.shape[-1]
            full = torch.ones(c, dtype=out.dtype, device=out.device)
            full = full.index_put((mem.idxs.to(out.device),), gate[mem.root_idxs.to(out.device)])
            if isinstance(module, nn.Linear):
                return out * full
            return out * full.view(1, -1, *([1] * (out.dim() - 2)))

        return hook

    def remove(self) -> None:
        """Remove the hooks (the model becomes the plain, unmasked network)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- MACs
    def _conv_specs(self) -> list:
        shapes = {}
        hooks = []
        mods = [(n, m) for n, m in self.model.named_modules() if _is_conv_or_linear(m)]
        for n, m in mods:
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape))))
        was = self.model.training
        self.model.eval()
        try:
            dev = next(self.model.parameters()).device
            with torch.no_grad():
                self.model(torch.zeros(1, 3, *self.input_hw, device=dev))
        finally:
            self.model.train(was)
            for h in hooks:
                h.remove()
        gidx = {}
        for gi, g in enumerate(self.groups):
            for mem in g.out_members:
                gidx.setdefault(("out", id(mem.module)), []).append((gi, mem.idxs, mem.root_idxs))
            for mem in g.in_members:
                gidx.setdefault(("in", id(mem.module)), []).append((gi, mem.idxs, mem.root_idxs))
        specs = []
        for n, m in mods:
            if n not in shapes:
                continue  # not used in forward
            shp = shapes[n]
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1]
                sp = _ConvSpec(n, m, k, m.groups, m.in_channels, m.out_channels, int(shp[-1] * shp[-2]))
                sp.depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
            else:
                pos = int(math.prod(shp[:-1]))  # batch 1
                sp = _ConvSpec(n, m, 1, 1, m.in_features, m.out_features, pos)
            sp.out_src = gidx.get(("out", id(m)), [])
            sp.in_src = gidx.get(("in", id(m)), [])
            specs.append(sp)
        return specs

    @staticmethod
    def _keep(n: int, srcs, gates, like):
        if not srcs or gates is None:
            return torch.ones(n, dtype=torch.float64, device=like)
        v = torch.ones(n, dtype=torch.float64, device=like)
        for gi, idxs, ridx in srcs:
            v = v.index_put((idxs.to(like),), gates[gi][ridx.to(like)].to(torch.float64))
        return v

    def _spec_macs(self, sp: _ConvSpec, gates) -> torch.Tensor:
        dev = "cpu" if gates is None else gates[0].device
        kout = self._keep(sp.cout, sp.out_src, gates, dev)
        if sp.depthwise:
            return sp.k * sp.positions * kout.sum()
        kin = self._keep(sp.cin, sp.in_src, gates, dev)
        g = sp.groups
        prod = (kout.view(g, -1).sum(1) * kin.view(g, -1).sum(1)).sum()
        return sp.k * sp.positions * prod

    def macs(self, gates: list | None = None) -> torch.Tensor:
        """Differentiable MACs (float64 scalar, in MACs, not GMACs) of the masked network.

        .. math::
            \\mathrm{MACs}(b) = \\sum_{\\text{conv } l} k_h k_w\\, H^{out}_l W^{out}_l
              \\sum_{g=1}^{G_l} \\Big(\\sum_{o \\in g} b^{out}_{l,o}\\Big)
              \\Big(\\sum_{i \\in g} b^{in}_{l,i}\\Big) + \\mathrm{MACs}_{other}

        (for a depth-wise conv, whose input and output channel are the same mask entry,
        the term is :math:`k_h k_w H W \\sum_c b_c`). ``b`` are the STE gates, so the value
        is the exact count of the hard-masked network and the gradient flows to ``s``.

        Args:
            gates: optional list of (C_i,) tensors replacing the masks' gates (e.g. hard
                boolean masks from a baseline); default: ``mask.gate()`` of each group.
        """
        if gates is None:
            gates = [m.gate() for m in self.masks]
        gates = [g.to(torch.float64) if g.dtype != torch.float64 else g for g in gates]
        total = sum(self._spec_macs(sp, gates) for sp in self._specs)
        return total + self.other_macs

    def hard_masks(self) -> dict:
        """``{group key: bool (C,) keep mask}`` of the current ``s``."""
        return {g.key: m.hard().cpu() for g, m in zip(self.groups, self.masks)}

    def gates_from(self, keep: dict) -> list:
        """List of float gates (group order) from a ``{key: bool mask}`` dict."""
        dev = self.masks[0].s.device
        out = []
        for g in self.groups:
            if g.key not in keep:
                raise KeyError(f"masks: no entry for group {g.key!r}")
            k = torch.as_tensor(keep[g.key]).to(dev)
            if k.numel() != g.channels:
                raise ValueError(f"masks[{g.key!r}] has {k.numel()} entries, group has {g.channels}")
            out.append(k.to(torch.float64))
        return out

    def set_masks(self, keep: dict) -> None:
        """Set each ``s`` to 1 where kept and 0 where removed (so ``gate() == keep``)."""
        with torch.no_grad():
            for g, m in zip(self.groups, self.masks):
                m.s.copy_(torch.as_tensor(keep[g.key], dtype=m.s.dtype).to(m.s.device))


def attach_masks(model: nn.Module, example_inputs: torch.Tensor, ignored_layers=None,
                 tau: float = 0.5, input_hw: Sequence[int] | None = None, s_init: float = 1.0) -> MaskedModel:
    """Insert one :class:`ChannelMask` per torch-pruning dependency group.

    The mask of a group multiplies the OUTPUT channels of every module that writes the
    group's channels (after the BN when a conv is followed by one, else after the conv),
    so coupled convs (residual adds, concats, a depth-wise conv and its producer) share
    one mask and a masked channel is exactly zero wherever it flows - which is what makes
    the removal physical and exact (:func:`apply_masks`).

    Args:
        model: network; hooks are registered on it (call ``.remove()`` to detach).
        example_inputs: float32 ``(1, 3, H, W)`` used for tracing.
        ignored_layers: modules whose outputs are never masked (default
            :func:`default_ignored_layers`: the classifier and attention q/k/v).
        tau: mask threshold.
        input_hw: size the MACs refer to (default: the example input's H, W).
        s_init: initial scale of every channel (> ``tau``; default 1, source 002).

    Returns:
        :class:`MaskedModel`.

    Raises:
        ValueError: ``example_inputs`` not a 4-d tensor, or no prunable group found.
    """
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 4:
        raise ValueError("attach_masks: example_inputs must be a float tensor (1, 3, H, W)")
    groups = find_groups(model, example_inputs, ignored_layers)
    if not groups:
        raise ValueError("attach_masks: torch-pruning found no prunable channel group in model")
    hw = tuple(example_inputs.shape[-2:]) if input_hw is None else tuple(input_hw)
    return MaskedModel(model, groups, hw, tau=tau, s_init=s_init)


def masked_macs(mm: MaskedModel, gates: list | None = None) -> torch.Tensor:
    """Differentiable GMACs (float64 scalar) of the masked network; see :meth:`MaskedModel.macs`."""
    return mm.macs(gates) / 1e9


def macs_regulariser(macs_g: torch.Tensor, target_gmacs: float, norm: str = "target") -> torch.Tensor:
    r"""MACs penalty :math:`L_{reg}` of the upper level.

    - ``norm="target"`` (this study's default): :math:`(\mathrm{MACs}(b) - C)^2 / C^2`, so that
      :math:`\beta` does not depend on the unit or the resolution;
    - ``norm="source002"``: source 002's literal :math:`|\sum_l \mathrm{MACs}_l - C|^2` with
      MACs in GMACs.

    Args:
        macs_g: GMACs of the masked network (float64 scalar tensor, differentiable).
        target_gmacs: the budget C, GMACs (> 0).
        norm: ``"target"`` or ``"source002"``.

    Raises:
        ValueError: unknown ``norm``.
    """
    if norm == "target":
        return ((macs_g - target_gmacs) / target_gmacs) ** 2
    if norm == "source002":
        return (macs_g - target_gmacs) ** 2
    raise ValueError(f"macs_regulariser: unknown norm {norm!r} (expected 'target' or 'source002')")


def _check_target(target_gmacs, dense_gmacs: float, floor_gmacs: float = 0.0) -> float:
    if not isinstance(target_gmacs, (int, float)) or isinstance(target_gmacs, bool) \
            or not math.isfinite(float(target_gmacs)):
        raise ValueError(f"target_gmacs must be a finite number of GMACs, got {target_gmacs!r}")
    t = float(target_gmacs)
    if t <= 0:
        raise ValueError(f"target_gmacs must be > 0 GMACs, got {t}")
    if t > dense_gmacs:
        raise ValueError(f"target_gmacs={t:.6g} GMACs is above the dense model's "
                         f"{dense_gmacs:.6g} GMACs: nothing to prune")
    if t < floor_gmacs:
        raise ValueError(f"target_gmacs={t:.6g} GMACs is below the smallest reachable "
                         f"{floor_gmacs:.6g} GMACs (minimum channels kept per group)")
    return t


# --------------------------------------------------------------------------- implicit term


def _gated_params(g: MaskGroup):
    """(param, idxs, root_idxs) for the out-channel slices of every module the mask of
    ``g`` scales: conv / linear weight rows (+ bias), BN weight and bias."""
    out = []
    for mem in g.out_members:
        for pn in ("weight", "bias"):
            p = getattr(mem.module, pn, None)
            if isinstance(p, nn.Parameter) and p.requires_grad:
                out.append((p, mem.idxs, mem.root_idxs))
    return out


def implicit_term(mm: MaskedModel, lam: float) -> list:
    r"""Source 002's approximation of the implicit term, from the ``.grad`` of the weights.

    .. math:: \Delta_c = -\lambda\, b_c \sum_{j \in \mathcal{W}_c} (\nabla_{w_j} L)^2

    where :math:`\mathcal{W}_c` are the weights of channel ``c``: the output-channel
    slices (rows of conv / linear weights, their bias, BN weight and bias) of every module
    the group's mask scales. Reduction rationale: for ``a_c = s_c y_c(w_c)`` with weights
    ``w_c`` that only reach channel ``c``, :math:`\partial^2 L/\partial s_c\partial w_c
    = \nabla_{w_c} L / s_c + (\text{curvature terms})`; dropping the curvature (the
    :math:`H \approx 0` step of the implicit-function theorem that gives
    :math:`dw^*/ds \approx -\lambda \nabla^2_{ws} L`) leaves
    :math:`-\lambda \sum_{j\in\mathcal{W}_c} (\nabla_{w_j} L)^2` for a kept channel and
    0 for a removed one (its weights get no gradient through the hard mask).

    Requires ``.grad`` of the weights to hold :math:`\nabla_w L_m` (call after backward).

    Returns:
        list of float32 ``(C_i,)`` tensors, one per group.
    """
    res = []
    for g, m in zip(mm.groups, mm.masks):
        acc = torch.zeros(g.channels, dtype=torch.float32, device=m.s.device)
        for p, idxs, ridx in _gated_params(g):
            if p.grad is None:
                continue
            gg = p.grad.detach()[idxs.to(p.device)].float() ** 2
            acc.index_add_(0, ridx.to(acc.device), gg.reshape(gg.shape[0], -1).sum(1))
        res.append(-lam * m.hard().float() * acc)
    return res


def exact_implicit_term(mm: MaskedModel, loss_fn: Callable[[], torch.Tensor], lam: float) -> list:
    r"""Exact first-order implicit term by double backward (Hessian-vector product).

    .. math:: \Delta = -\lambda\, \nabla^2_{s w} L \cdot \nabla_w L
        = -\lambda\, \nabla_s\big(\nabla_w L(w, s) \cdot \mathrm{sg}[\nabla_w L]\big)

    i.e. :math:`(dw^*/ds)^\top \nabla_w L_m` with :math:`dw^*/ds = -(H_{ww} + I/\lambda)^{-1}
    \nabla^2_{ws} L \approx -\lambda \nabla^2_{ws} L` (the same :math:`H_{ww} \approx 0`
    step source 002 and BiP make) but with the full mixed second derivative, including
    the cross-channel / cross-layer terms the approximation :func:`implicit_term` drops.

    Args:
        mm: masked model.
        loss_fn: closure computing the scalar loss ``L`` on a fixed batch (deterministic:
            call with the model in eval mode).
        lam: lambda.

    Returns:
        list of float32 ``(C_i,)`` tensors, one per group.
    """
    ws = [p for p in mm.model.parameters() if p.requires_grad]
    ss = [m.s for m in mm.masks]
    # aten::hardsigmoid_backward / hardswish_backward have no double backward: use the
    # same piecewise-linear functions written with clamp (identical values and gradients)
    patched = []
    for mod in mm.model.modules():
        if isinstance(mod, nn.Hardsigmoid):
            mod.forward = lambda x: torch.clamp(x + 3.0, 0.0, 6.0) / 6.0
            patched.append(mod)
        elif isinstance(mod, nn.Hardswish):
            mod.forward = lambda x: x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0
            patched.append(mod)
    try:
        loss = loss_fn()
        gw = torch.autograd.grad(loss, ws, create_graph=True, allow_unused=True)
        dot = sum((g * g.detach()).sum() for g in gw if g is not None)
        gs = torch.autograd.grad(dot, ss, allow_unused=True)
    finally:
        for mod in patched:
            del mod.forward
    return [(-lam * g).detach() if g is not None else torch.zeros_like(s) for g, s in zip(gs, ss)]


def implicit_agreement(mm: MaskedModel, loss_fn: Callable[[], torch.Tensor], lam: float) -> dict:
    """Compare :func:`implicit_term` with :func:`exact_implicit_term` on one batch.

    Returns:
        dict ``cosine`` (cosine similarity of the concatenated per-channel vectors),
        ``rel_err`` (``||approx - exact|| / ||exact||``), ``sign_agree`` (fraction of kept
        channels where the signs agree), ``norm_approx``, ``norm_exact``.
    """
    exact = torch.cat(exact_implicit_term(mm, loss_fn, lam))
    for p in mm.model.parameters():
        p.grad = None
    loss = loss_fn()
    loss.backward()
    approx = torch.cat(implicit_term(mm, lam))
    for p in mm.model.parameters():
        p.grad = None
    for m in mm.masks:
        m.s.grad = None
    kept = torch.cat([m.hard() for m in mm.masks])
    cos = F.cosine_similarity(approx.double(), exact.double(), dim=0).item()
    rel = ((approx - exact).norm() / exact.norm().clamp_min(1e-30)).item()
    nz = kept & ((exact != 0) | (approx != 0))
    sign = (torch.sign(approx[nz]) == torch.sign(exact[nz])).float().mean().item() if nz.any() else float("nan")
    return {"cosine": cos, "rel_err": rel, "sign_agree": sign,
            "norm_approx": approx.norm().item(), "norm_exact": exact.norm().item()}


# --------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    """Outcome of :func:`bilevel_search`.

    Attributes:
        masks: ``{group key: bool (C,) keep mask}`` after projection to the target.
        widths: list of dicts ``group, channels, kept, kept_frac`` (per group).
        history: per-step lists ``step, ce, gmacs (hard-mask MACs before projection),
            reg, implicit_norm, grad_s_norm, kept_frac``.
        s: ``{group key: float (C,) final scales}``.
        gmacs_raw: MACs (GMACs) of the hard masks ``s > tau`` at the end of the search.
        gmacs_final: MACs (GMACs) of ``masks`` (after projection).
        wall_s, cpu_s: wall-clock and process CPU seconds of the search.
        config: the search arguments.
    """

    masks: dict
    widths: list
    history: dict
    s: dict
    gmacs_raw: float
    gmacs_final: float
    wall_s: float
    cpu_s: float
    config: dict

    def to_dict(self) -> dict:
        """Plain dict (loads with ``torch.load(weights_only=True)``)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchResult":
        return cls(**d)


def _ce(logits, target):
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def widths_of(mm: MaskedModel, keep: dict) -> list:
    """Per-group kept channels: list of dicts ``group, channels, kept, kept_frac``."""
    return [{"group": g.key, "channels": g.channels, "kept": int(torch.as_tensor(keep[g.key]).sum()),
             "kept_frac": float(torch.as_tensor(keep[g.key]).float().mean())} for g in mm.groups]


def _segments(g: MaskGroup, device=None) -> list:
    """The group's mask entries per module writing them: one int64 index tensor per distinct
    ``root_idxs`` of its ``out_members`` (a concat group has one per branch; a plain group
    one covering every entry)."""
    segs = sorted({tuple(sorted(m.root_idxs.tolist())) for m in g.out_members})
    return [torch.as_tensor(seg, dtype=torch.long, device=device) for seg in segs]


def masks_from_scores(mm: MaskedModel, scores: list, target_gmacs: float, min_keep_frac: float = 0.1,
                      per_group: bool = False) -> dict:
    """Hard masks hitting ``target_gmacs`` from per-channel scores (higher = keep).

    Global mode: keep channels whose score >= a threshold found by bisection over the
    sorted scores so that :func:`masked_macs` is as close as possible to the target (the
    top ``ceil(min_keep_frac * C)`` (>= 1) channels of every group are always kept).
    ``per_group=True``: the same kept fraction in every group (uniform width), fraction
    found by bisection, channels chosen by score within each group.

    Returns:
        ``{group key: bool (C,)}``.

    Raises:
        ValueError: ``target_gmacs`` not in (floor, dense].
    """
    dev = mm.masks[0].s.device
    scores = [torch.as_tensor(s, dtype=torch.float64, device=dev).flatten() for s in scores]
    mins = [max(1, math.ceil(min_keep_frac * g.channels)) for g in mm.groups]
    orders = [torch.argsort(s, descending=True) for s in scores]
    # every module writing the group's channels keeps >= ceil(min_keep_frac * its share)
    # (>= 1): a concat group (e.g. TopFormer's token pyramid) must not empty one branch
    forced = []
    for i, g in enumerate(mm.groups):
        f = torch.zeros(g.channels, dtype=torch.bool, device=dev)
        for seg_t in _segments(g, dev):
            n = max(1, math.ceil(min_keep_frac * len(seg_t)))
            f[seg_t[torch.argsort(scores[i][seg_t], descending=True)[:n]]] = True
        forced.append(f)

    def keep_top(i, k):
        k_ = forced[i].clone()
        k_[orders[i][:max(k, mins[i])]] = True
        return k_

    def macs_of(keeps):
        with torch.no_grad():
            return float(masked_macs(mm, [k.double() for k in keeps]))

    floor = macs_of([keep_top(i, 0) for i in range(len(scores))])
    _check_target(target_gmacs, mm.dense_gmacs, floor)
    if per_group:
        lo, hi = 0.0, 1.0  # kept fraction
        best = None
        for _ in range(40):
            mid = (lo + hi) / 2
            keeps = [keep_top(i, int(round(mid * g.channels))) for i, g in enumerate(mm.groups)]
            v = macs_of(keeps)
            if best is None or abs(v - target_gmacs) < best[0]:
                best = (abs(v - target_gmacs), keeps)
            if v > target_gmacs:
                hi = mid
            else:
                lo = mid
        keeps = best[1]
    else:
        allv = torch.sort(torch.cat(scores)).values
        lo, hi = 0, allv.numel() - 1
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            thr = allv[mid]
            keeps = [(s >= thr) | keep_top(i, 0) for i, s in enumerate(scores)]
            v = macs_of(keeps)
            if best is None or abs(v - target_gmacs) < best[0]:
                best = (abs(v - target_gmacs), keeps)
            if v > target_gmacs:
                lo = mid + 1
            else:
                hi = mid - 1
        keeps = best[1]
    return {g.key: k.cpu() for g, k in zip(mm.groups, keeps)}


#: Source 002's parameterisation (as far as the slides state it): ``s`` starts at 1,
#: threshold 0.5, :math:`L_{reg} = |\mathrm{MACs} - C|^2` (here normalised by :math:`C^2`),
#: per-element Adam on ``s`` as in BiP. Pass as ``**SOURCE002_PARAMS`` to :func:`bilevel_search`.
SOURCE002_PARAMS = {"s_init": 1.0, "tau": 0.5, "lr_s": 0.02, "reg_scale": 1.0, "s_optim": "adam", "keep_alive": False}
#: This study's calibrated parameterisation (the defaults of :func:`bilevel_search`): ``s``
#: starts 0.1 above the threshold, the penalty is scaled by the number of mask entries
#: (``reg_scale="channels"``: :math:`\beta` then weighs the penalty's gradient per average
#: channel, comparable with the CE gradient of one channel), the mask step uses one second
#: moment per mask group (relative per-channel gradients are kept inside a group, so
#: channels leave in the order of their net gradient instead of all at once, and no group's
#: step is set by another's) and every module writing a group keeps >= 35 % of its channels
#: during the search and in the projection (``keep_alive``, ``min_keep_frac``). Measured on
#: ``cpu`` (TopFormer-B parent, 120 steps, val mIoU after 30 fine-tune steps): one shared
#: moment without a floor met the S budget only by switching the stem off (val 0.0024);
#: with a 25 % floor it stalled at +40 % MACs (the clamped stem's gradient set everyone's
#: step); per-group moments with a 35 % floor reached the T and S budgets within 1 % (val
#: 0.127 and 0.205) and DeepLabV3+'s 45 % budget within 4 %. See notebook 06 for how it
#: maps to source 002's.
CALIBRATED_PARAMS = {"s_init": 0.6, "tau": 0.5, "lr_s": 0.02, "reg_scale": "channels", "s_optim": "adam_group",
                     "keep_alive": True, "min_keep_frac": 0.35}


class _SharedAdam:
    """Adam on a list of tensors with a shared second-moment estimate (mean of g^2) instead
    of one per entry: the step keeps the relative sizes of the per-channel gradients
    (momentum SGD whose scale is set by the RMS gradient). ``per_tensor=False``: ONE
    estimate for all entries of all tensors; ``per_tensor=True``: one per tensor (here: per
    mask group), so relative sizes are kept inside a group and every group moves at its own
    RMS scale."""

    def __init__(self, params: list, lr: float, betas=(0.9, 0.99), eps: float = 1e-12, per_tensor: bool = False):
        self.params, self.lr, self.b1, self.b2, self.eps = list(params), float(lr), betas[0], betas[1], eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.per_tensor = bool(per_tensor)
        self.v = [0.0] * len(self.params) if self.per_tensor else 0.0
        self.t = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        gs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.per_tensor:
            self.v = [self.b2 * v + (1 - self.b2) * float(g.double().pow(2).mean()) for v, g in zip(self.v, gs)]
            vhats = [v / (1 - self.b2 ** self.t) for v in self.v]
        else:
            ms = float(torch.cat([g.flatten() for g in gs]).double().pow(2).mean())
            self.v = self.b2 * self.v + (1 - self.b2) * ms
            vhats = [self.v / (1 - self.b2 ** self.t)] * len(self.params)
        for p, g, m, vhat in zip(self.params, gs, self.m, vhats):
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            mhat = m / (1 - self.b1 ** self.t)
            p.sub_(self.lr * mhat / (math.sqrt(vhat) + self.eps))


def bilevel_search(model: nn.Module, train_loader, target_gmacs: float, *, input_hw: Sequence[int],
                   beta: float = 0.01, lam: float = 0.1, tau: float = 0.5, inner_steps: int = 1,
                   steps: int = 100, implicit: bool = True, lr_w: float = 5e-4, lr_s: float = 0.02,
                   s_init: float = 0.6, reg_scale: float | str = "channels", reg_norm: str = "target",
                   s_optim: str = "adam_group", keep_alive: bool = True,
                   l2_scale: float = 1e-3, min_keep_frac: float = 0.35, seed: int = 0,
                   ignored_layers=None, loss_fn: Callable | None = None, project: bool = True,
                   log_every: int = 0, mm: MaskedModel | None = None) -> SearchResult:
    r"""Bi-level mask search of source 002 (alternating, BiP-style).

    Each of ``steps`` iterations:

    1. lower level - ``inner_steps`` AdamW steps on the weights ``w`` (masks fixed) on
       batches A minimising :math:`\mathrm{CE}(w, s) + \lVert w\rVert^2/(2\lambda)`. The
       L2 term is applied as decoupled weight decay ``lr_w * l2_scale / lam * w``
       (``l2_scale = 1`` is the literal objective; the default ``1e-3`` makes
       ``lam = 0.1`` the usual AdamW decay of 0.01 - the literal 1/lam = 10 collapses a
       trained network within a few dozen steps, see the notebook);
    2. upper level - one step on ``s`` on a different batch B with
       :math:`g_s = \nabla_s[\mathrm{CE} + \beta K L_{reg}] - \lambda\, b \odot
       \sum_{j\in\mathcal W_c} (\nabla_{w_j}\mathrm{CE})^2` (last term only when
       ``implicit``; :func:`implicit_term`; :math:`K` = ``reg_scale``); ``s`` is clipped
       to [0, 2]. This step runs its own forward / backward through the network (batch B):
       per iteration the search costs ``inner_steps + 1`` forward/backward passes but
       updates the weights only ``inner_steps`` times.

    After the search, if ``project``, the final masks are the global threshold on ``s``
    whose MACs are closest to the target (:func:`masks_from_scores`); the raw hard-mask
    MACs at the end of the search, before any projection, are ``gmacs_raw``. The weights of
    ``model`` are updated in place (the search trains them); masks are removed from
    ``model`` at the end.

    Parameterisation (defaults :data:`CALIBRATED_PARAMS`; source 002's is
    :data:`SOURCE002_PARAMS`): ``s_init`` (every ``s`` starts there, > ``tau``),
    ``reg_scale`` (:math:`K`: a float, or ``"channels"`` for the number of mask entries),
    ``reg_norm`` (:func:`macs_regulariser`), ``s_optim`` (``"adam"``: torch Adam, one
    second moment per entry, as BiP; ``"adam_shared"``: one second moment for all of ``s``;
    ``"adam_group"``: one per mask group - relative per-channel gradients are kept inside a
    group and every group moves at the scale of its own RMS gradient, so the few
    high-resolution channels whose MACs gradient dwarfs all others cannot set the step of
    every other group), ``keep_alive`` (after each mask step the top
    ``ceil(min_keep_frac * n)`` scales of every module writing a group's ``n`` channels are
    kept above ``tau``: no group, and no concat branch, switches off entirely - without it,
    on ``cpu`` TopFormer-B searched to the S budget with ``"adam_shared"``, the stem group
    ``tpm.blocks.0.conv.1`` lost all 16 channels and the masked network predicted a constant).

    Args:
        model: network to search (e.g. a trained TopFormer-B), float32, train mode used.
        train_loader: yields ``(image float32 (N,3,H,W), mask int64 (N,H,W))``; read as
            one endless :func:`study.data.batch_stream` (a ``BatchStream`` given here is
            continued, not restarted).
        target_gmacs: MACs budget C in GMACs at ``input_hw``; must be in (0, dense].
        input_hw: ``(H, W)`` the MACs refer to.
        beta, lam, tau: source 002's beta (regulariser weight), lambda, threshold.
        inner_steps: weight steps per mask step (k).
        steps: mask steps.
        implicit: use the implicit-gradient term (False: source 002 Table 3 ablation).
        lr_w, lr_s: learning rates of weights (AdamW) and scales.
        s_init, reg_scale, reg_norm, s_optim: see above.
        l2_scale: scale of the lower-level L2 term (see above).
        min_keep_frac: fraction of each group's channels always kept by the projection.
        seed: seeds the batch order (through torch) and nothing else.
        ignored_layers: see :func:`attach_masks`.
        loss_fn: ``(logits, target) -> loss`` (default CE with ignore 255).
        project: project the final masks onto the MACs target.
        log_every: print progress every N steps (0: silent).
        mm: reuse an existing :class:`MaskedModel` of ``model`` (its ``s`` is used as is).

    Returns:
        :class:`SearchResult` (``history["gmacs"]``: hard-mask GMACs at each mask step;
        ``weight_steps`` / ``mask_steps`` / ``batches`` counts in ``config``).

    Raises:
        ValueError: bad ``target_gmacs`` (<= 0 or above the dense MACs), ``steps < 1``,
            ``inner_steps < 1``, ``beta < 0``, ``lam <= 0``, ``lr_s <= 0``, ``s_init <= tau``,
            unknown ``reg_scale`` / ``reg_norm`` / ``s_optim``.
    """
    for nm, v, ok in (("steps", steps, steps >= 1), ("inner_steps", inner_steps, inner_steps >= 1),
                      ("beta", beta, beta >= 0), ("lam", lam, lam > 0), ("lr_s", lr_s, lr_s > 0),
                      ("s_init", s_init, s_init > tau),
                      ("s_optim", s_optim, s_optim in ("adam", "adam_shared", "adam_group")),
                      ("reg_norm", reg_norm, reg_norm in ("target", "source002")),
                      ("reg_scale", reg_scale, reg_scale == "channels" or
                       (isinstance(reg_scale, (int, float)) and reg_scale >= 0))):
        if not ok:
            raise ValueError(f"bilevel_search: bad {nm}={v!r}")
    loss_fn = loss_fn or _ce
    dev = next(model.parameters()).device
    torch.manual_seed(seed)
    if mm is None:
        mm = attach_masks(model, torch.zeros(1, 3, *input_hw, device=dev), ignored_layers, tau=tau,
                          input_hw=input_hw, s_init=s_init)
    target = _check_target(target_gmacs, mm.dense_gmacs)
    n_mask = sum(g.channels for g in mm.groups)
    k_reg = float(n_mask) if reg_scale == "channels" else float(reg_scale)
    # keep_alive floors: per module writing a group's channels (a concat branch must not
    # empty either), as the projection (:func:`masks_from_scores`) does
    floors = [[(seg, max(1, math.ceil(min_keep_frac * len(seg)))) for seg in _segments(g, dev)] for g in mm.groups]
    ws = [p for p in model.parameters() if p.requires_grad]
    ss = [m.s for m in mm.masks]
    opt_w = torch.optim.AdamW(ws, lr=lr_w, weight_decay=l2_scale / lam)
    opt_s = torch.optim.Adam(ss, lr=lr_s) if s_optim == "adam" else \
        _SharedAdam(ss, lr=lr_s, per_tensor=s_optim == "adam_group")
    batches = batch_stream(train_loader)
    hist = {k: [] for k in ("step", "ce", "gmacs", "reg", "implicit_norm", "grad_s_norm", "kept_frac")}
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    for step in range(steps):
        # lower level: k weight steps on batches A
        for _ in range(inner_steps):
            x, y = next(batches)
            x, y = x.to(dev), y.to(dev)
            opt_w.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt_w.step()
        # upper level: one mask step on batch B
        x, y = next(batches)
        x, y = x.to(dev), y.to(dev)
        opt_w.zero_grad(set_to_none=True)
        opt_s.zero_grad(set_to_none=True)
        ce = loss_fn(model(x), y)
        macs_g = masked_macs(mm)
        reg = macs_regulariser(macs_g, target, reg_norm)
        (ce + beta * k_reg * reg.float()).backward()
        imp_norm = 0.0
        if implicit:
            terms = implicit_term(mm, lam)
            for m, t in zip(mm.masks, terms):
                m.s.grad = m.s.grad + t if m.s.grad is not None else t
            imp_norm = float(torch.cat(terms).norm())
        gnorm = float(torch.cat([m.s.grad.flatten() for m in mm.masks if m.s.grad is not None]).norm())
        opt_s.step()
        with torch.no_grad():
            for m, fl in zip(mm.masks, floors):
                m.s.clamp_(0.0, 2.0)
                if keep_alive:  # the top ceil(min_keep_frac * C) channels of each writer stay above tau
                    for seg, nk in fl:
                        top = seg[torch.topk(m.s[seg], nk).indices]
                        m.s[top] = m.s[top].clamp_min(tau + 1e-3)
        opt_w.zero_grad(set_to_none=True)
        kept = torch.cat([m.hard() for m in mm.masks]).float().mean().item()
        for k, v in (("step", step), ("ce", ce.item()), ("gmacs", float(macs_g.detach())), ("reg", float(reg.detach())),
                     ("implicit_norm", imp_norm), ("grad_s_norm", gnorm), ("kept_frac", kept)):
            hist[k].append(v)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"search step {step}: ce={ce.item():.3f} gmacs={float(macs_g):.4f} "
                  f"(target {target:.4f}) kept={kept:.3f}")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    with torch.no_grad():
        raw = float(masked_macs(mm, [m.hard().double() for m in mm.masks]))
    s_vals = {g.key: m.s.detach().cpu().clone() for g, m in zip(mm.groups, mm.masks)}
    if project:
        keep = masks_from_scores(mm, [m.s.detach() for m in mm.masks], target, min_keep_frac)
    else:
        keep = mm.hard_masks()
    with torch.no_grad():
        final = float(masked_macs(mm, mm.gates_from(keep)))
    widths = widths_of(mm, keep)
    mm.remove()
    cfg = dict(target_gmacs=target, input_hw=list(input_hw), beta=beta, lam=lam, tau=tau,
               inner_steps=inner_steps, steps=steps, implicit=implicit, lr_w=lr_w, lr_s=lr_s,
               s_init=s_init, keep_alive=keep_alive, reg_scale=reg_scale, reg_scale_value=k_reg, reg_norm=reg_norm, s_optim=s_optim,
               l2_scale=l2_scale, min_keep_frac=min_keep_frac, seed=seed, project=project,
               weight_steps=steps * inner_steps, mask_steps=steps, batches=steps * (inner_steps + 1))
    return SearchResult(masks=keep, widths=widths, history=hist, s=s_vals, gmacs_raw=raw,
                        gmacs_final=final, wall_s=wall, cpu_s=cpu, config=cfg)


# --------------------------------------------------------------------------- physical removal


def sync_static_channels(model: nn.Module, example_inputs: torch.Tensor) -> None:
    """Update Python-side channel lists that forward() slices with after pruning.

    TopFormer's backbone slices the token tensor back into scales with
    ``backbone.channels`` (plain ints): after pruning the token-pyramid widths these are
    re-read from the pyramid outputs (``model.feature_channels`` too).
    """
    for mod in model.modules():
        if hasattr(mod, "tpm") and isinstance(getattr(mod, "channels", None), list):
            was = mod.training
            mod.eval()
            with torch.no_grad():
                pyr = mod.tpm(example_inputs)
            mod.train(was)
            mod.channels = [int(p.shape[1]) for p in pyr]
            if hasattr(model, "feature_channels"):
                model.feature_channels = list(mod.channels)


def apply_masks(model: nn.Module, masks: dict, example_inputs: torch.Tensor, ignored_layers=None,
                inplace: bool = False) -> nn.Module:
    """Remove the masked-out channels physically (torch-pruning).

    For each group (keyed by its root conv's name) the removed indices ``~keep`` are
    pruned with ``DG.get_pruning_group(root, tp.prune_conv_out_channels, idxs).prune()``,
    which also removes the coupled channels (BN, depth-wise convs, consumers' inputs,
    concat offsets). In eval mode the pruned network computes the same function as the
    hard-masked one (tested), so MACs / params / latency can be measured on it.

    Args:
        model: the unmasked network (no hooks; a :class:`MaskedModel` must be removed).
        masks: ``{group key: bool (C,) keep}`` as in :class:`SearchResult`.
        example_inputs: float32 ``(1, 3, H, W)``.
        ignored_layers: as given to :func:`attach_masks`.
        inplace: prune ``model`` itself (default: a deep copy).

    Returns:
        the pruned model.

    Raises:
        KeyError: a mask names a module the model does not have.
        ValueError: a mask would remove every channel of a group, or has the wrong size.
    """
    if not inplace:
        model = copy.deepcopy(model)
    mods = dict(model.named_modules())
    dg = _build_dg(model, example_inputs)
    for key, keep in masks.items():
        if key not in mods:
            raise KeyError(f"apply_masks: model has no module {key!r}")
        keep = torch.as_tensor(keep, dtype=torch.bool)
        root = mods[key]
        n = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
        if keep.numel() != n:
            raise ValueError(f"apply_masks: masks[{key!r}] has {keep.numel()} entries, module has {n}")
        if not keep.any():
            raise ValueError(f"apply_masks: masks[{key!r}] removes every channel")
        idxs = (~keep).nonzero().flatten().tolist()
        if not idxs:
            continue
        fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        group = dg.get_pruning_group(root, fn, idxs)
        group.prune()
    sync_static_channels(model, example_inputs)
    return model


# --------------------------------------------------------------------------- baselines


def magnitude_scores(mm: MaskedModel) -> list:
    """Per-channel L2 group magnitude (torch-pruning ``GroupMagnitudeImportance(p=2)``,
    mean-normalised within each group), one ``(C_i,)`` tensor per group."""
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    out = []
    for g in mm.groups:
        with torch.no_grad():
            sc = imp(g.tp_group)
        out.append(sc.detach().float().cpu() if sc is not None else torch.ones(g.channels))
    return out


def magnitude_prune_to_macs(model: nn.Module, target_gmacs: float, input_hw: Sequence[int],
                            ignored_layers=None, min_keep_frac: float = 0.1) -> tuple[nn.Module, dict]:
    """Global magnitude (L2 group norm) pruning whose MACs match ``target_gmacs``.

    Channels of all groups are ranked together by mean-normalised group magnitude; the
    threshold is found by bisection on the exact masked MACs, then removed physically.

    Returns:
        ``(pruned model, masks)``.

    Raises:
        ValueError: ``target_gmacs`` <= 0 or above the dense MACs.
    """
    x = torch.zeros(1, 3, *input_hw, device=next(model.parameters()).device)
    mm = attach_masks(model, x, ignored_layers, input_hw=input_hw)
    try:
        keep = masks_from_scores(mm, magnitude_scores(mm), target_gmacs, min_keep_frac)
    finally:
        mm.remove()
    return apply_masks(model, keep, x, ignored_layers), keep


def uniform_width(model_or_name, target_gmacs: float, input_hw: Sequence[int], ignored_layers=None,
                  min_keep_frac: float = 0.1) -> tuple[nn.Module, dict]:
    """Equal kept fraction in every group (uniform width multiplier) at ``target_gmacs``.

    ``model_or_name``: a model (channels kept by magnitude within each group, weights
    inherited) or a registry name (a freshly initialised model, i.e. a uniformly thinner
    architecture to train from scratch). The fraction is found by bisection.

    Returns:
        ``(pruned model, masks)``.
    """
    if isinstance(model_or_name, str):
        model = create_model(model_or_name)
    else:
        model = model_or_name
    x = torch.zeros(1, 3, *input_hw, device=next(model.parameters()).device)
    mm = attach_masks(model, x, ignored_layers, input_hw=input_hw)
    try:
        keep = masks_from_scores(mm, magnitude_scores(mm), target_gmacs, min_keep_frac, per_group=True)
    finally:
        mm.remove()
    return apply_masks(model, keep, x, ignored_layers), keep


def random_masks_to_macs(model: nn.Module, target_gmacs: float, input_hw: Sequence[int], seed: int = 0,
                         ignored_layers=None, min_keep_frac: float = 0.1) -> tuple[nn.Module, dict]:
    """Random channel scores (uniform, seeded), global threshold at ``target_gmacs``.

    Returns:
        ``(pruned model, masks)``.
    """
    x = torch.zeros(1, 3, *input_hw, device=next(model.parameters()).device)
    mm = attach_masks(model, x, ignored_layers, input_hw=input_hw)
    gen = torch.Generator().manual_seed(seed)
    try:
        scores = [torch.rand(g.channels, generator=gen) for g in mm.groups]
        keep = masks_from_scores(mm, scores, target_gmacs, min_keep_frac)
    finally:
        mm.remove()
    return apply_masks(model, keep, x, ignored_layers), keep


def searched_model(model: nn.Module, result: SearchResult, input_hw: Sequence[int],
                   ignored_layers=None) -> nn.Module:
    """The physically pruned network of a :class:`SearchResult` (weights of ``model``)."""
    x = torch.zeros(1, 3, *input_hw, device=next(model.parameters()).device)
    return apply_masks(model, result.masks, x, ignored_layers)


__all__ = ["ChannelMask", "MaskGroup", "MaskedModel", "SearchResult", "DEFAULT_IGNORED_NAME_PARTS",
           "default_ignored_layers", "find_groups", "attach_masks", "masked_macs", "macs_regulariser",
           "implicit_term", "exact_implicit_term", "implicit_agreement", "widths_of", "masks_from_scores",
           "bilevel_search", "SOURCE002_PARAMS", "CALIBRATED_PARAMS", "sync_static_channels", "apply_masks", "magnitude_scores",
           "magnitude_prune_to_macs", "uniform_width", "random_masks_to_macs", "searched_model"]
