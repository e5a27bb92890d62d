"""Tests of study.models: registry, shapes, sizes, MAC counters, ONNX export."""
from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from study import NUM_CLASSES
from study.models import (adaptive_avg_pool, create_model, list_models, model_complexity,
                          register_model)

HW = 64
EXPECTED = {
    "upernet_mobilevit_s", "upernet_resnet18", "upernet_swinv2_t",
    "deeplabv3plus_mobilenetv2", "topformer_t", "topformer_s", "topformer_b",
}


@functools.lru_cache(maxsize=None)
def _build(name: str) -> nn.Module:
    """Built once per test session (tests below only read the models)."""
    torch.manual_seed(0)
    kw = {"img_size": HW} if name == "upernet_swinv2_t" else {}
    return create_model(name, **kw)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_registry_lists_expected_models():
    assert EXPECTED <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_model_name_lists_known_models():
    with pytest.raises(ValueError) as err:
        create_model("upernet_nope")
    msg = str(err.value)
    assert "upernet_nope" in msg
    for name in EXPECTED:
        assert name in msg


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("topformer_t", num_classes=0)
    from study.models import WeightsError
    with pytest.raises(WeightsError, match="weights_dir holding topformer/topformer-T-224-66.2.pth"):
        create_model("topformer_t", pretrained=True)  # not on the timm hub
    with pytest.raises(ValueError, match="img_size"):
        create_model("upernet_swinv2_t", img_size=100)
    with pytest.raises(ValueError, match="already registered"):
        register_model("topformer_t")(lambda num_classes=14: nn.Identity())
    with pytest.raises(ValueError, match="input_hw"):
        model_complexity(nn.Conv2d(3, 1, 1), input_hw=(0, 64))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_shape_dtype_finite(name):
    model = _build(name).eval()
    x = torch.randn(2, 3, HW, HW)
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor)
    assert y.shape == (2, NUM_CLASSES, HW, HW)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert isinstance(model.classifier, nn.Conv2d)
    assert model.classifier.out_channels == NUM_CLASSES
    assert hasattr(model, "backbone") and hasattr(model, "decode_head")


def test_train_step_and_num_classes():
    model = create_model("topformer_t", num_classes=5).train()
    x = torch.randn(2, 3, HW, HW)
    y = model(x)
    assert y.shape == (2, 5, HW, HW)
    y.mean().backward()
    assert model.classifier.weight.grad is not None


def _fixed_size_swin(img_size: int) -> nn.Module:
    """The teacher as it was built before issue 17: timm's strict (fixed) input size."""
    from study.models import TimmFeatures, UPerNet, UPerNetConfig
    bb = TimmFeatures("swinv2_tiny_window8_256", (0, 1, 2, 3), nhwc=True, img_size=img_size)
    cfg = UPerNetConfig("swinv2_tiny_window8_256", channels=96, backbone_kwargs={"img_size": img_size})
    return UPerNet(bb, NUM_CLASSES, cfg, fixed_input_hw=(img_size, img_size)).eval()


def test_swin_teacher_is_unchanged_at_its_built_size_and_takes_larger_images():
    """Issue 17: the teacher is built for the training crop and evaluated on full images."""
    model = _build("upernet_swinv2_t").eval()
    ref = _fixed_size_swin(HW)
    assert set(ref.state_dict()) == set(model.state_dict())
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, HW, HW, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # bit-identical: smoke / cpu numbers do not change
        with pytest.raises(ValueError):  # the old build refused other sizes ...
            ref(torch.randn(1, 3, 2 * HW, 2 * HW))
        y = model(torch.randn(1, 3, 2 * HW, 2 * HW))  # ... the new one takes them
    assert y.shape == (1, NUM_CLASSES, 2 * HW, 2 * HW) and torch.isfinite(y).all()


def test_swin_teacher_built_for_384_crops_evaluates_512_images():
    """The paper profile's shapes: built for 384-px crops, validated on 512-px images."""
    torch.manual_seed(0)
    model = create_model("upernet_swinv2_t", img_size=384).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 512, 512))
    assert y.shape == (1, NUM_CLASSES, 512, 512) and torch.isfinite(y).all()
    # stages whose map exceeds the window keep window 8 with a shift (the CPB bias is per window)
    blocks = [b for layer in model.backbone.body.values() if hasattr(layer, "blocks") for b in layer.blocks]
    assert blocks and all(tuple(b.window_size) == (8, 8) for b in blocks)


