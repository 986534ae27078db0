"""Measure the headroom of the synthetic RGB-D task (DESIGN §10): plain PyTorch, no Ray.

A benchmark for modality distillation is only informative when (1) ``ordinary_only`` at the
default budget stays well below ``full_multimodal`` and (2) ``ordinary_only`` given far more
data or epochs comes close to it, proving that RGB holds the information. This script trains

- ``ordinary_only``:   RGB -> encoder -> linear head,
- ``full_multimodal``: RGB encoder and depth encoder, concat -> Linear(2d, d) + ReLU -> head,
- ``depth_only``:      depth -> encoder -> linear head (sanity check, should be near 1.0),

on ``osmd_ray.data.synth.generate_classification`` and prints test accuracy per run and the
mean ± std over seeds. The encoder mirrors the product's ``small_cnn`` exactly.

Example (the default budget, three seeds)::

    python benchmarks/headroom.py --train-sizes 3000 --epochs 10 --seeds 0 1 2

Results and commands: docs/headroom.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from torch import nn

from osmd_ray.data.synth import SYNTH_DEFAULTS, generate_classification

MODELS = ("ordinary_only", "full_multimodal", "depth_only")


def small_cnn(c_in: int, width: int = 32, depth: int = 3, feature_dim: int = 128) -> nn.Module:
    """Local mirror of osmd_ray's small_cnn image encoder (keep the two identical)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        w = width * 2**i
        layers += [
            nn.Conv2d(c_in, w, 3, padding=1, stride=1 if i == 0 else 2),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
        ]
        c_in = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, feature_dim), nn.ReLU()]
    return nn.Sequential(*layers)


