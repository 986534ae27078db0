"""Dense prediction (task segmentation): shapes, per-pixel fusion, losses, deploy path."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from osmd_ray.blocks import encoders
from osmd_ray.blocks.fusion import CTNFusion
from osmd_ray.blocks.losses import (
    alignment_loss,
    dense_alignment_loss,
    distillation_loss,
)
from osmd_ray.blocks.nets import TrainingNet
from osmd_ray.config import LossConfig, ModelConfig
from osmd_ray.data.schema import ModalitySpec
from osmd_ray.methods import METHODS, build_deploy_net, build_training_net, method_losses

H, W, K = 12, 16, 5
RGB = ModalitySpec("rgb", "image", (3, H, W), "uint8")
DEPTH = ModalitySpec("depth", "image", (1, H, W), "float32")
IMU = ModalitySpec("imu", "vector", (6,), "float32")
CFG = ModelConfig(width=4, depth=2, feature_dim=8)


def batch(rows: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "rgb": torch.randint(0, 256, (rows, 3, H, W), generator=g).float(),
        "depth": torch.rand(rows, 1, H, W, generator=g) * 4,
        "imu": torch.randn(rows, 6, generator=g),
    }


def seg_model(method: str, privileged=(DEPTH,), cfg: ModelConfig = CFG) -> TrainingNet:
    torch.manual_seed(0)
    return build_training_net(method, [RGB], list(privileged), K, cfg, None, (H, W))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("privileged", [(DEPTH,), (DEPTH, IMU), (IMU,)], ids=["d", "d+imu", "imu"])
def test_every_method_predicts_a_label_map_and_trains(method, privileged):
    model = seg_model(method, privileged)
    out = model(batch())
    assert out["z_o"].shape == (4, H, W, CFG.feature_dim)  # channel-last map
    for key in ("deploy_logits", "teacher_logits", "priv_logits", "priv_logits_h"):
        if key in out:
            assert out[key].shape == (4, K, H, W), key
    labels = torch.randint(0, K, (4, H, W))
    labels[0, :3] = -100
    losses = method_losses(out, labels, None, method, LossConfig())
    losses["total"].backward()
    assert torch.isfinite(losses["total"])
    trained = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum()]
    assert any(n.startswith("E_o.") for n in trained)


@pytest.mark.parametrize("method", ["osmd", "ordinary_only", "full_multimodal", "imputation"])
def test_deploy_module_and_a_fresh_deploy_net_give_the_training_model_s_logits(method):
    model = seg_model(method).eval()
    b = batch()
    with torch.no_grad():
        want = model(b)["deploy_logits"]
        net = model.deploy_module().eval()
        assert torch.equal(net(b), want)
        fresh = build_deploy_net(method, [RGB], [DEPTH], K, CFG, None, (H, W)).eval()
        fresh.load_state_dict(net.state_dict(), strict=True)
        assert torch.allclose(fresh(b), want, atol=1e-6)
    assert "E_p" not in dict(model.deploy_module().named_children()) or method in (
        "full_multimodal",
        "imputation",
    )


def test_predictions_are_per_pixel_from_a_full_resolution_feature_map():
    """The small_cnn dense encoder keeps H x W, so a change in one corner of the image does
    not reach the logits of a far corner through any pooling (a U-Net has a bounded field)."""
    model = seg_model("ordinary_only", cfg=ModelConfig(width=4, depth=1, feature_dim=8)).eval()
    b = batch(rows=1)
    changed = {k: v.clone() for k, v in b.items()}
    changed["rgb"][:, :, :2, :2] = 255 - changed["rgb"][:, :, :2, :2]
    with torch.no_grad():
        before, after = model(b)["deploy_logits"], model(changed)["deploy_logits"]
    assert not torch.equal(before[..., :3, :3], after[..., :3, :3])
    assert torch.equal(before[..., -4:, -4:], after[..., -4:, -4:])


def test_ctn_on_feature_maps_is_the_ctn_of_every_pixel():
    torch.manual_seed(0)
    ctn = CTNFusion(8)
    a, b = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    per_pixel = ctn(a.reshape(-1, 8), b.reshape(-1, 8)).reshape(2, 3, 4, 8)
    assert torch.allclose(ctn(a, b), per_pixel, atol=1e-6)


def test_unsupported_dense_settings_say_what_to_change():
    with pytest.raises(ValueError, match="hallucination=encoder"):
        seg_model("osmd", cfg=ModelConfig(width=4, depth=2, feature_dim=8, hallucination="unet"))
    with pytest.raises(ValueError, match="hallucination_shared_stages"):
        seg_model("osmd", cfg=ModelConfig(width=4, depth=2, hallucination_shared_stages=1))
    with pytest.raises(ValueError, match="image among the ordinary"):
        build_training_net("osmd", [IMU], [DEPTH], K, CFG, None, (H, W))
    with pytest.raises(ValueError, match="segmentation uses small_cnn or timm"):
        seg_model("osmd", cfg=ModelConfig(image_encoder="torchvision:resnet18"))


def test_recon_decodes_the_depth_image_per_pixel():
    model = seg_model("osmd")
    out = model(batch())
    assert out["recon"].shape == out["recon_target"].shape == (4, 1 * H * W)


def test_dense_jmmd_is_the_pooled_term_plus_the_drawn_pixels_term():
    cfg = LossConfig(w_jan=1.0, jmmd_pixels=20)
    g = torch.Generator().manual_seed(1)
    z_p, z_h = torch.randn(3, 6, 8, 4, generator=g), torch.randn(3, 6, 8, 4, generator=g)
    lp, lh = torch.randn(3, K, 12, 16, generator=g), torch.randn(3, K, 12, 16, generator=g)
    torch.manual_seed(7)
    got = dense_alignment_loss(z_p, z_h, lp, lh, cfg)
    torch.manual_seed(7)
    rows, ys, xs = (torch.randint(n, (20,)) for n in (3, 12, 16))
    fy, fx = ys * 6 // 12, xs * 8 // 16  # logits at 12x16, features at 6x8
    pooled = alignment_loss(
        z_p.mean((1, 2)), z_h.mean((1, 2)), lp.mean((2, 3)), lh.mean((2, 3)), cfg
    )
    pixels = alignment_loss(
        z_p[rows, fy, fx], z_h[rows, fy, fx], lp[rows, :, ys, xs], lh[rows, :, ys, xs], cfg
    )
    assert torch.allclose(got, pooled + pixels)
    assert got > 0


def test_dense_jmmd_trains_the_hallucination_encoder():
    model = seg_model("osmd")
    out = model(batch())
    losses = method_losses(
        out, torch.zeros(4, H, W, dtype=torch.long), None, "osmd", LossConfig(), terms={"jan": 1}
    )
    losses["total"].backward()
    assert float(losses["jan"].detach()) > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.E_h.parameters())


def test_distillation_of_label_maps_is_the_mean_over_pixels():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, K, 3, 4, generator=g), torch.randn(2, K, 3, 4, generator=g)
    flat = [t.permute(0, 2, 3, 1).reshape(-1, K) for t in (student, teacher)]
    assert torch.allclose(
        distillation_loss(student, teacher, 2.0), distillation_loss(*flat, 2.0), atol=1e-6
    )


def test_rows_without_depth_stay_out_of_the_privileged_encoder():
    model = seg_model("osmd")
    b = batch()
    b["has_depth"] = torch.tensor([True, False, True, True])
    b["depth"][1] = float("nan")
    out = model(b)
    assert torch.equal(out["z_p"][1], torch.zeros_like(out["z_p"][1]))
    losses = method_losses(out, torch.zeros(4, H, W, dtype=torch.long), None, "osmd", LossConfig())
    assert torch.isfinite(losses["total"])


class _TinyPyramid(nn.Module):
    """What timm's ``features_only`` models offer: a list of maps and feature_info."""

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(in_chans, 3, 3, stride=4, padding=1),
                nn.Conv2d(3, 5, 3, stride=2, padding=1),
            ]
        )
        self.feature_info = types.SimpleNamespace(channels=lambda: [3, 5])

    def forward(self, x):
        first = self.convs[0](x)
        return [first, self.convs[1](first)]


