"""Train the product's own OS-MD model in one process, without Ray or DeepSpeed.

A fast bench for method work (DESIGN §10, issue 3): the Ray Train workers' own
``build_model``, ``batch_losses``, optimiser, cosine schedule and ``evaluate``, with the whole
dataset in memory. One process with global batch ``data.batch_size x scaling.num_workers``
stands in for the workers' data-parallel steps (the (J)MMD term then sees the whole global
batch instead of one rank's share, a small difference). Prints, as one JSON line per run,
the deployment path's (and the teacher path's) test accuracy and the deployment path's
accuracy on the training split (``train_deploy``); for a segmentation dataset, mIoU instead
(ignore index excluded), as the workers compute it.

Example::

    python benchmarks/method_lab.py --config configs/osmd_synth.yaml method=ordinary_only
    python benchmarks/method_lab.py --config configs/osmd_synth.yaml loss.w_mimic=1 seed=1

Results: docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from osmd_ray.config import load_config
from osmd_ray.data.reading import read_split_numpy
from osmd_ray.data.schema import read_manifest
from osmd_ray.method.model import build_model
from osmd_ray.method.stages import (
    method_stages,
    part_parameter_groups,
    recalibrate_batchnorm,
    set_stage_modes,
    stage_at_epoch,
)
from osmd_ray.train.loop import batch_losses, build_optimizer, evaluate, lr_schedule


def _tensors(split: dict[str, np.ndarray], names: list[str]) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(np.ascontiguousarray(split[n])) for n in names}


def _evaluate(model, data: dict[str, torch.Tensor], cfg, manifest, batch: int = 512) -> dict:
    """Every path's scores on one split, by the workers' own ``evaluate`` (one pass over the
    split; accuracy, or mIoU and pixel accuracy for segmentation, ignore index excluded)."""
    n = data["label"].shape[0]
    chunks = ({k: v[i : i + batch] for k, v in data.items()} for i in range(0, n, batch))
    return evaluate(model, chunks, cfg.method, torch.device("cpu"), manifest)


def run(config: str, overrides: list[str]) -> dict:
    cfg = load_config(config, overrides)
    torch.manual_seed(cfg.seed)
    manifest = read_manifest(cfg.data.root)
    names = list(dict.fromkeys(cfg.data.ordinary + cfg.data.privileged + ["label"]))
    splits = {
        s: _tensors(read_split_numpy(cfg.data.root, s, names, manifest=manifest), names)
        for s in ("train", "val", "test")
    }
    model = build_model(cfg, manifest)
    parts, groups = part_parameter_groups(model)
    opt = build_optimizer(groups, cfg)
    batch = cfg.data.batch_size * cfg.scaling.num_workers
    n = splits["train"]["label"].shape[0]
    steps_per_epoch = n // batch
    stages = method_stages(cfg)
    # The workers' own schedule: n // workers rows per worker gives the same steps per epoch.
    sched = lr_schedule(opt, cfg, n // cfg.scaling.num_workers, parts)
    gen = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        stage = stage_at_epoch(stages, epoch)
        set_stage_modes(model, stage)
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            b = {k: v[idx] for k, v in splits["train"].items()}
            losses = batch_losses(
                model(b), b, cfg, terms=stage.terms, ignore_index=manifest.ignore_index
            )
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
        # As the workers do after every epoch (train.bn_recalibration_batches).
        last = range(max(0, steps_per_epoch - cfg.train.bn_recalibration_batches), steps_per_epoch)
        recalibrate_batchnorm(
            model,
            model,
            (
                {k: v[order[i * batch : (i + 1) * batch]] for k, v in splits["train"].items()}
                for i in last
            ),
        )
    train_s = round(time.perf_counter() - started, 1)
    metric = "miou" if manifest.task == "segmentation" else "accuracy"
    test = _evaluate(model, splits["test"], cfg, manifest)
    result = {
        "overrides": overrides,
        "method": cfg.method,
        "seed": cfg.seed,
        "metric": metric,
        "test_deploy": test["deploy"][metric],
        "val_deploy": _evaluate(model, splits["val"], cfg, manifest)["deploy"][metric],
        "train_s": train_s,
        # On the training split: tells under-fitting (too few steps) from over-fitting.
        "train_deploy": _evaluate(model, splits["train"], cfg, manifest)["deploy"][metric],
    }
    if "teacher" in test:
        result["test_teacher"] = test["teacher"][metric]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/osmd_synth.yaml")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(run(args.config, args.overrides)), flush=True)


if __name__ == "__main__":
    main()
