"""Encoders: one family per modality kind, and the role encoder that combines them.

Every encoder maps one modality to a feature vector of size ``ModelConfig.feature_dim``:

- image ``C x H x W``: ``small_cnn`` (below), ``timm:<name>`` or ``torchvision:<name>``;
- sequence ``C x T``: a 1-D CNN;
- vector ``D``: an MLP.

A :class:`RoleEncoder` runs one encoder per modality of a role (ordinary or privileged) and
projects the concatenation back to ``feature_dim`` when the role has several modalities.

Dense prediction (task ``segmentation``, ``dense=True``): image encoders are encoder-decoders
that keep a spatial map (:class:`DenseCNN` for small_cnn, :func:`timm_dense_encoder`), and a
role's features are a *channel-last* map ``(B, h, w, feature_dim)``. Channel-last lets every
per-feature module (the role's projection, the fusion F, the heads) run unchanged on each
pixel: a Linear on the last dimension is a 1x1 convolution. Vector and sequence modalities of
a dense role keep their pooled features, broadcast to every pixel of the role's map.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from osmd_ray.config import ModelConfig
from osmd_ray.config.schema import POOLS
from osmd_ray.data.schema import ModalitySpec
from osmd_ray.errors import ConfigError

Normalization = Mapping[str, Mapping[str, Sequence[float]]]
"""Per modality, per-channel statistics: ``{name: {"mean": [...], "std": [...]}}``."""

# A channel whose training-split std is (nearly) zero is constant: dividing by its std would
# blow it up, so it is only centred.
_MIN_STD = 1e-6

_BACKBONES_HINT = (
    "install the optional backbones with `pip install 'osmd_ray[backbones]'` on a GPU node "
    "(PyPI torchvision needs a CUDA build of torch), or use model.image_encoder=small_cnn"
)


def num_channels(spec: ModalitySpec) -> int:
    """Statistics length of a modality: C for images and sequences, D for vectors."""
    expected_rank = {"image": 3, "sequence": 2, "vector": 1}
    if spec.kind not in expected_rank:
        raise ValueError(f"modality {spec.name!r}: unknown kind {spec.kind!r}")
    if len(spec.shape) != expected_rank[spec.kind]:
        raise ValueError(
            f"modality {spec.name!r} of kind {spec.kind} needs a {expected_rank[spec.kind]}-d "
            f"shape, got {tuple(spec.shape)}"
        )
    return int(spec.shape[0])


def resolve_normalization(
    specs: Sequence[ModalitySpec], normalization: Normalization | None
) -> dict[str, dict[str, list[float]]]:
    """Validated statistics for ``specs`` only, as plain lists (what meta.json stores).

    ``None`` means identity statistics (mean 0, std 1) for every modality, for synthetic data
    and tests; a mapping that lacks one of the modalities is an error, never a silent default.
    """
    resolved: dict[str, dict[str, list[float]]] = {}
    for spec in specs:
        channels = num_channels(spec)
        if normalization is None:
            resolved[spec.name] = {"mean": [0.0] * channels, "std": [1.0] * channels}
            continue
        if spec.name not in normalization:
            raise ValueError(
                f"no normalization statistics for modality {spec.name!r} "
                f"(have: {sorted(normalization)})"
            )
        stats = normalization[spec.name]
        mean, std = [float(v) for v in stats["mean"]], [float(v) for v in stats["std"]]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"modality {spec.name!r} has {channels} channels but its normalization has "
                f"{len(mean)} means and {len(std)} stds"
            )
        resolved[spec.name] = {"mean": mean, "std": std}
    return resolved


class Normalize(nn.Module):
    """Per-channel standardisation of a raw input (uint8 or float) of one modality kind.

    Computes and returns fp32. The consumer casts the result to its own weights' dtype
    (:func:`parameter_dtype`): DeepSpeed's bf16 engine casts parameters only and keeps
    buffers such as these statistics in fp32, so the buffers' dtype says nothing about the
    weights'.
    """

    def __init__(self, kind: str, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        # Statistics broadcast over (B, C, H, W), (B, C, T) or (B, D).
        view = {"image": (1, -1, 1, 1), "sequence": (1, -1, 1), "vector": (1, -1)}[kind]
        std_t = torch.tensor(std, dtype=torch.float32)
        std_t = torch.where(std_t.abs() < _MIN_STD, torch.ones_like(std_t), std_t)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(view))
        self.register_buffer("std", std_t.reshape(view))

    def forward(self, x: Tensor) -> Tensor:
        return (x.to(torch.float32) - self.mean.float()) / self.std.float()


def parameter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in: that of its first floating-point parameter (bf16
    under a bf16 DeepSpeed engine, also for ZeRO-3's partitioned placeholders)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class SmallCNN(nn.Module):
    """A plain VGG-like CNN: ``stages`` (a ModuleList, so E_h can share a prefix), then a head.

    Stage i: Conv(3x3, stride 1 for the first stage, else 2), norm, ReLU, Conv(3x3), norm,
    ReLU, with ``width * 2**i`` channels (norm: see :func:`channel_norm`). Head: global
    average (or, ``pool="max"``, max) pool, Linear to ``feature_dim``, ReLU.
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        depth: int,
        feature_dim: int,
        shared_stages: Sequence[nn.Module] = (),
        norm: str = "batch",
        pool: str = "avg",
    ) -> None:
        super().__init__()
        self.norm = norm
        if depth < 1:
            raise ValueError(f"small_cnn needs model.depth >= 1, got {depth}")
        if pool not in POOLS:
            raise ValueError(f"small_cnn pools with one of {POOLS} (model.pool), got {pool!r}")
        if len(shared_stages) > depth:
            raise ValueError(f"cannot share {len(shared_stages)} stages of a {depth}-stage CNN")
        stages: list[nn.Module] = list(shared_stages)
        for i in range(len(stages), depth):
            c_in = in_channels if i == 0 else width * 2 ** (i - 1)
            stages.append(self._stage(c_in, width * 2**i, stride=1 if i == 0 else 2))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(
            nn.AdaptiveMaxPool2d(1) if pool == "max" else nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width * 2 ** (depth - 1), feature_dim),
            nn.ReLU(),
        )

    def _stage(self, c_in: int, c_out: int, stride: int) -> nn.Sequential:
        # No conv bias: the following normalisation has its own shift.
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride, bias=False),
            channel_norm(self.norm, c_out, dims=2),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            channel_norm(self.norm, c_out, dims=2),
            nn.ReLU(),
        )

    @property
    def map_channels(self) -> int:
        """Channels of :meth:`feature_map`'s output."""
        return self.head[2].in_features

    def feature_map(self, x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """The last stage's (B, C, H / 2^(depth-1), W / 2^(depth-1)) map, before pooling.

        ``start`` / ``stop``: run only stages ``[start, stop)``; ``x`` is then the output of
        the first ``start`` stages (computed once for E_o and an E_h that shares them, see
        :func:`encode_sharing_stages`).
        """
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.feature_map(x))


