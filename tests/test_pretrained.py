"""Pretrained encoders: the local weights-dir layout, timm loading, TopFormer's official layout, errors."""
import re

import pytest
import torch
from safetensors.torch import save_file

from study import models


def _write_timm_checkpoint(root, ckpt_name, seed=0, **kw):
    """A seeded random timm model saved where `huggingface-cli download timm/<ckpt>` puts it."""
    import timm

    torch.manual_seed(seed)
    net = timm.create_model(ckpt_name.split(".")[0], pretrained=False, **kw)
    for p in net.parameters():  # not the default init: loading must really copy these
        p.data.normal_(0, 0.05)
    d = root / ckpt_name
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "model.safetensors"))
    return net


def test_mobilevit_encoder_weights_equal_the_file(tmp_path):
    src = _write_timm_checkpoint(tmp_path, "mobilevit_s.cvnets_in1k")
    m = models.create_model("upernet_mobilevit_s", pretrained=True, weights_dir=tmp_path)
    assert m.pretrained is True
    ref = src.state_dict()
    for k, v in m.backbone.stem.state_dict().items():
        assert torch.equal(v, ref[f"stem.{k}"]), k
    for k, v in m.backbone.stages.state_dict().items():
        assert torch.equal(v, ref[f"stages.{k}"]), k
    rand = models.create_model("upernet_mobilevit_s")
    assert rand.pretrained is False
    assert not torch.equal(next(rand.backbone.stem.parameters()), next(m.backbone.stem.parameters()))


def test_resnet_features_only_encoder_loads(tmp_path):
    src = _write_timm_checkpoint(tmp_path, "resnet18.a1_in1k")
    m = models.create_model("upernet_resnet18", pretrained=True, weights_dir=tmp_path)
    body = m.backbone.body.state_dict()
    assert torch.equal(body["conv1.weight"], src.state_dict()["conv1.weight"])
    assert torch.equal(body["layer4.1.conv2.weight"], src.state_dict()["layer4.1.conv2.weight"])


def test_missing_file_names_the_path_and_the_download_command(tmp_path):
    with pytest.raises(models.WeightsError) as e:
        models.create_model("upernet_swinv2_t", pretrained=True, weights_dir=tmp_path, img_size=64)
    msg = str(e.value)
    assert str(tmp_path / "swinv2_tiny_window8_256.ms_in1k" / "model.safetensors") in msg
    assert "hf download timm/swinv2_tiny_window8_256.ms_in1k" in msg
    with pytest.raises(models.WeightsError, match="topformer-T-224-66.2.pth"):
        models.check_pretrained(["upernet_resnet18", "topformer_t"], tmp_path)


def test_wrong_file_is_a_clear_error(tmp_path):
    _write_timm_checkpoint(tmp_path, "resnet18.a1_in1k")
    # a resnet file where mobilevit's belongs: timm would load it non-strictly and keep nothing
    (tmp_path / "resnet18.a1_in1k").rename(tmp_path / "mobilevit_s.cvnets_in1k")
    with pytest.raises(models.WeightsError, match="not this encoder's checkpoint"):
        models.create_model("upernet_mobilevit_s", pretrained=True, weights_dir=tmp_path)


def _official_layout(ours: dict) -> dict:
    """Inverse of topformer_official_to_ours for the tensors the official code names."""
    out = {}
    for k, v in ours.items():
        m = re.match(r"tpm\.stem\.(0|1)\.(.*)", k)
        if m:
            out[f"tpm.stem.0.{'c' if m[1] == '0' else 'bn'}.{m[2]}"] = v
            continue
        m = re.match(r"tpm\.blocks\.(\d+)\.conv\.(\d+)\.(0|1)\.(.*)", k)
        if m:
            out[f"tpm.layer{int(m[1]) + 1}.conv.{2 * int(m[2])}.{'c' if m[3] == '0' else 'bn'}.{m[4]}"] = v
            continue
        m = re.match(r"trans\.(\d+)\.(attn\.to_q|attn\.to_k|attn\.to_v|attn\.proj\.1|mlp\.fc1|mlp\.fc2)\.(0|1)\.(.*)", k)
        if m:
            out[f"trans.transformer_blocks.{m[1]}.{m[2]}.{'c' if m[3] == '0' else 'bn'}.{m[4]}"] = v
            continue
        m = re.match(r"trans\.(\d+)\.mlp\.dwconv\.(.*)", k)
        if m:
            out[f"trans.transformer_blocks.{m[1]}.mlp.dwconv.{m[2]}"] = v
    return out


def test_topformer_official_checkpoint_layout_loads(tmp_path):
    torch.manual_seed(3)
    src = models.create_model("topformer_t")
    for p in src.parameters():
        p.data.normal_(0, 0.05)
    official = {f"backbone.{k}": v for k, v in _official_layout(src.backbone.state_dict()).items()}
    official["head.l.weight"] = torch.zeros(1000, 384)  # the ImageNet classifier is dropped
    (tmp_path / "topformer").mkdir()
    torch.save({"state_dict_ema": official, "state_dict": {}}, tmp_path / "topformer" / "topformer-T-224-66.2.pth")
    m = models.create_model("topformer_t", pretrained=True, weights_dir=tmp_path)
    mine, ref = m.backbone.state_dict(), src.backbone.state_dict()
    core = [k for k in ref if k.startswith(("tpm.", "trans."))]
    assert core and all(torch.equal(mine[k], ref[k]) for k in core)
    # the S checkpoint does not fit the T variant: a clear error, not a silent partial load
    (tmp_path / "topformer" / "topformer-S-224-72.3.pth").write_bytes(
        (tmp_path / "topformer" / "topformer-T-224-66.2.pth").read_bytes())
    with pytest.raises(models.WeightsError, match="backbone tensors match"):
        models.create_model("topformer_s", pretrained=True, weights_dir=tmp_path)


def test_swin_checkpoint_at_256_loads_into_a_teacher_built_for_another_size(tmp_path):
    src = _write_timm_checkpoint(tmp_path, "swinv2_tiny_window8_256.ms_in1k")
    m = models.create_model("upernet_swinv2_t", pretrained=True, weights_dir=tmp_path, img_size=64)
    body, ref = m.backbone.body.state_dict(), src.state_dict()
    # learned weights are copied; position tables are recomputed for the new size by timm
    for k in ("patch_embed.proj.weight", "layers_3.blocks.1.mlp.fc2.weight", "layers_0.blocks.0.attn.cpb_mlp.0.weight"):
        ref_k = k.replace("layers_", "layers.")
        assert torch.equal(body[k], ref[ref_k]), k
