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
    """Append-only metrics file; one JSON object per line, flushed so a killed job loses nothing.
    When a TensorBoard mirror is registered for the file (mirror_metrics), every record goes there
    too: the one place that writes metrics stays this one."""

    def __init__(self, path: Path | None) -> None:
        self._f = open(path, "a") if path is not None else None  # noqa: SIM115 - lives for the run
        self._mirror = _mirrors.get(_mirror_key(path)) if path is not None else None

    def write(self, **record: Any) -> None:
        if self._f is None:
            return
        record.setdefault("time", round(time.time(), 3))
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._mirror is not None:
            self._mirror.record(record)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class TensorBoardMirror:
    """TensorBoard event files holding the scalars of metrics.jsonl's records, written by rank 0:
    `train/<name>` per step record (each loss term, lr, img_per_s), `epoch/<name>` per epoch
    record, `eval/<split>/<scp|kmeans>/<acc|nmi|ari>` at the last step, and
    `stage/<name>/seconds|peak_rss_mib`. Records without a step (stages, the evaluation) take the
    last step seen, and each event carries the record's wall time."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resume repeats the steps logged after its checkpoint; TensorBoard then drops
        # the first attempt's events from that step on, as readers of metrics.jsonl keep the last.
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.step = purge_step - 1 if purge_step else 0

    def _scalar(self, tag: str, value: Any, step: int, walltime: float | None) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self.writer.add_scalar(tag, value, step, walltime=walltime)

    def record(self, rec: dict[str, Any]) -> None:
        kind, wall = rec.get("kind"), rec.get("time")
        if isinstance(rec.get("step"), int):
            self.step = rec["step"]
        if kind == "step":
            for name, v in rec.items():
                if name not in ("kind", "step", "epoch", "time"):
                    self._scalar(f"train/{name}", v, self.step, wall)
        elif kind == "epoch":
            losses = rec.get("loss") or []
            if losses:
                self._scalar("epoch/loss", sum(losses) / len(losses), self.step, wall)
            if len(losses) > 1:
                for h, v in enumerate(losses):
                    self._scalar(f"epoch/loss_head{h}", v, self.step, wall)
            for reason, n in (rec.get("skipped") or {}).items():
                self._scalar(f"epoch/skipped/{reason}", n, self.step, wall)
        elif kind == "eval":
            for split, entry in (rec.get("splits") or {}).items():
                for method, key in (("scp", "scores"), ("kmeans", "kmeans")):
                    for m, v in (entry.get(key) or {}).items():
                        if m != "n":
                            self._scalar(f"eval/{split}/{method}/{m}", v, self.step, wall)
        elif kind == "stage":
            for m in ("seconds", "peak_rss_mib"):
                self._scalar(f"stage/{rec['stage']}/{m}", rec.get(m), self.step, wall)
        self.writer.flush()

    def add_png(self, tag: str, png: bytes) -> None:
        """A figure (PNG bytes, as the report makes them) at the last step."""
        import io

        import numpy as np
        from PIL import Image

        image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        self.writer.add_image(tag, image, self.step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


_mirrors: dict[str, TensorBoardMirror] = {}


def _mirror_key(path: Path) -> str:
    return str(Path(path).resolve())


def mirror_metrics(metrics: Path, log_dir: Path, purge_step: int | None = None) -> TensorBoardMirror:
    """From now on every JsonlLog opened on `metrics` also writes its scalars to event files in
    `log_dir`, until close_mirror(metrics)."""
    close_mirror(metrics)
    _mirrors[_mirror_key(metrics)] = m = TensorBoardMirror(log_dir, purge_step)
    return m


def metrics_mirror(metrics: Path | None) -> TensorBoardMirror | None:
    return None if metrics is None else _mirrors.get(_mirror_key(metrics))


def close_mirror(metrics: Path | None) -> None:
    m = None if metrics is None else _mirrors.pop(_mirror_key(metrics), None)
    if m is not None:
        m.close()


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
