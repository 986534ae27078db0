"""The lower bound: E_o + H trained on the ordinary modalities and the labels alone."""

from __future__ import annotations

from torch import Tensor, nn

from osmd_ray.blocks.nets import (
    Batch,
    DeployNet,
    DeployPlan,
    Roles,
    TrainingNet,
    role_encoder,
    task_head,
)
from osmd_ray.blocks.stages import Stage
from osmd_ray.config import Config
from osmd_ray.methods.interface import Method


def build_student(roles: Roles) -> dict[str, nn.Module]:
    """E_o and H: the network that reads the ordinary modalities only."""
    return {"E_o": role_encoder(roles.ordinary, roles), "H": task_head(roles)}


def student_features(net: DeployNet | TrainingNet, batch: Batch) -> Tensor:
    return net.E_o(batch)


STUDENT = DeployPlan(parts=("E_o", "H"), features=student_features)
"""E_o + H, deployed by ordinary_only and by logit_kd's student."""


def forward(net: TrainingNet, batch: Batch, has_privileged: Tensor | None) -> dict[str, Tensor]:
    z_o = net.E_o(batch)
    return {"z_o": z_o, "deploy_logits": net.logits(net.H, z_o)}


def labels_stage(cfg: Config) -> list[Stage]:
    """One stage, every part, the deployment path's task loss alone."""
    return [Stage("joint", cfg.train.epochs, None, {"deploy": 1.0})]


METHOD = Method(
    name="ordinary_only",
    summary="E_o + H on the ordinary modalities (the lower bound)",
    deploy=STUDENT,
    build_deploy=build_student,
    forward=forward,
    stages=labels_stage,
    needs_privileged=False,
)
