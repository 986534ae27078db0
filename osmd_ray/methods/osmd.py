"""OS-MD (DESIGN §2): one stage that trains the deployment path H(F(z_o, z_h)) together with
the teacher path H(F(z_o, z_p)), the privileged head H_p and the hallucination encoder E_h.

Deploys E_o, E_h, F, H (no E_p: the privileged inputs are never read at deployment).
Training adds E_p, H_p, D_h (the decoder of the privileged input from E_h, the ``recon``
term) and, with ``model.share_fusion=false``, a teacher fusion and head ``F_t``, ``H_t``.
The objective's weights are the ``loss.w_*`` of the config.

:func:`add_hallucination_parts` and :func:`hallucination_forward` are this network's build
and forward; two_stage_hallucination trains the same network in stages.
"""

from __future__ import annotations

from contextlib import nullcontext

from torch import Tensor, nn, no_grad

from osmd_ray.blocks.encoders import encode_sharing_stages
from osmd_ray.blocks.fusion import build_fusion
from osmd_ray.blocks.nets import (
    Batch,
    DeployNet,
    DeployPlan,
    Roles,
    TrainingNet,
    as_map_like,
    build_hallucination_encoder,
    frozen_parameters,
    masked_target,
    pooled_size,
    role_encoder,
    task_head,
)
from osmd_ray.blocks.stages import Stage
from osmd_ray.config import Config, LossConfig
from osmd_ray.config.schema import LOSS_WEIGHTS
from osmd_ray.errors import ConfigError
from osmd_ray.methods.interface import Method


def build_deploy(roles: Roles) -> dict[str, nn.Module]:
    """E_o, E_h (possibly sharing E_o's first stages), F, H."""
    e_o = role_encoder(roles.ordinary, roles)
    e_h = build_hallucination_encoder(roles, e_o)
    fusion = build_fusion(roles.cfg.fusion, roles.cfg.feature_dim, roles.cfg.shared_translator)
    return {"E_o": e_o, "E_h": e_h, "F": fusion, "H": task_head(roles)}


def deploy_features(net: DeployNet | TrainingNet, batch: Batch) -> Tensor:
    z_o, z_h, _ = encode_sharing_stages(net.E_o, net.E_h, batch)
    return net.F(z_o, z_h)


DEPLOY = DeployPlan(parts=("E_o", "E_h", "F", "H"), features=deploy_features)


def add_hallucination_parts(net: TrainingNet) -> None:
    """E_p, H_p and D_h. D_h is a 1x1 convolution on E_h's last feature map, predicting the
    privileged images at that map's resolution (``model.recon_mode=dense``, when E_h is a
    small_cnn and every privileged modality an image), else a linear layer from ``z_h`` to
    the pooled privileged input."""
    roles, cfg = net.roles, net.cfg
    net.E_p = role_encoder(roles.privileged, roles)
    net.H_p = task_head(roles)
    all_images = all(spec.kind == "image" for spec in net.privileged)
    net.recon_dense = cfg.recon_mode == "dense" and net.E_h.map_source is not None and all_images
    # Segmentation: z_h is itself a feature map; a per-pixel linear D_h reads the privileged
    # images off it at its resolution (the same layout as recon_dense).
    net.recon_per_pixel = roles.dense and cfg.recon_mode == "dense" and all_images
    channels = sum(spec.shape[0] for spec in net.privileged)
    if net.recon_per_pixel:
        net.D_h = nn.Linear(cfg.feature_dim, channels)
    elif net.recon_dense:
        net.D_h = nn.Conv2d(net.E_h.map_channels, channels, 1)
    else:
        target_size = sum(pooled_size(s, cfg.recon_size) for s in net.privileged)
        net.D_h = nn.Linear(cfg.feature_dim, target_size)


def add_training_parts(net: TrainingNet) -> None:
    add_hallucination_parts(net)
    if not net.cfg.share_fusion:
        net.F_t = build_fusion(net.cfg.fusion, net.cfg.feature_dim, net.cfg.shared_translator)
        net.H_t = task_head(net.roles)


