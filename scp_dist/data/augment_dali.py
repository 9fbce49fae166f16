"""Decode + the two-view augmentation in a DALI pipeline (the `dali` loader backend).

Same views as augment_torch, computed by DALI: decode (GPU `mixed` decoder on cuda, DALI's
CPU-only mode otherwise), then per view an optional crop, a linear antialiased resize to S x S, an
optional Gaussian blur and normalisation to CHW float.

Randomness: the random choices are NOT drawn by DALI's generators. Every view's draw (crop on/off
and window, blur on/off and sigma) comes from `augment_torch.draw_view` with the generator
`sample_rng(seed, epoch, global sample index)`, exactly as in the torch backend, and is fed to the
pipeline through external sources; DALI conditionals (`enable_conditionals=True`) then apply the
crop and the blur to the samples whose flag is set. So:
  - a sample's views depend only on (seed, epoch, sample index), not on which rank or batch it is
    in, on the batch size, on a pipeline rebuild, or on a corrupt neighbour being dropped;
  - the DALI and torch backends make the same random choices (pixels differ only by the resize
    and blur implementations), so switching backend does not change what training sees;
  - nothing needs reseeding per epoch: the pipeline itself is deterministic and is rebuilt only
    when a bigger batch arrives or after a decode error.
The cost is a header parse (PIL, no decode) and ~6 random numbers per view on the host.

EXIF orientation is ignored (`adjust_orientation=False`) because the torch backend's PIL decode
ignores it too, and both backends must see the same pixels.

Bad input never reaches DALI: a corrupt stream can crash the process inside DALI (DALI 2.4.0 was
seen to segfault on a truncated PNG), and a crash is no exception the loader can skip. Every
sample's bytes pass `_dali_problem` first (PNG and JPEG: augment_torch.structure_problem, a walk
over the chunk headers, not a decode; any other format: a full PIL decode). What fails it is
skipped as corrupt_image (or raised), as the torch backend, which runs the same check, does.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from scp_dist.data.augment_torch import (
    ViewDraw,
    ViewSpec,
    decode_rgb,
    draw_view,
    is_png_or_jpeg,
    sample_rng,
    structure_problem,
)
from scp_dist.data.batch import Batch
from scp_dist.data.reader import CORRUPT_IMAGE, RawSample


def _image_hw(data: bytes) -> tuple[int, int]:
    """Height and width from the header only; raises on data PIL cannot identify."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    return h, w


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _dali_problem(data: bytes) -> str | None:
    """Why the encoded image must not reach DALI, or None: PNG and JPEG get the structural check
    both backends share; other formats are rare here, so PIL decodes them in full."""
    if is_png_or_jpeg(data):
        return structure_problem(data)
    try:
        decode_rgb(data)
    except Exception as e:  # PIL raises several types for corrupt data
        return _error_text(e)
    return None


