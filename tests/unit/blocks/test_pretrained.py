"""model.pretrained: backbone weights from a safetensors file, into E_o, E_p and E_h.

The timm tests write a tiny timm model's weights themselves (nothing is downloaded) and skip
where timm is not installed; the torchvision and config tests run everywhere, on a stand-in
torchvision.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from osmd_ray.blocks.encoders import build_modality_encoder
from osmd_ray.config import ModelConfig
from osmd_ray.config.schema import Config
from osmd_ray.config.validation import validate
from osmd_ray.data.schema import ModalitySpec
from osmd_ray.errors import ConfigError
from osmd_ray.methods import build_training_net

TINY = "test_resnet"
"""timm's smallest ResNet (0.4M parameters), registered for tests and without weights."""
OTHER = "test_efficientnet"
S = 32
RGB = ModalitySpec("rgb", "image", (3, S, S), "uint8")
DEPTH = ModalitySpec("depth", "image", (1, S, S), "float32")


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


def _stats(spec: ModalitySpec) -> dict[str, list[float]]:
    return {"mean": [0.0] * spec.shape[0], "std": [1.0] * spec.shape[0]}


def _timm_file(timm, tmp_path, name: str = TINY) -> tuple[str, dict[str, torch.Tensor]]:
    """A full timm model's state dict (classifier included, as a real checkpoint has it)."""
    torch.manual_seed(1)
    state = {
        k: v.clone() for k, v in timm.create_model(name, pretrained=False).state_dict().items()
    }
    path = str(tmp_path / f"{name}.safetensors")
    save_file(state, path)
    return path, state


def _cfg(encoder: str, pretrained: str) -> ModelConfig:
    return ModelConfig(
        image_encoder=encoder,
        pretrained=pretrained,
        feature_dim=8,
        hallucination_width=1.0,
        hallucination_depth=0,
    )


def test_timm_weights_reach_e_o_e_p_and_e_h_with_the_depth_stem_adapted(timm, tmp_path):
    path, state = _timm_file(timm, tmp_path)
    net = build_training_net("osmd", [RGB], [DEPTH], 3, _cfg(f"timm:{TINY}", path), None)
    for role in (net.E_o, net.E_h):
        got = role.encoders["rgb"].body[0].state_dict()
        assert set(got) == {k for k in state if not k.startswith("fc.")}
        for key, value in got.items():
            torch.testing.assert_close(value, state[key], msg=key)
    depth = net.E_p.encoders["depth"].body[0]
    stem = depth.conv1[0].weight  # test_resnet's deep stem: conv1 is a Sequential
    assert stem.shape[1] == 1
    want = timm.models.adapt_input_conv(1, state["conv1.0.weight"])
    torch.testing.assert_close(stem, want)
    random_init = timm.create_model(TINY, pretrained=False, in_chans=1, num_classes=0)
    assert not torch.allclose(stem, random_init.conv1[0].weight)
    torch.testing.assert_close(depth.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    out = net(
        {
            "rgb": torch.randint(0, 256, (2, 3, S, S), dtype=torch.uint8),
            "depth": torch.rand(2, 1, S, S),
        }
    )
    assert out["deploy_logits"].shape == (2, 3)


def test_timm_dense_encoder_loads_the_features_only_backbone(timm, tmp_path):
    path, state = _timm_file(timm, tmp_path)
    enc = build_modality_encoder(DEPTH, _cfg(f"timm:{TINY}", path), _stats(DEPTH), dense=True)
    backbone = enc.body.backbone
    torch.testing.assert_close(
        backbone.conv1[0].weight, timm.models.adapt_input_conv(1, state["conv1.0.weight"])
    )
    torch.testing.assert_close(backbone.layer4[0].conv2.weight, state["layer4.0.conv2.weight"])


def test_a_file_of_another_architecture_is_refused_naming_the_key(timm, tmp_path):
    path, _ = _timm_file(timm, tmp_path, OTHER)
    with pytest.raises(ConfigError, match="does not fit the backbone: keys missing") as err:
        build_modality_encoder(RGB, _cfg(f"timm:{TINY}", path), _stats(RGB))
    assert err.value.key == "model.pretrained"
    assert "conv1.0.weight" in str(err.value)


def test_a_missing_file_is_refused_naming_the_key_and_the_path(timm, tmp_path):
    path = str(tmp_path / "nope.safetensors")
    with pytest.raises(ConfigError, match="no file at") as err:
        build_modality_encoder(RGB, _cfg(f"timm:{TINY}", path), _stats(RGB))
    assert err.value.key == "model.pretrained" and path in str(err.value)


def test_a_file_that_is_not_safetensors_is_refused(timm, tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a safetensors file") as err:
        build_modality_encoder(RGB, _cfg(f"timm:{TINY}", str(path)), _stats(RGB))
    assert err.value.key == "model.pretrained"


class _TinyClassifier(nn.Module):
    """Shaped like a torchvision classifier: a 3-channel conv stem and a final Linear."""

    def __init__(self, weights=None) -> None:
        super().__init__()
        assert weights is None  # never downloads
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 1000)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.conv2(self.conv1(x))), 1))


