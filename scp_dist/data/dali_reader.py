"""The `dali_reader` train loader: DALI reads the shards itself (fn.readers.webdataset) and augments.

The `dali` backend (loader.py + augment_dali.py) feeds DALI from our own plan reader; this backend
is the native path: no Python in the per-sample data path, GPU `mixed` decode and GPU augmentation
on cuda, DALI's CPU-only mode (device_id=None) otherwise. What it gives up is described below.

Which samples a rank reads (docs/DESIGN.md, "DALI backends: plan-fed vs native reader"):
  - DALI splits the canonical order (manifest shard order, then position in the shard) into W
    contiguous ranges `[N*r//W, N*(r+1)//W)`, sizes differing by at most one, and rank r reads
    range r (shard_id=rank, num_shards=W, stick_to_shard=True). That range is the SAME every
    epoch; only the order inside it changes: DALI keeps a buffer of `data.shuffle_buffer` samples
    and emits a random one of them each time (initial_fill), so the shuffle is local: a sample
    comes out at most a buffer's length before its canonical position, and usually not much
    after it. The plan-fed backends instead permute whole
    shards globally every epoch, so a sample meets different neighbours and ranks over epochs;
    here rank r never sees another rank's range. Prefer `dali`/`torch` when the shards are sorted
    by class or source and W is large.
  - Every rank runs `steps = min_r(n_r // B_r)` steps (computed from the manifest alone, so all
    ranks agree without communicating and collectives never hang) and takes exactly `steps`
    batches of B_r samples. DALI's reader emits each sample of its range once before it starts
    the range again, so no sample repeats within an epoch. The unused samples (the last
    `n_r - steps*B_r` of each rank's shuffled range, so a different set each epoch) number fewer
    than the global batch G = W*B: with N = W*q + s (s < W) and q = steps*B + t (t < B), the
    unused count is W*t + s <= W*B - 1. That bound needs equal per-rank batches (with unequal ones
    the equal split of samples idles a fixed fraction of N, e.g. a quarter for G=3 on W=2), so G
    must be a multiple of W (checked at construction). No padding exists: pad_last_batch=False, and the reader's
    partial/wrapped last batch is never taken.
  - The pipeline is rebuilt every epoch with seeds drawn from (train.seed, epoch, rank): the same
    seed gives the same order and the same views (also for another data.num_workers, i.e. DALI
    thread count; checked on CPU); another epoch gives another order and views.

Augmentation, per view and independently (same parameters and order of operations as ViewSpec /
augment_torch, but the random numbers come from DALI's generators, so the views are NOT those of
the torch/dali backends for the same seed):
  - crop with probability crop_p (fn.random.coin_flip): a fraction f ~ U(crop_scale) of each side
    (so the crop keeps the image's aspect ratio, a square for square images, exactly like the torch
    draw) at a relative top-left corner U(0, 1-f) per axis, via fn.slice with relative start and
    shape (DALI rounds them to whole pixels; torch draws the pixel offset uniformly among the
    valid integer offsets, which is the same distribution up to that rounding);
  - resize to image_size x image_size (linear, antialiased, float output);
  - blur with probability blur_p: sigma ~ U(blur_sigma), window ViewSpec.blur_kernel; both are in
    output pixels (ViewSpec), which is why the blur comes after the resize, as in the other backends;
  - normalise with the backbone's mean/std (given for [0, 1] pixels, so scaled by 255) to float32
    CHW.
All random numbers are drawn for every sample whether or not its branch runs (DALI conditionals),
so one choice never shifts another. The four coin flips come back in `Batch.flips`.

Keys: DALI does not return a sample's `__key__`, and our shards hold no member with it, so the key
is taken from the image member's name in `fn.get_property(..., key="source_info")`
("<tar path>:<offset>:<key>.<ext>"). Labels: `.cls` arrives as ASCII bytes and is parsed here;
unlabeled splits (no `.cls`) are read with an image-only ext list and get label -1.

Bad data: DALI fails a whole batch on one corrupt image and cannot say which one, so this backend
cannot skip and count bad samples: a decode error stops the job with a DataError naming the rank's
shards, whatever data.on_error says, and `stats` stays zero. Use `data.loader=dali` or `torch`
(which skip and count corrupt samples) for dirty data. A shard file that is missing is caught when
the manifest is read.

Evaluation does not use this backend: it needs every sample exactly once, gathered in order, which
the plan-based loaders guarantee (loader.EvalLoader). The GPU path (device="mixed", device_id =
the training device) is written but untested here (no GPU on the machines this was developed on).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scp_dist.data import plan as P
from scp_dist.data.augment_torch import ViewSpec
from scp_dist.data.loader import Batch, DataError, LoaderStats
from scp_dist.shards.manifest import Manifest, ShardError, read_manifest
from scp_dist.shards.writer import IMAGE_EXTS

log = logging.getLogger("scp_dist")

READER_NAME = "Reader"


def dali_shard_range(num_samples: int, world_size: int, rank: int) -> range:
    """The global sample indices DALI's reader assigns to shard `rank` of `world_size`."""
    return range(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)


