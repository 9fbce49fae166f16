"""A finished run, loaded for use on new images (scp_dist.predict) and for neighbour search
(scp_dist.search): its config.yaml, the head of its newest checkpoint, the clustering its evaluation
reported (eval.json's `chosen_head`, the consensus vote included), its k-means centroids and, on
demand, its backbone.

Whatever reaches the head here went through what the run's evaluation did: the backbone under the
run's precision and, for a cached run, the rounding to `cache.dtype` the stored features had
(`as_evaluated`). That is what makes a training image get the cluster and probability of the run's
assignments CSV.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from scp_dist.checkpoint import CheckpointError, newest_readable
from scp_dist.config import load_config
from scp_dist.errors import UserError
from scp_dist.evaluate import KMEANS_CENTROIDS
from scp_dist.models.backbones import Backbone, build_backbone
from scp_dist.models.head import SCPHead
from scp_dist.precision import resolve_precision

CONFIG_NAME = "config.yaml"
EVAL_NAME = "eval.json"


class RunError(UserError, RuntimeError):
    """A run directory that cannot be used: missing, unfinished, or its backbone cannot be built."""


@dataclass
class Run:
    path: Path
    cfg: DictConfig
    head: SCPHead  # every head of the checkpoint, eval mode, on `device`
    chosen: int  # eval.json's chosen_head; == head.num_heads: the heads' consensus vote
    mappings: np.ndarray | None  # (H, K) consensus relabelling (evaluate.report), else None
    vote_weights: np.ndarray | None  # (H,) 1 for the heads that vote (head.vote_margin), else None
    checkpoint: Path
    device: torch.device
    centroids: np.ndarray | None  # (K, D) k-means centroids; None for runs from before they were kept
    _backbone: Backbone | None = field(default=None, repr=False)

    @property
    def num_clusters(self) -> int:
        return self.head.num_clusters

    @property
    def consensus(self) -> bool:
        return self.chosen == self.head.num_heads

    @property
    def precision(self) -> str:
        """The forward precision the run's evaluation used on this kind of device."""
        return resolve_precision(self.cfg.train.precision, self.device)

    @property
    def cached(self) -> bool:
        return self.cfg.train.mode == "cached"

    @property
    def batch_size(self) -> int:
        # The batches the run's evaluation features were computed in: a backbone's result can move
        # in the last bit with the batch, and fp16 rounding (cached runs) would magnify that.
        return int(self.cfg.cache.batch_size if self.cached else self.cfg.train.eval_batch)

    def backbone(self) -> Backbone:
        """The run's frozen backbone on the run's device, built once; RunError when it cannot be."""
        if self._backbone is None:
            bb = self.cfg.backbone
            try:
                self._backbone = build_backbone(bb).to(self.device)
            except Exception as e:  # noqa: BLE001 - any failure (weights, package, model name): one line
                what = f"{bb.name} {bb.model}".strip()
                raise RunError(f"run {self.path}: its backbone ({what}) cannot be built: {_first_line(e)}") from e
            if self._backbone.feature_dim != self.head.dims[0]:
                raise RunError(f"run {self.path}: the backbone gives {self._backbone.feature_dim}-d features, the "
                               f"head of {self.checkpoint.name} takes {self.head.dims[0]}-d ones")
        return self._backbone

    def as_evaluated(self, feats: torch.Tensor) -> torch.Tensor:
        """Backbone features as the run's head saw them at evaluation: float32, and in a cached run
        first rounded to the cache's storage dtype (feature_cache.storage_dtype)."""
        if self.cached and self.cfg.cache.dtype == "fp16":
            feats = feats.half()
        return feats.float()

    @torch.no_grad()
    def probabilities(self, feats: torch.Tensor) -> torch.Tensor:
        """(n, K) distribution of the reported clustering: the chosen head's softmax, or for the
        consensus each cluster's share of the confidence-weighted vote (evaluate.consensus), whose
        argmax and max are the cluster and probability the run reports."""
        p = self.head(feats.to(self.device).float()).float().softmax(-1)  # (H, n, K), as evaluate.predict
        if not self.consensus:
            return p[self.chosen]
        conf, clusters = p.max(-1)
        assert self.mappings is not None and self.vote_weights is not None
        conf = conf * torch.as_tensor(self.vote_weights, dtype=conf.dtype, device=conf.device)[:, None]
        maps = torch.as_tensor(self.mappings, device=p.device)
        votes = torch.zeros(p.shape[1:], dtype=torch.float64, device=p.device)
        for h in range(len(maps)):
            votes.scatter_add_(1, maps[h][clusters[h]][:, None], conf[h].double()[:, None])
        return (votes / conf.double().sum(0).clamp_min(1e-12)[:, None]).float()


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def load_run(path: str | Path, device: torch.device | str = "cpu") -> Run:
    """The finished run in `path`; RunError (one line) when it has no config.yaml, checkpoint or
    eval.json. The backbone is built only when asked for (Run.backbone)."""
    run = Path(path)
    device = torch.device(device)
    if not run.is_dir():
        raise RunError(f"run directory {run} does not exist")
    if not (run / CONFIG_NAME).is_file():
        raise RunError(f"{run} holds no {CONFIG_NAME}: not a run directory of scp_dist.train")
    cfg = load_config(run / CONFIG_NAME)
    try:
        found = newest_readable(run)
    except CheckpointError as e:
        raise RunError(str(e)) from e
    if found is None:
        raise RunError(f"{run} holds no checkpoint (checkpoints/step-*.pt): the run has not finished an epoch")
    state, ckpt = found
    weights = state["head"]
    h, in_dim, _ = weights["weights.0"].shape
    head = SCPHead(in_dim, list(cfg.head.hidden), cfg.head.num_clusters, num_heads=h,
                   activation=cfg.head.activation, seed=cfg.train.seed)
    head.load_state_dict(weights)
    head.to(device).eval()
    chosen, mappings, vote_weights = _reported_head(run, h, cfg.head.num_clusters)
    centroids = np.load(run / KMEANS_CENTROIDS) if (run / KMEANS_CENTROIDS).is_file() else None
    return Run(run, cfg, head, chosen, mappings, vote_weights, ckpt, device, centroids)


def _reported_head(run: Path, num_heads: int, k: int) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    path = run / EVAL_NAME
    if not path.is_file():
        raise RunError(f"{run} holds no {EVAL_NAME}: the run was not evaluated; run its training command again "
                       "(train.resume=auto evaluates a finished run)")
    ev = json.loads(path.read_text())
    chosen = int(ev["chosen_head"])
    if chosen < num_heads:
        return chosen, None, None
    if "consensus_mappings" not in ev:
        raise RunError(f"{path} reports the heads' consensus but predates the stored relabelling "
                       "(consensus_mappings); run the training command again to re-evaluate it")
    mappings = np.asarray(ev["consensus_mappings"], dtype=np.int64)
    if mappings.shape != (num_heads, k):
        raise RunError(f"{path}: consensus_mappings is {mappings.shape}, the checkpoint has {num_heads} heads of "
                       f"{k} clusters")
    # Runs evaluated before head.vote_margin existed: every head voted.
    vote_weights = np.asarray(ev.get("consensus_weights", np.ones(num_heads)), dtype=np.float64)
    return chosen, mappings, vote_weights
