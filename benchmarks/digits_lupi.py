"""Write scikit-learn's handwritten digits as NPZ files for osmd data import (lowres/highres).

A real data set we did not design, with a privileged view (issue 3: "a win must also show
on data imported with osmd data import").

The 1797 digits (UCI, 8x8 pixels, 17 grey levels) ship inside scikit-learn, so nothing is
downloaded. The task follows the classic learning-using-privileged-information setting
(Vapnik & Vashist 2009 used 10x10 MNIST in the field and 28x28 in the lab; Lopez-Paz et al.
2016, 7x7 against 28x28): the **ordinary** modality ``lowres`` is the image averaged over
2x2 blocks (4x4 = 16 values, a coarse field sensor), the **privileged** ``highres`` is the
full 8x8 image (64 values), both as vectors in [0, 1]. A stratified, seeded split keeps
``--train`` digits for training (``osmd data import`` carves validation from them) and the
rest for testing.

scikit-learn is not a dependency of osmd_ray; install it where you run this::

    .venv/bin/pip install scikit-learn
    .venv/bin/python benchmarks/digits_lupi.py --out /tmp/digits --train 600
    .venv/bin/osmd data import --out data/digits600 \\
        --train /tmp/digits/train.npz --test /tmp/digits/test.npz

Results and the compare command: docs/lab_log.md ("Eighth round").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for train.npz, test.npz")
    parser.add_argument("--train", type=int, default=600, help="training digits (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    args = parser.parse_args()
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        hint = "this script needs scikit-learn: .venv/bin/pip install scikit-learn"
        raise SystemExit(hint) from err

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (N, 8, 8), grey levels 0..16
    lowres = images.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4))  # 2x2 block means: (N, 4, 4)
    train_idx, test_idx = train_test_split(
        np.arange(len(images)),
        train_size=args.train,
        stratify=digits.target,
        random_state=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        np.savez(
            args.out / f"{split}.npz",
            lowres=lowres[idx].reshape(len(idx), 16),
            highres=images[idx].reshape(len(idx), 64),
            label=digits.target[idx].astype(np.int64),
        )
        print(f"{split}: {len(idx)} digits -> {args.out / f'{split}.npz'}")


if __name__ == "__main__":
    main()
