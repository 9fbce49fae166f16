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


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, digits_root) -> dict[str, Path]:
    """Two small finished runs of the digits for the tools that use a run (predict, search), trained
    once per session: a streaming run of one head, and a cached run (fp16 features) of three heads
    reporting their consensus: both ways a head sees its features, both kinds of reported clustering."""
    from tests.helpers import tiny_run

    tmp = tmp_path_factory.mktemp("tiny_runs")
    return {
        "stream": tiny_run(tmp, digits_root, "stream"),
        "consensus": tiny_run(tmp, digits_root, "consensus", **{
            "train.mode": "cached", "cache.num_pairs": 1, "cache.dir": str(tmp / "cache"),
            "head.num_heads": 3, "head.select": "consensus"}),
    }


@pytest.fixture(scope="session")
def digits_pngs(tmp_path_factory, digits_root) -> dict[str, Path]:
    """The digits' training images as files `<key>.png` in one folder: key -> path."""
    from tests.helpers import split_to_files

    return split_to_files(digits_root / "train", tmp_path_factory.mktemp("digits_pngs") / "images")


@pytest.fixture()
def keep_logging():
    """For tests that call an entry point's main() in this process: it configures the root logger
    onto the test's captured stderr (runlog.setup_logging), which pytest closes after the test; the
    handlers before it are put back, so later tests do not log into a closed stream."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
