"""How well can K be estimated without labels? Every estimator measured for issue 18, against the true
number of classes of each labelled set (docs/RESULTS.md, "Many clusters on real images"):

- the eigengap of the kNN graph (`scp_dist.estimate_k`, the product's estimate) at graph sizes 5,
  10 (the product's), 20 and 50 neighbours;
- k-means' silhouette (cosine, on a seeded sample of 5,000) and its stability (ARI of two k-means fits
  on two seeded 80% subsamples, twice), each maximised over K;
- with `--runs`: the agreement of a multi-head run's heads (mean pairwise NMI, eval.json's
  head_agreement) across runs of one data set trained at different K, maximised over K.

    python benchmarks/kestimate.py --features digits=RUNS/features/digits-67bc29639b23 ... \\
        [--runs RUNS/m5_K6 RUNS/m5_K10 ...] --out benchmarks/results/kestimate-2026-12-05.json

`--features` takes the feature caches the training runs built (`<output.dir>/features/<name>-<hash>`);
the true K comes from their labels.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

KMIN, KMAX = 2, 40
GRAPH_SIZES = (5, 10, 20, 50)


def kmeans_scores(x: np.ndarray, seed: int = 0) -> tuple[dict[int, float], dict[int, float]]:
    """Per K: the silhouette of k-means' partition, and the ARI between k-means fits on two subsamples."""
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    from scp_dist.faiss_index import normalise
    from scp_dist.kmeans import kmeans_fit, kmeans_predict

    xn = normalise(x)
    sub = np.random.default_rng(seed).choice(len(x), min(len(x), 5000), replace=False)
    sil, stab = {}, {}
    for k in range(KMIN, min(KMAX, len(x) // 5) + 1):
        labels = kmeans_predict(kmeans_fit(xn, k, seed=seed, niter=25, nredo=1), xn)
        sil[k] = float(silhouette_score(xn[sub], labels[sub], metric="cosine"))
        aris = []
        for rep in range(2):
            fits = []
            for half in range(2):
                rows = np.random.default_rng(100 * rep + half + 1).choice(len(x), int(0.8 * len(x)), replace=False)
                fits.append(kmeans_predict(kmeans_fit(xn[rows], k, seed=100 * rep + half, niter=25, nredo=1), xn))
            aris.append(adjusted_rand_score(*fits))
        stab[k] = float(np.mean(aris))
    return sil, stab


def features_row(path: Path) -> dict:
    from scp_dist import estimate_k as E
    from scp_dist.feature_cache import load_kind

    t0 = time.perf_counter()
    plain = load_kind(path, "train", "plain")
    x, y = plain.feats[0].float().numpy(), plain.labels
    row: dict = {"true_k": int(len(np.unique(y))), "n": len(x)}
    default = E.GRAPH_K
    try:
        for g in GRAPH_SIZES:
            E.GRAPH_K = g
            ev = E.laplacian_spectrum(x, KMAX + 1)
            row[f"eigengap_{g}nn"] = E.estimate(ev, KMIN, 30)
            row[f"eigengap_{g}nn_upto40"] = E.estimate(ev, KMIN, KMAX)
    finally:
        E.GRAPH_K = default
    if len(x) > 20_000:  # as the eigengap: a seeded sample bounds the cost
        keep = np.sort(np.random.default_rng(0).choice(len(x), 20_000, replace=False))
        x = x[keep]
    sil, stab = kmeans_scores(x)
    row.update(silhouette=max(sil, key=sil.get), stability=max(stab, key=stab.get),
               silhouette_curve=sil, stability_curve=stab, seconds=round(time.perf_counter() - t0, 1))
    return row


def agreement_rows(runs: list[Path]) -> dict:
    from omegaconf import OmegaConf

    per_k = {}
    for run in runs:
        ev = json.loads((run / "eval.json").read_text())
        split = next(iter(ev["splits"].values()))
        k = int(OmegaConf.load(run / "config.yaml").head.num_clusters)
        per_k[k] = {"run": str(run), "mean_agreement": float(np.mean(ev["head_agreement"])),
                    "acc": split["scores"]["acc"], "nmi": split["scores"]["nmi"]}
    best = max(per_k, key=lambda k: per_k[k]["mean_agreement"])
    return {"per_k": dict(sorted(per_k.items())), "estimate": best}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", nargs="*", default=[], help="NAME=FEATURE_CACHE_DIR")
    p.add_argument("--runs", nargs="*", default=[], help="runs of one data set at different head.num_clusters")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out: dict = {"features": {}, "agreement": None}
    for item in args.features:
        name, path = item.split("=", 1)
        out["features"][name] = features_row(Path(path))
        print(name, {k: v for k, v in out["features"][name].items() if not k.endswith("curve")}, flush=True)
    if args.runs:
        out["agreement"] = agreement_rows([Path(r) for r in args.runs])
        print("head agreement per K:", {k: round(v["mean_agreement"], 3) for k, v in out["agreement"]["per_k"].items()})
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
