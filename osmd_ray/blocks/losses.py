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
  (the same pixels on both sides), so its cost does not grow with the image. Or a paired
  alignment of the deployment feature F(z_o, z_h) with the teacher path's F(z_o, z_p)
  (spatially pooled for segmentation): ``contrastive`` (InfoNCE) or ``relational`` (RKD's
  distance-wise term), see :func:`contrastive_loss` and :func:`relational_loss`
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

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from osmd_ray.blocks.jmmd import jmmd, mmd, squared_distances
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
    prediction_kernel = (
        (1, cfg.prediction_bandwidth) if cfg.prediction_bandwidth > 0 else (cfg.num_kernels, None)
    )
    return jmmd(
        [p_feat, p_prob],
        [z_h, h_prob],
        cfg.num_kernels,
        cfg.kernel_mul,
        cfg.jmmd_estimator,
        layer_kernels=[(cfg.num_kernels, None), prediction_kernel],
    )


PAIRED_ALIGNMENTS = ("contrastive", "relational")
"""The alignments that compare each sample's deployment feature with its own teacher feature."""


def contrastive_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """InfoNCE over the batch: row i's student feature must pick out teacher row i among all
    teacher rows, by cosine similarity / ``temperature``; cross-entropy, mean over rows. It
    keeps the pairing but asks only for the nearest match, not a copy."""
    s = F.normalize(student.float().flatten(1), dim=1)
    t = F.normalize(teacher.float().flatten(1), dim=1)
    logits = s @ t.T / temperature
    return F.cross_entropy(logits, torch.arange(s.shape[0], device=s.device))


def _relative_distances(z: Tensor) -> Tensor:
    """The off-diagonal pairwise Euclidean distances of the rows of ``z``, divided by their
    mean (so the two sides' scales need not agree)."""
    rows = z.shape[0]
    # The floor keeps sqrt's gradient finite for coinciding rows.
    d = squared_distances(z.float().flatten(1)).clamp_min(1e-12).sqrt()
    off = ~torch.eye(rows, dtype=torch.bool, device=z.device)
    d = d[off]
    return d / d.mean().clamp_min(1e-12)


def relational_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Park et al. 2019's distance-wise relational distillation (RKD-D): smooth L1 between
    the batch's relative pairwise distances on the two sides; the geometry of the batch is
    transferred, not the features themselves."""
    return F.smooth_l1_loss(_relative_distances(student), _relative_distances(teacher))


def paired_alignment_loss(deploy: Tensor, teacher: Tensor, cfg: LossConfig) -> Tensor:
    """The ``jan`` term of a paired alignment on already-masked rows; feature maps
    (B, h, w, d) are pooled over space first."""
    if deploy.dim() == 4:
        deploy, teacher = deploy.mean(dim=(1, 2)), teacher.mean(dim=(1, 2))
    if cfg.detach_privileged:
        teacher = teacher.detach()
    if cfg.alignment == "contrastive":
        return contrastive_loss(deploy, teacher, cfg.contrastive_temperature)
    return relational_loss(deploy, teacher)


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


@dataclass(frozen=True)
class _Batch:
    """What the terms read: the network's outputs, the labels, which rows have the privileged
    modalities (``valid``, None for all of them) and how many, and the terms' settings."""

    outputs: Mapping[str, Tensor]
    labels: Tensor
    valid: Tensor | None
    n_valid: int
    cfg: LossConfig
    ignore_index: int
    kd_temperature: float
    kd_source: str

    def rows(self, t: Tensor) -> Tensor:
        """``t`` restricted to the rows with the privileged modalities."""
        return t if self.valid is None else t[self.valid]


def _privileged_rows(
    outputs: Mapping[str, Tensor], labels: Tensor, has_privileged: Tensor | None
) -> Tensor | None:
    """The (B,) bool mask of the rows with the privileged modalities, on ``labels``' device:
    ``has_privileged``, else ``outputs["has_privileged"]``, else None (every row). A mask
    given both ways must agree."""
    mask = outputs.get("has_privileged") if has_privileged is None else has_privileged
    if has_privileged is not None and "has_privileged" in outputs:
        ran_with = outputs["has_privileged"]
        if not torch.equal(has_privileged.reshape(-1).to(ran_with.device, torch.bool), ran_with):
            raise ValueError("has_privileged differs from the mask the model ran E_p with")
    return None if mask is None else mask.reshape(-1).to(labels.device, torch.bool)


def _task_on_rows(b: _Batch, key: str) -> Tensor:
    """task_loss of ``outputs[key]`` on the rows with the privileged modalities."""
    return (
        task_loss(b.rows(b.outputs[key]), b.rows(b.labels), b.ignore_index)
        if b.n_valid
        else _zero(b.outputs[key])
    )


