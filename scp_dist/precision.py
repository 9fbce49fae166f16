"""Numeric precision of the forward passes (train.precision): one rule for the training job, the
feature extraction and the benchmarks."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext

import torch

log = logging.getLogger("scp_dist")


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision for this device: auto is bf16 on a GPU and fp32 on a CPU, where the reduced
    precisions are not used (a warning says so)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision != "fp32" and device.type != "cuda":
        log.warning("train.precision=%s needs a GPU; using fp32 on CPU", precision)
        return "fp32"
    return precision


def autocast_context(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast region of a resolved precision; a no-op for fp32 and on a CPU."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)