def channel_norm(norm: str, channels: int, dims: int) -> nn.Module:
    """The normalisation after each convolution: ``batch`` or ``group`` (8 groups or fewer).

    GroupNorm has no running statistics, so evaluation behaves exactly like training and no
    batch couples its rows; BatchNorm learned faster on the synthetic set.
    """
    if norm == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    raise ValueError(f"unknown normalisation {norm!r} (batch or group)")


def sequence_cnn(
    in_channels: int, width: int, depth: int, feature_dim: int, norm: str = "batch"
) -> nn.Sequential:
    """1-D CNN for ``C x T``: depth x [Conv1d(k=5), norm, ReLU] (stride 2 after the first)."""
    layers: list[nn.Module] = []
    c_in = in_channels
    for i in range(depth):
        stride = 1 if i == 0 else 2
        layers += [
            nn.Conv1d(c_in, width, 5, padding=2, stride=stride, bias=False),
            channel_norm(norm, width, dims=1),
            nn.ReLU(),
        ]
        c_in = width
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(c_in, feature_dim), nn.ReLU()]
    return nn.Sequential(*layers)


def vector_mlp(in_features: int, width: int, depth: int, feature_dim: int) -> nn.Sequential:
    """MLP for ``D``: depth x [Linear, LayerNorm, ReLU], then Linear to feature_dim, ReLU.

    LayerNorm rather than BatchNorm: it does not couple the rows of a batch, so a sample's
    features do not depend on which other samples share its batch.
    """
    layers: list[nn.Module] = []
    d_in = in_features
    for _ in range(depth):
        layers += [nn.Linear(d_in, width), nn.LayerNorm(width), nn.ReLU()]
        d_in = width
    layers += [nn.Linear(d_in, feature_dim), nn.ReLU()]
    return nn.Sequential(*layers)


