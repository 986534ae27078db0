"""Per-class test IoU of every finished run of a segmentation compare folder.

    .venv/bin/python benchmarks/seg_per_class_iou.py runs/cmp_seg --data data/synth_seg

Loads each run's deployment model (RUN/deploy), predicts the test split from the modalities
the model takes (the ordinary ones; `full_multimodal` also takes the privileged ones) and
prints the IoU of each class and their mean. The mean must equal the run's own
test mIoU in metrics.json (a cross-check of the workers' distributed count); it shows which
class a low mIoU comes from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from osmd_ray import load_deploy
from osmd_ray.blocks.metrics import confusion_matrix, per_class_iou
from osmd_ray.data.reading import read_split_numpy
from osmd_ray.data.schema import read_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compare_dir", help="an `osmd compare` output folder")
    parser.add_argument("--data", required=True, help="the dataset the runs were trained on")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()

    runs = sorted(p.parent for p in Path(args.compare_dir).glob("runs/*/*/seed*/metrics.json"))
    if not runs:
        raise SystemExit(f"{args.compare_dir}: no finished run under runs/*/*/seed*")
    # Read once: every run predicts the same split, from the ordinary modalities (and the
    # privileged ones for full_multimodal), so read them all.
    manifest = read_manifest(args.data)
    arrays = read_split_numpy(args.data, args.split, [*manifest.modalities, "label"], manifest)
    for run in runs:
        model = load_deploy(str(run / "deploy"))
        pred = model.predict({spec.name: arrays[spec.name] for spec in model.input_modalities})
        confusion = confusion_matrix(
            torch.as_tensor(pred), torch.as_tensor(arrays["label"]), model.num_classes
        )
        iou = per_class_iou(confusion)
        recorded = json.loads((run / "metrics.json").read_text())["test"]["deploy"]["miou"]
        classes = " ".join(f"{v:.3f}" for v in iou.tolist())
        print(
            f"{run.relative_to(args.compare_dir)}: IoU per class {classes}; "
            f"mean {iou.nanmean():.4f} (metrics.json {recorded:.4f})"
        )


if __name__ == "__main__":
    main()
