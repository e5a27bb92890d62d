"""Registry of segmentation models and their size / compute.

Every model maps a float32 image batch ``(N, 3, H, W)`` to float32 logits
``(N, num_classes, H, W)``: the bilinear upsampling to the input size happens inside
the model, so ``forward`` returns one plain tensor (what ONNX export and torch-pruning
need). Weights are random unless ``create_model(name, pretrained=True, weights_dir=...)``
loads the encoder's ImageNet checkpoint (:data:`PRETRAINED_ENCODERS`).

Registered models (``list_models()``):

=============================  =======================================================
``upernet_mobilevit_s``        UPerNet (Xiao et al., ECCV 2018) on timm ``mobilevit_s``
                               (Mehta & Rastegari, ICLR 2022): the student of source 000.
``upernet_resnet18``           UPerNet on timm ``resnet18`` (He et al., CVPR 2016):
                               source 000's CNN student.
``upernet_swinv2_t``           UPerNet on timm ``swinv2_tiny_window8_256`` (Liu et al.,
                               CVPR 2022): source 000's KD teacher. Built for
                               ``img_size`` (default 128), takes any multiple of 32.
``deeplabv3plus_mobilenetv2``  DeepLabV3+ (Chen et al., ECCV 2018) on timm
                               ``mobilenetv2_100`` (Sandler et al., CVPR 2018): the
                               model of source 002 Table 5.
``topformer_t/s/b``            TopFormer (Zhang et al., CVPR 2022), plain PyTorch, the
                               models of source 002 Table 4.
=============================  =======================================================

Conventions borrowed from timm: a registry of named builders (:func:`register_model`),
configs as frozen dataclasses, small composable layers (:func:`conv_bn_act`). Every
model has the attributes ``backbone``, ``decode_head`` and ``classifier`` (a plain
``nn.Conv2d``, so that pruners can list it in ``ignored_layers``).

Compute is reported by :func:`model_complexity` with two independent counters (module
hooks of torch-pruning, aten-level ``FlopCounterMode``).

ONNX note (see REFERENCE.md): the legacy TorchScript exporter refuses
``adaptive_avg_pool2d`` when the output size does not divide the input (PSP bin 6 on
a 4x4 or 16x16 map). :func:`adaptive_avg_pool` therefore uses a plain ``avg_pool2d``
(kernel = stride = H/out) when the size divides, and during ONNX export computes the
exact adaptive average as two constant averaging matrices (``P_h @ x @ P_w^T``, the
same windows as PyTorch's adaptive pooling); in eager mode it calls
``F.adaptive_avg_pool2d``. The three paths give the same numbers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from safetensors import safe_open
from timm.layers import DropPath
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from . import NUM_CLASSES

__all__ = [
    "register_model", "create_model", "list_models", "model_complexity", "count_params",
    "UPerNet", "UPerHead", "DeepLabV3Plus", "TopFormer", "UPerNetConfig",
    "DeepLabV3PlusConfig", "TopFormerConfig", "adaptive_avg_pool", "conv_bn_act",
    "gmacs", "model_fingerprint", "PRETRAINED_ENCODERS", "TOPFORMER_CHECKPOINTS", "WeightsError",
    "pretrained_weights_file", "check_pretrained",
]

# --------------------------------------------------------------------------- registry

_MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str | None = None):
    """Decorator that registers a model builder under ``name`` (default: function name).

    The builder must accept ``num_classes`` as keyword and return an ``nn.Module``.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _MODEL_REGISTRY:
            raise ValueError(f"register_model: name {key!r} is already registered")
        _MODEL_REGISTRY[key] = fn
        return fn

    if callable(name):  # used as @register_model without parentheses
        fn, name = name, None
        return deco(fn)
    return deco


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_MODEL_REGISTRY)