def _import_backbone_library(name: str):
    """Import timm or torchvision only when a config asks for it (never at module level)."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"model.image_encoder needs {name}: {_BACKBONES_HINT}") from err


_PRETRAINED_KEY = "model.pretrained"
# How many offending keys a refusal names: enough to recognise the architecture.
_KEYS_SHOWN = 5


def read_pretrained(path: str) -> dict[str, Tensor]:
    """The safetensors state dict at ``path`` (local or s3://), read through storage so that
    remote paths work; a missing or unreadable file is a ConfigError naming the key."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from osmd_ray.storage import read_bytes

    data = read_bytes(path)
    if data is None:
        raise ConfigError(
            f"config key {_PRETRAINED_KEY!r}: no file at {path!r}; write one with "
            "safetensors.torch.save_file(model.state_dict(), path) (see README.md)",
            _PRETRAINED_KEY,
        )
    try:
        return load(data)
    except SafetensorError as err:
        raise ConfigError(
            f"config key {_PRETRAINED_KEY!r}: {path!r} is not a safetensors file ({err})",
            _PRETRAINED_KEY,
        ) from err


def _canonical(key: str) -> str:
    # timm's features_only wrappers flatten nested module names ("blocks.0" -> "blocks_0") or
    # hold the model as ``model`` (ViTs' FeatureGetterNet), so keys are matched without that
    # prefix and with dots and underscores made equal.
    return key.removeprefix("model.").replace(".", "_")


def _adapt_input_conv_mean(in_channels: int, weight: Tensor) -> Tensor:
    """The RGB-D practice for a stem of another channel count: the kernel averaged over its
    input channels, repeated to ``in_channels`` and scaled by old/new channels so the
    activations keep their scale (what timm's ``adapt_input_conv`` does for 1 channel)."""
    mean = weight.float().mean(dim=1, keepdim=True)
    adapted = mean.repeat(1, in_channels, 1, 1) * (weight.shape[1] / in_channels)
    return adapted.to(weight.dtype)


def _first_conv_key(backbone: nn.Module) -> str | None:
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight" if name else "weight"
    return None


def _refuse(path: str, problem: str, keys: Sequence[str], fix: str) -> ConfigError:
    shown = ", ".join(keys[:_KEYS_SHOWN]) + (" ..." if len(keys) > _KEYS_SHOWN else "")
    return ConfigError(
        f"config key {_PRETRAINED_KEY!r}: {path!r} does not fit the backbone: {problem} "
        f"({len(keys)}: {shown}); {fix}",
        _PRETRAINED_KEY,
    )


def load_pretrained(
    backbone: nn.Module,
    path: str,
    ignore_prefixes: Sequence[str] = (),
    ignore_unexpected: bool = False,
    adapt_conv: Callable[[int, Tensor], Tensor] = _adapt_input_conv_mean,
) -> None:
    """Load the safetensors state dict at ``path`` into ``backbone`` (strict where it counts).

    Every backbone key must be in the file with its shape, except the first convolution's
    input channels, which ``adapt_conv(in_channels, weight)`` adapts (an RGB file for a depth
    encoder). File keys under ``ignore_prefixes`` (the classifier that ``num_classes=0``
    dropped) are ignored, and with ``ignore_unexpected`` every key the backbone lacks is (a
    features_only backbone keeps a prefix of the network). Anything else is a ConfigError
    naming the first offending keys.
    """
    state = read_pretrained(path)
    by_canonical = {_canonical(k): k for k in state}
    own = backbone.state_dict()
    stem = _first_conv_key(backbone)
    fix = "write the file from the same architecture as model.image_encoder (README.md)"
    loaded: dict[str, Tensor] = {}
    missing, mismatched, used = [], [], set()
    for key, target in own.items():
        source = key if key in state else by_canonical.get(_canonical(key))
        if source is None:
            # A file without BatchNorm's step counters is fine: they only count updates.
            if not key.endswith("num_batches_tracked"):
                missing.append(key)
            continue
        used.add(source)
        value = state[source]
        fits_but_channels = (
            key == stem
            and value.dim() == 4
            and value.shape[0] == target.shape[0]
            and value.shape[2:] == target.shape[2:]
        )
        if value.shape != target.shape and fits_but_channels:
            value = adapt_conv(target.shape[1], value)
        if value.shape != target.shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(target.shape)}")
            continue
        loaded[key] = value.to(target.dtype)
    unexpected = [
        k for k in state if k not in used and not any(k.startswith(p) for p in ignore_prefixes)
    ]
    if missing:
        raise _refuse(path, "keys missing from the file", missing, fix)
    if mismatched:
        raise _refuse(path, "shapes that differ (file vs backbone)", mismatched, fix)
    if unexpected and not ignore_unexpected:
        raise _refuse(path, "keys the backbone does not have", unexpected, fix)
    backbone.load_state_dict(loaded, strict=False)


