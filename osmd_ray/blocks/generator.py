"""A generator G: ordinary inputs -> privileged inputs, so that a network made for both can
run at deployment on (ordinary, reconstructed) (the imputation baseline of DESIGN §3).

Two shapes of G, chosen from the modalities:

- every ordinary and privileged modality an image of the same H x W: a fully convolutional
  network at full resolution (image-to-image, the usual case: RGB -> depth);
- anything else: the ordinary role encoder to ``feature_dim``, then a linear layer to every
  privileged value (vectors and short sequences; cost grows with the privileged size).

G predicts privileged inputs in their *normalised* space (what the L1 loss compares, so
channels of different scales weigh alike) and returns them in raw units too, which is what
``E_p`` takes (its first layer normalises again).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from osmd_ray.blocks.encoders import (
    Normalization,
    Normalize,
    RoleEncoder,
    channel_norm,
    parameter_dtype,
    resolve_normalization,
)
from osmd_ray.config import ModelConfig
from osmd_ray.data.schema import ModalitySpec


def _same_size_images(specs: Sequence[ModalitySpec]) -> bool:
    return all(s.kind == "image" for s in specs) and len({tuple(s.shape[1:]) for s in specs}) == 1


class Generator(nn.Module):
    """Ordinary batch -> {privileged name: reconstruction} (see the module docstring)."""

    def __init__(
        self,
        ordinary: Sequence[ModalitySpec],
        privileged: Sequence[ModalitySpec],
        cfg: ModelConfig,
        normalization: Normalization | None,
    ) -> None:
        super().__init__()
        self.ordinary, self.privileged = tuple(ordinary), tuple(privileged)
        stats = resolve_normalization(self.ordinary + self.privileged, normalization)
        self.inputs = nn.ModuleDict(
            {s.name: Normalize(s.kind, **stats[s.name]) for s in self.ordinary}
        )
        self.outputs = nn.ModuleDict(
            {s.name: Normalize(s.kind, **stats[s.name]) for s in self.privileged}
        )
        self.convolutional = _same_size_images(self.ordinary + self.privileged)
        out_channels = [s.shape[0] for s in self.privileged]
        if self.convolutional:
            layers: list[nn.Module] = []
            c_in = sum(s.shape[0] for s in self.ordinary)
            for _ in range(max(cfg.depth, 2)):
                layers += [
                    nn.Conv2d(c_in, cfg.width, 3, padding=1, bias=False),
                    channel_norm(cfg.norm, cfg.width, dims=2),
                    nn.ReLU(),
                ]
                c_in = cfg.width
            layers.append(nn.Conv2d(c_in, sum(out_channels), 1))
            self.net: nn.Module = nn.Sequential(*layers)
            self.split_sizes = out_channels
        else:
            self.encoder = RoleEncoder(self.ordinary, cfg, normalization)
            self.split_sizes = [int(torch.Size(s.shape).numel()) for s in self.privileged]
            self.net = nn.Linear(cfg.feature_dim, sum(self.split_sizes))

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{name: normalised reconstruction} for every privileged modality."""
        if self.convolutional:
            x = torch.cat([self.inputs[s.name](batch[s.name]) for s in self.ordinary], dim=1)
            parts = torch.split(self.net(x.to(parameter_dtype(self.net))), self.split_sizes, dim=1)
            return {s.name: p for s, p in zip(self.privileged, parts, strict=True)}
        flat = torch.split(self.net(self.encoder(batch)), self.split_sizes, dim=1)
        return {
            s.name: p.reshape(p.shape[0], *s.shape)
            for s, p in zip(self.privileged, flat, strict=True)
        }

    def normalised_target(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The real privileged inputs in the space G predicts in."""
        return {s.name: self.outputs[s.name](batch[s.name]) for s in self.privileged}

    def to_raw(self, normalised: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Reconstructions in the privileged modalities' raw units (what E_p takes)."""
        out = {}
        for s in self.privileged:
            norm = self.outputs[s.name]
            out[s.name] = normalised[s.name] * norm.std.to(normalised[s.name].dtype) + norm.mean
        return out