@pytest.mark.parametrize("name", ["upernet_mobilevit_s", "upernet_resnet18", "upernet_swinv2_t"])
def test_forward_with_features(name):
    model = _build(name).eval()
    x = torch.randn(1, 3, HW, HW)
    with torch.no_grad():
        logits, feats = model.forward_with_features(x)
        plain = model(x)
    torch.testing.assert_close(logits, plain)
    assert len(feats) == 4 == len(model.feature_channels)
    for f, c, s in zip(feats, model.feature_channels, (4, 8, 16, 32)):
        assert f.shape == (1, c, HW // s, HW // s)
    if name == "upernet_mobilevit_s":
        assert model.feature_channels == [64, 96, 128, 160]  # source 000's taps


def test_param_counts_plausible():
    params = {n: sum(p.numel() for p in _build(n).parameters()) / 1e6
              for n in ["upernet_mobilevit_s", "topformer_t", "topformer_s", "topformer_b",
                        "deeplabv3plus_mobilenetv2"]}
    assert 4.0 < params["upernet_mobilevit_s"] < 7.0  # source 000: 5.6 M
    assert params["topformer_t"] < params["topformer_s"] < params["topformer_b"]
    # published 1.4 / 3.1 / 5.1 M (TopFormer, CVPR 2022)
    for name, pub in [("topformer_t", 1.4), ("topformer_s", 3.1), ("topformer_b", 5.1)]:
        assert abs(params[name] - pub) / pub < 0.1, (name, params[name])
    assert 1.5 < params["deeplabv3plus_mobilenetv2"] < 3.0  # source 002 Table 5: 2.26 M


@pytest.mark.parametrize("name", ["upernet_resnet18", "deeplabv3plus_mobilenetv2"])
def test_mac_counters_agree_on_cnns(name):
    c = model_complexity(_build(name), input_hw=(HW, HW))
    assert c["gmacs"] == c["gmacs_fc"] > 0
    assert c["rel_diff"] < 0.05, c
    assert c["note"] == ""
    assert c["params_m"] > 1


def test_mac_note_when_counters_disagree():
    c = model_complexity(_build("upernet_swinv2_t"), input_hw=(HW, HW))
    assert c["rel_diff"] > 0.05
    assert "attention" in c["note"] and "GMACs" in c["note"]
    assert c["gmacs"] > c["gmacs_tp"]  # hooks miss the attention matmuls


def test_macs_scale_with_input_area():
    model = _build("topformer_t").train()
    small = model_complexity(model, input_hw=(64, 64))["gmacs"]
    big = model_complexity(model, input_hw=(128, 128))["gmacs"]
    assert 3.0 < big / small < 4.5  # ~4x pixels; attention over 1 vs 4 tokens
    assert model.training  # mode restored


def test_adaptive_avg_pool_matches_torch_in_all_paths():
    x = torch.randn(2, 5, 4, 4)
    for s in (1, 2, 3, 4, 6):
        ref = torch.nn.functional.adaptive_avg_pool2d(x, s)
        torch.testing.assert_close(adaptive_avg_pool(x, (s, s)), ref)
    # the exported (matrix) path equals adaptive pooling as well
    from study.models import _adaptive_matrix
    for s in (3, 6):
        ph = _adaptive_matrix(4, s, x.dtype, x.device)
        torch.testing.assert_close(ph @ x @ ph.t(), torch.nn.functional.adaptive_avg_pool2d(x, s))


@pytest.mark.parametrize("name", ["upernet_mobilevit_s", "deeplabv3plus_mobilenetv2",
                                  "topformer_t"])
def test_onnx_export_matches_onnxruntime(name):
    ort = pytest.importorskip("onnxruntime")
    model = _build(name).eval()
    x = torch.randn(1, 3, HW, HW)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, buf, opset_version=17, dynamo=False,
                          input_names=["x"], output_names=["logits"])
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (y_ort,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        y = model(x).numpy()
    assert y_ort.shape == (1, NUM_CLASSES, HW, HW)
    assert np.abs(y_ort - y).max() < 1e-3


def test_mac_counters_agree_on_mobilevit_attention():
    # MobileViT's timm Attention uses F.scaled_dot_product_attention; the aten counter
    # only sees it on the math backend (the CPU flash kernel has no FLOP formula).
    c = model_complexity(_build("upernet_mobilevit_s"), input_hw=(128, 128))
    assert c["rel_diff"] < 0.05, c
    assert 4.0 < c["params_m"] < 7.0
