"""The two networks every method is made of, and the helpers their forward paths share.

A method (:mod:`osmd_ray.methods`) says which parts it builds and how they connect; this
module holds what is the same for all of them:

- :class:`Roles`: the modalities of each role, the classes and the model config a network is
  built for;
- :class:`TrainingNet`: the network trained (and evaluated) for a method: its parts are
  registered in the order the method builds them (deployment parts, ``dropout``, then the
  training-only parts), which fixes the state dict keys, the per-part optimiser groups and
  the order in which their initial weights are drawn;
- :class:`DeployNet`: the deployment network, ordinary inputs (plus privileged ones where
  the method deploys them) -> logits, built around a TrainingNet's own parts (no copies) or
  from scratch when an export is loaded: both have the same state dict keys.

Part names are part of the contract (state dict keys, tests, the staged methods' stages):
``E_o`` ordinary encoder, ``E_p`` privileged encoder, ``E_h`` hallucination encoder, ``F``
fusion, ``H`` task head, ``H_p`` head on privileged-space features, ``D_h`` decoder of the
privileged input from E_h, ``G`` generator, ``T_o``/``F_t``/``H_t`` a separate teacher.

Dense prediction (segmentation): built with ``output_size`` (the label maps' H x W), the
encoders keep channel-last feature maps (:mod:`osmd_ray.blocks.encoders`), F and the heads
run on every pixel of them, and every ``*_logits`` output is (B, num_classes, H, W),
upsampled bilinearly from the feature map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from osmd_ray.blocks.encoders import (
    DecoderEncoder,
    Normalization,
    RoleEncoder,
    resolve_normalization,
)
from osmd_ray.config import ModelConfig
from osmd_ray.data.schema import ModalitySpec

Batch = Mapping[str, Tensor]


@dataclass(frozen=True)
class Roles:
    """What a network is built for: the modalities of each role, the classes, the model
    config, the datasets' normalisation statistics and (segmentation) the label maps' size."""

    ordinary: tuple[ModalitySpec, ...]
    privileged: tuple[ModalitySpec, ...]
    num_classes: int
    cfg: ModelConfig
    normalization: Normalization | None
    output_size: tuple[int, int] | None = None

    @property
    def dense(self) -> bool:
        return self.output_size is not None


def check_roles(roles: Roles, needs_privileged: bool, label: str) -> None:
    """What every network needs of its roles, said up front instead of failing in a forward."""
    if not roles.ordinary:
        raise ValueError("data.ordinary is empty: every method needs an ordinary modality")
    overlap = {s.name for s in roles.ordinary} & {s.name for s in roles.privileged}
    if overlap:
        raise ValueError(f"modalities {sorted(overlap)} are both ordinary and privileged")
    if needs_privileged and not roles.privileged:
        raise ValueError(f"method {label} needs at least one privileged modality")
    if roles.output_size is None:
        return
    if len(roles.output_size) != 2 or min(roles.output_size) < 1:
        raise ValueError(f"segmentation needs label maps of shape (H, W), got {roles.output_size}")
    if not any(s.kind == "image" for s in roles.ordinary):
        raise ValueError(
            "segmentation needs an image among the ordinary modalities (data.ordinary) to "
            f"predict a label map from, got {[(s.name, s.kind) for s in roles.ordinary]}"
        )
    if roles.cfg.hallucination_shared_stages:
        raise ValueError("model.hallucination_shared_stages is for classification only (set 0)")


def privileged_mask(batch: Batch, privileged: Sequence[str]) -> Tensor | None:
    """(B,) bool, True where every privileged modality is present, from ``has_<name>`` columns.

    ``None`` when the batch has no such column (every row has every privileged modality).
    """
    mask: Tensor | None = None
    for name in privileged:
        column = batch.get(f"has_{name}")
        if column is None:
            continue
        present = torch.as_tensor(column).reshape(-1).bool()
        mask = present if mask is None else mask & present
    return mask


def dense_logits(head_out: Tensor, output_size: tuple[int, int] | None) -> Tensor:
    """A head's output as logits: (B, K) unchanged for classification; for dense prediction
    the channel-last (B, h, w, K) map as (B, K, H, W) at ``output_size``."""
    if output_size is None:
        return head_out
    logits = head_out.permute(0, 3, 1, 2)
    if tuple(logits.shape[2:]) != tuple(output_size):
        logits = nnf.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
    return logits


def as_map_like(z: Tensor, like: Tensor) -> Tensor:
    """``z`` on the channel-last map grid of ``like`` (dense prediction): a (B, d) feature
    vector (a role without image modalities) broadcast to every pixel, a map of another size
    resized bilinearly. Classification features (B, d) pass through."""
    if like.dim() == 2:
        return z
    b, h, w, _ = like.shape
    if z.dim() == 2:
        return z[:, None, None, :].expand(b, h, w, z.shape[1])
    if z.shape[1:3] != like.shape[1:3]:
        z = nnf.interpolate(z.permute(0, 3, 1, 2), size=(h, w), mode="bilinear")
        z = z.permute(0, 2, 3, 1)
    return z


def standardised_inverse(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """``model.recon_target=inverse``: 1 / x where x > 0 and 0 elsewhere (a missing depth
    reading counts as infinitely far), then standardised per channel (dim 1) with the mean
    and std over the rows in ``mask`` (None: all rows) and every other dimension.

    For depth this is the disparity: near surfaces, which usually matter, spread over most of
    its range, while the far background collapses towards 0 instead of dominating a squared
    error. Rows outside ``mask`` may hold anything (NaN); they do not enter the statistics.
    """
    x = torch.nan_to_num(x, nan=0.0)
    inv = torch.where(x > 0, 1.0 / x.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
    rows = (inv if mask is None else inv[mask]).transpose(0, 1).reshape(x.shape[1], -1)
    if rows.shape[1] < 2:
        return torch.zeros_like(x)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    mean = rows.mean(dim=1).reshape(shape)
    std = rows.std(dim=1).clamp_min(1e-6).reshape(shape)
    return (inv - mean) / std


def pooled_size(spec: ModalitySpec, size: int) -> int:
    """Length of one privileged modality's flattened, pooled reconstruction target."""
    channels, *rest = spec.shape
    if spec.kind == "image":
        return channels * size * size
    if spec.kind == "sequence":
        return channels * size
    return int(torch.Size(spec.shape).numel())