def hallucination_forward(
    net: TrainingNet,
    batch: Batch,
    has_privileged: Tensor | None,
    fusion: nn.Module,
    head: nn.Module,
) -> dict[str, Tensor]:
    """``z_o``, ``z_p``, ``z_h``, ``teacher_feature = fusion(z_o, z_p)``,
    ``teacher_logits = head(teacher_feature)``, ``deploy_feature = F(z_o, z_h)``,
    ``deploy_logits``, ``priv_logits = H_p(z_p)``, ``priv_logits_h = H_p(z_h)`` (H_p frozen
    there unless ``model.alignment_trains_priv_head``), ``recon = D_h(z_h)`` and
    ``recon_target``."""
    z_o, z_h, h_map = encode_sharing_stages(net.E_o, net.E_h, batch)
    out: dict[str, Tensor] = {"z_o": z_o}
    mask = net.read_mask(batch, has_privileged, z_o, out)
    z_p = as_map_like(net.encode_privileged(batch, mask), z_o)
    out["z_p"] = z_p
    z_o_teacher = z_o.detach() if net.cfg.teacher_detach_ordinary else z_o
    out["teacher_feature"] = fusion(z_o_teacher, z_p)
    out["teacher_logits"] = net.logits(head, out["teacher_feature"])
    out["z_h"] = z_h
    out["deploy_feature"] = net.F(z_o, z_h)
    out["deploy_logits"] = net.logits(net.H, out["deploy_feature"])
    out["priv_logits"] = net.logits(net.H_p, z_p)
    trains_head = net.cfg.alignment_trains_priv_head
    with nullcontext() if trains_head else frozen_parameters(net.H_p):
        out["priv_logits_h"] = net.logits(net.H_p, z_h)
    if net.recon_per_pixel:
        out["recon"] = net.D_h(z_h).permute(0, 3, 1, 2).flatten(1)
        size = (z_h.shape[1], z_h.shape[2])
    elif net.recon_dense:
        out["recon"] = net.D_h(h_map).flatten(1)
        size = (h_map.shape[2], h_map.shape[3])
    else:
        pooled = z_h if z_h.dim() == 2 else z_h.mean(dim=(1, 2))
        out["recon"], size = net.D_h(pooled), None
    with no_grad():
        out["recon_target"] = masked_target(net.privileged_target(batch, size, mask), mask)
    return out


def forward(net: TrainingNet, batch: Batch, has_privileged: Tensor | None) -> dict[str, Tensor]:
    if net.cfg.share_fusion:
        return hallucination_forward(net, batch, has_privileged, net.F, net.H)
    return hallucination_forward(net, batch, has_privileged, net.F_t, net.H_t)


def objective(loss: LossConfig) -> dict[str, float]:
    """The single-stage objective's term weights, from the ``loss`` config."""
    return {
        "deploy": loss.w_deploy,
        "teacher": loss.w_teacher,
        "priv": loss.w_priv,
        "jan": loss.w_jan,
        "mimic": loss.w_mimic,
        "recon": loss.w_recon,
        "kd": loss.w_kd,
    }


def hallucination_lr_scale(cfg: Config) -> dict[str, float]:
    """``model.hallucination_lr_scale`` for E_h and D_h (empty when 1)."""
    scale = cfg.model.hallucination_lr_scale
    return {"E_h": scale, "D_h": scale} if scale != 1.0 else {}


def stages(cfg: Config) -> list[Stage]:
    # The kd term distils the privileged head by default, or the teacher path.
    source = "priv_logits" if cfg.loss.kd_source == "privileged" else "teacher_logits"
    return [
        Stage(
            "joint",
            cfg.train.epochs,
            None,
            objective(cfg.loss),
            hallucination_lr_scale(cfg),
            kd_source=source,
        )
    ]


def check_config(cfg: Config) -> None:
    if not any(getattr(cfg.loss, name) for name in LOSS_WEIGHTS):
        raise ConfigError(
            f"config section 'loss': every weight ({', '.join(LOSS_WEIGHTS)}) is zero, so "
            "method osmd would optimise nothing; give at least one a positive value",
            "loss",
        )


METHOD = Method(
    name="osmd",
    summary="one-stage modality distillation: E_h learns to stand in for E_p while training",
    deploy=DEPLOY,
    build_deploy=build_deploy,
    add_training_parts=add_training_parts,
    forward=forward,
    stages=stages,
    evaluates=("deploy", "teacher"),
    check_config=check_config,
    # Each searched only where the config gives it weight: a zero weight is a term left out.
    tuned_weights=tuple(f"loss.{name}" for name in LOSS_WEIGHTS if name != "w_deploy"),
)