def test_timm_dense_encoder_merges_the_feature_pyramid(monkeypatch):
    calls = {}

    def create_model(name, pretrained, in_chans, features_only, out_indices):
        calls.update(name=name, pretrained=pretrained, features_only=features_only)
        return _TinyPyramid(in_chans)

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    cfg = ModelConfig(image_encoder="timm:tiny", feature_dim=8)
    model = build_training_net("osmd", [RGB], [DEPTH], K, cfg, None, (H, W))
    assert isinstance(model.E_o.encoders["rgb"].body, encoders.TimmDenseEncoder)
    assert calls == {"name": "tiny", "pretrained": False, "features_only": True}
    out = model(batch())
    assert out["z_o"].shape == (4, H // 4, W // 4, 8)  # stride 4
    assert out["deploy_logits"].shape == (4, K, H, W)  # upsampled to the label map
    F.cross_entropy(out["deploy_logits"], torch.zeros(4, H, W, dtype=torch.long)).backward()


def test_a_narrower_hallucination_encoder_predicts_the_same_label_maps_shape():
    cfg = ModelConfig(width=8, depth=2, feature_dim=8, hallucination_width=0.5)
    model = seg_model("osmd", cfg=cfg)
    assert model.E_h.encoders["rgb"].body.trunk.out_channels == 4
    assert model.E_o.encoders["rgb"].body.trunk.out_channels == 8
    out = model(batch())
    assert out["z_h"].shape == out["z_o"].shape == (4, H, W, 8)
    deploy = build_deploy_net("osmd", [RGB], [], K, cfg, None, (H, W)).eval()
    deploy.load_state_dict(model.deploy_module().state_dict(), strict=True)
    assert deploy({"rgb": batch()["rgb"]}).shape == (4, K, H, W)