#: Registry name -> the timm ImageNet-1k encoder checkpoint (``<timm name>.<tag>``) its
#: backbone loads with ``pretrained=True`` (source 000 and 002 start from these).
PRETRAINED_ENCODERS = {
    "upernet_mobilevit_s": "mobilevit_s.cvnets_in1k",
    "upernet_resnet18": "resnet18.a1_in1k",
    "upernet_swinv2_t": "swinv2_tiny_window8_256.ms_in1k",
    "deeplabv3plus_mobilenetv2": "mobilenetv2_100.ra_in1k",
}
#: TopFormer's official ImageNet checkpoints (release file names of the TopFormer code),
#: looked for in ``<weights_dir>/topformer/``.
TOPFORMER_CHECKPOINTS = {
    "topformer_t": "topformer-T-224-66.2.pth",
    "topformer_s": "topformer-S-224-72.3.pth",
    "topformer_b": "topformer-B-224-75.3.pth",
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsError(FileNotFoundError):
    """Pretrained weights are missing or unusable; the message names the file expected and
    the command that fetches it."""


def _check_checkpoint_covers(state: dict, file, what: str) -> None:
    """Raise :class:`WeightsError` unless ``file`` holds >= 90 % of ``state``'s tensors by name
    and shape (timm loads encoder checkpoints non-strictly and would skip a wrong file)."""
    file = str(file)
    if file.endswith(".safetensors"):
        with safe_open(file, framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    else:
        shapes = {k: tuple(v.shape) for k, v in torch.load(file, map_location="cpu", weights_only=True).items()
                  if hasattr(v, "shape")}
    keys = [k for k in state if not k.endswith(("num_batches_tracked", "relative_position_index",
                                                "relative_coords_table", "attn_mask"))]
    hit = sum(1 for k in keys if shapes.get(k) == tuple(state[k].shape))
    if hit < 0.9 * len(keys):
        raise WeightsError(f"{what}: checkpoint {file} holds only {hit}/{len(keys)} of the encoder's tensors "
                           f"with matching names and shapes: it is not this encoder's checkpoint")


def pretrained_weights_file(name: str, weights_dir: str | os.PathLike) -> Path:
    """The local checkpoint file of model ``name``'s ImageNet encoder under ``weights_dir``.

    Layout (what ``huggingface-cli download timm/<n>.<tag> --local-dir DIR/<n>.<tag>``
    writes): ``DIR/<timm name>.<tag>/model.safetensors`` (or ``pytorch_model.bin``);
    TopFormer: ``DIR/topformer/<official release file>``.

    Raises:
        WeightsError: no such file (the message gives the path and the download command),
            or ``name`` has no pretrained encoder.
    """
    root = Path(weights_dir)
    if name in TOPFORMER_CHECKPOINTS:
        f = root / "topformer" / TOPFORMER_CHECKPOINTS[name]
        if not f.is_file():
            raise WeightsError(f"{name}: expected TopFormer's ImageNet checkpoint at {f}; download "
                               f"{TOPFORMER_CHECKPOINTS[name]} from the TopFormer release (hustvl/TopFormer, "
                               f"'modelzoos/classification') into {root / 'topformer'}")
        return f
    if name not in PRETRAINED_ENCODERS:
        raise WeightsError(f"{name}: no pretrained encoder is defined (known: {', '.join(PRETRAINED_ENCODERS)})")
    ck = PRETRAINED_ENCODERS[name]
    for fname in WEIGHT_FILES:
        if (root / ck / fname).is_file():
            return root / ck / fname
    raise WeightsError(f"{name}: expected {root / ck / WEIGHT_FILES[0]} (or {WEIGHT_FILES[1]}); fetch it with "
                       f"`hf download timm/{ck} --local-dir {root / ck}` (older huggingface_hub: `huggingface-cli download`)")


def check_pretrained(names, weights_dir: str | os.PathLike | None) -> dict:
    """Resolve the encoder checkpoints of ``names`` before any training starts.

    Returns:
        ``{name: Path or None}`` (None: timm fetches it from the hub, ``weights_dir`` unset).

    Raises:
        WeightsError: one message listing every missing file and its download command.
    """
    out, missing = {}, []
    for n in names:
        if weights_dir is None:
            out[n] = None
            continue
        try:
            out[n] = pretrained_weights_file(n, weights_dir)
        except WeightsError as exc:
            missing.append(str(exc))
    if missing:
        raise WeightsError("pretrained weights missing:\n  " + "\n  ".join(missing))
    return out


def create_model(name: str, num_classes: int = NUM_CLASSES, pretrained: bool = False,
                 weights_dir: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Build a registered model, with random weights or an ImageNet-pretrained encoder.

    Args:
        name: registry name (see :func:`list_models`).
        num_classes: number of output channels of the logits (positive int).
        pretrained: load the encoder's ImageNet weights (:data:`PRETRAINED_ENCODERS`,
            through timm; TopFormer: its official checkpoint, needs ``weights_dir``). The
            decoder always starts random, as in sources 000 and 002.
        weights_dir: folder of local checkpoints (see :func:`pretrained_weights_file`);
            None with ``pretrained`` lets timm use the Hugging Face hub / its cache.
        **kwargs: builder-specific options, e.g. ``img_size`` for ``upernet_swinv2_t``,
            ``aspp_rates`` for ``deeplabv3plus_mobilenetv2``, ``drop_path_rate`` for
            TopFormer.

    Returns:
        ``nn.Module`` in training mode; ``forward(x)`` maps float32 ``(N, 3, H, W)`` to
        float32 logits ``(N, num_classes, H, W)``. ``model.pretrained`` says which start.

    Raises:
        ValueError: unknown ``name`` (the message lists the known names), non-positive
            ``num_classes``.
        WeightsError: ``pretrained`` and the checkpoint is missing (the message names the
            file and the command that fetches it).
        TypeError: an option the builder does not accept.
    """
    if name not in _MODEL_REGISTRY:
        raise ValueError(f"create_model: unknown model name {name!r}; known models: "
                         f"{', '.join(list_models())}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"create_model: num_classes must be a positive int, got {num_classes!r}")
    model = _MODEL_REGISTRY[name](num_classes=num_classes, **kwargs)
    model.model_name = name
    model.pretrained = bool(pretrained)
    if pretrained:
        file = check_pretrained([name], weights_dir)[name]
        if name in TOPFORMER_CHECKPOINTS:
            if file is None:
                raise WeightsError(f"{name}: TopFormer's checkpoint is not on the timm hub; pass weights_dir "
                                   f"holding topformer/{TOPFORMER_CHECKPOINTS[name]}")
            model.backbone.load_pretrained(file)
        else:
            tag = PRETRAINED_ENCODERS[name].split(".", 1)[1]
            model.backbone.load_pretrained(tag, file)
    return model


# --------------------------------------------------------------------------- layers


def conv_bn_act(in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1,
                padding: int | None = None, dilation: int = 1, groups: int = 1,
                act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """``Conv2d(bias=False) -> BatchNorm2d -> act`` as a plain ``nn.Sequential``.

    Plain module types (no ``nn.Conv2d`` subclass) so that torch-pruning's exact-type
    op counters and dependency graph see them. ``padding`` defaults to "same"
    (``dilation * (kernel_size - 1) // 2``). ``act=None`` gives conv + BN only.
    """
    if padding is None:
        padding = dilation * (kernel_size - 1) // 2
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation=dilation,
                  groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def _adaptive_matrix(in_size: int, out_size: int, dtype, device) -> torch.Tensor:
    """(out_size, in_size) averaging matrix with PyTorch's adaptive pooling windows."""
    m = torch.zeros(out_size, in_size, dtype=dtype, device=device)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: torch.Tensor, out_hw: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling of float ``(N, C, H, W)`` to ``(N, C, oh, ow)``, exportable.

    Divisible sizes use ``avg_pool2d`` (kernel = stride = H/oh); during ONNX export a
    non-divisible size is computed with constant averaging matrices (exactly the windows
    of ``F.adaptive_avg_pool2d``); otherwise ``F.adaptive_avg_pool2d`` is called.
    """
    oh, ow = int(out_hw[0]), int(out_hw[1])
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if (oh, ow) == (h, w):
        return x
    if h % oh == 0 and w % ow == 0:
        kh, kw = h // oh, w // ow
        return F.avg_pool2d(x, kernel_size=(kh, kw), stride=(kh, kw))
    if torch.onnx.is_in_onnx_export():
        ph = _adaptive_matrix(h, oh, x.dtype, x.device)
        pw = _adaptive_matrix(w, ow, x.dtype, x.device)
        return torch.matmul(torch.matmul(ph, x), pw.t())
    return F.adaptive_avg_pool2d(x, (oh, ow))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _check_input(x: torch.Tensor, where: str, fixed_hw=None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{where}: x must be a float tensor of shape (N, 3, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
    if fixed_hw is not None and tuple(int(s) for s in x.shape[-2:]) != tuple(fixed_hw):
        raise ValueError(f"{where}: this model was built for img_size={tuple(fixed_hw)} and "
                         f"got input of size {tuple(x.shape[-2:])}; rebuild it with "
                         f"create_model(..., img_size={int(x.shape[-2])})")


def count_params(model: nn.Module) -> int:
    """Number of parameters (all, trainable or not)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- backbones


class TimmFeatures(nn.Module):
    """timm ``features_only`` backbone returning NCHW features as a list.

    Args:
        name: timm model name.
        out_indices: feature indices to return.
        nhwc: True for models whose features come out ``(N, H, W, C)`` (timm Swin).
        **kwargs: passed to ``timm.create_model`` (e.g. ``img_size``, ``output_stride``).

    Attributes:
        channels: channels of each returned feature.
        reductions: stride of each returned feature relative to the input.
    """

    def __init__(self, name: str, out_indices: Sequence[int], nhwc: bool = False, **kwargs):
        super().__init__()

        self.body = timm.create_model(name, pretrained=False, features_only=True,
                                      out_indices=tuple(out_indices), **kwargs)
        self.timm_name = name
        self._timm_kwargs = {"features_only": True, "out_indices": tuple(out_indices), **kwargs}
        self.channels = list(self.body.feature_info.channels())
        self.reductions = list(self.body.feature_info.reduction())
        self.nhwc = nhwc

    def load_pretrained(self, tag: str, file: str | None = None) -> None:
        """Load timm's ImageNet weights ``<timm_name>.<tag>`` into this backbone.

        ``file``: a local ``model.safetensors`` / ``pytorch_model.bin``; None lets timm
        fetch them from the Hugging Face hub (its cache and ``HF_HUB_OFFLINE=1`` apply).
        timm's own checkpoint filter adapts them (e.g. Swin-V2's position tables to
        ``img_size``).
        """

        overlay = {"pretrained_cfg_overlay": {"file": str(file)}} if file else {}
        if file:
            bare = timm.create_model(self.timm_name, pretrained=False, **{
                k: v for k, v in self._timm_kwargs.items() if k not in ("features_only", "out_indices")})
            _check_checkpoint_covers(bare.state_dict(), file, f"{self.timm_name}.{tag}")
        src = timm.create_model(f"{self.timm_name}.{tag}", pretrained=True, **self._timm_kwargs, **overlay)
        self.body.load_state_dict(src.state_dict())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(x)
        if self.nhwc:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return list(feats)


class MobileViTFeatures(nn.Module):
    """timm ``mobilevit_s`` stem + 5 stages, tapping the outputs of stages 1..4.

    timm's ``features_only`` puts the 160->640 ``final_conv`` into the stride-32
    feature; source 000 (HF MobileViT) taps the 160-channel stage output instead, so
    the stages are run by hand and ``final_conv``/``head`` are dropped. Taps:
    channels [64, 96, 128, 160] at strides [4, 8, 16, 32].
    """

    def __init__(self, name: str = "mobilevit_s"):
        super().__init__()

        m = timm.create_model(name, pretrained=False, num_classes=0)
        self.timm_name = name
        self.stem = m.stem
        self.stages = m.stages
        info = m.feature_info  # list of dicts, one per stage (+ final conv)
        self.channels = [int(info[i]["num_chs"]) for i in range(1, 5)]
        self.channels[-1] = _last_out_channels(self.stages[4])
        self.reductions = [4, 8, 16, 32]

    def load_pretrained(self, tag: str, file: str | None = None) -> None:
        """Load timm's ImageNet weights ``<timm_name>.<tag>`` into the stem and stages
        (see :meth:`TimmFeatures.load_pretrained`)."""

        overlay = {"pretrained_cfg_overlay": {"file": str(file)}} if file else {}
        if file:
            bare = {f"stem.{k}": v for k, v in self.stem.state_dict().items()}
            bare.update({f"stages.{k}": v for k, v in self.stages.state_dict().items()})
            _check_checkpoint_covers(bare, file, f"{self.timm_name}.{tag}")
        src = timm.create_model(f"{self.timm_name}.{tag}", pretrained=True, num_classes=0, **overlay)
        self.stem.load_state_dict(src.stem.state_dict())
        self.stages.load_state_dict(src.stages.state_dict())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:
                feats.append(x)
        return feats


def _last_out_channels(module: nn.Module) -> int:
    out = None
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            out = m.out_channels
    if out is None:
        raise RuntimeError("no conv found in module")
    return out


# --------------------------------------------------------------------------- UPerNet


@dataclass(frozen=True)
class UPerNetConfig:
    """UPerNet configuration (Xiao et al., "Unified Perceptual Parsing", ECCV 2018).

    Attributes:
        backbone: timm model name.
        channels: decoder (PSP + FPN) width; source 000 uses 64 for MobileViT/ResNet18,
            96 for Swin-V2-T, 128 for Swin-V2-B.
        pool_scales: PSP bins on the deepest feature (source 000: [1, 2, 4, 6]).
        dropout: dropout before the classifier (mmseg default 0.1).
        backbone_kwargs: extra args for the backbone (e.g. ``img_size``).
    """

    backbone: str
    channels: int = 64
    pool_scales: tuple = (1, 2, 4, 6)
    dropout: float = 0.1
    backbone_kwargs: dict = field(default_factory=dict)


class PPM(nn.Module):
    """Pyramid pooling module (PSPNet, Zhao et al., CVPR 2017), as in mmseg's UPerHead.

    Each bin: adaptive average pool -> 1x1 conv (with bias) -> ReLU -> bilinear upsample.
    The pooled branches use a biased conv without BN so that the bin-1 branch (one
    value per channel) also trains at batch size 1.
    """

    def __init__(self, in_ch: int, channels: int, pool_scales: Sequence[int]):
        super().__init__()
        self.pool_scales = tuple(int(s) for s in pool_scales)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_ch, channels, 1), nn.ReLU()) for _ in self.pool_scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = x.shape[-2:]
        return [_resize(branch(adaptive_avg_pool(x, (s, s))), size)
                for s, branch in zip(self.pool_scales, self.branches)]


class UPerHead(nn.Module):
    """UPerNet decoder (PPM on the deepest feature + FPN), mmseg ``UPerHead`` layout.

    Input: list of 4 float32 features ``(N, C_i, H/s_i, W/s_i)`` with s = 4, 8, 16, 32.
    Output: float32 ``(N, channels, H/4, W/4)`` (classifier not included).
    """

    def __init__(self, in_channels: Sequence[int], channels: int, pool_scales: Sequence[int]):
        super().__init__()
        in_channels = list(in_channels)
        self.psp = PPM(in_channels[-1], channels, pool_scales)
        self.psp_bottleneck = conv_bn_act(in_channels[-1] + len(pool_scales) * channels,
                                          channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_act(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_act(channels, channels, 3)
                                       for _ in in_channels[:-1])
        self.fpn_bottleneck = conv_bn_act(len(in_channels) * channels, channels, 3)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1])]
        laterals.append(self.psp_bottleneck(torch.cat([top] + self.psp(top), dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(l) for conv, l in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [_resize(o, size) for o in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))


class UPerNet(nn.Module):
    """UPerNet segmenter: backbone pyramid (strides 4..32) -> UPerHead -> 1x1 classifier.

    Attributes:
        backbone: module returning 4 features (strides 4, 8, 16, 32).
        feature_channels: channels of those features.
        decode_head: :class:`UPerHead`.
        classifier: ``nn.Conv2d(channels, num_classes, 1)``.
        fixed_input_hw: ``(H, W)`` the model requires (Swin), or None.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, cfg: UPerNetConfig,
                 fixed_input_hw=None):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.feature_channels = list(backbone.channels)
        if len(self.feature_channels) != 4:
            raise ValueError(f"UPerNet: backbone must give 4 features, got {self.feature_channels}")
        self.decode_head = UPerHead(self.feature_channels, cfg.channels, cfg.pool_scales)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(cfg.channels, num_classes, 1)
        self.fixed_input_hw = fixed_input_hw

    def forward_with_features(self, x: torch.Tensor):
        """Logits and backbone features.

        Args:
            x: float32 ``(N, 3, H, W)``.

        Returns:
            ``(logits, feats)``: logits float32 ``(N, num_classes, H, W)``; ``feats`` a
            list of 4 float32 tensors ``(N, feature_channels[i], H/s, W/s)``, s = 4..32.
        """
        y, feats = self.forward_decoder(x)
        return _resize(y, x.shape[-2:]), feats

    def forward_decoder(self, x: torch.Tensor):
        """Logits at the decoder's resolution (before the final bilinear upsampling) and features.

        ``forward(x) == F.interpolate(forward_decoder(x)[0], x.shape[-2:], mode="bilinear")``;
        used to store a teacher's outputs compactly (:func:`study.distill.teacher_targets`).

        Returns:
            ``(logits float32 (N, num_classes, H/4, W/4), feats)`` with ``feats`` as in
            :meth:`forward_with_features`.
        """
        _check_input(x, "UPerNet.forward", self.fixed_input_hw)
        feats = self.backbone(x)
        return self.classifier(self.dropout(self.decode_head(feats))), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``(N, 3, H, W)`` -> logits float32 ``(N, num_classes, H, W)``."""
        return self.forward_with_features(x)[0]


@register_model("upernet_mobilevit_s")
def upernet_mobilevit_s(num_classes: int = NUM_CLASSES, channels: int = 64, **kwargs) -> UPerNet:
    """UPerNet + MobileViT-S (source 000's student; MobileViT: Mehta & Rastegari, ICLR 2022).

    Taps [64, 96, 128, 160] channels at strides 4..32 (stage outputs, as source 000),
    PSP bins [1, 2, 4, 6], FPN width 64. 5.39 M params (source 000 reports 5.6 M; we drop
    timm's 160->640 final conv, which source 000's taps also skip).
    Any input size divisible by 32.
    """
    cfg = UPerNetConfig("mobilevit_s", channels=channels, **kwargs)
    return UPerNet(MobileViTFeatures("mobilevit_s"), num_classes, cfg)


@register_model("upernet_resnet18")
def upernet_resnet18(num_classes: int = NUM_CLASSES, channels: int = 64, **kwargs) -> UPerNet:
    """UPerNet + ResNet-18 (He et al., CVPR 2016; source 000's CNN student), FPN width 64.

    Taps [64, 128, 256, 512] channels at strides 4..32. Any input size divisible by 32.
    """
    cfg = UPerNetConfig("resnet18", channels=channels, **kwargs)
    return UPerNet(TimmFeatures("resnet18", (1, 2, 3, 4)), num_classes, cfg)


@register_model("upernet_swinv2_t")
def upernet_swinv2_t(num_classes: int = NUM_CLASSES, img_size: int = 128, channels: int = 96,
                     **kwargs) -> UPerNet:
    """UPerNet + Swin-V2-T (Liu et al., CVPR 2022; source 000's KD teacher), FPN width 96.

    Backbone: timm ``swinv2_tiny_window8_256`` (window 8, the torchvision ``swin_v2_t``
    configuration source 000 used) built for ``img_size`` (int, multiple of 32, default
    128: the study builds it for the training crop); taps [96, 192, 384, 768] channels at
    strides 4..32. ~27.6 M backbone params.

    **Other input sizes** (the teacher is trained on 384-px crops and evaluated on full
    512-px images in the ``paper`` profile): the backbone is built with timm's
    ``strict_img_size=False`` (= ``dynamic_img_size=True``), so it accepts any size that is
    a multiple of 32 and builds the shifted-window attention mask for the actual size on
    each forward. This is sound for Swin-V2 specifically: its relative position bias is a
    *continuous* function of the relative coordinates inside one window (the log-spaced
    CPB MLP, Liu et al. 2022, Sec. 3.3), and the window size (8 where a stage's map is
    larger than 8 px) is fixed at build time, so the same parameters serve a larger image
    with more windows - no interpolation of bias tables, no retraining. It is what the
    authors do when they transfer a model to a larger resolution with the same window.
    Alternatives considered: rebuilding the teacher for the evaluation size and copying
    the weights (the same numbers, but two models to keep in sync and a fixed size again),
    and sliding-window inference (MMSegmentation's ``slide`` mode: 384-px windows over the
    512-px image, averaged logits; costs ~2-4x the compute and changes what the teacher
    sees at the borders). At the built size the outputs are bit-identical to a
    fixed-size build (the mask is the same tensor, computed per call instead of once;
    ``tests/test_models.py``), so ``smoke`` / ``cpu`` numbers, where crops and images have
    one size, are unchanged. Caveat: a model built for a size whose stride-32 map is <= 8
    px uses smaller windows (and no shift) in that stage at every input size.

    Raises:
        ValueError: ``img_size`` not a positive multiple of 32; at forward time, an input
            that is not ``(N, 3, H, W)``.
    """
    if not isinstance(img_size, int) or img_size < 32 or img_size % 32:
        raise ValueError(f"upernet_swinv2_t: img_size must be a positive multiple of 32, "
                         f"got {img_size!r}")
    cfg = UPerNetConfig("swinv2_tiny_window8_256", channels=channels,
                        backbone_kwargs={"img_size": img_size, "strict_img_size": False}, **kwargs)
    bb = TimmFeatures("swinv2_tiny_window8_256", (0, 1, 2, 3), nhwc=True, img_size=img_size,
                      strict_img_size=False)
    model = UPerNet(bb, num_classes, cfg)
    model.img_size = img_size
    return model


# --------------------------------------------------------------------------- DeepLabV3+


@dataclass(frozen=True)
class DeepLabV3PlusConfig:
    """DeepLabV3+ configuration (Chen et al., "Encoder-Decoder with Atrous Separable
    Convolution", ECCV 2018).

    Attributes:
        backbone: timm model name.
        output_stride: stride of the high-level feature (16: last blocks dilated).
        aspp_rates: atrous rates of the three 3x3 ASPP branches. The paper's (6, 12, 18)
            are for 513 px crops at stride 16 (32x32 maps); our training inputs are
            128 px (8x8 maps) so the default is (2, 4, 6).
        channels: ASPP / decoder width.
        low_level_channels: width of the reduced stride-4 feature (paper: 48).
    """

    backbone: str = "mobilenetv2_100"
    output_stride: int = 16
    aspp_rates: tuple = (2, 4, 6)
    channels: int = 128
    low_level_channels: int = 48
    dropout: float = 0.1


def sep_conv_bn_act(in_ch: int, out_ch: int, dilation: int = 1) -> nn.Sequential:
    """Depth-wise separable 3x3: dw conv + BN + ReLU, then 1x1 conv + BN + ReLU."""
    return nn.Sequential(conv_bn_act(in_ch, in_ch, 3, dilation=dilation, groups=in_ch),
                         conv_bn_act(in_ch, out_ch, 1))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with separable atrous convs (DeepLabV3+ Sec. 3.2).

    Input float32 ``(N, C, h, w)``; output ``(N, channels, h, w)``. The image-pool branch
    is global average -> 1x1 conv with bias -> ReLU (no BN, so batch 1 trains).
    """

    def __init__(self, in_ch: int, channels: int, rates: Sequence[int]):
        super().__init__()
        self.branch1x1 = conv_bn_act(in_ch, channels, 1)
        self.atrous = nn.ModuleList(sep_conv_bn_act(in_ch, channels, int(r)) for r in rates)
        self.image_pool = nn.Sequential(nn.Conv2d(in_ch, channels, 1), nn.ReLU())
        self.project = conv_bn_act((2 + len(rates)) * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = self.image_pool(F.adaptive_avg_pool2d(x, 1))
        outs = [self.branch1x1(x)] + [b(x) for b in self.atrous] + [_resize(pooled, size)]
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on the high-level feature + decoder fusing the stride-4 feature.

    Input: ``[low (N, C_low, H/4, W/4), high (N, C_high, H/os, W/os)]``; output float32
    ``(N, channels, H/4, W/4)``.
    """

    def __init__(self, low_ch: int, high_ch: int, cfg: DeepLabV3PlusConfig):
        super().__init__()
        self.aspp = ASPP(high_ch, cfg.channels, cfg.aspp_rates)
        self.low_proj = conv_bn_act(low_ch, cfg.low_level_channels, 1)
        self.fuse = nn.Sequential(
            sep_conv_bn_act(cfg.channels + cfg.low_level_channels, cfg.channels),
            sep_conv_bn_act(cfg.channels, cfg.channels))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        low, high = feats
        low = self.low_proj(low)
        high = _resize(self.aspp(high), low.shape[-2:])
        return self.fuse(torch.cat([high, low], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ segmenter: backbone [stride 4, stride os] -> ASPP + decoder -> classifier.

    Attributes: ``backbone`` (:class:`TimmFeatures`), ``feature_channels``,
    ``decode_head`` (:class:`DeepLabV3PlusHead`), ``classifier`` (``nn.Conv2d``).
    """

    def __init__(self, num_classes: int, cfg: DeepLabV3PlusConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = TimmFeatures(cfg.backbone, (1, 4), output_stride=cfg.output_stride)
        self.feature_channels = list(self.backbone.channels)
        self.decode_head = DeepLabV3PlusHead(*self.feature_channels, cfg)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(cfg.channels, num_classes, 1)

    def forward_with_features(self, x: torch.Tensor):
        """``(logits (N, K, H, W), [low (N, 24, H/4, W/4), high (N, 320, H/os, W/os)])``."""
        _check_input(x, "DeepLabV3Plus.forward")
        feats = self.backbone(x)
        y = self.classifier(self.dropout(self.decode_head(feats)))
        return _resize(y, x.shape[-2:]), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``(N, 3, H, W)`` -> logits float32 ``(N, num_classes, H, W)``."""
        return self.forward_with_features(x)[0]


@register_model("deeplabv3plus_mobilenetv2")
def deeplabv3plus_mobilenetv2(num_classes: int = NUM_CLASSES, output_stride: int = 16,
                              aspp_rates: Sequence[int] = (2, 4, 6), channels: int = 128,
                              **kwargs) -> DeepLabV3Plus:
    """DeepLabV3+ + MobileNetV2-1.0 (source 002 Table 5: 2.26 M params, 9.5 GMACs at
    512x1024).

    Backbone timm ``mobilenetv2_100`` (no 1280 head conv): low-level 24 channels at
    stride 4, high-level 320 channels at ``output_stride`` (16 by default, last blocks
    dilated; 32 also allowed). Separable ASPP (width 128) and decoder as in the paper.

    Raises:
        ValueError: ``output_stride`` not in {8, 16, 32}, empty ``aspp_rates``.
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"deeplabv3plus_mobilenetv2: output_stride must be 8, 16 or 32, "
                         f"got {output_stride!r}")
    if len(tuple(aspp_rates)) == 0:
        raise ValueError("deeplabv3plus_mobilenetv2: aspp_rates must not be empty")
    cfg = DeepLabV3PlusConfig(output_stride=output_stride, aspp_rates=tuple(aspp_rates),
                              channels=channels, **kwargs)
    return DeepLabV3Plus(num_classes, cfg)


# --------------------------------------------------------------------------- TopFormer


@dataclass(frozen=True)
class TopFormerConfig:
    """TopFormer configuration (Zhang et al., "TopFormer: Token Pyramid Transformer for
    Mobile Semantic Segmentation", CVPR 2022; official ``topformer.py`` configs).

    Attributes:
        cfgs: token-pyramid MobileNetV2 blocks ``(kernel, expand, out_ch, stride)``.
        embed_out_indices: block indices whose outputs are the 4 pyramid scales
            (strides 4, 8, 16, 32).
        channels: channels of those 4 scales.
        out_channels: width of the semantic-injection outputs (scales 1..3).
        decode_out_indices: scales that get injected and decoded (1/8, 1/16, 1/32).
        num_heads: attention heads; key_dim 16, attn_ratio 2 (v dim 32 per head),
            mlp_ratio 2, depth 4, c2t_stride 2.
        head_channels: SimpleHead width.
        drop_path_rate: stochastic depth over the 4 transformer blocks.
    """

    cfgs: tuple
    embed_out_indices: tuple
    channels: tuple
    out_channels: int
    num_heads: int
    head_channels: int
    decode_out_indices: tuple = (1, 2, 3)
    depth: int = 4
    key_dim: int = 16
    attn_ratio: int = 2
    mlp_ratio: int = 2
    c2t_stride: int = 2
    drop_path_rate: float = 0.1
    dropout: float = 0.1


_TOPFORMER_CFGS = {
    "t": TopFormerConfig(
        cfgs=((3, 1, 16, 1), (3, 4, 16, 2), (3, 3, 16, 1), (5, 3, 32, 2), (5, 3, 32, 1),
              (3, 3, 64, 2), (3, 3, 64, 1), (5, 6, 96, 2), (5, 6, 96, 1)),
        embed_out_indices=(2, 4, 6, 8), channels=(16, 32, 64, 96), out_channels=128,
        num_heads=4, head_channels=128),
    "s": TopFormerConfig(
        cfgs=((3, 1, 16, 1), (3, 4, 24, 2), (3, 3, 24, 1), (5, 3, 48, 2), (5, 3, 48, 1),
              (3, 3, 96, 2), (3, 3, 96, 1), (5, 6, 128, 2), (5, 6, 128, 1), (3, 6, 128, 1)),
        embed_out_indices=(2, 4, 6, 9), channels=(24, 48, 96, 128), out_channels=192,
        num_heads=6, head_channels=192),
    "b": TopFormerConfig(
        cfgs=((3, 1, 16, 1), (3, 4, 32, 2), (3, 3, 32, 1), (5, 3, 64, 2), (5, 3, 64, 1),
              (3, 3, 128, 2), (3, 3, 128, 1), (5, 6, 160, 2), (5, 6, 160, 1), (3, 6, 160, 1)),
        embed_out_indices=(2, 4, 6, 9), channels=(32, 64, 128, 160), out_channels=256,
        num_heads=8, head_channels=256),
}


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual (Sandler et al., CVPR 2018) with ReLU.

    ``[1x1 expand conv+BN+ReLU] -> kxk depth-wise conv+BN+ReLU -> 1x1 conv+BN``, plus
    identity when stride 1 and in == out channels.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, expand: int, stride: int):
        super().__init__()
        hidden = int(round(in_ch * expand))
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(in_ch, hidden, 1))
        layers += [conv_bn_act(hidden, hidden, kernel_size, stride, groups=hidden),
                   conv_bn_act(hidden, out_ch, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class TokenPyramid(nn.Module):
    """Stem (3x3 s2 conv+BN+ReLU, 16 ch) + MobileNetV2 blocks; returns 4 scales."""

    def __init__(self, cfg: TopFormerConfig):
        super().__init__()
        self.stem = conv_bn_act(3, 16, 3, 2)
        blocks, in_ch = [], 16
        for k, t, c, s in cfg.cfgs:
            blocks.append(InvertedResidual(in_ch, c, k, t, s))
            in_ch = c
        self.blocks = nn.ModuleList(blocks)
        self.out_indices = tuple(cfg.embed_out_indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.out_indices:
                outs.append(x)
        return outs


class TopFormerAttention(nn.Module):
    """Multi-head attention with 1x1 conv+BN q/k/v (TopFormer Sec. 3.2).

    q, k: ``dim -> num_heads*key_dim``; v: ``dim -> num_heads*attn_ratio*key_dim``;
    ``proj``: ReLU6 -> 1x1 conv+BN back to ``dim`` (BN weight initialised to 0, as the
    official code). Input/output float32 ``(N, dim, h, w)``. Heads are separated with
    ``reshape`` (no ``split``/``chunk``). Scores are scaled by ``key_dim ** -0.5``
    (the official code defines that scale but never applies it; we apply it).
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: int):
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.d = attn_ratio * key_dim
        self.scale = key_dim ** -0.5
        self.to_q = conv_bn_act(dim, num_heads * key_dim, 1, act=None)
        self.to_k = conv_bn_act(dim, num_heads * key_dim, 1, act=None)
        self.to_v = conv_bn_act(dim, num_heads * self.d, 1, act=None)
        self.proj = nn.Sequential(nn.ReLU6(), conv_bn_act(num_heads * self.d, dim, 1, act=None))
        nn.init.zeros_(self.proj[1][1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        q = self.to_q(x).reshape(n, self.num_heads, self.key_dim, h * w).permute(0, 1, 3, 2)
        k = self.to_k(x).reshape(n, self.num_heads, self.key_dim, h * w)
        v = self.to_v(x).reshape(n, self.num_heads, self.d, h * w).permute(0, 1, 3, 2)
        attn = torch.softmax(torch.matmul(q, k) * self.scale, dim=-1)
        out = torch.matmul(attn, v).permute(0, 1, 3, 2).reshape(n, self.num_heads * self.d, h, w)
        return self.proj(out)


class TopFormerMlp(nn.Module):
    """1x1 conv+BN -> 3x3 depth-wise conv (bias) -> ReLU6 -> 1x1 conv+BN."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = conv_bn_act(dim, hidden, 1, act=None)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=True)
        self.act = nn.ReLU6()
        self.fc2 = conv_bn_act(hidden, dim, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class TopFormerBlock(nn.Module):
    """``x + DropPath(Attention(x))``, then ``x + DropPath(Mlp(x))`` (no norm layers
    besides the BNs inside the convs, as the official code)."""

    def __init__(self, dim: int, cfg: TopFormerConfig, drop_path: float):
        super().__init__()

        self.attn = TopFormerAttention(dim, cfg.key_dim, cfg.num_heads, cfg.attn_ratio)
        self.mlp = TopFormerMlp(dim, dim * cfg.mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(x))


class SemanticInjection(nn.Module):
    """Semantic injection module: ``BN(conv(local)) * hsigmoid(BN(conv(global))) +
    BN(conv(global))``, the global terms bilinearly upsampled to the local size.

    Inputs: local ``(N, C, H_l, W_l)``, global ``(N, C, h, w)``; output
    ``(N, out_ch, H_l, W_l)``.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.local_embedding = conv_bn_act(in_ch, out_ch, 1, act=None)
        self.global_embedding = conv_bn_act(in_ch, out_ch, 1, act=None)
        self.global_act = conv_bn_act(in_ch, out_ch, 1, act=None)
        self.act = nn.Hardsigmoid()

    def forward(self, x_local: torch.Tensor, x_global: torch.Tensor) -> torch.Tensor:
        size = x_local.shape[-2:]
        sig = _resize(self.act(self.global_act(x_global)), size)
        glob = _resize(self.global_embedding(x_global), size)
        return self.local_embedding(x_local) * sig + glob


_TOPFORMER_RULES = (
    (re.compile(r"^tpm\.stem\.0\.c\."), lambda m: "tpm.stem.0."),
    (re.compile(r"^tpm\.stem\.0\.bn\."), lambda m: "tpm.stem.1."),
    (re.compile(r"^tpm\.layer(\d+)\.conv\.(\d+)\.(c|bn)\."),
     lambda m: f"tpm.blocks.{int(m[1]) - 1}.conv.{int(m[2]) // 2}.{0 if m[3] == 'c' else 1}."),
    (re.compile(r"^trans\.transformer_blocks\.(\d+)\.attn\.(to_q|to_k|to_v)\.(c|bn)\."),
     lambda m: f"trans.{m[1]}.attn.{m[2]}.{0 if m[3] == 'c' else 1}."),
    (re.compile(r"^trans\.transformer_blocks\.(\d+)\.attn\.proj\.1\.(c|bn)\."),
     lambda m: f"trans.{m[1]}.attn.proj.1.{0 if m[2] == 'c' else 1}."),
    (re.compile(r"^trans\.transformer_blocks\.(\d+)\.mlp\.(fc1|fc2)\.(c|bn)\."),
     lambda m: f"trans.{m[1]}.mlp.{m[2]}.{0 if m[3] == 'c' else 1}."),
    (re.compile(r"^trans\.transformer_blocks\.(\d+)\.mlp\.dwconv\."), lambda m: f"trans.{m[1]}.mlp.dwconv."),
    (re.compile(r"^SIM\.(\d+)\.(local_embedding|global_embedding|global_act)\.(conv|bn)\."),
     lambda m: f"sim.{m[1]}.{m[2]}.{0 if m[3] == 'conv' else 1}."),
)


def topformer_official_to_ours(state: dict) -> dict:
    """Rename a state dict from the official TopFormer code's layout to :class:`TopFormerBackbone`'s.

    Official names (Zhang et al., CVPR 2022, reference code): ``tpm.stem.0.{c,bn}``,
    ``tpm.layer<i>.conv.<j>.{c,bn}`` (j counts activations too), ``trans.transformer_blocks.
    <b>.{attn.to_q|to_k|to_v|proj.1, mlp.fc1|fc2}.{c,bn}``, ``mlp.dwconv``,
    ``SIM.<i>.<embedding>.{conv,bn}``; a ``backbone.`` / ``module.`` prefix is stripped.
    Keys matching no rule (e.g. the ImageNet classifier) are dropped.
    """
    out = {}
    for key, value in state.items():
        k = key
        for prefix in ("module.", "backbone."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        for pattern, repl in _TOPFORMER_RULES:
            m = pattern.match(k)
            if m:
                out[repl(m) + k[m.end():]] = value
                break
    return out


class TopFormerBackbone(nn.Module):
    """Token pyramid -> pool all scales to 1/(32*c2t_stride) and concat -> transformer
    blocks -> split back by channel slicing -> semantic injection into scales 1..3.

    Input float32 ``(N, 3, H, W)``; output list of 3 float32 ``(N, out_channels,
    H/s, W/s)`` for s = 8, 16, 32. ``self.pyramid_features(x)`` gives the 4 token
    pyramid scales (strides 4..32) for feature KD.
    """

    def __init__(self, cfg: TopFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.tpm = TokenPyramid(cfg)
        self.channels = list(cfg.channels)
        dim = sum(self.channels)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.trans = nn.Sequential(*[TopFormerBlock(dim, cfg, dpr[i]) for i in range(cfg.depth)])
        self.sim = nn.ModuleDict({str(i): SemanticInjection(self.channels[i], cfg.out_channels)
                                  for i in cfg.decode_out_indices})

    def load_pretrained(self, file: str | os.PathLike) -> dict:
        """Load TopFormer's official ImageNet checkpoint (``topformer-{T,S,B}-224-*.pth``).

        The file's ``state_dict_ema`` (else ``state_dict``, ``model`` or the dict itself)
        is renamed from the official layout to this module's by :func:`topformer_official_to_ours`
        and loaded non-strictly (the classifier is dropped; the semantic-injection modules
        are not in the ImageNet checkpoint and stay random, as in the official code).

        Returns:
            dict with ``loaded`` and ``total`` tensor counts.

        Raises:
            WeightsError: unreadable file, or fewer than 90 % of the token-pyramid and
                transformer tensors found with matching shapes (wrong variant or layout).
        """
        try:
            ck = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file's name
            raise WeightsError(f"cannot read TopFormer checkpoint {file}: {exc}") from exc
        for key in ("state_dict_ema", "state_dict", "model"):
            if isinstance(ck, dict) and key in ck and isinstance(ck[key], dict):
                ck = ck[key]
                break
        mapped = topformer_official_to_ours(ck)
        own = self.state_dict()
        ok = {k: v for k, v in mapped.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
        core = [k for k in own if k.startswith(("tpm.", "trans."))]
        found = sum(1 for k in core if k in ok)
        if found < 0.9 * len(core):
            raise WeightsError(f"TopFormer checkpoint {file}: only {found}/{len(core)} backbone tensors match "
                               f"this {self.cfg.channels} variant (wrong variant or key layout)")
        self.load_state_dict(ok, strict=False)
        return {"loaded": len(ok), "total": len(own)}

    def forward_all(self, x: torch.Tensor):
        pyr = self.tpm(x)
        h, w = pyr[-1].shape[-2:]
        s = self.cfg.c2t_stride
        oh, ow = (int(h) - 1) // s + 1, (int(w) - 1) // s + 1
        tokens = self.trans(torch.cat([adaptive_avg_pool(p, (oh, ow)) for p in pyr], dim=1))
        outs, start = [], 0
        for i, c in enumerate(self.channels):
            if str(i) in self.sim:
                outs.append(self.sim[str(i)](pyr[i], tokens[:, start:start + c]))
            start += c
        return outs, pyr

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_all(x)[0]


class SimpleHead(nn.Module):
    """TopFormer head: sum of the injected features upsampled to the first one's size,
    then 1x1 conv+BN+ReLU. Output ``(N, channels, H/8, W/8)``."""

    def __init__(self, in_ch: int, channels: int):
        super().__init__()
        self.linear_fuse = conv_bn_act(in_ch, channels, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        x = feats[0]
        for f in feats[1:]:
            x = x + _resize(f, size)
        return self.linear_fuse(x)


class TopFormer(nn.Module):
    """TopFormer segmenter (Zhang et al., CVPR 2022), plain PyTorch.

    Attributes: ``backbone`` (:class:`TopFormerBackbone`), ``feature_channels`` (token
    pyramid channels), ``decode_head`` (:class:`SimpleHead`), ``classifier``
    (``nn.Conv2d``). Inputs: any size divisible by 32 (64 for exact pooling).
    """

    def __init__(self, num_classes: int, cfg: TopFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = TopFormerBackbone(cfg)
        self.feature_channels = list(cfg.channels)
        self.decode_head = SimpleHead(cfg.out_channels, cfg.head_channels)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(cfg.head_channels, num_classes, 1)

    def forward_with_features(self, x: torch.Tensor):
        """``(logits (N, K, H, W), 4 token-pyramid features at strides 4..32)``."""
        _check_input(x, "TopFormer.forward")
        injected, pyr = self.backbone.forward_all(x)
        y = self.classifier(self.dropout(self.decode_head(injected)))
        return _resize(y, x.shape[-2:]), pyr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``(N, 3, H, W)`` -> logits float32 ``(N, num_classes, H, W)``."""
        return self.forward_with_features(x)[0]


def _topformer(variant: str, num_classes: int, **kwargs) -> TopFormer:
    cfg = _TOPFORMER_CFGS[variant]
    if kwargs:
        cfg = dataclasses.replace(cfg, **kwargs)
    return TopFormer(num_classes, cfg)


@register_model("topformer_t")
def topformer_t(num_classes: int = NUM_CLASSES, **kwargs) -> TopFormer:
    """TopFormer-Tiny: channels [16, 32, 64, 96], 4 heads, injection/head width 128.
    Published (TopFormer Table; source 002 Table 4): 1.4 M params, 0.6 GFLOPs at 512x512."""
    return _topformer("t", num_classes, **kwargs)


@register_model("topformer_s")
def topformer_s(num_classes: int = NUM_CLASSES, **kwargs) -> TopFormer:
    """TopFormer-Small: channels [24, 48, 96, 128], 6 heads, width 192.
    Published: 3.1 M params, 1.2 GFLOPs at 512x512."""
    return _topformer("s", num_classes, **kwargs)


@register_model("topformer_b")
def topformer_b(num_classes: int = NUM_CLASSES, **kwargs) -> TopFormer:
    """TopFormer-Base: channels [32, 64, 128, 160], 8 heads, width 256.
    Published: 5.1 M params, 1.8 GFLOPs at 512x512."""
    return _topformer("b", num_classes, **kwargs)


# --------------------------------------------------------------------------- complexity

_ATTN_OPS = ("bmm", "baddbmm", "_scaled_dot_product")
_LINEAR_OPS = ("mm", "addmm")


def _check_hw(input_hw, where: str) -> None:
    if (not isinstance(input_hw, (tuple, list)) or len(input_hw) != 2
            or not all(isinstance(v, int) and v > 0 for v in input_hw)):
        raise ValueError(f"{where}: input_hw must be (H, W) positive ints, got {input_hw!r}")


def _aten_counter(model: nn.Module, input_hw: Sequence[int], also=None):
    """Run ``model`` on one zero image under ``FlopCounterMode`` (SDPA on the math backend);
    ``also(model, x)`` runs first, inside ``no_grad``. Returns the counter."""

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.zeros(1, 3, *input_hw, device=device)
        with torch.no_grad():
            if also is not None:
                also(model, x)
            counter = FlopCounterMode(display=False)
            # The CPU flash-attention kernel behind F.scaled_dot_product_attention has
            # no FLOP formula (its MACs would silently count as 0); the math backend
            # decomposes it into bmm, which is counted.
            with counter, sdpa_kernel([SDPBackend.MATH]):
                model(x)
    finally:
        model.train(was_training)
    return counter


def gmacs(model: nn.Module, input_hw: Sequence[int]) -> float:
    """MACs of one ``(1, 3, H, W)`` float32 image, in GMACs (1e9 multiply-accumulates).

    The study's one MACs counter: ``torch.utils.flop_counter.FlopCounterMode`` at the aten
    level (every conv / mm / bmm, attention included), FLOPs / 2. It is the ``gmacs``
    column of every table; :func:`model_complexity` adds a second, independent counter
    for cross-checking.

    Raises:
        ValueError: bad ``input_hw``.
    """
    _check_hw(input_hw, "gmacs")
    return _aten_counter(model, input_hw).get_total_flops() / 2 / 1e9


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex chars) identifying a model's exact weights and shapes.

    Hashes every state-dict entry's name, shape, dtype and bytes, plus the model's class
    and any ``segcompress_*`` attribute (the pruning record of :mod:`study.prune`), so a
    physically pruned model and a masked one differ. The study's one model identity: every
    cache key that depends on a model includes it.
    """
    h = hashlib.sha256(type(model).__name__.encode())
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    extra = {k: v for k, v in vars(model).items() if k.startswith("segcompress_")}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def model_complexity(model: nn.Module, input_hw: Sequence[int] = (128, 128)) -> dict:
    """Parameters and MACs of ``model`` for one image of size ``input_hw``.

    Two independent counters:

    - ``gmacs_tp``: torch-pruning's ``tp.utils.count_ops_and_params`` (module forward
      hooks on exact module types: misses ``torch.matmul`` inside custom attention,
      ``F.interpolate``, element-wise ops and ``nn.Conv2d`` subclasses; counts some
      BN / pooling work as ops).
    - ``gmacs_fc``: ``torch.utils.flop_counter.FlopCounterMode`` (aten level: every
      conv / mm / bmm, whatever module it sits in; no element-wise ops, no
      interpolation or pooling), FLOPs/2. SDPA runs on the math backend while counting
      (the CPU flash kernel has no FLOP formula and would count as 0).

    Args:
        model: any ``nn.Module`` taking float32 ``(1, 3, H, W)``; its train/eval mode is
            restored afterwards.
        input_hw: ``(H, W)`` in pixels (positive ints).

    Returns:
        dict with ``params_m`` (millions of parameters), ``gmacs`` (= ``gmacs_fc``, the
        complete aten-level count, 1e9 multiply-accumulates per image), ``gmacs_tp``,
        ``gmacs_fc``, ``rel_diff`` (``|fc - tp| / fc``), ``note`` (explains a rel_diff
        above 5 %, with the matmul MACs only the aten counter sees; "" otherwise).

    Raises:
        ValueError: bad ``input_hw``.
    """

    _check_hw(input_hw, "model_complexity")
    box = {}

    def count_tp(m, x):
        box["tp"], _ = tp.utils.count_ops_and_params(m, x)

    counter = _aten_counter(model, input_hw, also=count_tp)
    macs_tp = box["tp"]
    total = counter.get_total_flops()
    by_op: dict[str, int] = {}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        key = str(op).split(".")[1] if "." in str(op) else str(op)
        by_op[key] = by_op.get(key, 0) + int(n)
    attn_macs = sum(n for op, n in by_op.items() if op.startswith(_ATTN_OPS)) / 2
    fc = total / 2
    rel = abs(fc - macs_tp) / fc if fc else 0.0
    note = ""
    if rel > 0.05:
        parts = [f"torch-pruning (module hooks) counts {macs_tp / 1e9:.4f} GMACs vs "
                 f"aten-level {fc / 1e9:.4f} GMACs ({100 * rel:.1f}% apart)"]
        if attn_macs:
            parts.append(f"{attn_macs / 1e9:.4f} GMACs are attention matmuls (bmm/SDPA "
                         f"on activations) that only the aten counter sees")
        residual = fc - attn_macs - macs_tp
        if residual > 0.01 * fc:
            parts.append(f"{residual / 1e9:.4f} GMACs more are conv/mm calls that module "
                         f"hooks miss: functional F.linear/F.conv2d on a module's weight "
                         f"(e.g. the qkv projection of timm Swin-V2) or nn.Conv2d subclasses")
        elif residual < -0.01 * fc:
            parts.append(f"torch-pruning counts {-residual / 1e9:.4f} GMACs more: it also "
                         f"counts BatchNorm, ReLU and pooling modules (one op per element) "
                         f"and softmax/scaling inside timm Attention, which the aten "
                         f"counter ignores (it counts conv/mm/bmm only)")
        note = "; ".join(parts)
    return {
        "params_m": count_params(model) / 1e6,
        "gmacs": fc / 1e9,
        "gmacs_tp": float(macs_tp) / 1e9,
        "gmacs_fc": fc / 1e9,
        "rel_diff": rel,
        "note": note,
    }
