"""The OS-MD model of DESIGN §2 and the baselines of §3, plus the deployment network.

Parts (attribute names are part of the contract: state dict keys, tests, the trainer's
per-part optimiser groups and the staged baselines use them):

- ``E_o`` ordinary encoder, ``E_p`` privileged encoder, ``E_h`` hallucination encoder;
- ``F`` fusion and ``H`` task head, shared by the teacher path ``H(F(z_o, z_p))`` and the
  deployment path ``H(F(z_o, z_h))``; with ``model.share_fusion=False`` (osmd only) the
  teacher path gets its own ``F_t`` and ``H_t`` instead;
- ``H_p`` head on privileged-space features (``z_p`` and ``z_h``);
- ``D_h`` decoder of the privileged input from E_h (the ``recon`` term): a 1x1 convolution
  on E_h's last feature map, predicting the privileged images at that map's resolution
  (``model.recon_mode=dense``, when E_h is a small_cnn and every privileged modality an
  image), else a linear layer from ``z_h`` to the pooled privileged input;
- ``logit_kd``: the student is ``E_o + H``; the full_multimodal teacher is ``T_o``, ``E_p``,
  ``F_t``, ``H_t``;
- ``imputation``: the generator ``G`` (ordinary -> privileged inputs), then ``E_o``, ``E_p``,
  ``F``, ``H`` run on (ordinary, reconstructed).

Dense prediction (segmentation): built with ``output_size`` (the label maps' H x W), the
encoders keep channel-last feature maps (:mod:`osmd_ray.method.encoders`), F and the heads
run on every pixel of them (the cross translation network on feature maps), and every
``*_logits`` output is (B, num_classes, H, W), upsampled bilinearly from the feature map.

Methods: ``ordinary_only`` (E_o + H), ``full_multimodal`` (E_o + E_p + F + H, the upper bound
that needs the privileged modalities at test time), ``osmd`` (everything, one stage), and the
staged baselines ``two_stage_hallucination``, ``logit_kd`` and ``imputation`` (their stages:
:mod:`osmd_ray.method.stages`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from osmd_ray.config import Config, ModelConfig
from osmd_ray.config.schema import METHODS
from osmd_ray.data.schema import ModalitySpec
from osmd_ray.method.encoders import (
    DecoderEncoder,
    Normalization,
    RoleEncoder,
    encode_sharing_stages,
    resolve_normalization,
)
from osmd_ray.method.fusion import build_fusion
from osmd_ray.method.imputation import Generator

HALLUCINATING = ("osmd", "two_stage_hallucination")
"""Methods whose deployment path fuses E_o with the hallucination encoder E_h."""
STUDENT_ONLY = ("ordinary_only", "logit_kd")
"""Methods that deploy E_o + H alone."""
DEPLOY_NEEDS_PRIVILEGED_SPECS = ("full_multimodal", "imputation")
"""Deployment networks that hold E_p (fed real or reconstructed privileged inputs)."""


def privileged_mask(batch: Mapping[str, Tensor], privileged: Sequence[str]) -> Tensor | None:
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


def _check_roles(
    method: str, ordinary: Sequence[ModalitySpec], privileged: Sequence[ModalitySpec]
) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r}: use one of {METHODS}")
    if not ordinary:
        raise ValueError("data.ordinary is empty: every method needs an ordinary modality")
    overlap = {s.name for s in ordinary} & {s.name for s in privileged}
    if overlap:
        raise ValueError(f"modalities {sorted(overlap)} are both ordinary and privileged")


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


def _check_dense(
    method: str,
    ordinary: Sequence[ModalitySpec],
    cfg: ModelConfig,
    output_size: tuple[int, int] | None,
) -> None:
    """What dense prediction supports, said up front instead of failing in a forward."""
    if output_size is None:
        return
    if len(output_size) != 2 or min(output_size) < 1:
        raise ValueError(f"segmentation needs label maps of shape (H, W), got {output_size}")
    if not any(s.kind == "image" for s in ordinary):
        raise ValueError(
            "segmentation needs an image among the ordinary modalities (data.ordinary) to "
            f"predict a label map from, got {[(s.name, s.kind) for s in ordinary]}"
        )
    if method in HALLUCINATING and cfg.hallucination != "encoder":
        raise ValueError("segmentation supports model.hallucination=encoder only")
    if cfg.hallucination_shared_stages:
        raise ValueError("model.hallucination_shared_stages is for classification only (set 0)")


def _deploy_part_names(method: str) -> tuple[str, ...]:
    """What the deployment network of ``method`` holds, in registration order."""
    if method in STUDENT_ONLY:
        return ("E_o", "H")
    if method in HALLUCINATING:
        return ("E_o", "E_h", "F", "H")
    return {
        "full_multimodal": ("E_o", "E_p", "F", "H"),
        "imputation": ("E_o", "E_p", "F", "H", "G"),
    }[method]


def _deploy_inputs(
    method: str, ordinary: Sequence[ModalitySpec], privileged: Sequence[ModalitySpec]
) -> list[ModalitySpec]:
    """What the deployment network reads: the ordinary modalities, plus the privileged ones
    for full_multimodal only (imputation reconstructs them)."""
    return list(ordinary) + (list(privileged) if method == "full_multimodal" else [])


def build_hallucination_encoder(
    ordinary: Sequence[ModalitySpec],
    cfg: ModelConfig,
    normalization: Normalization | None,
    e_o: RoleEncoder,
    dense: bool = False,
) -> nn.Module:
    """E_h of ``model.hallucination``: a role encoder like E_o (``encoder``, optionally
    sharing E_o's first stages) or a U-Net decoder followed by an encoder of its own
    (``unet``, :class:`osmd_ray.method.encoders.DecoderEncoder`)."""
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
        return DecoderEncoder(ordinary, cfg, normalization)
    if cfg.hallucination != "encoder":
        raise ValueError(f"model.hallucination={cfg.hallucination!r}: use encoder or unet")
    return RoleEncoder(
        ordinary,
        cfg,
        normalization,
        share_from=e_o,
        shared_stages=cfg.hallucination_shared_stages,
        dense=dense,
    )


def _deploy_parts(
    method: str,
    ordinary: Sequence[ModalitySpec],
    privileged: Sequence[ModalitySpec],
    num_classes: int,
    cfg: ModelConfig,
    normalization: Normalization | None,
    dense: bool = False,
) -> dict[str, nn.Module]:
    """Build the deployment parts of ``method`` (and nothing else: no E_p for osmd)."""
    parts: dict[str, nn.Module] = {"E_o": RoleEncoder(ordinary, cfg, normalization, dense=dense)}
    if method in DEPLOY_NEEDS_PRIVILEGED_SPECS:
        if not privileged:
            raise ValueError(f"{method} needs at least one privileged modality")
        parts["E_p"] = RoleEncoder(privileged, cfg, normalization, dense=dense)
    if method in HALLUCINATING:
        parts["E_h"] = build_hallucination_encoder(
            ordinary, cfg, normalization, parts["E_o"], dense=dense
        )
    if method not in STUDENT_ONLY:
        parts["F"] = build_fusion(cfg.fusion, cfg.feature_dim, cfg.shared_translator)
    parts["H"] = nn.Linear(cfg.feature_dim, num_classes)
    if method == "imputation":
        parts["G"] = Generator(ordinary, privileged, cfg, normalization)
    return parts


class DeployNet(nn.Module):
    """The deployment network: ordinary inputs (plus privileged for full_multimodal) -> logits.

    Holds exactly the parts of :func:`_deploy_part_names`; built either around an
    :class:`OSMDModel`'s modules (same parameter tensors) or from scratch when loading an
    export. Both have the same state dict keys.
    """

    def __init__(
        self,
        method: str,
        parts: Mapping[str, nn.Module],
        input_modalities: Sequence[ModalitySpec],
        dropout: float,
        output_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        expected = _deploy_part_names(method)
        if tuple(parts) != expected:
            raise ValueError(f"{method} deploys {expected}, got {tuple(parts)}")
        self.method = method
        self.output_size = None if output_size is None else tuple(output_size)
        """Segmentation: the (H, W) of the label maps it predicts (None: classification)."""
        self.input_modalities: tuple[ModalitySpec, ...] = tuple(input_modalities)
        for name, module in parts.items():
            self.add_module(name, module)
        self.dropout = nn.Dropout(dropout)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Logits: (B, K), or (B, K, H, W) for segmentation."""
        return dense_logits(self.H(self.dropout(self._fused(batch))), self.output_size)

    def _fused(self, batch: Mapping[str, Tensor]) -> Tensor:
        if self.method in HALLUCINATING:
            z_o, z_h, _ = encode_sharing_stages(self.E_o, self.E_h, batch)
            return self.F(z_o, z_h)
        z_o = self.E_o(batch)
        if self.method in STUDENT_ONLY:
            return z_o
        if self.method == "imputation":
            other = self.E_p(self.G.to_raw(self.G(batch)))
        else:
            other = self.E_p(batch)
        return self.F(z_o, as_map_like(other, z_o))


def build_deploy_net(
    method: str,
    ordinary: Sequence[ModalitySpec],
    privileged: Sequence[ModalitySpec],
    num_classes: int,
    cfg: ModelConfig,
    normalization: Normalization | None,
    output_size: tuple[int, int] | None = None,
) -> DeployNet:
    """A freshly initialised :class:`DeployNet`; only full_multimodal and imputation build
    E_p (for the other methods ``privileged`` may be empty). ``output_size``: segmentation."""
    _check_roles(method, ordinary, privileged)
    _check_dense(method, ordinary, cfg, output_size)
    inputs = _deploy_inputs(method, ordinary, privileged)
    dense = output_size is not None
    parts = _deploy_parts(method, ordinary, privileged, num_classes, cfg, normalization, dense)
    return DeployNet(method, parts, inputs, cfg.dropout, output_size)


class OSMDModel(nn.Module):
    """OS-MD (DESIGN §2) or one of its baselines (§3), for training and evaluation.

    ``forward(batch)`` returns a dict of tensors:

    - all methods: ``z_o``, ``deploy_logits``;
    - full_multimodal, osmd, two_stage_hallucination and logit_kd: ``z_p``,
      ``teacher_logits`` (for full_multimodal the teacher path *is* the deployment path);
    - osmd and two_stage_hallucination: ``z_h``, ``priv_logits = H_p(z_p)``,
      ``priv_logits_h = H_p(z_h)``, ``recon = D_h(z_h)`` and ``recon_target``;
    - imputation: ``imputed`` and ``imputed_target`` (normalised, flattened);
    - ``has_privileged`` (B,) bool, when a mask was given or read from ``has_<name>`` columns.

    Rows without their privileged modalities never enter ``E_p``: it runs on the other rows
    only (so they do not shift BatchNorm statistics or receive gradient), and their ``z_p`` is
    zero. Losses must mask those rows (:func:`osmd_ray.method.losses.compute_losses` does).
    """

    def __init__(
        self,
        method: str,
        ordinary: Sequence[ModalitySpec],
        privileged: Sequence[ModalitySpec],
        num_classes: int,
        cfg: ModelConfig,
        normalization: Normalization | None,
        output_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        _check_roles(method, ordinary, privileged)
        _check_dense(method, ordinary, cfg, output_size)
        if method != "ordinary_only" and not privileged:
            raise ValueError(f"method {method} needs at least one privileged modality")
        self.method = method
        self.output_size = None if output_size is None else tuple(output_size)
        """Segmentation: the label maps' (H, W); None for classification."""
        dense = self.output_size is not None
        self.ordinary = tuple(ordinary)
        self.privileged = tuple(privileged) if method != "ordinary_only" else ()
        self.num_classes = num_classes
        self.cfg = cfg
        self.normalization = resolve_normalization(self.ordinary + self.privileged, normalization)
        for name, module in _deploy_parts(
            method, ordinary, privileged, num_classes, cfg, normalization, dense
        ).items():
            self.add_module(name, module)
        self.dropout = nn.Dropout(cfg.dropout)
        if method == "logit_kd":
            # The full_multimodal teacher, entirely separate from the student E_o + H.
            self.T_o = RoleEncoder(ordinary, cfg, normalization, dense=dense)
            self.E_p = RoleEncoder(privileged, cfg, normalization, dense=dense)
            self.F_t = build_fusion(cfg.fusion, cfg.feature_dim, cfg.shared_translator)
            self.H_t = nn.Linear(cfg.feature_dim, num_classes)
        if method in HALLUCINATING:
            self.E_p = RoleEncoder(privileged, cfg, normalization, dense=dense)
            self.H_p = nn.Linear(cfg.feature_dim, num_classes)
            source = self.E_h.map_source
            all_images = all(spec.kind == "image" for spec in self.privileged)
            self.recon_dense = cfg.recon_mode == "dense" and source is not None and all_images
            # Segmentation: z_h is itself a feature map; a per-pixel linear D_h reads the
            # privileged images off it at its resolution (the same layout as recon_dense).
            self.recon_per_pixel = dense and cfg.recon_mode == "dense" and all_images
            if self.recon_per_pixel:
                channels = sum(spec.shape[0] for spec in self.privileged)
                self.D_h: nn.Module = nn.Linear(cfg.feature_dim, channels)
            elif self.recon_dense:
                channels = sum(spec.shape[0] for spec in self.privileged)
                self.D_h = nn.Conv2d(self.E_h.map_channels, channels, 1)
            else:
                target_size = sum(_pooled_size(s, cfg.recon_size) for s in self.privileged)
                self.D_h = nn.Linear(cfg.feature_dim, target_size)
            if method == "osmd" and not cfg.share_fusion:
                self.F_t = build_fusion(cfg.fusion, cfg.feature_dim, cfg.shared_translator)
                self.H_t = nn.Linear(cfg.feature_dim, num_classes)

    @property
    def teacher_parts(self) -> tuple[nn.Module, nn.Module]:
        """(fusion, head) of the teacher path: F and H unless share_fusion is off (osmd) or
        the teacher is a separate model (logit_kd)."""
        if self.method == "logit_kd" or (self.method == "osmd" and not self.cfg.share_fusion):
            return self.F_t, self.H_t
        return self.F, self.H

    def privileged_target(
        self,
        batch: Mapping[str, Tensor],
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

    def privileged_mask(self, batch: Mapping[str, Tensor]) -> Tensor | None:
        """The rows that have every privileged modality (see :func:`privileged_mask`)."""
        return privileged_mask(batch, [s.name for s in self.privileged])

    def _encode_privileged(self, batch: Mapping[str, Tensor], mask: Tensor | None) -> Tensor:
        if mask is None or bool(mask.all()):
            return self.E_p(batch)
        rows = mask.nonzero(as_tuple=True)[0]
        # An empty selection still runs E_p (BatchNorm skips empty batches), which keeps every
        # E_p parameter in the graph with a zero gradient: DeepSpeed expects that on all ranks.
        z_valid = self.E_p({s.name: batch[s.name][mask] for s in self.privileged})
        full = z_valid.new_zeros((mask.shape[0], *z_valid.shape[1:]))
        return full.index_copy(0, rows, z_valid)

    def forward(
        self, batch: Mapping[str, Tensor], has_privileged: Tensor | None = None
    ) -> dict[str, Tensor]:
        if self.method in HALLUCINATING:
            z_o, z_h, h_map = encode_sharing_stages(self.E_o, self.E_h, batch)
        else:
            z_o = self.E_o(batch)
        out: dict[str, Tensor] = {"z_o": z_o}
        if self.method in STUDENT_ONLY:
            out["deploy_logits"] = self._logits(self.H, z_o)
        if self.method == "ordinary_only":
            return out
        mask = self.privileged_mask(batch) if has_privileged is None else has_privileged
        if mask is not None:
            mask = mask.reshape(-1).to(device=z_o.device, dtype=torch.bool)
            if mask.shape[0] != z_o.shape[0]:
                raise ValueError(f"has_privileged has {mask.shape[0]} rows, batch {z_o.shape[0]}")
            out["has_privileged"] = mask
        if self.method == "imputation":
            return self._imputation_forward(batch, z_o, mask, out)
        z_p = as_map_like(self._encode_privileged(batch, mask), z_o)
        fusion, head = self.teacher_parts
        out["z_p"] = z_p
        if self.method == "logit_kd":
            out["teacher_logits"] = self._logits(head, fusion(self.T_o(batch), z_p))
            return out
        z_o_teacher = z_o.detach() if self.cfg.teacher_detach_ordinary else z_o
        out["teacher_logits"] = self._logits(head, fusion(z_o_teacher, z_p))
        if self.method == "full_multimodal":
            out["deploy_logits"] = out["teacher_logits"]
            return out
        out["z_h"] = z_h
        out["deploy_logits"] = self._logits(self.H, self.F(z_o, z_h))
        out["priv_logits"] = self._logits(self.H_p, z_p)
        out["priv_logits_h"] = self._logits(self.H_p, z_h)
        if self.recon_per_pixel:
            out["recon"] = self.D_h(z_h).permute(0, 3, 1, 2).flatten(1)
            size = (z_h.shape[1], z_h.shape[2])
        elif self.recon_dense:
            out["recon"] = self.D_h(h_map).flatten(1)
            size = (h_map.shape[2], h_map.shape[3])
        else:
            pooled = z_h if z_h.dim() == 2 else z_h.mean(dim=(1, 2))
            out["recon"], size = self.D_h(pooled), None
        with torch.no_grad():
            target = self.privileged_target(batch, size, mask)
            # Rows without their privileged inputs may hold anything (NaN); they are masked
            # out of the loss, and must not carry a NaN into it.
            out["recon_target"] = target if mask is None else torch.where(mask[:, None], target, 0)
        return out

    def _imputation_forward(
        self,
        batch: Mapping[str, Tensor],
        z_o: Tensor,
        mask: Tensor | None,
        out: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """G reconstructs the privileged inputs; E_p, F and H run on the reconstruction."""
        imputed = self.G(batch)
        flat = torch.cat([imputed[s.name].flatten(1) for s in self.privileged], dim=1)
        out["imputed"] = flat
        with torch.no_grad():
            target = torch.cat(
                [t.flatten(1) for t in self.G.normalised_target(batch).values()], dim=1
            )
            out["imputed_target"] = (
                target if mask is None else torch.where(mask[:, None], target, 0)
            )
        z_p = as_map_like(self.E_p(self.G.to_raw(imputed)), z_o)
        out["z_p"] = z_p
        out["deploy_logits"] = self._logits(self.H, self.F(z_o, z_p))
        return out

    def _logits(self, head: nn.Module, features: Tensor) -> Tensor:
        """``head`` on dropped-out features, as logits (:func:`dense_logits`)."""
        return dense_logits(head(self.dropout(features)), self.output_size)

    def deploy_module(self) -> DeployNet:
        """The deployment network around this model's own modules (no copies, no E_p for
        osmd): training it trains the model, and its state dict is what gets exported."""
        parts = {name: getattr(self, name) for name in _deploy_part_names(self.method)}
        inputs = _deploy_inputs(self.method, self.ordinary, self.privileged)
        return DeployNet(self.method, parts, inputs, self.cfg.dropout, self.output_size)


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


def _pooled_size(spec: ModalitySpec, size: int) -> int:
    """Length of one privileged modality's flattened reconstruction target."""
    channels, *rest = spec.shape
    if spec.kind == "image":
        return channels * size * size
    if spec.kind == "sequence":
        return channels * size
    return int(torch.Size(spec.shape).numel())


def _role_specs(manifest, names: Sequence[str], role: str) -> list[ModalitySpec]:
    missing = [n for n in names if n not in manifest.modalities]
    if missing:
        raise ValueError(
            f"data.{role} names {missing}, which the dataset does not have "
            f"(modalities: {sorted(manifest.modalities)})"
        )
    return [manifest.modalities[n] for n in names]


def build_model(cfg: Config, manifest) -> OSMDModel:
    """The model of ``cfg.method`` for a dataset's manifest.

    Uses ``manifest.modalities[name]`` (ModalitySpec) for the configured roles,
    ``manifest.num_classes``, the ``manifest.normalization`` of the roles' modalities, and
    ``manifest.task`` with ``manifest.label_shape`` (segmentation: the label maps' H x W).
    ordinary_only ignores (and does not require) the privileged modalities.
    """
    ordinary = _role_specs(manifest, cfg.data.ordinary, "ordinary")
    privileged = (
        []
        if cfg.method == "ordinary_only"
        else _role_specs(manifest, cfg.data.privileged, "privileged")
    )
    stats = manifest.normalization
    if stats is not None:
        names = {s.name for s in ordinary + privileged}
        stats = {name: v for name, v in stats.items() if name in names}
    output_size = tuple(manifest.label_shape) if manifest.task == "segmentation" else None
    return OSMDModel(
        cfg.method, ordinary, privileged, manifest.num_classes, cfg.model, stats, output_size
    )