def _timm_classifier_prefixes(net: nn.Module) -> tuple[str, ...]:
    """The file keys of the classifier that ``num_classes=0`` replaced: the model's
    ``pretrained_cfg["classifier"]`` (a name or a tuple of names), as ``name.`` prefixes."""
    classifier = getattr(net, "pretrained_cfg", {}).get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{n}." for n in names)


def _load_timm_pretrained(timm, net: nn.Module, path: str, ignore_unexpected: bool = False) -> None:
    load_pretrained(
        net,
        path,
        ignore_prefixes=_timm_classifier_prefixes(net),
        ignore_unexpected=ignore_unexpected,
        # timm's own helper, so the adaptation is exactly what timm's pretrained loading does.
        adapt_conv=timm.models.adapt_input_conv,
    )


def timm_encoder(
    name: str, in_channels: int, feature_dim: int, pretrained: str = ""
) -> nn.Sequential:
    """A timm backbone without its classifier, then Linear to feature_dim; random init, or
    the weights of the file ``pretrained`` (:func:`load_pretrained`), never downloaded."""
    timm = _import_backbone_library("timm")
    net = timm.create_model(name, pretrained=False, in_chans=in_channels, num_classes=0)
    if pretrained:
        _load_timm_pretrained(timm, net, pretrained)
    return nn.Sequential(net, nn.Linear(net.num_features, feature_dim), nn.ReLU())


