"""Fusion F of (ordinary features, privileged-space features): ctn, concat or sum.

The same module instance serves the teacher path ``F(z_o, z_p)`` and the deployment path
``F(z_o, z_h)`` (DESIGN §2), so every fusion takes its two inputs in that order.

Features are the last dimension: (B, d) vectors, or channel-last (B, h, w, d) maps for dense
prediction, where the cross translation network then runs on every pixel of the feature maps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from osmd_ray.config.schema import FUSIONS


def translator(dim: int) -> nn.Sequential:
    """T of the cross translation network: Linear, ReLU, Linear (dim -> dim)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))


def _merge(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU())


class CTNFusion(nn.Module):
    """Cross translation network: ``a' = a + T(b)``, ``b' = b + T2(a)``, ``merge([a', b'])``.

    With ``shared_translator`` T2 *is* T (one set of weights maps each side into the other);
    otherwise T2 is a second translator, registered as ``T2``.
    """

    def __init__(self, dim: int, shared_translator: bool = True) -> None:
        super().__init__()
        self.T = translator(dim)
        # Only registered when separate: a shared T2 would duplicate T's keys in state dicts.
        self.T2: nn.Module | None = None if shared_translator else translator(dim)
        self.merge = _merge(dim)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        reverse = self.T if self.T2 is None else self.T2
        return self.merge(torch.cat([a + self.T(b), b + reverse(a)], dim=-1))


class ConcatFusion(nn.Module):
    """``Linear(2d, d) + ReLU`` on ``concat(a, b)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.merge = _merge(dim)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.merge(torch.cat([a, b], dim=-1))


class SumFusion(nn.Module):
    """``a + b``: no parameters."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


def build_fusion(kind: str, dim: int, shared_translator: bool = True) -> nn.Module:
    """The fusion named by ``model.fusion``; ``shared_translator`` only matters for ctn."""
    if kind == "ctn":
        return CTNFusion(dim, shared_translator)
    if kind == "concat":
        return ConcatFusion(dim)
    if kind == "sum":
        return SumFusion()
    raise ValueError(f"model.fusion={kind!r}: use one of {FUSIONS}")
