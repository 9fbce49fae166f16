"""Fixtures and hooks only; the helpers the test modules import are in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Kinds of test (pyproject's markers) set in the test files; `unit` is given here to the rest, so a new
# in-process test is selected by `-m unit` without anyone having to mark it.
KINDS = ("multiprocess", "slurm", "bench")


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from scp_dist.shards.sources import prepare_digits

    root = tmp_path_factory.mktemp("digits")
    prepare_digits(root)
    return root


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the `unit` marker added here
def pytest_collection_modifyitems(config, items) -> None:
    """Tests of no other kind are marked `unit`. Tests marked `gpu` skip, with the reason in the summary, where torch sees no CUDA device.
    SCP_GPU_TESTS_ON_CPU=1 runs them on the CPU anyway (tiny sizes; the dry run of
    launch/gpu_check.sh does, so they are exercised before a GPU is there)."""
    for item in items:
        if not any(item.get_closest_marker(kind) for kind in KINDS):
            item.add_marker(pytest.mark.unit)
    if torch.cuda.is_available() or os.environ.get("SCP_GPU_TESTS_ON_CPU") == "1":
        return
    skip = pytest.mark.skip(reason="gpu test: no CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
