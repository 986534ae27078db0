"""Encoders per modality kind, role encoders, input normalisation and backbone builders."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from osmd_ray.blocks.encoders import (
    Normalize,
    RoleEncoder,
    SmallCNN,
    build_modality_encoder,
    resolve_normalization,
)
from osmd_ray.config import ModelConfig
from osmd_ray.data.schema import ModalitySpec

CFG = ModelConfig(width=4, depth=2, feature_dim=12)
RGB = ModalitySpec("rgb", "image", (3, 16, 12), "uint8")
IMU = ModalitySpec("imu", "sequence", (6, 20), "float32")
META = ModalitySpec("meta", "vector", (7,), "float32")


def _raw(spec: ModalitySpec, rows: int) -> torch.Tensor:
    if spec.dtype == "uint8":
        return torch.randint(0, 256, (rows, *spec.shape), dtype=torch.uint8)
    return torch.randn(rows, *spec.shape)


def _identity_stats(spec: ModalitySpec) -> dict[str, list[float]]:
    return {"mean": [0.0] * spec.shape[0], "std": [1.0] * spec.shape[0]}


@pytest.mark.parametrize(
    "kind,shape,view",
    [
        ("image", (3, 4, 5), (1, 3, 1, 1)),
        ("sequence", (3, 9), (1, 3, 1)),
        ("vector", (3,), (1, 3)),
    ],
)
def test_normalize_matches_manual_maths(kind, shape, view):
    mean, std = [10.0, 100.0, 200.0], [2.0, 50.0, 0.5]
    x = torch.randint(0, 256, (4, *shape), dtype=torch.uint8)
    out = Normalize(kind, mean, std)(x)
    want = (x.double() - torch.tensor(mean).reshape(view)) / torch.tensor(std).reshape(view)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-5)


def test_normalize_computes_in_fp32_and_only_centres_constant_channels():
    # fp32 even with bf16 statistics: the encoder casts to its weights' dtype, not the buffers'.
    norm = Normalize("vector", [1.0, 2.0], [0.0, 4.0]).to(torch.bfloat16)
    x = torch.tensor([[3.0, 10.0]], dtype=torch.float64)
    out = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0]]))


@pytest.mark.parametrize("spec", [RGB, IMU, META], ids=lambda s: s.kind)
def test_each_kind_encodes_to_feature_dim(spec):
    enc = build_modality_encoder(spec, CFG, _identity_stats(spec))
    out = enc(_raw(spec, 5))
    assert out.shape == (5, CFG.feature_dim)
    assert out.dtype == torch.float32 and (out >= 0).all()  # ends in a ReLU


def test_small_cnn_stage_layout():
    net = SmallCNN(in_channels=3, width=4, depth=3, feature_dim=10)
    assert len(net.stages) == 3
    convs = [[m for m in s if isinstance(m, nn.Conv2d)] for s in net.stages]
    assert [c[0].out_channels for c in convs] == [4, 8, 16]
    assert [c[0].stride for c in convs] == [(1, 1), (2, 2), (2, 2)]
    assert [c[0].in_channels for c in convs] == [3, 4, 8]
    assert net.head[2].in_features == 16
    assert net(torch.randn(2, 3, 9, 9)).shape == (2, 10)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_small_cnn_pools_its_last_map_as_model_pool_says(pool):
    torch.manual_seed(0)
    net = SmallCNN(in_channels=3, width=4, depth=2, feature_dim=5, pool=pool).eval()
    x = torch.randn(2, 3, 8, 8)
    fmap = net.feature_map(x)
    pooled = fmap.amax(dim=(2, 3)) if pool == "max" else fmap.mean(dim=(2, 3))
    expected = torch.relu(net.head[2](pooled))
    torch.testing.assert_close(net(x), expected)
    # The config reaches the encoder the builder makes.
    cfg = ModelConfig(width=4, depth=2, pool=pool)
    built = build_modality_encoder(RGB, cfg, _identity_stats(RGB))
    want = nn.AdaptiveMaxPool2d if pool == "max" else nn.AdaptiveAvgPool2d
    assert isinstance(built.body.head[0], want)


def test_small_cnn_refuses_an_unknown_pooling():
    with pytest.raises(ValueError, match="model.pool"):
        SmallCNN(in_channels=3, width=4, depth=2, feature_dim=5, pool="min")


def test_role_encoder_single_and_multi_modality():
    single = RoleEncoder([IMU], CFG, None)
    assert isinstance(single.project, nn.Identity)
    assert single({"imu": _raw(IMU, 3)}).shape == (3, CFG.feature_dim)

    role = RoleEncoder([RGB, IMU, META], CFG, None)
    batch = {s.name: _raw(s, 3) for s in (RGB, IMU, META)}
    batch["unrelated"] = torch.zeros(3)  # other keys of a batch are not looked at
    out = role(batch)
    assert out.shape == (3, CFG.feature_dim)
    assert role.project[0].in_features == 3 * CFG.feature_dim
    # Every modality contributes: changing one changes the output.
    changed = dict(batch, meta=batch["meta"] + 5.0)
    role.eval()
    assert not torch.allclose(role(batch), role(changed))


def test_role_encoder_applies_the_given_statistics():
    stats = {"meta": {"mean": list(range(7)), "std": [2.0] * 7}}
    role = RoleEncoder([META], CFG, stats)
    norm = role.encoders["meta"].normalize
    torch.testing.assert_close(norm.mean.reshape(-1), torch.arange(7.0))
    torch.testing.assert_close(norm.std.reshape(-1), torch.full((7,), 2.0))


def test_vector_features_do_not_depend_on_the_rest_of_the_batch():
    role = RoleEncoder([META], CFG, None).train()
    x = _raw(META, 6)
    torch.testing.assert_close(role({"meta": x})[:2], role({"meta": x[:2]}))


def test_resolve_normalization_errors_name_the_modality():
    with pytest.raises(ValueError, match="'meta'"):
        resolve_normalization([META], {"rgb": _identity_stats(RGB)})
    with pytest.raises(ValueError, match="'meta' has 7 channels"):
        resolve_normalization([META], {"meta": {"mean": [0.0], "std": [1.0]}})
    with pytest.raises(ValueError, match="3-d shape"):
        resolve_normalization([ModalitySpec("x", "image", (3, 4), "uint8")], None)


def test_hallucination_shares_the_first_stages_with_the_ordinary_encoder():
    cfg = ModelConfig(width=4, depth=3, feature_dim=8)
    e_o = RoleEncoder([RGB, META], cfg, None)
    e_h = RoleEncoder([RGB, META], cfg, None, share_from=e_o, shared_stages=2)
    o_stages = e_o.encoders["rgb"].body.stages
    h_stages = e_h.encoders["rgb"].body.stages
    assert h_stages[0] is o_stages[0] and h_stages[1] is o_stages[1]
    assert h_stages[2] is not o_stages[2]
    assert e_h.encoders["meta"] is not e_o.encoders["meta"]
    o_params = {id(p) for p in e_o.parameters()}
    shared = [p for p in e_h.parameters() if id(p) in o_params]
    assert sum(p.numel() for p in shared) == sum(
        p.numel() for s in o_stages[:2] for p in s.parameters()
    )


def test_shared_stage_errors():
    cfg = ModelConfig(width=4, depth=2, feature_dim=8)
    e_o = RoleEncoder([RGB], cfg, None)
    with pytest.raises(ValueError, match="exceeds"):
        RoleEncoder([RGB], cfg, None, share_from=e_o, shared_stages=3)
    with pytest.raises(ValueError, match="no image modality"):
        RoleEncoder([META], cfg, None, share_from=e_o, shared_stages=1)


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_missing_backbone_library_says_how_to_install(monkeypatch, library):
    monkeypatch.setitem(sys.modules, library, None)  # makes `import library` fail
    cfg = ModelConfig(image_encoder=f"{library}:resnet18", feature_dim=8)
    with pytest.raises(ImportError, match=r"pip install 'osmd_ray\[backbones\]'"):
        build_modality_encoder(RGB, cfg, _identity_stats(RGB))


def test_unknown_image_encoder_is_an_error():
    with pytest.raises(ValueError, match="small_cnn, timm:<name> or torchvision:<name>"):
        build_modality_encoder(RGB, ModelConfig(image_encoder="resnet"), _identity_stats(RGB))


class _TinyClassifier(nn.Module):
    """Shaped like a torchvision classifier: a 3-channel conv stem and a final Linear."""

    def __init__(self, weights=None) -> None:
        super().__init__()
        assert weights is None  # never downloads
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 1000)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.conv1(x)), 1))


def test_torchvision_builder_adapts_the_stem_and_drops_the_classifier(monkeypatch):
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(tiny=_TinyClassifier)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    spec = ModalitySpec("ms", "image", (5, 8, 8), "float32")
    enc = build_modality_encoder(
        spec, ModelConfig(image_encoder="torchvision:tiny", feature_dim=9), _identity_stats(spec)
    )
    backbone = enc.body[0]
    assert backbone.conv1.in_channels == 5 and backbone.conv1.stride == (2, 2)
    assert isinstance(backbone.fc, nn.Identity)
    assert enc(torch.randn(2, 5, 8, 8)).shape == (2, 9)
    with pytest.raises(ValueError, match="no model 'nope'"):
        build_modality_encoder(
            spec, ModelConfig(image_encoder="torchvision:nope"), _identity_stats(spec)
        )


def test_real_timm_backbone():
    timm = pytest.importorskip("timm")
    assert timm is not None
    spec = ModalitySpec("ms", "image", (4, 32, 32), "float32")
    enc = build_modality_encoder(
        spec,
        ModelConfig(image_encoder="timm:resnet18", feature_dim=16),
        _identity_stats(spec),
    )
    assert enc(torch.randn(2, 4, 32, 32)).shape == (2, 16)
