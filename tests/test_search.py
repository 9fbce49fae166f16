"""scp_dist.search: a training image used as a query finds itself first; training_neighbours gives the
exact nearest other training rows in both spaces; flat and IVF indexes agree on a synthetic set; the
stored index is rebuilt when stale; a run that cannot be used is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scp_dist import faiss_index as FI
from scp_dist import search as S
from scp_dist.feature_cache import load_kind
from scp_dist.run_artifacts import load_run

pytestmark = pytest.mark.usefixtures("keep_logging")  # main() runs in this process

def hits_of(capsys, argv: list[str]) -> list[dict]:
    assert S.main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow  # the tiny runs train first (seconds)
@pytest.mark.parametrize("kind", ["stream", "consensus"])
def test_a_training_image_finds_itself_first(tiny_runs, digits_pngs, capsys, kind):
    keys = ["digits_0000001", "digits_0001234"]
    hits = hits_of(capsys, ["--run", str(tiny_runs[kind]), "--query", *(str(digits_pngs[k]) for k in keys),
                            "-k", "5", "--json"])
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5] * 2
    for i, key in enumerate(keys):
        mine = hits[5 * i: 5 * i + 5]
        assert mine[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
        # itself, unless an identical image ties with it at the top (the digits hold a few)
        assert key in {h["key"] for h in mine if h["similarity"] > 1 - 1e-5}
        assert [h["similarity"] for h in mine] == sorted((h["similarity"] for h in mine), reverse=True)
    assumed = {r.split(",")[0]: int(r.split(",")[1])
               for r in (tiny_runs[kind] / "assignments_train.csv").read_text().splitlines()[1:]}
    assert all(h["cluster"] == assumed[h["key"]] for h in hits)  # the run's own clusters


@pytest.mark.slow
@pytest.mark.parametrize("space", ["features", "probs"])
def test_training_neighbours_are_the_exact_nearest_other_rows(tiny_runs, space):
    run = tiny_runs["consensus"]
    loaded = load_run(run)
    plain = load_kind(S._cached_plain(loaded), "train", "plain")
    x = plain.feats[0].float()
    x = loaded.probabilities(x).numpy() if space == "probs" else x.numpy()
    x = FI.normalise(x)
    rows = [0, 7, 500, 1796]
    ids, sims = S.training_neighbours(run, rows, k=6, space=space)
    assert ids.shape == sims.shape == (4, 6)
    sim_all = x[rows] @ x.T
    for r, row in enumerate(rows):
        assert row not in ids[r]
        sim_all[r, row] = -np.inf
        want = np.sort(sim_all[r])[::-1][:6]
        np.testing.assert_allclose(sims[r], want, atol=1e-5)  # ties may swap rows, never similarities
        np.testing.assert_allclose(sim_all[r, ids[r]], sims[r], atol=1e-5)
    if space == "probs":  # a row's nearest in probability space share its cluster
        clusters = np.load(run / "search" / "clusters.npy")
        assert (clusters[ids[:, 0]] == clusters[rows]).all()


@pytest.mark.slow
def test_a_stale_index_is_rebuilt(tiny_runs):
    run = tiny_runs["stream"]
    S.training_neighbours(run, [0], k=2)
    meta = run / "search" / "meta.json"
    stale = json.loads(meta.read_text())
    stale["fingerprint"]["eval"] = "something else"
    meta.write_text(json.dumps(stale))
    ids, _ = S.training_neighbours(run, [0], k=2)
    assert json.loads(meta.read_text())["fingerprint"] == S.fingerprint(load_run(run))
    assert ids.shape == (1, 2) and (ids >= 0).all()


def test_flat_and_ivf_agree_on_a_synthetic_set():
    rng = np.random.default_rng(0)
    n, d, classes, k = 20_000, 32, 40, 10
    labels = rng.integers(0, classes, n)
    x = FI.normalise(rng.normal(0, 1, (classes, d))[labels] * 3 + rng.normal(0, 1, (n, d)))
    q = np.arange(0, n, 97)
    flat, ivf = FI.build_index(x, "flat"), FI.build_index(x, "ivf")
    assert isinstance(flat, type(FI.build_index(x[:100]))) and ivf.nlist == FI.ivf_lists(n) and ivf.nprobe >= 1
    _, f_ids = flat.search(x[q], k + 1)
    _, i_ids = ivf.search(x[q], k + 1)
    same_label = [float((labels[ids[:, 1:]] == labels[q, None]).mean()) for ids in (f_ids, i_ids)]
    assert abs(same_label[0] - same_label[1]) < 0.02, same_label
    recall = np.mean([len(set(a) & set(b)) / (k + 1) for a, b in zip(f_ids, i_ids, strict=True)])
    assert recall > 0.9, recall


def test_a_missing_run_is_a_one_line_error(tmp_path, capsys):
    query = tmp_path / "q.png"
    query.write_bytes(b"")
    assert S.main(["--run", str(tmp_path / "nothing"), "--query", str(query)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0], err
    assert S.main(["--run", str(tmp_path), "--query", str(tmp_path / "absent.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0], err