def _replace_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def torchvision_encoder(
    name: str, in_channels: int, feature_dim: int, pretrained: str = ""
) -> nn.Sequential:
    """A torchvision classification model (random init) adapted to ``in_channels``.

    The first Conv2d is rebuilt for ``in_channels`` and the last Linear (the classifier) is
    replaced by Identity; this covers ResNet, VGG, MobileNet, EfficientNet, ConvNeXt, DenseNet.
    ``pretrained``: a safetensors file of the model's weights (:func:`load_pretrained`).
    """
    torchvision = _import_backbone_library("torchvision")
    builder = getattr(torchvision.models, name, None)
    if not callable(builder):
        raise ValueError(f"torchvision.models has no model {name!r}")
    net = builder(weights=None)
    modules = dict(net.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not convs or not linears:
        raise ValueError(f"torchvision:{name} has no Conv2d stem or no Linear classifier")
    stem: nn.Conv2d = modules[convs[0]]
    if stem.in_channels != in_channels:
        _replace_submodule(
            net,
            convs[0],
            nn.Conv2d(
                in_channels,
                stem.out_channels,
                stem.kernel_size,
                stride=stem.stride,
                padding=stem.padding,
                dilation=stem.dilation,
                groups=stem.groups,
                bias=stem.bias is not None,
                padding_mode=stem.padding_mode,
            ),
        )
    classifier: nn.Linear = modules[linears[-1]]
    _replace_submodule(net, linears[-1], nn.Identity())
    if pretrained:
        load_pretrained(net, pretrained, ignore_prefixes=(f"{linears[-1]}.",))
    return nn.Sequential(net, nn.Linear(classifier.in_features, feature_dim), nn.ReLU())


class DenseCNN(nn.Module):
    """small_cnn for dense prediction: a :class:`UNetTrunk` of ``depth`` levels (the
    encoder-decoder), then a 1x1 convolution to ``feature_dim`` and ReLU: (B, C, H, W) ->
    (B, feature_dim, H, W), at the input's full resolution."""

    def __init__(
        self, in_channels: int, width: int, depth: int, feature_dim: int, norm: str = "batch"
    ) -> None:
        super().__init__()
        self.trunk = UNetTrunk(in_channels, width, levels=depth, norm=norm)
        self.head = nn.Sequential(nn.Conv2d(self.trunk.out_channels, feature_dim, 1), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


class FeaturePyramidDecoder(nn.Module):
    """Merges a backbone's multi-scale maps: each projected to ``feature_dim`` by a 1x1
    convolution, upsampled to the finest map's size and summed, then a 3x3 convolution and
    ReLU (a light FPN without the top-down chain)."""

    def __init__(self, channels: Sequence[int], feature_dim: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, feature_dim, 1) for c in channels)
        self.out = nn.Sequential(nn.Conv2d(feature_dim, feature_dim, 3, padding=1), nn.ReLU())

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        size = maps[0].shape[2:]
        merged = self.lateral[0](maps[0])
        for lateral, fmap in zip(self.lateral[1:], maps[1:], strict=True):
            merged = merged + nn.functional.interpolate(
                lateral(fmap), size=size, mode="bilinear", align_corners=False
            )
        return self.out(merged)


class TimmDenseEncoder(nn.Module):
    """A timm backbone's feature pyramid (``features_only``, strides 4 to 32, random init)
    merged by a :class:`FeaturePyramidDecoder`: (B, C, H, W) -> (B, feature_dim, H/4, W/4).

    ``pretrained``: a safetensors file of the whole timm model; the keys of the layers that
    features_only drops (the head, a final norm) are ignored."""

    def __init__(self, name: str, in_channels: int, feature_dim: int, pretrained: str = "") -> None:
        super().__init__()
        timm = _import_backbone_library("timm")
        self.backbone = timm.create_model(
            name,
            pretrained=False,
            in_chans=in_channels,
            features_only=True,
            out_indices=(1, 2, 3, 4),
        )
        if pretrained:
            _load_timm_pretrained(timm, self.backbone, pretrained, ignore_unexpected=True)
        self.decoder = FeaturePyramidDecoder(self.backbone.feature_info.channels(), feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.backbone(x))


def timm_dense_encoder(
    name: str, in_channels: int, feature_dim: int, pretrained: str = ""
) -> TimmDenseEncoder:
    """The dense counterpart of :func:`timm_encoder` (segmentation)."""
    return TimmDenseEncoder(name, in_channels, feature_dim, pretrained)


class ModalityEncoder(nn.Module):
    """Normalize, then the kind's encoder body: one modality -> (B, feature_dim)."""

    def __init__(self, normalize: Normalize, body: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.body = body

    def prepare(self, x: Tensor) -> Tensor:
        """The raw input normalised and cast to the body's dtype: what the body reads."""
        return self.normalize(x).to(parameter_dtype(self.body))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.prepare(x))


def build_modality_encoder(
    spec: ModalitySpec,
    cfg: ModelConfig,
    stats: Mapping[str, Sequence[float]],
    shared_stages: Sequence[nn.Module] = (),
    dense: bool = False,
) -> ModalityEncoder:
    """The encoder for one modality, chosen from its kind (and, for images, the config);
    ``dense``: image encoders keep a (B, feature_dim, h, w) map (segmentation)."""
    channels = num_channels(spec)
    normalize = Normalize(spec.kind, stats["mean"], stats["std"])
    if spec.kind == "image" and dense:
        choice = cfg.image_encoder
        if shared_stages:
            raise ValueError("model.hallucination_shared_stages > 0 is for classification only")
        if choice == "small_cnn":
            body: nn.Module = DenseCNN(channels, cfg.width, cfg.depth, cfg.feature_dim, cfg.norm)
        elif choice.startswith("timm:"):
            body = timm_dense_encoder(
                choice.removeprefix("timm:"), channels, cfg.feature_dim, cfg.pretrained
            )
        else:
            raise ValueError(
                f"model.image_encoder={choice!r}: segmentation uses small_cnn or timm:<name>"
            )
    elif spec.kind == "image":
        choice = cfg.image_encoder
        if choice == "small_cnn":
            body = SmallCNN(
                channels,
                cfg.width,
                cfg.depth,
                cfg.feature_dim,
                shared_stages,
                norm=cfg.norm,
                pool=cfg.pool,
            )
        elif shared_stages:
            raise ValueError("model.hallucination_shared_stages needs image_encoder=small_cnn")
        elif choice.startswith("timm:"):
            body = timm_encoder(
                choice.removeprefix("timm:"), channels, cfg.feature_dim, cfg.pretrained
            )
        elif choice.startswith("torchvision:"):
            body = torchvision_encoder(
                choice.removeprefix("torchvision:"), channels, cfg.feature_dim, cfg.pretrained
            )
        else:
            raise ValueError(
                f"model.image_encoder={choice!r}: use small_cnn, timm:<name> or torchvision:<name>"
            )
    elif spec.kind == "sequence":
        body = sequence_cnn(channels, cfg.width, cfg.depth, cfg.feature_dim, cfg.norm)
    else:
        body = vector_mlp(channels, cfg.width, cfg.depth, cfg.feature_dim)
    return ModalityEncoder(normalize, body)


class RoleEncoder(nn.Module):
    """All modalities of one role -> (B, feature_dim).

    ``share_from`` and ``shared_stages``: reuse the first ``shared_stages`` stage modules of
    ``share_from``'s small_cnn image encoders (same objects, so the same parameters); this is
    how E_h shares its early layers with E_o.
    """

    def __init__(
        self,
        specs: Sequence[ModalitySpec],
        cfg: ModelConfig,
        normalization: Normalization | None,
        share_from: RoleEncoder | None = None,
        shared_stages: int = 0,
        dense: bool = False,
    ) -> None:
        super().__init__()
        if not specs:
            raise ValueError("a role encoder needs at least one modality")
        self.dense = dense
        """Segmentation: features are channel-last maps (see the module docstring)."""
        if shared_stages < 0:
            raise ValueError(f"shared_stages must be >= 0, got {shared_stages}")
        if shared_stages and not any(s.kind == "image" for s in specs):
            raise ValueError(
                "model.hallucination_shared_stages > 0 shares small_cnn image stages, but the "
                f"role has no image modality ({[s.name for s in specs]})"
            )
        stats = resolve_normalization(specs, normalization)
        self.specs = tuple(specs)
        self.shared_stages = shared_stages
        """How many first small_cnn stages of each image modality are ``share_from``'s."""
        self.encoders = nn.ModuleDict()
        for spec in specs:
            shared: Sequence[nn.Module] = ()
            if shared_stages and spec.kind == "image":
                if share_from is None:
                    raise ValueError("shared_stages > 0 needs share_from")
                source = share_from.encoders[spec.name].body
                if not isinstance(source, SmallCNN):
                    raise ValueError(
                        "model.hallucination_shared_stages needs image_encoder=small_cnn"
                    )
                if shared_stages > len(source.stages):
                    raise ValueError(
                        f"model.hallucination_shared_stages={shared_stages} exceeds the "
                        f"{len(source.stages)} stages of the small_cnn (model.depth)"
                    )
                shared = list(source.stages)[:shared_stages]
            self.encoders[spec.name] = build_modality_encoder(
                spec, cfg, stats[spec.name], shared, dense=dense
            )
        self.project: nn.Module = nn.Identity()
        if len(specs) > 1:
            self.project = nn.Sequential(
                nn.Linear(len(specs) * cfg.feature_dim, cfg.feature_dim), nn.ReLU()
            )

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        if self.dense:
            return self._dense_forward(batch)
        return self.forward_with_map(batch)[0]

    def _dense_forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """(B, h, w, feature_dim) channel-last, on the first image modality's map size; a
        role without an image modality gives (B, feature_dim), for the model to broadcast."""
        maps, vectors = [], []
        for spec in self.specs:
            out = self.encoders[spec.name](batch[spec.name])
            (maps if out.dim() == 4 else vectors).append(out)
        if not maps:
            return self.project(vectors[0] if len(vectors) == 1 else torch.cat(vectors, dim=1))
        size = maps[0].shape[2:]
        feats = [
            m
            if m.shape[2:] == size
            else nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in maps
        ]
        feats = [f.permute(0, 2, 3, 1) for f in feats]
        b, h, w, _ = feats[0].shape
        feats += [v[:, None, None, :].expand(b, h, w, v.shape[1]) for v in vectors]
        return self.project(feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1))

    @property
    def map_source(self) -> str | None:
        """The first image modality with a small_cnn body: whose feature map
        :meth:`forward_with_map` returns (None: there is none, or the role is dense)."""
        if self.dense:
            return None
        for spec in self.specs:
            if isinstance(self.encoders[spec.name].body, SmallCNN):
                return spec.name
        return None

    @property
    def map_channels(self) -> int:
        """Channels of :meth:`forward_with_map`'s map (needs a :attr:`map_source`)."""
        source = self.map_source
        if source is None:
            raise ValueError("this role encoder has no small_cnn image encoder, hence no map")
        return self.encoders[source].body.map_channels

    def stems(self, batch: Mapping[str, Tensor], stages: int) -> dict[str, Tensor]:
        """Per small_cnn image modality, the output of its first ``stages`` stages."""
        out = {}
        for spec in self.specs:
            encoder = self.encoders[spec.name]
            if isinstance(encoder.body, SmallCNN):
                x = encoder.prepare(batch[spec.name])
                out[spec.name] = encoder.body.feature_map(x, 0, stages)
        return out

    def forward_with_map(
        self,
        batch: Mapping[str, Tensor],
        stems: Mapping[str, Tensor] | None = None,
        stem_stages: int = 0,
    ) -> tuple[Tensor, Tensor | None]:
        """(features, the last-stage map of :attr:`map_source` or None), in one pass.

        ``stems`` (from :meth:`stems` with ``stem_stages``): start those modalities' small_cnn
        after their first ``stem_stages`` stages, from the given outputs.
        """
        if self.dense:
            return self._dense_forward(batch), None
        source, fmap = self.map_source, None
        feats = []
        for spec in self.specs:
            encoder = self.encoders[spec.name]
            if stems is not None and spec.name in stems:
                x, start = stems[spec.name], stem_stages
            elif spec.name == source:
                x, start = encoder.prepare(batch[spec.name]), 0
            else:
                feats.append(encoder(batch[spec.name]))
                continue
            body_map = encoder.body.feature_map(x, start)
            if spec.name == source:
                fmap = body_map
            feats.append(encoder.body.head(body_map))
        z = self.project(feats[0] if len(feats) == 1 else torch.cat(feats, dim=1))
        return z, fmap


