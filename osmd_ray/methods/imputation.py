"""Imputation (DESIGN §3): a generator G reconstructs the privileged inputs from the ordinary
ones (``generator`` stage, L1 in the normalised privileged space), then E_o, E_p, F and H
train on (ordinary, reconstructed) with G frozen (``task`` stage;
``baselines.imputation_fraction`` of the epochs for G). Deploys E_o, E_p, F, H and G: the
deployed network reads the ordinary inputs only."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from osmd_ray.blocks.generator import Generator
from osmd_ray.blocks.nets import (
    Batch,
    DeployNet,
    DeployPlan,
    Roles,
    TrainingNet,
    as_map_like,
    masked_target,
)
from osmd_ray.blocks.stages import Stage, split_epochs
from osmd_ray.config import Config
from osmd_ray.methods import full_multimodal
from osmd_ray.methods.interface import Method


def build_deploy(roles: Roles) -> dict[str, nn.Module]:
    """full_multimodal's network, then G to feed its E_p."""
    parts = full_multimodal.build_deploy(roles)
    parts["G"] = Generator(roles.ordinary, roles.privileged, roles.cfg, roles.normalization)
    return parts


def deploy_features(net: DeployNet | TrainingNet, batch: Batch) -> Tensor:
    z_o = net.E_o(batch)
    return net.F(z_o, as_map_like(net.E_p(net.G.to_raw(net.G(batch))), z_o))


def forward(net: TrainingNet, batch: Batch, has_privileged: Tensor | None) -> dict[str, Tensor]:
    """``z_o``, ``imputed`` and ``imputed_target`` (normalised, flattened), ``z_p`` (E_p on the
    reconstruction) and ``deploy_logits``."""
    z_o = net.E_o(batch)
    out: dict[str, Tensor] = {"z_o": z_o}
    mask = net.read_mask(batch, has_privileged, z_o, out)
    imputed = net.G(batch)
    out["imputed"] = torch.cat([imputed[s.name].flatten(1) for s in net.privileged], dim=1)
    with torch.no_grad():
        target = torch.cat([t.flatten(1) for t in net.G.normalised_target(batch).values()], dim=1)
        out["imputed_target"] = masked_target(target, mask)
    z_p = as_map_like(net.E_p(net.G.to_raw(imputed)), z_o)
    out["z_p"] = z_p
    out["deploy_logits"] = net.logits(net.H, net.F(z_o, z_p))
    return out


def stages(cfg: Config) -> list[Stage]:
    fraction = cfg.baselines.imputation_fraction
    e = split_epochs(cfg.train.epochs, [fraction, 1 - fraction])
    return [
        Stage("generator", e[0], ("G",), {"impute": 1.0}),
        Stage("task", e[1], ("E_o", "E_p", "F", "H"), {"deploy": 1.0}),
    ]


METHOD = Method(
    name="imputation",
    summary="G reconstructs the privileged inputs, then a multimodal network runs on them",
    deploy=DeployPlan(
        parts=("E_o", "E_p", "F", "H", "G"), features=deploy_features, privileged_specs=True
    ),
    build_deploy=build_deploy,
    forward=forward,
    stages=stages,
    stage_count=2,
)