class Net(nn.Module):
    """One of the three models; ``forward`` takes (rgb, depth) and uses what the model needs."""

    def __init__(self, model: str, num_classes: int, feature_dim: int = 128) -> None:
        super().__init__()
        self.model = model
        if model in ("ordinary_only", "full_multimodal"):
            self.rgb_encoder = small_cnn(3, feature_dim=feature_dim)
        if model in ("depth_only", "full_multimodal"):
            self.depth_encoder = small_cnn(1, feature_dim=feature_dim)
        if model == "full_multimodal":
            self.fusion = nn.Sequential(nn.Linear(2 * feature_dim, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        if self.model == "ordinary_only":
            z = self.rgb_encoder(rgb)
        elif self.model == "depth_only":
            z = self.depth_encoder(depth)
        else:
            z = self.fusion(torch.cat([self.rgb_encoder(rgb), self.depth_encoder(depth)], 1))
        return self.head(z)


def _normalise(
    splits: dict[str, dict[str, np.ndarray]],
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Float tensors normalised per channel with the train split's mean and std."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in splits}
    for key in ("rgb", "depth"):
        train = splits["train"][key].astype(np.float32)
        mean = train.mean(axis=(0, 2, 3), keepdims=True)
        std = train.std(axis=(0, 2, 3), keepdims=True) + 1e-6
        for name, split in splits.items():
            out[name].append(torch.from_numpy((split[key].astype(np.float32) - mean) / std))
    for name, split in splits.items():
        out[name].append(torch.from_numpy(split["label"]))
    return {name: tuple(t) for name, t in out.items()}


@torch.no_grad()
def _accuracy(net: Net, data: tuple[torch.Tensor, ...], batch: int = 512) -> float:
    net.eval()
    rgb, depth, label = data
    correct = 0
    for i in range(0, len(label), batch):
        pred = net(rgb[i : i + batch], depth[i : i + batch]).argmax(1)
        correct += int((pred == label[i : i + batch]).sum())
    return correct / len(label)


def train_one(
    model: str,
    data: dict[str, tuple[torch.Tensor, ...]],
    num_classes: int,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
) -> dict:
    """Train one model with AdamW and return its test/val accuracy and seconds per epoch."""
    torch.manual_seed(seed)
    net = Net(model, num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    rgb, depth, label = data["train"]
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(label), generator=gen)
        for i in range(0, len(label), batch_size):
            idx = order[i : i + batch_size]
            loss = loss_fn(net(rgb[idx], depth[idx]), label[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    # CPU seconds / threads estimates the wall time on an otherwise idle machine; the wall
    # time itself is inflated whenever other processes share the cores.
    cpu_seconds = time.process_time() - cpu_start
    return {
        "test_acc": _accuracy(net, data["test"]),
        "val_acc": _accuracy(net, data["val"]),
        "train_acc": _accuracy(net, data["train"]),
        "sec_per_epoch": seconds / max(epochs, 1),
        "cpu_sec_per_epoch": cpu_seconds / max(epochs, 1),
    }


def _quadrants(x: np.ndarray) -> np.ndarray:
    """(N, S, S) -> (N, 4, S/2 * S/2), quadrants in class order (row-major)."""
    n, s, _ = x.shape
    h = s // 2
    return x.reshape(n, 2, h, 2, h).transpose(0, 1, 3, 2, 4).reshape(n, 4, h * h)


def simple_statistics(split: dict[str, np.ndarray]) -> dict[str, float]:
    """Accuracy of non-learned per-quadrant statistics (argmax over quadrants) on one split.

    The oracle uses the depth map only to find the disc pixels; the quantity it ranks
    (disc chroma over background brightness) is computed from RGB alone.
    """
    rgb = split["rgb"].astype(np.float32) / 255.0
    label = split["label"]
    chroma = _quadrants(rgb.max(1) - rgb.min(1))
    brightness = _quadrants(rgb.mean(1))
    disc = _quadrants(split["depth"][:, 0] < 6.0)
    median = np.median(rgb.reshape(len(rgb), 3, -1), axis=2)[:, :, None, None]
    deviation = _quadrants(np.abs(rgb - median).max(1))
    disc_chroma = (chroma * disc).sum(2) / np.maximum(disc.sum(2), 1)
    background = (brightness * ~disc).sum(2) / np.maximum((~disc).sum(2), 1)
    scores = {
        "oracle_disc_chroma_over_background": disc_chroma / background,
        "most_saturated_pixel": chroma.max(2),
        "most_saturated_pixel_over_brightness": chroma.max(2) / brightness.mean(2),
        "mean_chroma": chroma.mean(2),
        "largest_blob": (deviation > 0.08).sum(2),
        "brightest_quadrant": brightness.mean(2),
    }
    return {k: float((v.argmax(1) == label).mean()) for k, v in scores.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[SYNTH_DEFAULTS["n_train"]])
    parser.add_argument("--epochs", type=int, nargs="+", default=[10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=SYNTH_DEFAULTS["size"])
    parser.add_argument("--n-val", type=int, default=SYNTH_DEFAULTS["n_val"])
    parser.add_argument("--n-test", type=int, default=SYNTH_DEFAULTS["n_test"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="append one JSON line per run to this file")
    parser.add_argument(
        "--stats", action="store_true", help="only print non-learned RGB statistics, no training"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.stats:
        for n_train in args.train_sizes:
            for seed in args.seeds:
                splits, _ = generate_classification(n_train, 0, 0, args.size, seed)
                stats = simple_statistics(splits["train"])
                print(json.dumps(dict(n=n_train, seed=seed, **stats)), flush=True)
        return

    results: dict[tuple, list[dict]] = {}
    for n_train in args.train_sizes:
        for seed in args.seeds:
            # The data seed is the run seed: each seed is a fresh draw of the whole task.
            splits, info = generate_classification(
                n_train, args.n_val, args.n_test, args.size, seed
            )
            data = _normalise(splits)
            for epochs in args.epochs:
                for model in args.models:
                    r = train_one(model, data, info["num_classes"], epochs, seed)
                    row = dict(model=model, n_train=n_train, epochs=epochs, seed=seed, **r)
                    print(json.dumps(row), flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
                    results.setdefault((model, n_train, epochs), []).append(r)

    print("\n| model | n_train | epochs | seeds | test acc (mean ± std) | s/epoch | cpu s/epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (model, n_train, epochs), runs in results.items():
        accs = [r["test_acc"] for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        spe = statistics.mean(r["sec_per_epoch"] for r in runs)
        cpu = statistics.mean(r["cpu_sec_per_epoch"] for r in runs)
        print(
            f"| {model} | {n_train} | {epochs} | {len(runs)} | "
            f"{statistics.mean(accs):.3f} ± {std:.3f} | {spe:.1f} | {cpu:.1f} |"
        )


if __name__ == "__main__":
    main()