def reader_steps_per_epoch(num_samples: int, global_batch: int, world_size: int) -> int:
    """Steps every rank runs: the fewest full batches any rank's DALI range holds."""
    sizes = P.rank_batch_sizes(global_batch, world_size)
    return min(len(dali_shard_range(num_samples, world_size, r)) // b for r, b in enumerate(sizes))


def epoch_seeds(seed: int, epoch: int, rank: int) -> tuple[int, int]:
    """(reader seed, augmentation seed) for one rank and epoch. The rank is mixed in so ranks do not
    shuffle their ranges with the same permutation or draw the same flips for the same batch slot."""
    a, b = np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(2)
    return int(a) & 0x7FFFFFFF, int(b) & 0x7FFFFFFF


def key_from_source_info(info: str) -> str:
    """'<path>.tar:<offset>:<key>.<ext>' -> key. Keys contain no '.' (the shard writer refuses
    them), so the first '.' of the member name ends the key even when the path holds ':'."""
    member = info[info.rfind(".tar:") + len(".tar:"):].split(":", 1)[1]
    return member.partition(".")[0]


def _first_line(e: BaseException) -> str:
    """DALI's message is a multi-line traceback; keep what it says it encountered."""
    text = str(e)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def build_reader_pipeline(manifest: Manifest, spec: ViewSpec, *, world_size: int, rank: int, batch_size: int,
                          shuffle_buffer: int, reader_seed: int, aug_seed: int, device_id: int | None,
                          num_threads: int) -> Any:
    """The DALI pipeline: outputs (view_a, view_b, source_info, crop_a, blur_a, crop_b, blur_b[, cls])."""
    from nvidia.dali import fn, pipeline_def, types

    paths = [str(p) for p in manifest.shard_paths()]
    index_paths = [str(p.with_suffix(".idx")) for p in manifest.shard_paths()]
    labeled = manifest.labeled
    image_ext = ";".join(IMAGE_EXTS)
    size = [spec.image_size, spec.image_size]
    mean = [255.0 * m for m in spec.mean]
    std = [255.0 * s for s in spec.std]
    window = spec.blur_kernel
    crop_lo, crop_hi = (float(v) for v in spec.crop_scale)
    sigma_lo, sigma_hi = (float(v) for v in spec.blur_sigma)

    def view(img):
        do_crop = fn.random.coin_flip(probability=float(spec.crop_p), dtype=types.BOOL)
        do_blur = fn.random.coin_flip(probability=float(spec.blur_p), dtype=types.BOOL)
        # Uniforms are mapped onto [lo, hi] by hand because fn.random.uniform rejects lo == hi,
        # which the config allows (a fixed crop fraction or sigma).
        u = fn.random.uniform(range=[0.0, 1.0], shape=[4])
        frac = crop_lo + (crop_hi - crop_lo) * u[0]
        sigma = sigma_lo + (sigma_hi - sigma_lo) * u[3]
        x = img
        if do_crop:
            # trim_to_shape: float rounding of start + shape may land a hair past the edge.
            x = fn.slice(x, rel_start=fn.stack(u[1], u[2]) * (1.0 - frac), rel_shape=fn.stack(frac, frac),
                         axis_names="HW", out_of_bounds_policy="trim_to_shape")
        x = fn.resize(x, size=size, interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
        if do_blur:
            x = fn.gaussian_blur(x, sigma=sigma, window_size=window)
        x = fn.crop_mirror_normalize(x, mean=mean, std=std, output_layout="CHW", dtype=types.FLOAT)
        return x, do_crop, do_blur

    @pipeline_def(enable_conditionals=True)
    def graph():
        read = fn.readers.webdataset(
            paths=paths, index_paths=index_paths, ext=[image_ext, "cls"] if labeled else [image_ext],
            # A labeled sample without its label, or any sample without an image, is a broken shard.
            missing_component_behavior="error",
            shard_id=rank, num_shards=world_size, stick_to_shard=True, pad_last_batch=False,
            random_shuffle=True, initial_fill=max(1, int(shuffle_buffer)), seed=reader_seed, name=READER_NAME,
        )
        enc, cls = (read[0], read[1]) if labeled else (read, None)
        info = fn.get_property(enc, key="source_info")
        img = fn.decoders.image(enc, device="cpu" if device_id is None else "mixed", output_type=types.RGB,
                                adjust_orientation=False)  # as the other backends: PIL ignores EXIF too
        a, crop_a, blur_a = view(img)
        b, crop_b, blur_b = view(img)
        outs = (a, b, info, crop_a, blur_a, crop_b, blur_b)
        return (*outs, cls) if labeled else outs

    pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=aug_seed)
    pipe.build()
    return pipe


class DaliReaderLoader:
    """Train loader over fn.readers.webdataset; same interface as loader.TrainLoader."""

    backend = "dali_reader"

    def __init__(self, split_dir: Path, data_cfg: Any, spec: ViewSpec, *, world_size: int, rank: int,
                 global_batch: int, seed: int, device: torch.device, num_threads: int | None = None) -> None:
        self.manifest: Manifest = read_manifest(split_dir)
        self.spec, self.seed, self.device = spec, int(seed), torch.device(device)
        self.world_size, self.rank, self.global_batch = int(world_size), int(rank), int(global_batch)
        self.shuffle_buffer = int(data_cfg.shuffle_buffer)
        self.num_threads = int(num_threads) if num_threads else max(1, int(data_cfg.num_workers))
        self.stats = LoaderStats()  # always zero: this backend stops on bad data instead of skipping
        self.epoch = 0
        self._pipe: Any = None
        n = self.manifest.num_samples
        if n < global_batch:
            raise ShardError(f"{split_dir}: {n} samples, fewer than train.global_batch={global_batch}: "
                             "an epoch would have no step")
        if global_batch % world_size:
            raise ShardError(
                f"data.loader=dali_reader needs train.global_batch ({global_batch}) to be a multiple of the "
                f"world size ({world_size}): DALI gives every rank an equal share of the samples, so unequal "
                "per-rank batches would leave many samples unused each epoch. Use a multiple, or "
                "data.loader=dali / torch (exact for any split)")
        self.batch_size = P.rank_batch_sizes(global_batch, world_size)[rank]
        self.steps = reader_steps_per_epoch(n, global_batch, world_size)
        self.range = dali_shard_range(n, world_size, rank)
        self._cuda = self.device.type == "cuda"
        if rank == 0:
            log.info("dali_reader: %d ranks read fixed contiguous ranges of %d-%d samples; %d steps of %d; "
                     "%d samples unused per epoch", world_size, n // world_size, -(-n // world_size), self.steps,
                     self.batch_size, n - self.steps * global_batch)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.stats.reset()
        self._pipe = None

    def rank_shards(self) -> list[str]:
        """Names of the shards that hold this rank's range (for error messages)."""
        offsets = P.shard_offsets([s.num_samples for s in self.manifest.shards])
        lo, hi = self.range.start, self.range.stop
        return [s.name for i, s in enumerate(self.manifest.shards) if offsets[i] < hi and offsets[i + 1] > lo]

    def _build(self) -> Any:
        reader_seed, aug_seed = epoch_seeds(self.seed, self.epoch, self.rank)
        device_id = None
        if self._cuda:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return build_reader_pipeline(
            self.manifest, self.spec, world_size=self.world_size, rank=self.rank, batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer, reader_seed=reader_seed, aug_seed=aug_seed, device_id=device_id,
            num_threads=self.num_threads)

    def _view(self, out: Any, n: int) -> torch.Tensor:
        s = self.spec.image_size
        t = out.as_tensor()
        if not self._cuda:
            # Copy: the array views DALI's output buffer, which a later run overwrites.
            return torch.from_numpy(np.array(t, dtype=np.float32, copy=True)).reshape(n, 3, s, s)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dst = torch.empty((n, 3, s, s), dtype=torch.float32, device=self.device)
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device))
        return dst

    def _batch(self, outs: tuple) -> Batch:
        a, b, info, *flags = outs[:7]
        n = len(info)
        keys = [key_from_source_info(bytes(np.array(info[i])).decode()) for i in range(n)]
        if self.manifest.labeled:
            cls = outs[7]
            labels = [int(bytes(np.array(cls[i])).decode().strip()) for i in range(n)]
        else:
            labels = [-1] * n
        batch = Batch([self._view(a, n), self._view(b, n)], keys, torch.tensor(labels, dtype=torch.int64))
        # (crop a, blur a, crop b, blur b) x n, for frequency checks.
        batch.flips = torch.from_numpy(  # type: ignore[attr-defined]
            np.stack([np.array(f.as_tensor(), dtype=bool).reshape(n) for f in flags]))
        return batch

    def __iter__(self) -> Iterator[Batch]:
        self._pipe = pipe = self._build()
        try:
            for _ in range(self.steps):
                try:
                    outs = pipe.run()
                except RuntimeError as e:
                    raise DataError(
                        f"data.loader=dali_reader, rank {self.rank}, epoch {self.epoch}: DALI failed on a sample "
                        f"of shard(s) {self.rank_shards()} in {self.manifest.root} ({_first_line(e)}). This "
                        "backend cannot skip bad samples; data.loader=dali or torch skip and count them"
                    ) from e
                yield self._batch(outs)
        finally:
            # Rebuilt per epoch anyway; dropping it frees its threads and buffers now.
            if self._pipe is pipe:
                self._pipe = None