class DaliViews:
    """Batch with `raw` encoded samples -> Batch with decoded, augmented, normalised views."""

    def __init__(self, spec: ViewSpec, two_views: bool, seed: int, device: torch.device, num_threads: int = 2,
                 return_draws: bool = False) -> None:
        self.spec, self.two_views, self.seed = spec, two_views, int(seed)
        self.device = torch.device(device)
        self.num_threads = int(num_threads)
        self.return_draws = return_draws
        self.num_views = 2 if two_views else 1
        self._cuda = self.device.type == "cuda"
        self._pipe = None
        self._capacity = 0

    # -- pipeline -------------------------------------------------------------------------------

    def _build(self, capacity: int) -> None:
        from nvidia.dali import fn, pipeline_def, types

        spec, two_views = self.spec, self.two_views
        size = [spec.image_size, spec.image_size]
        mean = [255.0 * m for m in spec.mean]  # spec is for [0, 1] pixels, DALI's are 0..255
        std = [255.0 * s for s in spec.std]
        window = spec.blur_kernel
        decoder_device = "mixed" if self._cuda else "cpu"

        def finish(x):
            return fn.crop_mirror_normalize(x, mean=mean, std=std, output_layout="CHW", dtype=types.FLOAT)

        def view(img, v: int):
            crop = fn.external_source(name=f"crop{v}", dtype=types.BOOL, ndim=0)
            start = fn.external_source(name=f"start{v}", dtype=types.INT32, ndim=1)
            shape = fn.external_source(name=f"shape{v}", dtype=types.INT32, ndim=1)
            blur = fn.external_source(name=f"blur{v}", dtype=types.BOOL, ndim=0)
            sigma = fn.external_source(name=f"sigma{v}", dtype=types.FLOAT, ndim=0)
            x = img
            if crop:
                x = fn.slice(x, start=start, shape=shape, axis_names="HW")
            # Resize on float output so no rounding to uint8 happens before blur/normalise (torch
            # does both in float too).
            x = fn.resize(x, size=size, interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
            if blur:
                x = fn.gaussian_blur(x, sigma=sigma, window_size=window)
            return finish(x)

        @pipeline_def(enable_conditionals=True)
        def graph():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            img = fn.decoders.image(enc, device=decoder_device, output_type=types.RGB,
                                    adjust_orientation=False)
            if two_views:
                return view(img, 0), view(img, 1)
            x = fn.resize(img, size=size, interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
            return (finish(x),)

        device_id = None
        if self._cuda:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        # prefetch_queue_depth=1: each call feeds one batch and runs it synchronously (run(**inputs)
        # needs it); the loader's DataLoader workers already overlap reading with this.
        pipe = graph(batch_size=capacity, num_threads=self.num_threads, device_id=device_id, seed=self.seed,
                     prefetch_queue_depth=1)
        pipe.build()
        self._pipe, self._capacity = pipe, capacity

    def _pipeline(self, n: int):
        if self._pipe is None or n > self._capacity:
            self._pipe = None
            self._build(max(n, self._capacity))
        return self._pipe

    # -- host-side draws ------------------------------------------------------------------------

    def _inputs(self, raws: list[RawSample], hws: list[tuple[int, int]], draws: list[list[ViewDraw]]) -> dict:
        inputs: dict[str, list[np.ndarray]] = {"enc": [np.frombuffer(r.image, dtype=np.uint8) for r in raws]}
        if not self.two_views:
            return inputs
        for v in range(2):
            ds = [d[v] for d in draws]
            inputs[f"crop{v}"] = [np.array(d.crop is not None) for d in ds]
            # A sample whose flag is off never reaches fn.slice; its window is the whole image.
            inputs[f"start{v}"] = [np.array(d.crop[:2] if d.crop else (0, 0), dtype=np.int32) for d in ds]
            inputs[f"shape{v}"] = [np.array(d.crop[2:] if d.crop else hw, dtype=np.int32)
                                   for d, hw in zip(ds, hws, strict=True)]
            inputs[f"blur{v}"] = [np.array(d.sigma is not None) for d in ds]
            inputs[f"sigma{v}"] = [np.array(0.0 if d.sigma is None else d.sigma, dtype=np.float32)
                                   for d in ds]
        return inputs

    def _draw(self, raw: RawSample, hw: tuple[int, int], epoch: int) -> list[ViewDraw]:
        if not self.two_views:
            return [ViewDraw(None, None)]
        # Same generator and call order as augment_torch.two_views: view a's draw, then view b's.
        rng = sample_rng(self.seed, epoch, raw.index)
        return [draw_view(rng, hw[0], hw[1], self.spec), draw_view(rng, hw[0], hw[1], self.spec)]

    # -- running --------------------------------------------------------------------------------

    def _run(self, raws: list[RawSample], hws: list[tuple[int, int]],
             draws: list[list[ViewDraw]]) -> list[torch.Tensor]:
        n, s = len(raws), self.spec.image_size
        if n == 0:
            dev = self.device if self._cuda else torch.device("cpu")
            return [torch.zeros((0, 3, s, s), dtype=torch.float32, device=dev) for _ in range(self.num_views)]
        pipe = self._pipeline(n)
        try:
            outs = pipe.run(**self._inputs(raws, hws, draws))
        except Exception:
            # A failed iteration can leave the executor in an unusable state: start over next time.
            self._pipe = None
            raise
        return [self._to_torch(o, n) for o in outs]

    def _to_torch(self, out, n: int) -> torch.Tensor:
        s = self.spec.image_size
        t = out.as_tensor()
        if not self._cuda:
            # Copy: the array views DALI's output buffer, which the next run overwrites.
            return torch.from_numpy(np.array(t, dtype=np.float32, copy=True)).reshape(n, 3, s, s)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dst = torch.empty((n, 3, s, s), dtype=torch.float32, device=self.device)
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device))
        return dst

    def _isolate_bad(self, raws: list[RawSample], hws, draws, err: BaseException) -> list[int]:
        """Positions of the samples that broke a DALI run: PIL's verdict first, DALI one by one if
        PIL decodes them all (formats DALI rejects but PIL reads)."""
        bad = []
        for i, r in enumerate(raws):
            try:
                decode_rgb(r.image)
            except Exception:  # PIL raises several types for corrupt data
                bad.append(i)
        if bad:
            return bad
        for i in range(len(raws)):
            try:
                self._run(raws[i: i + 1], hws[i: i + 1], draws[i: i + 1])
            except Exception:
                bad.append(i)
        if not bad:
            raise err  # not a data problem: every sample decodes alone
        return bad

    def __call__(self, batch: Batch, epoch: int) -> Batch:
        skipped = list(batch.skipped)
        raws: list[RawSample] = []
        hws: list[tuple[int, int]] = []
        for r in batch.raw or []:
            try:
                hw = _image_hw(r.image)
            except Exception as e:  # unidentifiable header: DALI would fail the whole batch on it
                skipped.append((CORRUPT_IMAGE, r.key, _error_text(e)))
                continue
            problem = _dali_problem(r.image)
            if problem is not None:
                skipped.append((CORRUPT_IMAGE, r.key, problem))
                continue
            raws.append(r)
            hws.append(hw)
        draws = [self._draw(r, hw, epoch) for r, hw in zip(raws, hws, strict=True)]
        while True:
            try:
                views = self._run(raws, hws, draws)
                break
            except Exception as e:  # DALI raises RuntimeError for a bad image, failing the whole batch
                bad = set(self._isolate_bad(raws, hws, draws, e))
                for i in sorted(bad):
                    try:
                        decode_rgb(raws[i].image)
                        detail = f"DALI could not decode it: {_error_text(e)}"
                    except Exception as pe:
                        detail = _error_text(pe)
                    skipped.append((CORRUPT_IMAGE, raws[i].key, detail))
                keep = [i for i in range(len(raws)) if i not in bad]
                raws, hws, draws = [raws[i] for i in keep], [hws[i] for i in keep], [draws[i] for i in keep]
        labels = torch.tensor([r.label for r in raws], dtype=torch.int64)
        out = Batch(views, [r.key for r in raws], labels, skipped, raw=None, indices=[r.index for r in raws])
        if self.return_draws:
            out.draws = {  # type: ignore[attr-defined]
                "crop": torch.tensor([[d[v].crop is not None for d in draws] for v in range(self.num_views)],
                                     dtype=torch.bool).reshape(self.num_views, len(draws)),
                "blur": torch.tensor([[d[v].sigma is not None for d in draws] for v in range(self.num_views)],
                                     dtype=torch.bool).reshape(self.num_views, len(draws)),
            }
        return out
