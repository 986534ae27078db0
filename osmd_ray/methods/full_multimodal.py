"""The upper bound: E_o + E_p + F + H trained on every modality, and deployed with the
privileged ones too (they must then exist at test time: not a field model)."""

from __future__ import annotations

from torch import Tensor, nn

from osmd_ray.blocks.fusion import build_fusion
from osmd_ray.blocks.nets import (
    Batch,
    DeployNet,
    DeployPlan,
    Roles,
    TrainingNet,
    as_map_like,
    role_encoder,
    task_head,
)
from osmd_ray.methods.interface import Method
from osmd_ray.methods.ordinary_only import labels_stage


def build_deploy(roles: Roles) -> dict[str, nn.Module]:
    cfg = roles.cfg
    return {
        "E_o": role_encoder(roles.ordinary, roles),
        "E_p": role_encoder(roles.privileged, roles),
        "F": build_fusion(cfg.fusion, cfg.feature_dim, cfg.shared_translator),
        "H": task_head(roles),
    }


def deploy_features(net: DeployNet | TrainingNet, batch: Batch) -> Tensor:
    z_o = net.E_o(batch)
    return net.F(z_o, as_map_like(net.E_p(batch), z_o))


def forward(net: TrainingNet, batch: Batch, has_privileged: Tensor | None) -> dict[str, Tensor]:
    """``z_o``, ``z_p`` and ``teacher_logits``, which *are* the ``deploy_logits``."""
    z_o = net.E_o(batch)
    out: dict[str, Tensor] = {"z_o": z_o}
    mask = net.read_mask(batch, has_privileged, z_o, out)
    z_p = as_map_like(net.encode_privileged(batch, mask), z_o)
    out["z_p"] = z_p
    z_o_teacher = z_o.detach() if net.cfg.teacher_detach_ordinary else z_o
    out["teacher_logits"] = net.logits(net.H, net.F(z_o_teacher, z_p))
    out["deploy_logits"] = out["teacher_logits"]
    return out


METHOD = Method(
    name="full_multimodal",
    summary="E_o + E_p + F + H, privileged modalities at test time too (the upper bound)",
    deploy=DeployPlan(
        parts=("E_o", "E_p", "F", "H"),
        features=deploy_features,
        reads_privileged=True,
        privileged_specs=True,
    ),
    build_deploy=build_deploy,
    forward=forward,
    stages=labels_stage,
)
