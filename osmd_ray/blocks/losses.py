"""The training objective of DESIGN §2, with per-sample masking of missing privileged data.

``L = w_deploy L_deploy + w_teacher L_teacher + w_priv L_priv + w_jan L_jan + w_mimic L_mimic
+ w_recon L_recon + w_kd L_kd``

- ``deploy``  task_loss(H(F(z_o, z_h)), y)        all rows
- ``teacher`` task_loss(H(F(z_o, z_p)), y)        rows with the privileged modalities
- ``priv``    task_loss(H_p(z_p), y)              rows with the privileged modalities
- ``jan``     JMMD({z_p, softmax(H_p(z_p))}, {z_h, softmax(H_p(z_h))}) (or MMD(z_p, z_h)),
  over the rows with the privileged modalities; needs at least two of them; quadratic or
  linear-time estimator (``loss.jmmd_estimator``). Segmentation: the sum of that term on
  the spatially pooled features and logits, and on ``loss.jmmd_pixels`` randomly drawn pixels
  (the same pixels on both sides), so its cost does not grow with the image
- ``mimic``   mean((z_h - stopgrad(z_p))^2): the mean over rows *and* features, so its weight
  does not scale with ``model.feature_dim``
- ``recon``   mean((D_h(z_h) - pooled privileged input)^2) (or its mean absolute error,
  ``loss.recon_loss=l1``): dense supervision of E_h by the privileged input itself (see
  ``TrainingNet.privileged_target``)

- ``kd``      T^2 KL(softmax(source / T) || softmax(deploy / T)), source detached: the output
  the stage names (``Stage.kd_source``: a separate teacher's logits, the teacher path, or the
  privileged head H_p(z_p)), rows with the privileged modalities
- ``impute``  mean |G(x_o) - x_p| in the normalised privileged space, same rows

Which terms a method optimises, with which weights, is its stages' business
(:mod:`osmd_ray.methods`); this module computes whatever terms it is given.

A term with no usable rows is an exact 0 that stays connected to the graph (no NaN, and every
parameter still gets a gradient, as DeepSpeed expects on every rank).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from osmd_ray.blocks.jmmd import jmmd, mmd
from osmd_ray.config import LossConfig
from osmd_ray.config.schema import ALIGNMENTS, RECON_LOSSES

TERMS = ("deploy", "teacher", "priv", "jan", "mimic", "recon", "kd", "impute")


def _zero(t: Tensor) -> Tensor:
    """A 0 connected to ``t``'s graph; summing an empty slice cannot produce NaN."""
    return t.reshape(-1)[:0].float().sum()


