"""Assign new images to a finished run's clusters.

    python -m scp_dist.predict --run runs/X --input DIR|LIST|SHARDS [--out F]
    torchrun --nproc_per_node 4 -m scp_dist.predict --run-dir runs/X --input DIR    # each rank a share

--input is a folder of images (searched recursively), a text/CSV list of image paths (the format of
`python -m scp_dist.shards list`; labels in it are ignored), or a shard split directory written by
this project (one holding manifest.json, e.g. data/digits/train).

One path for every input: a folder or list is first written into temporary shards by the project's
own shard writer, in the input's order, and every input is then read by the evaluation's loader
(plain view: resize + normalise, no augmentation), passed through the run's backbone and head by
the code its evaluation ran (features.backbone_forward, evaluate.predict, evaluate.consensus). So a
training image gets the cluster and probability of the run's assignments CSV.

Writes F.csv and F.parquet (Parquet needs pyarrow: pip install 'scp_dist[report]'), one row per
image in input order: `path` (folder, list) or `key` (shards), `cluster`, `probability` and, when the
run kept its k-means centroids, `kmeans_cluster`; and F.failed.csv: every image that could not be
read or decoded, with the reason. Default F: <run>/predict/<input name>.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from scp_dist import distributed as D
from scp_dist.data.batch import DataError
from scp_dist.data.loader import build_eval_loader
from scp_dist.data.plan import eval_range
from scp_dist.errors import USER_ERRORS, UserError
from scp_dist.evaluate import consensus
from scp_dist.evaluate import predict as head_predict
from scp_dist.features import EvalBatch, backbone_forward
from scp_dist.fileio import atomic_write, atomic_write_text
from scp_dist.kmeans import nearest_centroid
from scp_dist.run_artifacts import Run, load_run
from scp_dist.runlog import progress, setup_logging
from scp_dist.shards.converters import _is_image, _key, _list_entries, _resolve, load_image_file
from scp_dist.shards.format import index_path, shard_name
from scp_dist.shards.manifest import MANIFEST_NAME, Manifest, ShardError, write_manifest
from scp_dist.shards.writer import LazySample, write_shards

log = logging.getLogger("scp_dist")
SHARD_SAMPLES = 10_000  # per temporary shard, as the converters' default
UNREADABLE = "unreadable"  # the reason of a file the shard writer could not read or convert


class PredictError(UserError, RuntimeError):
    """An input that cannot be predicted on (missing, empty, a data set instead of a split)."""


@dataclass
class InputSplit:
    """The input as a shard split: its directory, the file path of each key (folder and list
    inputs; None for shards) and the files that could not even be read, with the reason."""

    split_dir: Path
    paths: dict[str, str] | None = None
    unreadable: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- inputs -> one shard split


def image_files(folder: Path) -> list[Path]:
    """The images under `folder`, recursively, in a stable order (as the imagefolder converter)."""
    return sorted((p for p in folder.rglob("*") if _is_image(p)), key=lambda p: p.relative_to(folder).parts)


def list_files(list_path: Path) -> list[Path]:
    """The paths a list names (relative ones from the list's folder); missing files stay in the
    list, so they are reported with the others that fail instead of stopping the job."""
    base = list_path.parent.absolute()
    return [_resolve(base, entry) for _, entry, _ in _list_entries(list_path)]


def images_to_shards(files: Sequence[Path], out: Path, st: D.DistState | None = None) -> InputSplit:
    """Write `files` into a shard split at `out` in the given order, with the project's writer and
    its image handling (converters.load_image_file); a file it cannot read becomes an empty image,
    which the loader then skips, and its reason is kept. Collective: each rank writes the shards of
    its evaluation range (the files it will then read), rank 0 joins them under one manifest."""
    st = st or D.DistState()
    if not files:
        raise PredictError("no images to predict on")
    common = Path(os.path.commonpath([p.absolute().parent for p in files]))
    used: set[str] = set()
    keys = [_key(p.absolute().relative_to(common).as_posix(), used) for p in files]
    unreadable: dict[str, str] = {}

    def loader(path: Path, key: str):
        def load() -> tuple[bytes, str]:
            try:
                return load_image_file(path)
            except ShardError as e:
                unreadable[key] = str(e)
                return b"", "png"
        return load

    mine = eval_range(len(files), st.world_size, st.rank)
    shards = []
    if len(mine):
        samples = [LazySample(keys[i], None, loader(files[i], keys[i])) for i in mine]
        shards = write_shards(samples, _part_dir(out, st.rank), source="predict", split=out.name, classes=None,
                              max_count=SHARD_SAMPLES, progress=False, resume=False, seed=None).shards
    parts = D.gather_objects((shards, unreadable))
    if st.is_main:
        assert parts is not None
        out.mkdir(parents=True, exist_ok=True)
        joined = []
        for rank, (infos, lost) in enumerate(parts):
            unreadable.update(lost)
            src = _part_dir(out, rank)
            for info in infos:  # renamed in rank order: the manifest's shard order is the input's
                name = shard_name(len(joined))
                os.replace(src / info.name, out / name)
                os.replace(index_path(src / info.name), index_path(out / name))
                joined.append(replace(info, name=name))
            shutil.rmtree(src, ignore_errors=True)
        write_manifest(out, Manifest(source="predict", split=out.name, num_samples=0, num_classes=0, classes=None,
                                     shards=joined, order="as_given"))
    D.barrier()  # the joined split is complete before any rank opens it
    return InputSplit(out, dict(zip(keys, map(str, files), strict=True)), D.broadcast_object(unreadable))


def _part_dir(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.part{rank:03d}")


def shared(st: D.DistState, make: Callable[[], object]) -> object:
    """What rank 0 makes (`make()`), on every rank; an error there is raised on every rank, so
    none waits in a collective for a rank that has stopped."""
    result: tuple[str, object] | None = None
    if st.is_main:
        try:
            result = ("ok", make())
        except USER_ERRORS as e:
            result = ("error", str(e))
    result = D.broadcast_object(result)
    if result[0] == "error":
        raise PredictError(result[1])
    return result[1]


def input_files(src: Path) -> list[Path] | None:
    """The image files of a folder or list input; None for a shard split (read as it is)."""
    if src.is_dir() and (src / MANIFEST_NAME).is_file():
        return None
    if src.is_dir():
        splits = sorted(d.name for d in src.iterdir() if (d / MANIFEST_NAME).is_file())
        if splits:
            raise PredictError(f"--input {src} is a sharded data set: name one of its splits ({', '.join(splits)}), "
                               f"e.g. {src / splits[0]}")
        files = image_files(src)
        if not files:
            raise PredictError(f"--input {src}: no image files in it")
        return files
    if src.is_file():
        files = list_files(src)
        if not files:
            raise PredictError(f"--input {src}: the list names no images")
        return files
    raise PredictError(f"--input {src} does not exist")


def resolve_input(src: Path, work: Path, st: D.DistState) -> InputSplit:
    """--input as a shard split: a split directory as it is; a folder or list (listed once, by
    rank 0) through images_to_shards into `work`. Collective."""
    files = shared(st, lambda: input_files(src))
    return InputSplit(src) if files is None else images_to_shards(files, work / "input", st)


# ---------------------------------------------------------------- images -> the run's features


def feature_batches(run: Run, split_dir: Path, st: D.DistState, skipped: list[tuple[str, str, str]],
                    batch_size: int = 0, desc: str = "predict") -> Iterator[EvalBatch]:
    """This rank's share of a split as (features as the run's head saw them, keys, labels): the
    evaluation's loader and forward. Samples that cannot be read are appended to `skipped` as
    (reason, key, detail) and never stop the job (data.on_error=skip whatever the run said)."""
    backbone = run.backbone()
    data_cfg = OmegaConf.merge(run.cfg.data, {"on_error": "skip", "verify": False})
    loader = build_eval_loader(split_dir, data_cfg, world_size=st.world_size, rank=st.rank,
                               batch_size=batch_size or run.batch_size, image_size=backbone.image_size,
                               mean=backbone.mean, std=backbone.std, device=run.device)
    for batch in progress(loader, st.is_main, desc=desc):
        skipped.extend(batch.skipped)
        if batch.keys:
            f = backbone_forward(backbone, batch.views[0], run.device, run.precision)
            yield run.as_evaluated(f), batch.keys, batch.labels


@dataclass
class Assignments:
    keys: list[str]
    cluster: np.ndarray
    probability: np.ndarray
    kmeans: np.ndarray | None
    failed: list[tuple[str, str, str]]  # (key, reason, detail)


def assign(run: Run, split_dir: Path, st: D.DistState, batch_size: int = 0) -> Assignments | None:
    """Every sample of the split to the run's reported clustering (and its k-means centroids).
    Collective; rank 0 returns the result in the split's order, the others None."""
    skipped: list[tuple[str, str, str]] = []
    keep = run.centroids is not None
    try:
        preds, local = head_predict(feature_batches(run, split_dir, st, skipped, batch_size), run.head, st,
                                    keep_features=keep, split=str(split_dir))
    except DataError:  # raised on every rank alike: no image could be read; the failed list says why
        preds, local = None, np.zeros((0, run.head.dims[0]), np.float32) if keep else None
    km_parts = None
    if keep:
        assert local is not None and run.centroids is not None
        km_parts = D.gather_objects(nearest_centroid(run.centroids, local) if len(local) else np.zeros(0, np.int64))
    failed_parts = D.gather_objects([(key, reason, detail) for reason, key, detail in skipped])
    if not st.is_main:
        return None
    failed = [f for part in failed_parts for f in part]
    kmeans = np.concatenate(km_parts) if km_parts is not None else None
    if preds is None:
        return Assignments([], np.zeros(0, np.int64), np.zeros(0, np.float32),
                           None if kmeans is None else kmeans, failed)
    if run.consensus:
        h = run.head.num_heads
        cluster, prob = consensus(preds.clusters[:h], preds.confidence[:h] * run.vote_weights[:, None], run.mappings,
                                  run.num_clusters)
    else:
        cluster, prob = preds.clusters[run.chosen], preds.confidence[run.chosen]
    return Assignments(preds.keys, cluster.astype(np.int64), prob.astype(np.float32), kmeans, failed)