def encode_sharing_stages(
    e_o: RoleEncoder, e_h: RoleEncoder | DecoderEncoder, batch: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(z_o, z_h, E_h's map) for the deployment path, each shared stage computed once.

    With ``model.hallucination_shared_stages = k`` E_h's first k small_cnn stages *are* E_o's
    modules, fed the same normalised input, so their outputs are identical: running them
    once and branching halves their cost (benchmarks/RESULTS.md, deployment cost) and gives
    the same gradients (both branches' sum into the shared weights). BatchNorm's running
    statistics in those stages are updated once per step instead of twice.
    """
    k = e_h.shared_stages
    if not k:
        z_h, h_map = e_h.forward_with_map(batch)
        return e_o(batch), z_h, h_map
    stems = e_o.stems(batch, k)
    z_o, _ = e_o.forward_with_map(batch, stems, k)
    z_h, h_map = e_h.forward_with_map(batch, stems, k)
    return z_o, z_h, h_map


class UNetTrunk(nn.Module):
    """A small U-Net: same-size images (C x H x W) -> a (B, width, H, W) full-resolution map.

    Down path: ``levels`` stages of [Conv(3x3), norm, ReLU] x 2 with ``width * 2**i``
    channels, halving H and W (max pool) between them; up path: bilinear upsampling, the
    skip connection of the same level concatenated, then [Conv, norm, ReLU] x 2. Each output
    pixel sees the whole 24x24 image at 3 levels, and keeps full resolution: what a dense
    prediction of the privileged image (or a per-pixel cue such as haze) needs.
    """

    def __init__(self, in_channels: int, width: int, levels: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"a U-Net trunk needs at least one level, got {levels}")
        self.norm = norm
        chans = [width * 2**i for i in range(levels)]
        self.down = nn.ModuleList(
            self._block(in_channels if i == 0 else chans[i - 1], c) for i, c in enumerate(chans)
        )
        self.up = nn.ModuleList(
            self._block(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(levels - 1))
        )
        self.out_channels = width

    def _block(self, c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            channel_norm(self.norm, c_out, dims=2),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            channel_norm(self.norm, c_out, dims=2),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = nn.functional.max_pool2d(x, 2, ceil_mode=True)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = nn.functional.interpolate(
                x, size=skip.shape[2:], mode="bilinear", align_corners=False
            )
            x = block(torch.cat([x, skip], dim=1))
        return x


class DecoderEncoder(nn.Module):
    """E_h shaped as "decode the privileged view, then encode it" (``model.hallucination``
    = ``unet``): a :class:`UNetTrunk` turns the ordinary images into a full-resolution map (the
    training-only ``D_h``, a 1x1 convolution, reads the privileged images off it at full
    resolution), and a privileged-kind :class:`SmallCNN` of its own (never E_p's weights)
    encodes that map to ``feature_dim``.

    Needs every ordinary modality to be an image of one H x W (they are concatenated along
    channels). Offers :class:`RoleEncoder`'s interface (``forward``, ``forward_with_map``,
    ``map_source``, ``map_channels``).
    """

    def __init__(
        self,
        specs: Sequence[ModalitySpec],
        cfg: ModelConfig,
        normalization: Normalization | None,
    ) -> None:
        super().__init__()
        if not specs or not all(s.kind == "image" for s in specs):
            raise ValueError(
                "model.hallucination=unet needs image ordinary modalities only, got "
                f"{[(s.name, s.kind) for s in specs]}"
            )
        if len({tuple(s.shape[1:]) for s in specs}) != 1:
            raise ValueError("model.hallucination=unet needs ordinary images of one size")
        stats = resolve_normalization(specs, normalization)
        self.specs = tuple(specs)
        self.inputs = nn.ModuleDict(
            {s.name: Normalize(s.kind, **stats[s.name]) for s in self.specs}
        )
        in_channels = sum(num_channels(s) for s in self.specs)
        self.trunk = UNetTrunk(in_channels, cfg.width, levels=3, norm=cfg.norm)
        self.body = SmallCNN(
            self.trunk.out_channels,
            cfg.width,
            cfg.depth,
            cfg.feature_dim,
            norm=cfg.norm,
            pool=cfg.pool,
        )

    map_source = "trunk"
    """Not a modality: :meth:`forward_with_map` always returns the trunk's map."""
    shared_stages = 0
    """Nothing of E_o's is shared (:func:`encode_sharing_stages` runs it on its own)."""

    @property
    def map_channels(self) -> int:
        return self.trunk.out_channels

    def forward_with_map(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(z_h, the trunk's full-resolution map)."""
        x = torch.cat([self.inputs[s.name](batch[s.name]) for s in self.specs], dim=1)
        fmap = self.trunk(x.to(parameter_dtype(self.trunk)))
        return self.body(fmap), fmap

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.forward_with_map(batch)[0]