def task_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy, mean over the labelled targets (0 when none is labelled).

    Works for classification, (B, C) and (B,), and dense prediction, (B, C, H, W) and
    (B, H, W). Computed in fp32 so bf16 logits do not lose the loss's precision.
    """
    labels = labels.long()
    summed = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().clamp_min(1)
    return summed / count


def alignment_loss(
    z_p: Tensor,
    z_h: Tensor,
    priv_logits: Tensor,
    priv_logits_h: Tensor,
    cfg: LossConfig,
) -> Tensor:
    """The ``jan`` term on already-masked rows: JMMD of (features, predictions) or MMD."""
    if cfg.alignment not in ALIGNMENTS:
        raise ValueError(f"loss.alignment={cfg.alignment!r}: use one of {ALIGNMENTS}")
    p_feat, p_prob = z_p, torch.softmax(priv_logits.float(), dim=1)
    if cfg.detach_privileged:
        p_feat, p_prob = p_feat.detach(), p_prob.detach()
    if cfg.alignment == "mmd":
        return mmd(p_feat, z_h, cfg.num_kernels, cfg.kernel_mul, cfg.jmmd_estimator)
    h_prob = torch.softmax(priv_logits_h.float(), dim=1)
    return jmmd(
        [p_feat, p_prob], [z_h, h_prob], cfg.num_kernels, cfg.kernel_mul, cfg.jmmd_estimator
    )


def dense_alignment_loss(
    z_p: Tensor,
    z_h: Tensor,
    priv_logits: Tensor,
    priv_logits_h: Tensor,
    cfg: LossConfig,
) -> Tensor:
    """The ``jan`` term of segmentation on already-masked rows: features (B, h, w, d)
    channel-last, logits (B, K, H, W). Pooled term plus a term on ``cfg.jmmd_pixels`` pixels
    drawn (with replacement) from all rows, paired across the two sides."""
    pooled = alignment_loss(
        z_p.mean(dim=(1, 2)),
        z_h.mean(dim=(1, 2)),
        priv_logits.mean(dim=(2, 3)),
        priv_logits_h.mean(dim=(2, 3)),
        cfg,
    )
    b, height, width = priv_logits.shape[0], priv_logits.shape[2], priv_logits.shape[3]
    n = cfg.jmmd_pixels
    device = priv_logits.device
    rows = torch.randint(b, (n,), device=device)
    ys = torch.randint(height, (n,), device=device)
    xs = torch.randint(width, (n,), device=device)
    # The logits are upsampled to the label map; features stay on the (coarser) feature grid.
    fy, fx = ys * z_p.shape[1] // height, xs * z_p.shape[2] // width
    pixels = alignment_loss(
        z_p[rows, fy, fx],
        z_h[rows, fy, fx],
        priv_logits[rows, :, ys, xs],
        priv_logits_h[rows, :, ys, xs],
        cfg,
    )
    return pooled + pixels


def recon_loss(prediction: Tensor, target: Tensor, kind: str = "mse") -> Tensor:
    """The ``recon`` term: mean squared (``mse``) or absolute (``l1``) error, in fp32."""
    if kind == "mse":
        return F.mse_loss(prediction.float(), target.float())
    if kind == "l1":
        return F.l1_loss(prediction.float(), target.float())
    raise ValueError(f"loss.recon_loss={kind!r}: use one of {RECON_LOSSES}")


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton et al.'s soft-target term: T^2 KL(p_teacher^T || p_student^T), mean over the
    predictions (rows, or rows x pixels for (B, K, H, W) logits); the teacher is detached (it
    is trained by its own stage, not pulled towards the student)."""
    t = float(temperature)
    log_student = F.log_softmax(student.float() / t, dim=1)
    log_teacher = F.log_softmax(teacher.detach().float() / t, dim=1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="sum")
    predictions = max(student.numel() // max(student.shape[1], 1), 1)
    return kl / predictions * t * t


def compute_losses(
    outputs: dict[str, Tensor],
    labels: Tensor,
    has_privileged: Tensor | None,
    cfg: LossConfig,
    terms: Mapping[str, float],
    ignore_index: int = -100,
    kd_temperature: float = 4.0,
    kd_source: str = "teacher_logits",
) -> dict[str, Tensor]:
    """Each active term, unweighted, under its name, and ``total`` (the weighted sum).

    ``has_privileged`` (B,) bool marks the rows that have the privileged modalities; ``None``
    falls back to ``outputs["has_privileged"]`` (set by the network from ``has_<name>``
    columns), and then to "every row". ``terms`` (term -> weight) is the current stage's
    objective, ``kd_source`` the output the ``kd`` term distils. A term whose weight is 0 is
    neither computed nor reported.
    """
    weights = dict(terms)
    unknown = sorted(set(weights) - set(TERMS))
    if unknown:
        raise ValueError(f"unknown loss terms {unknown}; known: {TERMS}")

    if cfg.alignment not in ALIGNMENTS:
        raise ValueError(f"loss.alignment={cfg.alignment!r}: use one of {ALIGNMENTS}")
    mask = outputs.get("has_privileged") if has_privileged is None else has_privileged
    if has_privileged is not None and "has_privileged" in outputs:
        ran_with = outputs["has_privileged"]
        if not torch.equal(has_privileged.reshape(-1).to(ran_with.device, torch.bool), ran_with):
            raise ValueError("has_privileged differs from the mask the model ran E_p with")
    valid = None if mask is None else mask.reshape(-1).to(labels.device, torch.bool)

    def rows(t: Tensor) -> Tensor:
        return t if valid is None else t[valid]

    n_valid = labels.shape[0] if valid is None else int(valid.sum())
    weights = {name: float(weights.get(name, 0.0)) for name in TERMS}
    terms: dict[str, Tensor] = {}
    if weights["deploy"] != 0:
        terms["deploy"] = task_loss(outputs["deploy_logits"], labels, ignore_index)
    if weights["teacher"] != 0:
        terms["teacher"] = (
            task_loss(rows(outputs["teacher_logits"]), rows(labels), ignore_index)
            if n_valid
            else _zero(outputs["teacher_logits"])
        )
    if weights["priv"] != 0:
        terms["priv"] = (
            task_loss(rows(outputs["priv_logits"]), rows(labels), ignore_index)
            if n_valid
            else _zero(outputs["priv_logits"])
        )
    if weights["jan"] != 0:
        # Distances between fewer than two samples of a side say nothing about a distribution.
        align = dense_alignment_loss if outputs["z_h"].dim() == 4 else alignment_loss
        terms["jan"] = (
            align(
                rows(outputs["z_p"]),
                rows(outputs["z_h"]),
                rows(outputs["priv_logits"]),
                rows(outputs["priv_logits_h"]),
                cfg,
            )
            if n_valid >= 2
            else _zero(outputs["z_h"]) + _zero(outputs["z_p"]) + _zero(outputs["priv_logits_h"])
        )
    if weights["mimic"] != 0:
        terms["mimic"] = (
            F.mse_loss(rows(outputs["z_h"]).float(), rows(outputs["z_p"]).detach().float())
            if n_valid
            else _zero(outputs["z_h"])
        )
    if weights["recon"] != 0:
        terms["recon"] = (
            recon_loss(rows(outputs["recon"]), rows(outputs["recon_target"]), cfg.recon_loss)
            if n_valid
            else _zero(outputs["recon"])
        )
    if weights["kd"] != 0:
        terms["kd"] = (
            distillation_loss(
                rows(outputs["deploy_logits"]), rows(outputs[kd_source]), kd_temperature
            )
            if n_valid
            else _zero(outputs["deploy_logits"])
        )
    if weights["impute"] != 0:
        terms["impute"] = (
            F.l1_loss(rows(outputs["imputed"]).float(), rows(outputs["imputed_target"]).float())
            if n_valid
            else _zero(outputs["imputed"])
        )
    # Every output joins the graph (as an exact 0 where its term is off): each parameter then
    # gets a gradient on every rank, which DeepSpeed's ZeRO reductions expect.
    total = sum((_zero(v) for v in outputs.values() if v.requires_grad), _zero(labels))
    for name, value in terms.items():
        total = total + weights[name] * value
    terms["total"] = total
    return terms