# ---------------------------------------------------------------- output


def output_stem(out: str | None, run: Path, src: Path) -> Path:
    if out is None:
        return run / "predict" / (src.stem or "input")
    p = Path(out)
    return p.with_suffix("") if p.suffix in (".csv", ".parquet") else p


def write_outputs(stem: Path, a: Assignments, inp: InputSplit) -> list[Path]:
    """stem.csv, stem.parquet (with pyarrow) and stem.failed.csv, each written atomically."""
    name = "key" if inp.paths is None else "path"
    ids = a.keys if inp.paths is None else [inp.paths[k] for k in a.keys]
    columns: dict[str, list] = {name: ids, "cluster": a.cluster.tolist(), "probability": a.probability.tolist()}
    if a.kmeans is not None:
        columns["kmeans_cluster"] = a.kmeans.tolist()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for i in range(len(ids)):
        w.writerow([ids[i], columns["cluster"][i], f"{columns['probability'][i]:.6f}",
                    *([columns["kmeans_cluster"][i]] if "kmeans_cluster" in columns else [])])
    written = [stem.with_suffix(".csv")]
    atomic_write_text(written[0], buf.getvalue())
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        log.warning("no Parquet output: pyarrow is not installed (pip install 'scp_dist[report]')")
    else:
        types = {name: pa.string(), "cluster": pa.int32(), "probability": pa.float32(), "kmeans_cluster": pa.int32()}
        table = pa.table({k: pa.array(v, type=types[k]) for k, v in columns.items()})
        written.append(stem.with_suffix(".parquet"))
        atomic_write(written[-1], lambda f: pq.write_table(table, f))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([name, "reason", "detail"])
    for key, reason, detail in a.failed:
        if key in inp.unreadable:  # the writer's reason (the file itself), not the empty image's
            reason, detail = UNREADABLE, inp.unreadable[key]
        w.writerow([inp.paths.get(key, key) if inp.paths else key, reason, detail])
    written.append(stem.with_name(stem.name + ".failed.csv"))
    atomic_write_text(written[-1], buf.getvalue())
    return written


