"""The label-free measure benchmarks/posthoc.py ranks heads with (the analyses themselves run on
finished runs: docs/RESULTS.md, "The current code, rerun")."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.posthoc import modularity


def test_modularity_is_high_for_the_graphs_groups_zero_for_one_cluster_and_negative_across():
    # Two groups of five images; each image's four neighbours are the rest of its group.
    table = np.array([[j for j in range(g, g + 5) if j != i] for g in (0, 5) for i in range(g, g + 5)])
    assert modularity(table, np.repeat([0, 1], 5), 2) == pytest.approx(0.5)
    assert modularity(table, np.zeros(10, dtype=np.int64), 2) == pytest.approx(0.0)  # nothing above chance
    assert modularity(table, np.tile([0, 1], 5), 2) < 0.0  # every group split across both clusters
