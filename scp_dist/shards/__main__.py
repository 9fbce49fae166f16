"""Write a dataset into shards: `python -m scp_dist.shards <source> [--src PATH] --out DIR`.

Sources: digits, fashion_mnist (built in, no download); cifar10, cifar100, cifar20 (python pickle
batches); stl10 (binary .bin); imagefolder (class-per-folder tree, e.g. ImageNet train/val);
imagenet10, imagenet_dogs (ImageNet subsets by the standard wnid lists); list (a text/CSV file of
image paths, optionally with integer labels). Re-running the same command skips finished shards.

Samples are written in a seeded random order (--seed, default 0), so every shard and every run of
consecutive samples is a uniform random sample of the split: SCP's loss is per batch, and a reader
that goes through the shards in order (DALI's webdataset reader included) then gets honest batches.
"""

from __future__ import annotations

import argparse
import sys

from scp_dist.shards import sources
from scp_dist.shards.converters import CONVERTERS, Converter
from scp_dist.shards.manifest import ShardError

BUILTIN = {"digits": sources.digits, "fashion_mnist": sources.fashion_mnist}


def converter(name: str) -> Converter:
    return BUILTIN.get(name) or CONVERTERS[name]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scp_dist.shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=sorted([*BUILTIN, *CONVERTERS]))
    p.add_argument("--src", default=None, help="the dataset as downloaded (directory or file)")
    p.add_argument("--out", required=True, help="dataset directory; one sub-directory per split is written")
    p.add_argument("--max-count", type=int, default=10_000, help="samples per shard (default 10000)")
    p.add_argument("--max-bytes", type=int, default=0, help="also close a shard after this many image bytes")
    p.add_argument("--no-resume", action="store_true", help="rewrite shards a previous run finished")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample order (default 0)")
    p.add_argument("--no-shuffle", action="store_true",
                   help="keep the source's order (class by class for ImageFolder trees: not for training)")
    args = p.parse_args(argv)
    if args.source not in BUILTIN and not args.src:
        p.error(f"source {args.source!r} needs --src")
    try:
        manifests = converter(args.source)(args.src, args.out, max_count=args.max_count, max_bytes=args.max_bytes,
                                           resume=not args.no_resume, progress=True,
                                           seed=None if args.no_shuffle else args.seed)
    except (ShardError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, m in manifests.items():
        order = f"shuffled (seed {m.order_seed})" if m.order == "shuffled" else "in the source's order"
        print(f"{args.out}/{split}: {m.num_samples} samples in {len(m.shards)} shards, {m.num_classes} classes, "
              f"{order}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
