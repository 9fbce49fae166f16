"""Run-time reporting: rank-0 logging, JSONL metrics, progress bars. Every rank computes; rank 0 talks."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("scp_dist")


def setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr, force=True)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its INFO lines list every CPU variant it tried


class JsonlLog:
    """Append-only metrics file; one JSON object per line, flushed so a killed job loses nothing."""

    def __init__(self, path: Path | None) -> None:
        self._f = open(path, "a") if path is not None else None  # noqa: SIM115 - lives for the run

    def write(self, **record: Any) -> None:
        if self._f is None:
            return
        record.setdefault("time", round(time.time(), 3))
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def progress(iterable: Any, enabled: bool, **kw: Any) -> Any:
    # Off a terminal (CI, SLURM logs) a bar that redraws every 0.1 s floods the log; update rarely.
    interactive = sys.stderr.isatty()
    return tqdm(iterable, disable=not enabled, mininterval=0.2 if interactive else 10.0, dynamic_ncols=True, **kw)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def stage(name: str, metrics: Path | None, world_max: Callable[[float], float] = lambda x: x) -> Iterator[None]:
    """Time a stage of the job and record it with the peak memory of the largest rank so far: the
    numbers that say what does not scale on a long job. `world_max` is a collective (every rank
    enters every stage); `metrics` is rank 0's metrics.jsonl, None elsewhere."""
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    rss = world_max(peak_rss_mib())
    log.info("stage %s: %.1f s, peak memory of the largest rank %.0f MiB", name, seconds, rss)
    if metrics is not None:
        jsonl = JsonlLog(metrics)
        jsonl.write(kind="stage", stage=name, seconds=round(seconds, 3), peak_rss_mib=round(rss, 1))
        jsonl.close()
