"""Export and load the deployment model (DESIGN §2 "Deployment model", §5 ``deploy/``).

An export is a folder with two files:

- ``model.safetensors``: the :class:`~osmd_ray.blocks.nets.DeployNet` state dict, CPU,
  floating tensors in fp32. safetensors holds raw tensors only, so loading executes no code
  (never ``torch.load`` of a pickle);
- ``meta.json``: format version, package version, method, task (and for segmentation the
  ``label_shape`` H x W of the label maps it predicts), classes, the input modality
  specs (the ordinary modalities only, unless the method deploys privileged ones), the model
  config, the inputs' normalisation statistics, the sha256 of ``model.safetensors`` and free-form
  ``extra`` metadata; ``sha256["meta.json"]`` is the digest of meta.json's own content (all
  of it but that entry), so an edited meta.json is detected too.

:func:`load_deploy` rebuilds the network from ``meta.json`` (without any privileged encoder
except for full_multimodal and imputation, whose E_p reads real or reconstructed privileged
inputs), checks the checksums and loads the weights strictly.

Only finite weights are exported or loaded: a diverged model (NaN or inf in any tensor) is
refused on both sides. The checksums detect accidental changes and corruption; they are no
signature: whoever can rewrite both files can make a consistent pair (safetensors still keeps
such a pair from executing code).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from osmd_ray import storage
from osmd_ray.blocks.encoders import Normalization, resolve_normalization
from osmd_ray.blocks.nets import DeployNet, TrainingNet
from osmd_ray.config import ModelConfig
from osmd_ray.data.schema import ModalitySpec
from osmd_ray.errors import ConfigError, DeployError
from osmd_ray.methods import build_deploy_net, get_method
from osmd_ray.version import __version__

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
# How many names of non-finite tensors an error message lists.
_NAMES_SHOWN = 5


def _spec_to_json(spec: ModalitySpec) -> dict[str, Any]:
    return {"name": spec.name, "kind": spec.kind, "shape": list(spec.shape), "dtype": spec.dtype}


def _spec_from_json(data: Mapping[str, Any]) -> ModalitySpec:
    return ModalitySpec(
        name=data["name"], kind=data["kind"], shape=tuple(data["shape"]), dtype=data["dtype"]
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _meta_digest(meta: Mapping[str, Any]) -> str:
    """sha256 of meta.json's content without its own digest entry, in a canonical JSON form,
    so re-indenting the file changes nothing but any edited value does."""
    content = dict(meta)
    content["sha256"] = {k: v for k, v in dict(meta.get("sha256") or {}).items() if k != META_FILE}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _meta_digest_or_none(meta: Mapping[str, Any]) -> str | None:
    """The digest, or None for content no export writes (NaN, values JSON cannot hold)."""
    try:
        return _meta_digest(meta)
    except (TypeError, ValueError):
        return None


def nonfinite_tensors(state: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating tensors of a state dict that hold NaN or inf."""
    return [
        name
        for name, tensor in state.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def _describe_names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cpu_state(net: DeployNet) -> dict[str, Tensor]:
    """Contiguous CPU tensors, floating ones in fp32 (bf16 engines export fp32 weights).

    Cloned: shared modules (E_h's stages taken from E_o) appear under two keys, and
    safetensors refuses tensors that share memory.
    """
    state: dict[str, Tensor] = {}
    for key, value in net.state_dict().items():
        tensor = value.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        state[key] = tensor.contiguous().clone()
    return state


def _check_export_args(
    model: TrainingNet,
    method: str,
    ordinary: Sequence[ModalitySpec],
    privileged: Sequence[ModalitySpec],
    num_classes: int,
    model_cfg: ModelConfig,
    class_names: Sequence[str] | None,
) -> None:
    """The metadata must describe the model being exported, or the export would not load."""
    problems = []
    if model.method != method:
        problems.append(f"method {method!r} but the model is {model.method!r}")

    def as_json(specs: Sequence[ModalitySpec]) -> list[dict[str, Any]]:
        return [_spec_to_json(s) for s in specs]

    if as_json(ordinary) != as_json(model.ordinary):
        problems.append(f"ordinary {[s.name for s in ordinary]} differs from the model's")
    privileged_specs = get_method(method).deploy.privileged_specs
    if privileged_specs and as_json(privileged) != as_json(model.privileged):
        problems.append(f"privileged {[s.name for s in privileged]} differs from the model's")
    if num_classes != model.num_classes:
        problems.append(f"num_classes {num_classes} but the model has {model.num_classes}")
    if dataclasses.asdict(model_cfg) != dataclasses.asdict(model.cfg):
        problems.append("model_cfg differs from the config the model was built with")
    if class_names is not None and len(class_names) != num_classes:
        problems.append(f"{len(class_names)} class names for {num_classes} classes")
    if problems:
        raise ValueError("export_deploy: " + "; ".join(problems))


def _replaceable(path: Path) -> bool:
    """Only an earlier export (or an empty folder) may be replaced, never unrelated files."""
    return path.is_dir() and ((path / META_FILE).is_file() or not any(path.iterdir()))


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``; the previous export is moved aside only
    now that the new one is complete, and restored if the final rename fails."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_task(model: TrainingNet, task: str) -> None:
    """A segmentation export needs a model built for label maps, and vice versa."""
    if (task == "segmentation") != (model.output_size is not None):
        raise ValueError(
            f"export_deploy: task {task!r} but the model was built "
            + ("for label maps" if model.output_size is not None else "for classification")
        )


def _checked_normalization(
    model: TrainingNet, normalization: Normalization | None
) -> dict[str, Any]:
    """The statistics to record, which must be those the model normalises its inputs with.

    A network built from the privileged specs (E_p) normalises privileged-shaped inputs, real
    or reconstructed: their statistics are kept.
    """
    privileged_specs = model.plan.privileged_specs
    built_from = list(model.ordinary) + (list(model.privileged) if privileged_specs else [])
    stats = resolve_normalization(built_from, normalization)
    for name, values in stats.items():
        built = model.normalization[name]
        if not (
            np.allclose(values["mean"], built["mean"]) and np.allclose(values["std"], built["std"])
        ):
            raise ValueError(
                f"export_deploy: normalization of {name!r} differs from the model's own"
            )
    return stats


def _export_meta(
    model: TrainingNet,
    net: DeployNet,
    *,
    method: str,
    ordinary: Sequence[ModalitySpec],
    privileged: Sequence[ModalitySpec],
    num_classes: int,
    model_cfg: ModelConfig,
    stats: dict[str, Any],
    task: str,
    class_names: Sequence[str] | None,
    extra_meta: dict | None,
) -> dict[str, Any]:
    """meta.json's content, its ``sha256`` still empty."""
    privileged_specs = model.plan.privileged_specs
    return {
        "format_version": FORMAT_VERSION,
        "osmd_ray_version": __version__,
        "method": method,
        "task": task,
        "label_shape": list(model.output_size or ()),
        "num_classes": num_classes,
        "class_names": list(class_names) if class_names is not None else None,
        "ordinary": [_spec_to_json(s) for s in ordinary],
        # Only a network that reads them (the non-deployable upper bound) takes privileged
        # inputs; one that reconstructs them needs their specs to rebuild E_p, not their values.
        "privileged": [_spec_to_json(s) for s in privileged] if privileged_specs else [],
        "input_modalities": [s.name for s in net.input_modalities],
        "model_config": dataclasses.asdict(model_cfg),
        "normalization": stats,
        "sha256": {},
        "extra": dict(extra_meta or {}),
    }


def _finite_state(net: DeployNet) -> dict[str, Tensor]:
    """:func:`_cpu_state`, refused if any tensor holds NaN or inf."""
    state = _cpu_state(net)
    bad = nonfinite_tensors(state)
    if bad:
        # A diverged model must never replace a good export (DESIGN §5, issue 8).
        raise ValueError(
            f"export_deploy: refusing to export non-finite weights: {len(bad)} tensor(s) hold "
            f"NaN or inf ({_describe_names(bad)}); the training diverged, so resume from an "
            "earlier checkpoint with a lower train.lr"
        )
    return state


def _write_export(state: dict[str, Tensor], meta: dict[str, Any], out: Path) -> None:
    """Write both files into a temporary sibling folder of ``out``, then swap it into place;
    the temporary folder is removed if anything fails."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; an export is meant to be shared
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _fsync(tmp / WEIGHTS_FILE)
        meta["sha256"][WEIGHTS_FILE] = _sha256(tmp / WEIGHTS_FILE)
        # The digest is taken of what a reader will parse back, e.g. tuples as lists.
        meta["sha256"][META_FILE] = _meta_digest(json.loads(json.dumps(meta)))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _fsync(tmp / META_FILE)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_deploy(
    model: TrainingNet,
    out_dir: str,
    *,
    method: str,
    ordinary: list[ModalitySpec],
    privileged: list[ModalitySpec],
    num_classes: int,
    model_cfg: ModelConfig,
    normalization: Normalization | None,
    task: str = "classification",
    class_names: Sequence[str] | None = None,
    extra_meta: dict | None = None,
) -> None:
    """Write the deployment model of ``model`` to the local folder ``out_dir`` atomically.

    Both files are written into a temporary sibling folder that then replaces ``out_dir``; an
    existing export there stays intact until the new one is complete. ``out_dir`` must be
    absent, empty or an earlier export.
    """
    _check_export_args(model, method, ordinary, privileged, num_classes, model_cfg, class_names)
    _check_task(model, task)
    net = model.deploy_module()
    meta = _export_meta(
        model,
        net,
        method=method,
        ordinary=ordinary,
        privileged=privileged,
        num_classes=num_classes,
        model_cfg=model_cfg,
        stats=_checked_normalization(model, normalization),
        task=task,
        class_names=class_names,
        extra_meta=extra_meta,
    )
    json.dumps(meta)  # fail on non-JSON extra_meta before touching the disk

    out = Path(out_dir)
    if out.exists() and not _replaceable(out):
        raise FileExistsError(f"{out} exists and is not a deployment export; not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_export(_finite_state(net), meta, out)


class DeployedModel:
    """A loaded deployment model: numpy (or tensor) batches in, class probabilities out
    (per image, or per pixel for segmentation: ``task`` and ``label_shape``).

    Attributes: ``net`` (the :class:`DeployNet`, CPU, eval mode), ``meta`` (meta.json) and
    ``input_modalities`` (the ModalitySpecs it needs; other keys of a batch are ignored).
    """

    def __init__(self, net: DeployNet, meta: dict[str, Any]) -> None:
        self.net = net
        self.meta = meta
        self.input_modalities: tuple[ModalitySpec, ...] = net.input_modalities

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def class_names(self) -> list[str] | None:
        return self.meta.get("class_names")

    @property
    def task(self) -> str:
        return str(self.meta.get("task", "classification"))

    @property
    def label_shape(self) -> tuple[int, ...]:
        """(H, W) of the predicted label maps for segmentation, () for classification."""
        return tuple(int(v) for v in self.meta.get("label_shape") or ())

    def _inputs(self, batch: Mapping[str, np.ndarray | Tensor]) -> tuple[dict[str, Tensor], int]:
        tensors: dict[str, Tensor] = {}
        rows: int | None = None
        for spec in self.input_modalities:
            expected = f"(N, {', '.join(str(d) for d in spec.shape)})"
            if spec.name not in batch:
                raise DeployError(
                    f"missing input modality {spec.name!r} (expected shape {expected}); "
                    f"the model needs {[s.name for s in self.input_modalities]}"
                )
            value = batch[spec.name]
            if isinstance(value, Tensor):
                tensor = value.detach().cpu()
            else:
                tensor = torch.from_numpy(np.ascontiguousarray(np.asarray(value)))
            if tuple(tensor.shape[1:]) != tuple(spec.shape) or tensor.dim() != len(spec.shape) + 1:
                raise DeployError(
                    f"modality {spec.name!r}: expected shape {expected}, got {tuple(tensor.shape)}"
                )
            if rows is not None and tensor.shape[0] != rows:
                raise DeployError(
                    f"modality {spec.name!r} has {tensor.shape[0]} rows, the others {rows}"
                )
            rows = tensor.shape[0]
            tensors[spec.name] = tensor
        return tensors, int(rows or 0)

    def _per_chunk(
        self, batch: Mapping[str, np.ndarray | Tensor], batch_size: int, fn: Any
    ) -> list[np.ndarray]:
        """``fn(logits)`` of every ``batch_size`` rows, as numpy arrays."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        inputs, rows = self._inputs(batch)
        chunks = []
        with torch.inference_mode():
            for start in range(0, rows, batch_size):
                part = {k: v[start : start + batch_size] for k, v in inputs.items()}
                chunks.append(fn(self.net(part).float()).numpy())
        return chunks

    def predict_proba(
        self, batch: Mapping[str, np.ndarray | Tensor], batch_size: int = 256
    ) -> np.ndarray:
        """Softmax probabilities (N, num_classes) float32, or (N, num_classes, H, W) per
        pixel for segmentation, ``batch_size`` rows at a time."""
        chunks = self._per_chunk(batch, batch_size, lambda logits: torch.softmax(logits, dim=1))
        if not chunks:
            return np.zeros((0, self.num_classes, *self.label_shape), dtype=np.float32)
        return np.concatenate(chunks, axis=0)

    def predict(
        self, batch: Mapping[str, np.ndarray | Tensor], batch_size: int = 256
    ) -> np.ndarray:
        """Predicted class indices, (N,) int64, or a label map per image (N, H, W) int64 for
        segmentation (computed per chunk: the per-pixel probabilities are never all held)."""
        chunks = self._per_chunk(batch, batch_size, lambda logits: logits.argmax(dim=1))
        if not chunks:
            return np.zeros((0, *self.label_shape), dtype=np.int64)
        return np.concatenate(chunks, axis=0).astype(np.int64)


def _model_config(data: Mapping[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        # A newer package wrote fields this one does not know: guessing could build another net.
        raise DeployError(f"meta.json model_config has unknown fields {unknown}; upgrade osmd_ray")
    # The export's weights are the whole network: model.pretrained only initialised training,
    # and serving must not need (or read) that file.
    return dataclasses.replace(ModelConfig(**data), pretrained="")


def load_deploy(path: str) -> DeployedModel:
    """Load an export written by :func:`export_deploy` onto the CPU, in eval mode.

    Raises :class:`DeployError` when meta.json is missing, malformed or edited after the
    export, when model.safetensors does not match the checksum in meta.json, when the weights
    do not fit the network the metadata describes or hold NaN or inf. Nothing is built from
    meta.json before its digest is checked. Exports written before meta.json carried its own
    digest load without that check.

    ``path`` may be an ``s3://`` URI: the export is downloaded to a temporary folder first.
    """

    if storage.is_remote(path):
        try:
            with storage.local_copy(path, prefix="osmd-deploy-") as local:
                return _load_local(local)
        except FileNotFoundError as err:
            raise DeployError(f"{path}: no deployment export there ({err})") from err
    return _load_local(path)


def _load_local(path: str) -> DeployedModel:
    root = Path(path)
    meta_path, weights_path = root / META_FILE, root / WEIGHTS_FILE
    if not meta_path.is_file():
        raise DeployError(f"{meta_path} not found: {root} is not a deployment export")
    if not weights_path.is_file():
        raise DeployError(f"{weights_path} not found: the export is incomplete")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise DeployError(f"{meta_path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise DeployError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DeployError(
            f"{meta_path}: format_version {meta.get('format_version')!r}, this osmd_ray reads "
            f"{FORMAT_VERSION}"
        )
    if not isinstance(meta.get("sha256"), dict):
        raise DeployError(f"{meta_path} lacks the field 'sha256' (the files' checksums)")
    recorded = meta["sha256"].get(META_FILE)
    if recorded is not None and recorded != _meta_digest_or_none(meta):
        raise DeployError(
            f"{meta_path} was modified after export: its content no longer matches the digest "
            "it recorded; export the model again from its run"
        )
    try:
        expected = meta["sha256"][WEIGHTS_FILE]
        actual = _sha256(weights_path)
        if actual != expected:
            raise DeployError(
                f"{weights_path} was modified after export: its sha256 {actual} differs from "
                f"{expected} recorded in meta.json"
            )
        net = build_deploy_net(
            meta["method"],
            [_spec_from_json(s) for s in meta["ordinary"]],
            [_spec_from_json(s) for s in meta["privileged"]],
            int(meta["num_classes"]),
            _model_config(meta["model_config"]),
            meta["normalization"],
            tuple(meta["label_shape"]) if meta.get("label_shape") else None,
        )
    except KeyError as err:
        raise DeployError(f"{meta_path} lacks the field {err}") from err
    except ConfigError as err:  # a method this version of the package does not know
        raise DeployError(f"{meta_path} names an unknown method: {err}") from err
    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise DeployError(f"{weights_path} is not a readable safetensors file: {err}") from err
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as err:
        raise DeployError(f"{weights_path} does not fit the network in meta.json: {err}") from err
    bad = nonfinite_tensors(state)
    if bad:
        raise DeployError(
            f"{weights_path} holds NaN or inf in {len(bad)} tensor(s) ({_describe_names(bad)}); "
            "it cannot predict anything"
        )
    net.eval()
    return DeployedModel(net, meta)
