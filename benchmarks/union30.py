"""A real labelled set with K = 30 from three that install offline: MNIST-5k's digits (classes 0-9),
animal-mnist's silhouettes (10-19) and Fashion-MNIST's test garments (20-29), N per class each (seeded
draw), written as shards for the protocol (the built-in sets all have K <= 10):

    python benchmarks/union30.py --per-class 500 --out data/union30     # 15,000 images
    python benchmarks/union30.py --per-class 10 --out data/union30s     # 300 images: 10 per cluster
    python benchmarks/protocol.py --config demo_digits_lite0 --seeds 3 --tag u30 \\
        data.root=data/union30 data.prepare= data.name=union30 head.num_clusters=30

Within each source the classes are as hard as in the source; across sources they are easy, so this
measures the recipe at K = 30 and, with few images per class, with clusters smaller than the
neighbour lists (docs/RESULTS.md, "Many clusters on real images").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from scp_dist.shards.sources import (
    ANIMAL_CLASSES,
    FASHION_MNIST_DIR,
    _animal_arrays,
    _find,
    _mnist5k_arrays,
    array_samples,
    read_idx,
)
from scp_dist.shards.writer import write_shards


def per_class(images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    keep = np.concatenate([rng.choice(np.flatnonzero(labels == c), n, replace=False) for c in np.unique(labels)])
    return images[keep], labels[keep]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, required=True, help="images per class (at most 500)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    digits = per_class(*_mnist5k_arrays(), args.per_class, rng)
    animals = per_class(*_animal_arrays(), args.per_class, rng)
    garments = per_class(read_idx(_find(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte")),
                         read_idx(_find(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte")).astype(np.int64), args.per_class, rng)
    images = np.concatenate([digits[0], animals[0], garments[0]])
    labels = np.concatenate([digits[1], animals[1] + 10, garments[1] + 20])
    classes = [f"digit{c}" for c in range(10)] + ANIMAL_CLASSES + [f"fashion{c}" for c in range(10)]
    m = write_shards(array_samples(images, labels, "u30"), Path(args.out) / "train",
                     source=f"union30 per_class={args.per_class} seed={args.seed}", split="train", classes=classes,
                     max_count=2000, total=len(images), progress=False, seed=args.seed)
    print(f"{m.num_samples} images, {len(classes)} classes -> {args.out}/train")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
