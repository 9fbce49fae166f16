"""The one place that knows about distributed state: rank, world size, device, init and teardown.

Works the same under torchrun (RANK/WORLD_SIZE/LOCAL_RANK; the SLURM scripts start one torchrun per
node) and as a plain single process, where every collective below is the identity.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def collective_device(self) -> torch.device:
        """Where small tensors for a collective live: NCCL reduces only GPU tensors, gloo CPU ones."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _env_int(*names: str) -> int | None:
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    return None


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 600) -> DistState:
    world = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local_rank = _env_int("LOCAL_RANK") or 0
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world == 1:
        return DistState(device=dev)
    be = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    # torchrun keeps one store for every restart of the group, and the group's keys (each rank's
    # address) are the same each time: after a restart a rank read a dead peer's old address and
    # gloo failed with "connectFullMesh ... Connection refused" (7 of 8 restarts here). A prefix per
    # attempt gives every restarted group its own keys.
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    global _failures
    _failures = dist.PrefixStore(f"scp_dist/attempt{attempt}/failures/", store)
    dist.init_process_group(
        backend=be,
        store=dist.PrefixStore(f"scp_dist/attempt{attempt}/", store),
        rank=rank,
        world_size=world,
        timeout=timeout,
        device_id=dev if be == "nccl" else None,
    )
    return DistState(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=be)


def teardown(*objects_to_drop: object) -> None:
    """Destroy the process group after releasing DDP state.

    With gloo on CPU, destroying the group while a DDP reducer is still alive crashed ~10% of exits
    with `terminate called without an active exception` (measured: 2-3 of 25 runs). The caller passes
    nothing it still holds a reference to; we collect garbage so reducers die first.
    """
    del objects_to_drop
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# Why a rank failed, where the others can read it: under torchrun the store lives in the agent and
# outlives every worker. When a rank fails, torchrun SIGTERMs the others; without this they could
# not tell that stop from a preemption, and would ask to be run again.
_failures: dist.Store | None = None
_FIRST_FAILURE = "first"
_STORE_WAIT = datetime.timedelta(seconds=5)  # on the way out: never the group's dist.timeout_s


def report_failure(message: str) -> None:
    """Record this rank's failure unless another rank's came first: the first is the cause, the ones
    after it are mostly other ranks losing it in a collective. Best effort (the store's host may be
    gone too)."""
    if _failures is None:
        return
    try:
        _failures.set_timeout(_STORE_WAIT)
        _failures.compare_set(_FIRST_FAILURE, "", message)
    except Exception:  # noqa: BLE001 - nothing to tell the others with; the caller exits anyway
        pass


def peer_failure() -> str | None:
    """The failure a rank reported with report_failure in this attempt, or None (also when the
    store cannot be reached)."""
    if _failures is None:
        return None
    try:
        _failures.set_timeout(_STORE_WAIT)
        if _failures.check([_FIRST_FAILURE]):
            return _failures.get(_FIRST_FAILURE).decode(errors="replace")
    except Exception:  # noqa: BLE001 - no store, no news
        return None
    return None


def exit_now(code: int) -> None:
    """Leave at once, for the error path of a multi-process job: no barrier and no group teardown,
    since the other ranks may be inside another collective and would keep this one waiting for
    dist.timeout_s. torchrun sees the exit code and stops the other workers within seconds."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --- collectives. Identity in a single process. -------------------------------------------------


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks. Backward all-reduces the gradient too, so each rank receives
    the sum over ranks of d(loss_r)/d(t_global); see scp_dist.loss for how that is rescaled."""
    if world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, op=dist.ReduceOp.SUM)


def all_gather_stack(t: torch.Tensor) -> torch.Tensor:
    """Differentiable gather of same-shaped tensors from all ranks, stacked on a new dim 0."""
    if world_size() == 1:
        return t.unsqueeze(0)
    from torch.distributed.nn.functional import all_gather

    return torch.stack(all_gather(t), dim=0)


def sum_detached(t: torch.Tensor | float | int, device: torch.device | None = None) -> torch.Tensor:
    """Non-differentiable sum over ranks (counts, logging)."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t, dtype=torch.float64, device=device)
    t = t.detach().clone()
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def max_detached(t: torch.Tensor) -> torch.Tensor:
    """Non-differentiable elementwise max over ranks (flags every rank must agree on)."""
    t = t.detach().clone()
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_objects(obj: object) -> list[object] | None:
    """All ranks' picklable objects, in rank order, on rank 0 only (the others get None): used once
    per evaluation, and only rank 0 scores, so no other rank holds every prediction."""
    if world_size() == 1:
        return [obj]
    out: list[object] | None = [None] * world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj: object) -> list[object]:
    """All ranks' picklable objects, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def gather_sample(local: Any, size: int, seed: Any, st: DistState) -> tuple[int, Any, list | None]:
    """A seeded uniform sample of at most `size` rows of an array split across ranks in canonical
    order (each rank holds its contiguous part, `local`), gathered to rank 0 without the rest
    travelling. Collective. Returns (total rows, the sampled row positions in canonical order, every
    rank's sampled rows on rank 0 / None elsewhere); the sample depends on `seed` and the total only,
    so it is the same on any world size."""
    import numpy as np

    counts = broadcast_object(gather_objects(len(local)))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(offsets[-1])
    pick = None
    if st.is_main:
        m = min(n, size)
        pick = np.arange(n) if m == n else np.sort(np.random.default_rng(seed).choice(n, m, replace=False))
    pick = broadcast_object(pick)
    lo, hi = offsets[st.rank], offsets[st.rank + 1]
    return n, pick, gather_objects(local[pick[(pick >= lo) & (pick < hi)] - lo])