@pytest.fixture
def fake_torchvision(monkeypatch):
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(tiny=_TinyClassifier)
    monkeypatch.setitem(sys.modules, "torchvision", fake)


def test_torchvision_weights_load_with_the_stem_averaged_for_depth(fake_torchvision, tmp_path):
    torch.manual_seed(2)
    state = _TinyClassifier().state_dict()
    path = str(tmp_path / "tiny.safetensors")
    save_file(state, path)
    cfg = _cfg("torchvision:tiny", path)
    rgb = build_modality_encoder(RGB, cfg, _stats(RGB)).body[0]
    torch.testing.assert_close(rgb.conv1.weight, state["conv1.weight"])
    depth = build_modality_encoder(DEPTH, cfg, _stats(DEPTH)).body[0]
    # Averaged over R, G, B and scaled by 3 / 1 channel: the sum of the RGB kernels.
    want = state["conv1.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(depth.conv1.weight, want)
    torch.testing.assert_close(depth.conv1.bias, state["conv1.bias"])
    torch.testing.assert_close(depth.conv2.weight, state["conv2.weight"])


def test_torchvision_shape_mismatches_are_refused_with_the_keys(fake_torchvision, tmp_path):
    state = _TinyClassifier().state_dict()
    state["conv2.weight"] = torch.zeros(4, 6, 5, 5)
    state["extra.weight"] = torch.zeros(1)
    path = str(tmp_path / "bad.safetensors")
    save_file(state, path)
    with pytest.raises(ConfigError, match=r"shapes that differ.*conv2\.weight") as err:
        build_modality_encoder(RGB, _cfg("torchvision:tiny", path), _stats(RGB))
    assert err.value.key == "model.pretrained"
    del state["conv2.weight"]
    state["conv2.weight"] = torch.zeros(4, 6, 3, 3)
    save_file(state, path)
    with pytest.raises(ConfigError, match=r"keys the backbone does not have.*extra\.weight"):
        build_modality_encoder(RGB, _cfg("torchvision:tiny", path), _stats(RGB))


def test_pretrained_with_small_cnn_is_a_config_error():
    cfg = Config()
    cfg.model.pretrained = "weights.safetensors"
    with pytest.raises(ConfigError, match="small_cnn has no pretrained weights") as err:
        validate(cfg)
    assert err.value.key == "model.pretrained"
    cfg.model.pretrained = ""
    validate(cfg)


def test_a_deployed_model_does_not_read_the_pretrained_file():
    from osmd_ray.deploy import _model_config

    built = _model_config({"image_encoder": "timm:x", "pretrained": "s3://bucket/w.safetensors"})
    assert built.image_encoder == "timm:x" and built.pretrained == ""