def _deploy_term(b: _Batch) -> Tensor:
    return task_loss(b.outputs["deploy_logits"], b.labels, b.ignore_index)


def _teacher_term(b: _Batch) -> Tensor:
    return _task_on_rows(b, "teacher_logits")


def _priv_term(b: _Batch) -> Tensor:
    return _task_on_rows(b, "priv_logits")


def _jan_term(b: _Batch) -> Tensor:
    out = b.outputs
    # Distances between fewer than two samples of a side say nothing about a distribution.
    if b.cfg.alignment in PAIRED_ALIGNMENTS:
        return (
            paired_alignment_loss(
                b.rows(out["deploy_feature"]), b.rows(out["teacher_feature"]), b.cfg
            )
            if b.n_valid >= 2
            else _zero(out["deploy_feature"]) + _zero(out["teacher_feature"])
        )
    align = dense_alignment_loss if out["z_h"].dim() == 4 else alignment_loss
    return (
        align(
            b.rows(out["z_p"]),
            b.rows(out["z_h"]),
            b.rows(out["priv_logits"]),
            b.rows(out["priv_logits_h"]),
            b.cfg,
        )
        if b.n_valid >= 2
        else _zero(out["z_h"]) + _zero(out["z_p"]) + _zero(out["priv_logits_h"])
    )


def _mimic_term(b: _Batch) -> Tensor:
    out = b.outputs
    return (
        F.mse_loss(b.rows(out["z_h"]).float(), b.rows(out["z_p"]).detach().float())
        if b.n_valid
        else _zero(out["z_h"])
    )


def _recon_term(b: _Batch) -> Tensor:
    out = b.outputs
    return (
        recon_loss(b.rows(out["recon"]), b.rows(out["recon_target"]), b.cfg.recon_loss)
        if b.n_valid
        else _zero(out["recon"])
    )


def _kd_term(b: _Batch) -> Tensor:
    out = b.outputs
    return (
        distillation_loss(b.rows(out["deploy_logits"]), b.rows(out[b.kd_source]), b.kd_temperature)
        if b.n_valid
        else _zero(out["deploy_logits"])
    )


def _impute_term(b: _Batch) -> Tensor:
    out = b.outputs
    return (
        F.l1_loss(b.rows(out["imputed"]).float(), b.rows(out["imputed_target"]).float())
        if b.n_valid
        else _zero(out["imputed"])
    )


# Each term's unweighted value; computed (and reported) in the order of TERMS.
_TERM_LOSSES: dict[str, Callable[[_Batch], Tensor]] = {
    "deploy": _deploy_term,
    "teacher": _teacher_term,
    "priv": _priv_term,
    "jan": _jan_term,
    "mimic": _mimic_term,
    "recon": _recon_term,
    "kd": _kd_term,
    "impute": _impute_term,
}


def _graph_total(
    outputs: Mapping[str, Tensor],
    labels: Tensor,
    values: Mapping[str, Tensor],
    weights: Mapping[str, float],
) -> Tensor:
    """The weighted sum of ``values``, connected to every output that requires a gradient."""
    # Every output joins the graph (as an exact 0 where its term is off): each parameter then
    # gets a gradient on every rank, which DeepSpeed's ZeRO reductions expect.
    total = sum((_zero(v) for v in outputs.values() if v.requires_grad), _zero(labels))
    for name, value in values.items():
        total = total + weights[name] * value
    return total


def warmed_up_terms(terms: Mapping[str, float], warmup_epochs: int, epoch: int) -> dict[str, float]:
    """``terms`` at 0-based ``epoch`` with the alignment term (``jan``) ramped up linearly over
    ``warmup_epochs`` epochs: its weight times min(1, (epoch + 1) / warmup_epochs)."""
    out = dict(terms)
    if warmup_epochs > 0 and "jan" in out:
        out["jan"] = out["jan"] * min(1.0, (epoch + 1) / warmup_epochs)
    return out


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
    valid = _privileged_rows(outputs, labels, has_privileged)
    n_valid = labels.shape[0] if valid is None else int(valid.sum())
    batch = _Batch(outputs, labels, valid, n_valid, cfg, ignore_index, kd_temperature, kd_source)
    weights = {name: float(weights.get(name, 0.0)) for name in TERMS}
    values = {name: _TERM_LOSSES[name](batch) for name in TERMS if weights[name] != 0}
    values["total"] = _graph_total(outputs, labels, values, weights)
    return values
