"""One run, any world size: with data.order=global the job on W = 1, 2, 3 gloo processes trains on
the same global batches with the same views, so per-step losses agree to float rounding and the
final clustering is the same (streaming and cached). The windowed order is the counter-test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import run_gloo
from tests.helpers import overrides

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]




def _train_rank(rank: int, world: int, args: list[str]) -> None:
    from scp_dist.config import load_config
    from scp_dist.distributed import DistState
    from scp_dist.train import train

    train(load_config("demo_digits", args), DistState(rank, world, 0, torch.device("cpu"), "gloo"))


def _run(tmp: Path, data_root: Path, world: int, name: str, **kw) -> tuple[list[float], dict]:
    # lr 5e-4: Adam turns the rounding of near-zero gradients into full-size steps, and at the paper's
    # 1e-3 on raw pixels that grows past 1e-4 within 10 steps; the job is the same, the chaos is less.
    args = overrides(tmp, data_root, **{"output.run_name": name, "train.epochs": 3, "train.global_batch": 200,
                                        "optim.lr": 5e-4, "output.kmeans": "false", **kw})
    run_gloo(_train_rank, world, args)
    run = tmp / "runs" / name
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["kind"] == "step"]
    return losses, json.loads((run / "eval.json").read_text())["splits"]["train"]["scores"]


@pytest.mark.parametrize("mode", ["stream", "cached", "neighbors"])
def test_one_two_and_three_processes_run_the_same_run(tmp_path, digits_root, mode):
    extra = {"train.mode": "stream" if mode == "stream" else "cached", "cache.num_pairs": 2, "cache.dtype": "fp32"}
    if mode == "neighbors":  # the neighbour draws are per sample too, so no rank draws differently
        extra |= {"neighbors.k": 5, "neighbors.p": 0.5}
    ref_loss, ref_scores = _run(tmp_path, digits_root, 1, f"{mode}_w1", **extra)
    assert len(ref_loss) == 3 * (1797 // 200) and ref_scores["acc"] > 0.15  # it learned something
    for world in (2, 3):
        loss, scores = _run(tmp_path, digits_root, world, f"{mode}_w{world}", **extra)
        torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref_loss), rtol=1e-4, atol=0)
        assert scores["acc"] == pytest.approx(ref_scores["acc"], abs=1e-9)
        assert scores["nmi"] == pytest.approx(ref_scores["nmi"], abs=1e-6)


def test_windowed_order_is_not_world_size_invariant(tmp_path, digits_root):
    """Counter-test: the comparison above can fail. The windowed order gives each rank its own
    contiguous range, so two processes see other global batches than one."""
    extra = {"data.order": "windowed"}
    one, _ = _run(tmp_path, digits_root, 1, "win_w1", **extra)
    two, _ = _run(tmp_path, digits_root, 2, "win_w2", **extra)
    rel = (torch.tensor(one) - torch.tensor(two)).abs() / torch.tensor(one).abs()
    assert float(rel.max()) > 1e-3


class _Clock:
    """train.py's `time` for one rank: monotonic() advances `tick` seconds per reading (0: a stopped
    clock), everything else is the real module."""

    def __init__(self, tick: float) -> None:
        self.t, self.tick = 0.0, tick

    def monotonic(self) -> float:
        self.t += self.tick
        return self.t

    def __getattr__(self, name: str):
        import time

        return getattr(time, name)


def _train_rank_on_own_clock(rank: int, world: int, args: list[str]) -> None:
    import scp_dist.train as T

    T.time = _Clock(3600.0 if rank == 1 else 0.0)
    _train_rank(rank, world, args)


def test_ranks_whose_clocks_disagree_still_checkpoint_together(tmp_path, digits_root):
    """train.checkpoint_minutes is judged by each rank's clock, and only rank 0 writes (with streamed
    shards every rank joins the write). Rank 0's clock stands still, rank 1's says an hour passed at
    every reading: agreed, every step is saved (periodic inside an epoch, epoch end at its end).
    Counter: deciding per rank, rank 0 would write only the epoch ends."""
    args = overrides(tmp_path, digits_root, **{
        "output.run_name": "clocks", "train.mode": "cached", "cache.num_pairs": 1, "cache.dtype": "fp32",
        "train.epochs": 2, "train.global_batch": 600, "train.checkpoint_minutes": 1,
        "train.keep_checkpoints": 100, "output.kmeans": "false"})
    run_gloo(_train_rank_on_own_clock, 2, args)
    saved = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "runs" / "clocks" / "checkpoints").glob("step-*.pt"))
    assert saved == list(range(1, 2 * (1797 // 600) + 1))
