"""Write lab segmentation scenes whose classes are 3-D shapes (dome, cone, flat disc).

A probe of issue 4 (docs/lab_log.md, "Segmentation", ninth round), not a shipped dataset. On
the default scenes (`osmd data synth --task segmentation`) a pixel's label is the depth band
of its surface, so the label maps already say what depth would teach. Here every object has
a circular silhouette, and its class is its 3-D profile, which depth shows directly and RGB
only through Lambertian shading under a random light from the front (with a near-frontal
light, a cone and a disc shade almost alike). So depth varies within an object where its
label does not. Per scene: three objects at depths in [3, 4) over a background at 6, radius
0.12 to 0.28 of the side, profile height 0.6 to 1.0 of the radius (a dome is a half
ellipsoid, a cone is linear, a disc is flat and faces the camera); random albedo, ambient
light and a smooth illumination field; antialiased rims are unlabelled.

    .venv/bin/python benchmarks/shapes_seg.py --out data/shapes_seg
    .venv/bin/python benchmarks/method_lab.py --threads 1 --config configs/osmd_synth_seg.yaml \\
        data.root=data/shapes_seg seed=0 [overrides]
"""

from __future__ import annotations

import argparse

import numpy as np

from osmd_ray.data.scenes import hue_to_rgb, illumination
from osmd_ray.data.schema import IGNORE_INDEX
from osmd_ray.data.writer import write_dataset

CLASS_NAMES = ["background", "dome", "cone", "disc"]
BACKGROUND_DEPTH = 6.0
OBJECTS = 3


def _profile(kind: np.ndarray, rho: np.ndarray, height: np.ndarray):
    """Height toward the camera (in radius units) and its radial slope, per pixel."""
    dome = height * np.sqrt(np.clip(1 - rho**2, 0, None))
    dome_slope = -height * rho / np.sqrt(np.clip(1 - rho**2, 1e-3, None))
    cone, cone_slope = height * (1 - rho), -height * np.ones_like(rho)
    z = np.where(kind == 1, dome, np.where(kind == 2, cone, 0.0))
    slope = np.where(kind == 1, dome_slope, np.where(kind == 2, cone_slope, 0.0))
    return z, np.clip(slope, -4, 4)


def render(rng: np.random.Generator, n: int, size: int) -> dict[str, np.ndarray]:
    k = OBJECTS
    d0 = -np.sort(-rng.uniform(3.0, 4.0, size=(n, k)), axis=1)  # far to near: painter's order
    kind = rng.integers(1, 4, size=(n, k))
    radius = rng.uniform(0.12, 0.28, size=(n, k)) * size
    centre = rng.uniform(0.1 * size, 0.9 * size, size=(n, k, 2))
    aspect = rng.uniform(0.6, 1.0, size=(n, k))
    phi = rng.uniform(0, 2 * np.pi, size=n)
    lateral = rng.uniform(0.0, 0.8, size=n)
    light = np.stack([lateral * np.cos(phi), lateral * np.sin(phi), np.sqrt(1 - lateral**2)], 1)
    ambient = rng.uniform(0.2, 0.4, size=n)
    sat = rng.uniform(0.3, 0.8, size=(n, k))
    val = rng.uniform(0.6, 1.0, size=(n, k))
    hue = hue_to_rgb(rng.uniform(size=(n, k)))
    albedo = val[..., None] * (sat[..., None] * hue + (1 - sat[..., None]))
    bg_albedo = rng.uniform(0.3, 0.9, size=(n, 3))
    bg_shade = ambient + (1 - ambient) * light[:, 2]
    colour = (bg_albedo * bg_shade[:, None])[:, :, None, None]
    colour = np.broadcast_to(colour, (n, 3, size, size)).copy()
    depth = np.full((n, 1, size, size), BACKGROUND_DEPTH)
    label = np.zeros((n, size, size), dtype=np.int64)
    rim = np.zeros((n, size, size), dtype=bool)
    coords = np.arange(size) + 0.5
    lx, ly, lz = (light[:, i, None, None] for i in range(3))
    amb = ambient[:, None, None]
    for j in range(k):
        dy = coords[None, :, None] - centre[:, j, 0, None, None]
        dx = coords[None, None, :] - centre[:, j, 1, None, None]
        r = radius[:, j, None, None]
        dist = np.sqrt(dy**2 + dx**2)
        kd = kind[:, j, None, None]
        z, slope = _profile(kd, np.clip(dist / r, 0, 1), aspect[:, j, None, None])
        ux, uy = dx / np.maximum(dist, 1e-6), dy / np.maximum(dist, 1e-6)
        nx, ny = -slope * ux, -slope * uy
        lambert = (nx * lx + ny * ly + lz) / np.sqrt(nx**2 + ny**2 + 1)
        shade = amb + (1 - amb) * np.clip(lambert, 0, None)
        alpha = np.clip(r - dist + 0.5, 0.0, 1.0)
        a = alpha[:, None]
        colour = a * (albedo[:, j, :, None, None] * shade[:, None]) + (1 - a) * colour
        inside = alpha >= 0.5
        depth[:, 0] = np.where(inside, d0[:, j, None, None] - z, depth[:, 0])
        label = np.where(inside, kd, label)
        rim = np.where((alpha > 0.25) & (alpha < 0.75), True, rim & ~(alpha >= 0.75))
    rgb = colour * illumination(rng, n, size) + rng.normal(0.0, 0.02, size=colour.shape)
    depth = depth + rng.normal(0.0, 0.02, size=depth.shape)
    label[rim] = IGNORE_INDEX
    return {
        "rgb": np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8),
        "depth": depth.astype(np.float32),
        "label": label,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="dataset folder")
    parser.add_argument("--train", type=int, default=1000, help="training scenes (default 1000)")
    parser.add_argument("--val", type=int, default=500, help="validation scenes (default 500)")
    parser.add_argument("--test", type=int, default=1000, help="test scenes (default 1000)")
    parser.add_argument("--size", type=int, default=32, help="image side (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    args = parser.parse_args()
    counts = {"train": args.train, "val": args.val, "test": args.test}
    children = np.random.SeedSequence(args.seed).spawn(3)
    splits = {
        name: render(np.random.default_rng(child), n, args.size)
        for (name, n), child in zip(counts.items(), children, strict=True)
    }
    write_dataset(
        args.out,
        splits,
        task="segmentation",
        num_classes=len(CLASS_NAMES),
        class_names=CLASS_NAMES,
        description=__doc__.split("\n")[0],
        overwrite=True,
        progress=False,
    )
    print(f"wrote {args.out}: {counts}")


if __name__ == "__main__":
    main()
