"""Logit distillation (Hinton 2015; DESIGN §3): a separate multimodal teacher (T_o, E_p, F_t,
H_t) trained first, then the student E_o + H on the labels and the teacher's softened logits
(``baselines.kd_teacher_fraction`` of the epochs for the teacher, ``kd_weight``,
``kd_temperature``). Deploys the student alone."""

from __future__ import annotations

from torch import Tensor

from osmd_ray.blocks.fusion import build_fusion
from osmd_ray.blocks.nets import Batch, TrainingNet, as_map_like, role_encoder, task_head
from osmd_ray.blocks.stages import Stage, split_epochs
from osmd_ray.config import Config
from osmd_ray.methods.interface import Method
from osmd_ray.methods.ordinary_only import STUDENT, build_student


def add_teacher(net: TrainingNet) -> None:
    """The teacher, entirely separate from the student E_o + H."""
    roles, cfg = net.roles, net.cfg
    net.T_o = role_encoder(roles.ordinary, roles)
    net.E_p = role_encoder(roles.privileged, roles)
    net.F_t = build_fusion(cfg.fusion, cfg.feature_dim, cfg.shared_translator)
    net.H_t = task_head(roles)


def forward(net: TrainingNet, batch: Batch, has_privileged: Tensor | None) -> dict[str, Tensor]:
    """The student's ``z_o`` and ``deploy_logits``; the teacher's ``z_p``, ``teacher_logits``."""
    z_o = net.E_o(batch)
    out: dict[str, Tensor] = {"z_o": z_o, "deploy_logits": net.logits(net.H, z_o)}
    mask = net.read_mask(batch, has_privileged, z_o, out)
    z_p = as_map_like(net.encode_privileged(batch, mask), z_o)
    out["z_p"] = z_p
    out["teacher_logits"] = net.logits(net.H_t, net.F_t(net.T_o(batch), z_p))
    return out


def stages(cfg: Config) -> list[Stage]:
    base = cfg.baselines
    e = split_epochs(cfg.train.epochs, [base.kd_teacher_fraction, 1 - base.kd_teacher_fraction])
    student_terms = {"deploy": 1.0 - base.kd_weight, "kd": base.kd_weight}
    return [
        Stage("teacher", e[0], ("T_o", "E_p", "F_t", "H_t"), {"teacher": 1.0}),
        Stage("student", e[1], ("E_o", "H"), student_terms, kd_source="teacher_logits"),
    ]


METHOD = Method(
    name="logit_kd",
    summary="a separate multimodal teacher, then E_o + H distilled from its logits",
    deploy=STUDENT,
    build_deploy=build_student,
    add_training_parts=add_teacher,
    forward=forward,
    stages=stages,
    evaluates=("deploy", "teacher"),
    stage_count=2,
    tuned_weights=("baselines.kd_temperature",),
)