# ---------------------------------------------------------------- CLI


def add_run_arg(p: argparse.ArgumentParser) -> None:
    # --run-dir too: under torchrun `--run` is refused as an ambiguous abbreviation of torchrun's own
    # --run-path (argparse matches prefixes before it hands the rest to the script).
    p.add_argument("--run", "--run-dir", dest="run", required=True, type=Path,
                   help="the run directory (runs/<name>); under torchrun spell it --run-dir")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scp_dist.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arg(p)
    p.add_argument("--input", required=True, type=Path, help="a folder of images, a list of image paths, "
                   "or a shard split directory")
    p.add_argument("--out", default=None, help="output path without suffix (.csv/.parquet are stripped); "
                   "default <run>/predict/<input name>")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=0,
                   help="images per backbone batch; 0: the run's evaluation batch (the same features to the bit)")
    p.add_argument("--work-dir", type=Path, default=None, help="where a folder or list input is written as "
                   "temporary shards (on a file system every rank sees); default: beside the output")
    return p.parse_args(argv)


def predict_main(args: argparse.Namespace, st: D.DistState) -> None:
    run = load_run(args.run, st.device)
    stem = output_stem(args.out, args.run, args.input)

    def make_work() -> str:
        parent = args.work_dir or stem.parent
        parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(prefix=".predict-", dir=parent)

    work = Path(str(shared(st, make_work)))
    try:
        inp = resolve_input(args.input, work, st)
        result = assign(run, inp.split_dir, st, args.batch_size)
        if result is not None:
            files = write_outputs(stem, result, inp)
            print(f"{len(result.keys)} images assigned, {len(result.failed)} failed: "
                  + ", ".join(str(f) for f in files), flush=True)
        D.barrier()  # nobody still reads the temporary shards
    finally:
        if st.is_main:
            shutil.rmtree(work, ignore_errors=True)


def cli(argv: list[str] | None, parse: Callable[[list[str] | None], argparse.Namespace],
        body: Callable[[argparse.Namespace, D.DistState], None]) -> int:
    """The entry points' frame (predict, search): distributed init, one line and exit code 2 for
    what the user can fix (as scp_dist.train), a traceback and 1 for anything else."""
    args = parse(argv)
    st = D.init_distributed(args.device)
    setup_logging(st.is_main)
    try:
        body(args, st)
    except Exception as e:  # noqa: BLE001 - every way out but success gets its line and exit code
        if isinstance(e, USER_ERRORS):
            print(f"error{f' (rank {st.rank})' if st.distributed else ''}: {e}", file=sys.stderr, flush=True)
            code = 2
        else:
            traceback.print_exception(e)
            code = 1
        if st.distributed:
            D.exit_now(code)  # no barrier: the other ranks may be inside a collective
        return code
    D.teardown()
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(argv, parse_args, predict_main)


if __name__ == "__main__":
    raise SystemExit(main())
