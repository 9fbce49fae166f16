"""scp_dist.predict: new images get the cluster and probability the run's own evaluation gave the same
images (assignments_train.csv), from shards or from a folder of image files, on one process and on
two gloo processes under torchrun; unreadable images are listed with the reason, never fatal; a run
that cannot be used is a one-line error with exit code 2."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scp_dist.config import load_config, save_config
from scp_dist.metrics import clustering_scores
from scp_dist.predict import main
from tests.helpers import REPO

pytestmark = pytest.mark.usefixtures("keep_logging")  # main() runs in this process

def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_as_the_run(run: Path, rows: list[dict[str, str]], key_of=lambda r: r["key"]) -> None:
    want = {r["key"]: r for r in read_csv(run / "assignments_train.csv")}
    got = {key_of(r): r for r in rows}
    assert got.keys() == want.keys()
    for key, r in got.items():
        assert int(r["cluster"]) == int(want[key]["cluster"]), key
        assert abs(float(r["probability"]) - float(want[key]["probability"])) <= 1e-5, key
    # The k-means column is the run's baseline: it scores as eval.json says.
    labels = np.array([int(want[k]["label"]) for k in got])
    kmeans = np.array([int(r["kmeans_cluster"]) for r in got.values()])
    ev = json.loads((run / "eval.json").read_text())
    assert clustering_scores(labels, kmeans)["acc"] == pytest.approx(ev["splits"]["train"]["kmeans"]["acc"], abs=2e-3)


@pytest.mark.slow  # the tiny runs train first (seconds)
@pytest.mark.parametrize("kind", ["stream", "consensus"])
def test_training_shards_get_the_runs_assignments(tiny_runs, digits_root, tmp_path, kind):
    run = tiny_runs[kind]
    assert main(["--run", str(run), "--input", str(digits_root / "train"), "--out", str(tmp_path / "p")]) == 0
    rows = read_csv(tmp_path / "p.csv")
    assert [r["key"] for r in rows] == [r["key"] for r in read_csv(run / "assignments_train.csv")]  # input order
    assert_same_as_the_run(run, rows)
    assert read_csv(tmp_path / "p.failed.csv") == []
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "p.parquet").to_pydict()
    assert table["key"] == [r["key"] for r in rows] and table["cluster"] == [int(r["cluster"]) for r in rows]
    np.testing.assert_allclose(table["probability"], [float(r["probability"]) for r in rows], atol=1e-6)


@pytest.mark.slow
def test_a_vote_without_some_heads_is_what_predict_votes_too(digits_root, tmp_path):
    """head.vote_margin=0: only the lowest-loss head votes (eval.json's consensus_weights); predict
    must vote with the same heads to reproduce the run's own assignments."""
    from tests.helpers import tiny_run

    run = tiny_run(tmp_path, digits_root, "few_voters", **{
        "train.mode": "cached", "cache.num_pairs": 1, "head.num_heads": 3, "head.select": "consensus",
        "head.vote_margin": 0})
    assert sorted(json.loads((run / "eval.json").read_text())["consensus_weights"]) == [0.0, 0.0, 1.0]
    assert main(["--run", str(run), "--input", str(digits_root / "train"), "--out", str(tmp_path / "p")]) == 0
    assert_same_as_the_run(run, read_csv(tmp_path / "p.csv"))


@pytest.mark.slow
def test_a_folder_of_images_gets_the_runs_assignments_and_lists_what_fails(tiny_runs, digits_pngs, tmp_path):
    folder = next(iter(digits_pngs.values())).parent
    broken = folder / "zz_broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    (folder / "zz_not_an_image.jpg").write_bytes(b"hello")
    (folder / "notes.txt").write_text("not an image suffix: ignored")
    try:
        assert main(["--run", str(tiny_runs["stream"]), "--input", str(folder), "--out", str(tmp_path / "p.csv")]) == 0
    finally:
        for p in ("zz_broken.png", "zz_not_an_image.jpg", "notes.txt"):
            (folder / p).unlink()
    rows = read_csv(tmp_path / "p.csv")
    assert_same_as_the_run(tiny_runs["stream"], rows, key_of=lambda r: Path(r["path"]).stem)
    failed = {Path(r["path"]).name: r for r in read_csv(tmp_path / "p.failed.csv")}
    assert failed.keys() == {"zz_broken.png", "zz_not_an_image.jpg"}
    assert failed["zz_broken.png"]["reason"] == "corrupt_image" and failed["zz_broken.png"]["detail"]
    assert failed["zz_not_an_image.jpg"]["reason"] == "unreadable"
    assert "not a readable image" in failed["zz_not_an_image.jpg"]["detail"]


@pytest.mark.slow
def test_a_list_of_paths_keeps_its_order_and_a_missing_file_is_listed(tiny_runs, digits_pngs, tmp_path):
    keys = list(digits_pngs)[::-1][:50]  # another order than the shards'
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([str(digits_pngs[k]) for k in keys[:25]] + [str(tmp_path / "gone.png")]
                                 + [str(digits_pngs[k]) for k in keys[25:]]) + "\n")
    assert main(["--run", str(tiny_runs["consensus"]), "--input", str(listing), "--out", str(tmp_path / "p")]) == 0
    rows = read_csv(tmp_path / "p.csv")
    assert [Path(r["path"]).stem for r in rows] == keys
    want = {r["key"]: r for r in read_csv(tiny_runs["consensus"] / "assignments_train.csv")}
    assert all(int(r["cluster"]) == int(want[Path(r["path"]).stem]["cluster"]) for r in rows)
    (failed,) = read_csv(tmp_path / "p.failed.csv")
    assert failed["path"] == str(tmp_path / "gone.png") and failed["reason"] == "unreadable"


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("source", ["shards", "folder"])
def test_two_torchrun_processes_write_one_output_in_input_order(tiny_runs, digits_root, digits_pngs, tmp_path, source):
    src = digits_root / "train" if source == "shards" else next(iter(digits_pngs.values())).parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scp_dist.predict", "--run-dir", str(tiny_runs["stream"]), "--input", str(src), "--out", str(tmp_path / "p"),
           "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_csv(tmp_path / "p.csv")
    key_of = (lambda r: r["key"]) if source == "shards" else (lambda r: Path(r["path"]).stem)
    if source == "shards":  # one file, in input order, from the two ranks' halves
        assert [r["key"] for r in rows] == [r["key"] for r in read_csv(tiny_runs["stream"] / "assignments_train.csv")]
    else:
        assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)  # the folder's sorted order
    assert_same_as_the_run(tiny_runs["stream"], rows, key_of=key_of)
    assert not list(tmp_path.glob(".predict-*"))  # the temporary shards are gone


def test_a_run_without_checkpoint_is_a_one_line_error(tmp_path, capsys):
    broken = tmp_path / "run"
    save_config(load_config("demo_digits"), broken / "config.yaml")
    assert main(["--run", str(broken), "--input", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint" in err[0], err
    assert main(["--run", str(tmp_path / "nothing"), "--input", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0], err


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_backbone_that_cannot_be_built_is_a_one_line_error_with_exit_code_2(tiny_runs, digits_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "eval.json"):
        (run / name).write_text((tiny_runs["stream"] / name).read_text())
    (run / "checkpoints").symlink_to(tiny_runs["stream"] / "checkpoints")
    cfg = (run / "config.yaml").read_text().replace("name: pixels\n  model: ''", "name: timm\n  model: no_such_model_xyz", 1)
    (run / "config.yaml").write_text(cfg)
    proc = subprocess.run([sys.executable, "-m", "scp_dist.predict", "--run", str(run), "--input",
                           str(digits_root / "train")], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "backbone" in lines[0] and "cannot be built" in lines[0], \
        proc.stderr
