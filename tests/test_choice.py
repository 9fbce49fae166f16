"""Label-free choice among heads: Hungarian alignment of cluster ids and the confidence-weighted vote."""

from __future__ import annotations

import numpy as np
import torch

from scp_dist.evaluate import align_clusters, consensus, vote_weights
from scp_dist.metrics import cluster_acc


def test_alignment_undoes_a_relabelling():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 6, 500)
    perm = rng.permutation(6)
    mapping = align_clusters(ref, perm[ref], 6)
    np.testing.assert_array_equal(mapping[perm[ref]], ref)


def test_consensus_outvotes_noisy_heads():
    """Five heads, each the truth under its own ids with a different 30% of samples scrambled: every
    head scores about 0.75, the aligned vote recovers almost all of the truth."""
    rng = np.random.default_rng(1)
    k, n = 8, 2000
    truth = rng.integers(0, k, n)
    heads = []
    for _ in range(5):
        h = truth.copy()
        bad = rng.random(n) < 0.3
        h[bad] = rng.integers(0, k, bad.sum())
        heads.append(rng.permutation(k)[h])
    clusters = np.stack(heads)
    conf = np.full(clusters.shape, 0.9)
    mappings = np.stack([align_clusters(clusters[0], c, k) for c in clusters])
    vote, share = consensus(clusters, conf, mappings, k)
    single = max(cluster_acc(truth, c) for c in clusters)
    assert single < 0.8 and cluster_acc(truth, vote) > 0.95
    assert share.min() > 0 and share.max() <= 1.0 + 1e-9
    # Counter-test: without alignment (identity mappings) the vote mixes unrelated ids and fails.
    raw, _ = consensus(clusters, conf, np.tile(np.arange(k), (5, 1)), k)
    assert cluster_acc(truth, raw) < 0.8


def test_consensus_is_the_dense_tally_without_its_memory():
    """The vote equals a per-cluster tally (argmax, lowest id on ties), ties included, and its memory
    does not grow with K: an (n, K) tally here would take 400 MB."""
    import tracemalloc

    rng = np.random.default_rng(2)
    h, n, k = 5, 3000, 6
    clusters = rng.integers(0, k, (h, n))
    conf = rng.choice([0.25, 0.5, 1.0], (h, n))  # exact in binary: many exact ties between candidates
    mappings = np.stack([rng.permutation(k) for _ in range(h)])
    dense = np.zeros((n, k))
    for i in range(h):
        np.add.at(dense, (np.arange(n), mappings[i][clusters[i]]), conf[i])
    vote, share = consensus(clusters, conf, mappings, k)
    np.testing.assert_array_equal(vote, dense.argmax(1))
    np.testing.assert_allclose(share, dense.max(1) / conf.sum(0))
    assert (np.sort(dense, 1)[:, -1] == np.sort(dense, 1)[:, -2]).sum() > 100  # ties were exercised

    n, k = 50_000, 1000
    clusters = rng.integers(0, k, (h, n))
    mappings = np.stack([rng.permutation(k) for _ in range(h)])
    tracemalloc.start()
    consensus(clusters, np.ones((h, n)), mappings, k)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.05 * n * k * 8, peak  # well under the dense tally's 400 MB


def test_heads_whose_loss_ended_clearly_higher_do_not_vote():
    """head.vote_margin: three heads agree on a partition that merges two classes and ended 0.12 above
    the fourth head's loss, which found the classes: the vote of the heads within 0.1 of the lowest
    loss is the fourth's. Counter: with every head voting (a large margin) the three outvote it."""
    rng = np.random.default_rng(0)
    k, n = 4, 400
    truth = rng.integers(0, k, n)
    merged = np.where(truth == 1, 0, truth)
    clusters, conf, maps = np.stack([truth, merged, merged, merged]), np.ones((4, n)), np.tile(np.arange(k), (4, 1))
    losses = torch.tensor([-10.93, -10.81, -10.80, -10.79])
    weights = vote_weights(losses, 0.1)
    assert weights.tolist() == [1.0, 0.0, 0.0, 0.0]
    np.testing.assert_array_equal(consensus(clusters, conf * weights[:, None], maps, k)[0], truth)
    everyone = vote_weights(losses, 1e9)
    np.testing.assert_array_equal(consensus(clusters, conf * everyone[:, None], maps, k)[0], merged)
