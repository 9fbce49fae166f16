import numpy as np
import pytest

from scp_dist.metrics import ari, cluster_acc, clustering_scores, contingency, nmi


def test_acc_hand_computed():
    y = np.array([0, 0, 0, 1, 1, 1])
    # Clusters are a relabelling except one sample: best map 2->0, 5->1, 5 of 6 right.
    p = np.array([2, 2, 5, 5, 5, 5])
    assert cluster_acc(y, p) == pytest.approx(5 / 6)
    assert cluster_acc(y, 1 - y) == 1.0


def test_acc_more_clusters_than_classes():
    y = np.array([0, 0, 1, 1])
    p = np.array([0, 1, 2, 3])  # 4 clusters, 2 classes: only two clusters can be matched
    assert cluster_acc(y, p) == pytest.approx(0.5)


def test_acc_fewer_clusters_than_classes():
    y = np.array([0, 1, 2, 2])
    p = np.array([0, 0, 1, 1])
    assert cluster_acc(y, p) == pytest.approx(3 / 4)


def test_nmi_ari_hand_computed():
    y = np.array([0, 0, 1, 1])
    assert nmi(y, y) == pytest.approx(1.0)
    assert ari(y, y) == pytest.approx(1.0)
    # Independent split: zero mutual information; ARI = (0 - 0.5*... ) hand value -0.5.
    p = np.array([0, 1, 0, 1])
    assert nmi(y, p) == pytest.approx(0.0, abs=1e-12)
    assert ari(y, p) == pytest.approx(-0.5)


@pytest.mark.parametrize("seed", range(5))
def test_acc_is_the_best_one_to_one_map(seed):
    """Hungarian ACC equals the best of all K! cluster->class maps (K = 5, brute force)."""
    import itertools

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, size=200)
    p = np.where(rng.random(200) < 0.5, (y + 2) % 5, rng.integers(0, 5, size=200))
    best = max(np.mean(np.asarray(perm)[p] == y) for perm in itertools.permutations(range(5)))
    assert cluster_acc(y, p) == pytest.approx(best)


def test_scores_ignore_unlabelled_and_check_lengths():
    y = np.array([0, 1, -1, 1])
    p = np.array([1, 0, 0, 0])
    s = clustering_scores(y, p)
    assert s["n"] == 3 and s["acc"] == 1.0
    assert clustering_scores(np.array([-1, -1]), np.array([0, 1])) == {"n": 0}
    with pytest.raises(ValueError, match="differ in length"):
        contingency(np.zeros(3), np.zeros(4))
