"""Decode + the paper's two-view augmentation in plain torch (the fallback when DALI is absent).

Each view independently: RandomCrop with probability `crop_p` (a random square-ish window whose
sides are a fraction U(crop_scale) of the image's), GaussianBlur with probability `blur_p` (sigma
U(blur_sigma) in output pixels), resize to the backbone's size, normalise with its mean/std.
Randomness comes from a generator seeded by (seed, epoch, global sample index), so the views of a
sample do not depend on the number of ranks or workers.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class ViewSpec:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_p: float = 0.5
    crop_scale: tuple[float, float] = (0.5, 1.0)
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1

    @property
    def blur_kernel(self) -> int:
        k = max(3, round(self.blur_kernel_frac * self.image_size))
        return k if k % 2 else k + 1

    @classmethod
    def from_config(cls, aug, image_size: int, mean, std) -> ViewSpec:
        return cls(image_size, tuple(mean), tuple(std), float(aug.crop_p), tuple(aug.crop_scale), float(aug.blur_p),
                   tuple(aug.blur_sigma), float(aug.blur_kernel_frac))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG markers without a length field: TEM and the restart markers.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def _png_problem(data: bytes) -> str | None:
    pos, idat = len(_PNG_SIGNATURE), False
    while pos + 12 <= len(data):
        n, kind = struct.unpack_from(">I4s", data, pos)
        if pos == len(_PNG_SIGNATURE) and (kind != b"IHDR" or n != 13):
            return "PNG does not start with an IHDR chunk"
        pos += 12 + n  # length, type, data, CRC
        if pos > len(data):
            return f"PNG chunk {kind.decode('latin-1')!r} runs past the end of the data (truncated)"
        if kind == b"IEND":
            return None if idat else "PNG without image data (no IDAT chunk)"
        idat = idat or kind == b"IDAT"
    return "PNG ends before its IEND chunk (truncated)"


def _jpeg_problem(data: bytes) -> str | None:
    pos = 2
    while True:  # the header segments, up to the first scan
        if pos + 4 > len(data):
            return "JPEG ends inside its headers (truncated)"
        if data[pos] != 0xFF:
            return f"JPEG: no marker at byte {pos}"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker == 0xD9:
            return "JPEG ends before its first scan"
        (n,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + n
        if marker == 0xDA:
            break
    # Entropy-coded data stuffs every 0xFF with 0x00, so an end-of-image marker after the first
    # scan's header is the real one (an EXIF thumbnail's lies before it).
    if data.rfind(b"\xff\xd9") < pos:
        return "JPEG without an end-of-image marker after its scan data (truncated)"
    return None


def is_png_or_jpeg(data: bytes) -> bool:
    return data.startswith((_PNG_SIGNATURE, b"\xff\xd8"))


def structure_problem(data: bytes) -> str | None:
    """Why a PNG or JPEG stream is incomplete, or None (also for other formats): a walk over its
    chunk or segment headers, no CRC, no decode. The DALI backend runs it before DALI sees the
    bytes (a truncated stream can crash DALI); decode_rgb runs it too, so both backends reject
    the same files (PIL alone would read a PNG missing its IEND chunk)."""
    if data.startswith(_PNG_SIGNATURE):
        return _png_problem(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_problem(data)
    return None


# PIL opens 16-bit grey PNGs in these modes, whose convert("RGB") clips at 255 instead of scaling.
_WIDE_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def _rgb8(im: Image.Image) -> np.ndarray:
    if im.mode not in _WIDE_MODES:
        return np.asarray(im.convert("RGB"))
    # round(v * 255 / 65535), as DALI's decoder does, so both backends see the same pixels.
    grey = np.rint(np.asarray(im, dtype=np.float64) * (255.0 / 65535.0)).clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def decode_rgb(data: bytes) -> torch.Tensor:
    """Encoded PNG/JPEG -> uint8 (3, H, W), 16-bit PNGs scaled to 8 bits. Raises on corrupt data
    (ValueError for an incomplete stream, else PIL's errors)."""
    problem = structure_problem(data)
    if problem is not None:
        raise ValueError(problem)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        arr = _rgb8(im)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a float (3, H, W) image, reflect padding (as torchvision/DALI)."""
    r = kernel // 2
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    w = torch.exp(-(t**2) / (2 * sigma**2))
    w = w / w.sum()
    c = x.shape[0]
    pad_mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    y = F.pad(x[None], (r, r, 0, 0), mode=pad_mode)
    y = F.conv2d(y, w.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, r, r), mode=pad_mode)
    y = F.conv2d(y, w.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


@dataclass
class ViewDraw:
    """The random choices of one view (exposed so tests can check their frequencies)."""

    crop: tuple[int, int, int, int] | None  # (top, left, height, width)
    sigma: float | None


def draw_view(rng: np.random.Generator, height: int, width: int, spec: ViewSpec) -> ViewDraw:
    crop = None
    # Draw every number every time so one choice never shifts the stream of the next.
    u_crop, frac, u_top, u_left, u_blur, u_sigma = rng.random(6)
    if u_crop < spec.crop_p:
        lo, hi = spec.crop_scale
        f = lo + (hi - lo) * frac
        h, w = max(1, round(f * height)), max(1, round(f * width))
        crop = (math.floor(u_top * (height - h + 1)), math.floor(u_left * (width - w + 1)), h, w)
    sigma = None
    if u_blur < spec.blur_p:
        lo, hi = spec.blur_sigma
        sigma = lo + (hi - lo) * u_sigma
    return ViewDraw(crop, sigma)


def apply_view(img: torch.Tensor, draw: ViewDraw, spec: ViewSpec) -> torch.Tensor:
    """uint8 (3, H, W) -> normalised float32 (3, S, S)."""
    x = img
    if draw.crop is not None:
        top, left, h, w = draw.crop
        x = x[:, top: top + h, left: left + w]
    x = _resize(x.float().div_(255.0), spec.image_size)
    if draw.sigma is not None:
        x = gaussian_blur(x, spec.blur_kernel, draw.sigma)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return (x - mean) / std


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def two_views(img: torch.Tensor, spec: ViewSpec, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = img.shape[-2:]
    return (apply_view(img, draw_view(rng, h, w, spec), spec), apply_view(img, draw_view(rng, h, w, spec), spec))


def plain_view(img: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    """Evaluation: resize + normalise, no augmentation."""
    return apply_view(img, ViewDraw(None, None), spec)