def role_encoder(specs: Sequence[ModalitySpec], roles: Roles) -> RoleEncoder:
    """An encoder of one role's modalities to ``model.feature_dim`` (maps when dense)."""
    return RoleEncoder(specs, roles.cfg, roles.normalization, dense=roles.dense)


@contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Within the block, calls of ``module`` record no gradient for its parameters; their
    outputs still pass gradient on to their inputs (autograd reads ``requires_grad`` when an
    operation runs, so other calls of the same module in the same step still train it)."""
    trained = [p for p in module.parameters() if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trained:
            p.requires_grad_(True)


def task_head(roles: Roles) -> nn.Linear:
    """A linear head from ``model.feature_dim`` features to the classes (per pixel if dense)."""
    return nn.Linear(roles.cfg.feature_dim, roles.num_classes)


def build_hallucination_encoder(roles: Roles, e_o: RoleEncoder) -> nn.Module:
    """E_h of ``model.hallucination``: a role encoder like E_o (``encoder``, optionally
    sharing E_o's first stages) or a U-Net decoder followed by an encoder of its own
    (``unet``, :class:`osmd_ray.blocks.encoders.DecoderEncoder`)."""
    cfg = roles.cfg
    if roles.dense and cfg.hallucination != "encoder":
        raise ValueError("segmentation supports model.hallucination=encoder only")
    if cfg.hallucination == "unet" and cfg.hallucination_shared_stages:
        raise ValueError("model.hallucination=unet shares no stages with E_o")
    if cfg.hallucination_width != 1.0 or cfg.hallucination_depth:
        if cfg.hallucination_shared_stages:
            raise ValueError(
                "model.hallucination_shared_stages > 0 needs model.hallucination_width=1 and "
                "model.hallucination_depth=0 (the shared stages have E_o's shape)"
            )
        # E_h is the only part built from this copy: E_o, E_p, F and H keep E_o's shape.
        cfg = dataclasses.replace(
            cfg,
            width=max(1, round(cfg.width * cfg.hallucination_width)),
            depth=cfg.hallucination_depth or cfg.depth,
        )
    if cfg.hallucination == "unet":
        return DecoderEncoder(roles.ordinary, cfg, roles.normalization)
    if cfg.hallucination != "encoder":
        raise ValueError(f"model.hallucination={cfg.hallucination!r}: use encoder or unet")
    return RoleEncoder(
        roles.ordinary,
        cfg,
        roles.normalization,
        share_from=e_o,
        shared_stages=cfg.hallucination_shared_stages,
        dense=roles.dense,
    )


@dataclass(frozen=True)
class DeployPlan:
    """What a method deploys: its parts (in registration order), whether the deployed
    network reads the privileged inputs, whether it is built from the privileged modalities'
    specs (it holds E_p), and ``features(net, batch)``: the fused features H classifies."""

    parts: tuple[str, ...]
    features: Callable[[DeployNet, Batch], Tensor]
    reads_privileged: bool = False
    privileged_specs: bool = False

    def inputs(self, roles: Roles) -> list[ModalitySpec]:
        """The modalities the deployment network reads."""
        return list(roles.ordinary) + (list(roles.privileged) if self.reads_privileged else [])


class DeployNet(nn.Module):
    """The deployment network of one method: its inputs -> logits (B, K), or (B, K, H, W).

    Holds exactly the parts of its :class:`DeployPlan`, then ``dropout``; ``method`` is the
    method's name (written into the export's meta.json).
    """

    def __init__(
        self,
        method: str,
        plan: DeployPlan,
        parts: Mapping[str, nn.Module],
        input_modalities: Sequence[ModalitySpec],
        dropout: float,
        output_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if tuple(parts) != plan.parts:
            raise ValueError(f"{method} deploys {plan.parts}, got {tuple(parts)}")
        self.method = method
        self._features = plan.features
        self.output_size = None if output_size is None else tuple(output_size)
        """Segmentation: the (H, W) of the label maps it predicts (None: classification)."""
        self.input_modalities: tuple[ModalitySpec, ...] = tuple(input_modalities)
        for name, module in parts.items():
            self.add_module(name, module)
        self.dropout = nn.Dropout(dropout)

    def forward(self, batch: Batch) -> Tensor:
        """Logits: (B, K), or (B, K, H, W) for segmentation."""
        return dense_logits(self.H(self.dropout(self._features(self, batch))), self.output_size)


class TrainingNet(nn.Module):
    """The network a method trains: ``forward(batch)`` returns a dict of tensors, at least
    ``z_o`` and ``deploy_logits`` (what the deployment network computes), plus whatever the
    method's loss terms read (:mod:`osmd_ray.blocks.losses` names them) and
    ``has_privileged`` (B,) bool, when a mask was given or read from ``has_<name>`` columns.

    Rows without their privileged modalities never enter ``E_p``
    (:meth:`encode_privileged`): it runs on the other rows only (so they do not shift
    BatchNorm statistics or receive gradient), and their ``z_p`` is zero. The losses mask
    those rows (:func:`osmd_ray.blocks.losses.compute_losses`).
    """

    def __init__(
        self,
        method: str,
        roles: Roles,
        plan: DeployPlan,
        forward: Callable[[TrainingNet, Batch, Tensor | None], dict[str, Tensor]],
    ) -> None:
        super().__init__()
        self.method = method
        self.roles = roles
        self.plan = plan
        self._forward = forward
        self.output_size = roles.output_size
        """Segmentation: the label maps' (H, W); None for classification."""
        self.ordinary = roles.ordinary
        self.privileged = roles.privileged
        self.num_classes = roles.num_classes
        self.cfg = roles.cfg
        self.normalization = resolve_normalization(
            self.ordinary + self.privileged, roles.normalization
        )

    def forward(self, batch: Batch, has_privileged: Tensor | None = None) -> dict[str, Tensor]:
        return self._forward(self, batch, has_privileged)

    def deploy_module(self) -> DeployNet:
        """The deployment network around this network's own modules (no copies, and none of
        the training-only parts): training it trains this one; its state dict is exported."""
        parts = {name: getattr(self, name) for name in self.plan.parts}
        inputs = self.plan.inputs(self.roles)
        return DeployNet(self.method, self.plan, parts, inputs, self.cfg.dropout, self.output_size)

    def logits(self, head: nn.Module, features: Tensor) -> Tensor:
        """``head`` on dropped-out features, as logits (:func:`dense_logits`)."""
        return dense_logits(head(self.dropout(features)), self.output_size)

    def privileged_mask(self, batch: Batch) -> Tensor | None:
        """The rows that have every privileged modality (see :func:`privileged_mask`)."""
        return privileged_mask(batch, [s.name for s in self.privileged])

    def read_mask(
        self, batch: Batch, has_privileged: Tensor | None, like: Tensor, out: dict[str, Tensor]
    ) -> Tensor | None:
        """The rows with their privileged inputs (given, or from ``has_<name>`` columns), on
        ``like``'s device, recorded as ``out["has_privileged"]``; None: every row."""
        mask = self.privileged_mask(batch) if has_privileged is None else has_privileged
        if mask is None:
            return None
        mask = mask.reshape(-1).to(device=like.device, dtype=torch.bool)
        if mask.shape[0] != like.shape[0]:
            raise ValueError(f"has_privileged has {mask.shape[0]} rows, batch {like.shape[0]}")
        out["has_privileged"] = mask
        return mask

    def encode_privileged(self, batch: Batch, mask: Tensor | None) -> Tensor:
        """E_p on the rows that have their privileged inputs; zeros for the others."""
        if mask is None or bool(mask.all()):
            return self.E_p(batch)
        rows = mask.nonzero(as_tuple=True)[0]
        # An empty selection still runs E_p (BatchNorm skips empty batches), which keeps every
        # E_p parameter in the graph with a zero gradient: DeepSpeed expects that on all ranks.
        z_valid = self.E_p({s.name: batch[s.name][mask] for s in self.privileged})
        full = z_valid.new_zeros((mask.shape[0], *z_valid.shape[1:]))
        return full.index_copy(0, rows, z_valid)

    def privileged_target(
        self,
        batch: Batch,
        image_size: tuple[int, int] | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """(B, D) the privileged inputs as ``model.recon_target`` says (normalised as E_p sees
        them, or their standardised reciprocals, see :func:`standardised_inverse`) and
        average-pooled (images to ``image_size``, default recon_size x recon_size; sequences
        to recon_size steps), flattened and concatenated (images channel-major, as D_h's map
        output). ``mask``: the rows that have their privileged inputs (None: all)."""
        parts = []
        for spec in self.privileged:
            raw = batch[spec.name].float()
            if self.cfg.recon_target == "inverse":
                x = standardised_inverse(raw, mask)
            else:
                x = self.E_p.encoders[spec.name].normalize(raw)
            if spec.kind == "image":
                x = nnf.adaptive_avg_pool2d(x, image_size or self.cfg.recon_size)
            elif spec.kind == "sequence":
                x = nnf.adaptive_avg_pool1d(x, self.cfg.recon_size)
            parts.append(x.flatten(1))
        return torch.cat(parts, dim=1)


def masked_target(target: Tensor, mask: Tensor | None) -> Tensor:
    """A target with the rows outside ``mask`` zeroed: rows without their privileged inputs
    may hold anything (NaN); they are masked out of the loss and must not carry a NaN into it."""
    return target if mask is None else torch.where(mask[:, None], target, 0)
