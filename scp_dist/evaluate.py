"""Evaluation: cluster every sample of a split once (no augmentation), gather on rank 0, score, save."""

from __future__ import annotations

import csv
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scp_dist import distributed as D
from scp_dist.metrics import clustering_scores
from scp_dist.shards.manifest import atomic_write_text


@dataclass
class Predictions:
    keys: list[str]
    labels: np.ndarray  # (n,) int, -1 where unlabeled
    clusters: np.ndarray  # (H, n) int
    confidence: np.ndarray  # (H, n) float, the winning cluster's probability
    features: np.ndarray | None = None  # (n, D) backbone features, only when asked for

    def scores(self, head: int) -> dict[str, float]:
        return clustering_scores(self.labels, self.clusters[head])


def autocast_context(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def predict(loader, backbone: torch.nn.Module, head: torch.nn.Module, st: D.DistState, precision: str,
            want_features: bool = False, progress=None) -> Predictions | None:
    """Run every rank over its eval range; rank 0 returns everything in canonical order, others None."""
    head_was_training = head.training
    head.eval()
    keys: list[str] = []
    labels, clusters, conf, feats = [], [], [], []
    batches = progress(loader) if progress is not None else loader
    for batch in batches:
        if not batch.keys:
            continue
        x = batch.views[0].to(st.device, non_blocking=True)
        with autocast_context(st.device, precision):
            f = backbone(x)
            p = head(f).float().softmax(-1)  # (H, n, K)
        c, k = p.max(-1)
        keys.extend(batch.keys)
        labels.append(batch.labels.cpu().numpy())
        clusters.append(k.cpu().numpy())
        conf.append(c.cpu().numpy())
        if want_features:
            feats.append(f.float().cpu().numpy())
    head.train(head_was_training)
    local = (
        keys,
        np.concatenate(labels) if labels else np.zeros(0, np.int64),
        np.concatenate(clusters, axis=1) if clusters else None,
        np.concatenate(conf, axis=1) if conf else None,
        np.concatenate(feats) if feats else None,
    )
    parts = D.gather_objects(local)
    if not st.is_main:
        return None
    parts = [p for p in parts if p[0]]  # ranks with an empty eval range
    return Predictions(
        keys=[k for p in parts for k in p[0]],
        labels=np.concatenate([p[1] for p in parts]),
        clusters=np.concatenate([p[2] for p in parts], axis=1),
        confidence=np.concatenate([p[3] for p in parts], axis=1),
        features=np.concatenate([p[4] for p in parts]) if want_features else None,
    )


def write_assignments(path: Path, pred: Predictions, head: int) -> None:
    """key, cluster, probability, label per sample, written atomically."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["key", "cluster", "probability", "label"])
    for key, c, p, y in zip(pred.keys, pred.clusters[head], pred.confidence[head], pred.labels, strict=True):
        w.writerow([key, int(c), f"{float(p):.6f}", int(y)])
    atomic_write_text(path, buf.getvalue())


def write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def format_scores(name: str, s: dict[str, float]) -> str:
    if not s.get("n"):
        return f"{name}: no labels, clusters only"
    return f"{name}: ACC {100 * s['acc']:.2f}  NMI {100 * s['nmi']:.2f}  ARI {100 * s['ari']:.2f}  (n={s['n']})"
