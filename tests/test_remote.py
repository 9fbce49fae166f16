"""Shards from anywhere (issue 21): http(s)://, s3://, brace sets and pipe: roots against real
loopback servers the tests start (benchmarks/servers.py): random access by range requests equals
local reads; streamed epochs use each sample at most once with equal steps on every rank; missing
shards, dropped connections and stalls are counted and skipped, never a hang; the cache spares a
second download; a resumed streamed epoch skips what it used."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from benchmarks.servers import Faults, http_server, s3_server, wait_for
from scp_dist.config import AugmentConfig, DataConfig, load_config
from scp_dist.data import remote as R
from scp_dist.data.batch import DataError
from scp_dist.data.stream import (
    StreamEvalLoader,
    StreamTrainLoader,
    choose_access,
    deal_shards,
    open_eval_loader,
    open_train_loader,
    step_sizes,
    stream_order,
)
from scp_dist.errors import ConfigError
from scp_dist.shards.sources import encode_png
from scp_dist.shards.writer import Sample, write_shards
from tests.dist_helpers import run_gloo
from tests.helpers import REPO

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CPU = torch.device("cpu")
N, PER_SHARD, G = 96, 8, 10  # 12 shards, 9 steps of 10


def make_split(root: Path, n: int = N, per_shard: int = PER_SHARD) -> Path:
    """root/train: n labelled PNGs (4 classes) in shards of per_shard, with .idx files and a manifest."""
    rng = np.random.default_rng(1)
    items = [Sample(f"k{i:05d}", encode_png(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)), "png", i % 4)
             for i in range(n)]
    write_shards(items, root / "train", source="t", split="train", classes=list("abcd"), max_count=per_shard,
                 progress=False)
    return root


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    return make_split(tmp_path_factory.mktemp("remote") / "ds")


def cfg(**kw):
    return OmegaConf.structured(DataConfig(**{"loader": "torch", "num_workers": 0, **kw}))


def train(root: str, world: int = 1, rank: int = 0, batch: int = G, **kw):
    return open_train_loader(str(root), "train", cfg(**kw), OmegaConf.structured(AugmentConfig()), world_size=world,
                             rank=rank, global_batch=batch, image_size=8, mean=MEAN, std=STD, seed=0, device=CPU)


def epoch(loader, e: int = 0, start: int = 0) -> list:
    loader.set_epoch(e, start)
    return list(loader)


def brace(url: str, shards: int = N // PER_SHARD) -> str:
    return f"{url}/train/shard-{{000000..{shards - 1:06d}}}.tar"


def check_epoch(per_rank: list[list], steps: int, global_batch: int = G, used: int | None = None) -> list[str]:
    """Every rank ran `steps` steps, each global batch holds global_batch samples (with `used` given:
    a stream without counts, whose last step takes what is left), no key twice."""
    assert [len(b) for b in per_rank] == [steps] * len(per_rank)
    for s in range(steps):
        n = sum(len(r[s].keys) for r in per_rank)
        assert n == global_batch or (used is not None and s == steps - 1 and 0 < n < global_batch)
    keys = [k for r in per_rank for b in r for k in b.keys]
    assert len(keys) == len(set(keys)) == (steps * global_batch if used is None else used)
    return keys


# --- pure parts ------------------------------------------------------------------------------------


def test_roots_are_parsed_joined_and_named():
    assert [R.kind_of(x) for x in ("data/x", "https://h/x", "http://h", "s3://b/p", "pipe:cat a.tar")] == \
        ["local", "http", "http", "s3", "pipe"]
    assert R.split_location("https://h:8/d/", "train") == "https://h:8/d/train"
    assert R.split_location("s3://b/d", "test") == "s3://b/d/test"
    assert R.split_location("data/d", "train") == str(Path("data/d/train"))
    spec = "https://h/d/train/shard-{000000..000003}.tar"
    assert R.is_shard_set(spec) and R.split_location(spec, "train") == spec and R.is_remote(spec)
    assert not R.is_remote("data/d")
    assert R.root_name("https://h/x/digits/") == "digits" and R.root_name(spec) == "train"
    assert R.root_name("s3://bucket/imagenet") == "imagenet"
    pipe = "pipe:aws s3 cp s3://b/photos/shard-{000000..000002}.tar -"
    assert R.root_name(pipe) == "photos" and R.kind_of(pipe) == "pipe"
    assert R.open_split(pipe, R.RemoteOptions()).names == [f"shard-{i:06d}.tar" for i in range(3)]
    with pytest.raises(ConfigError, match="data.test_split"):
        load_config("demo_digits", [f"data.root={spec}", "data.test_split=test"])
    with pytest.raises(ConfigError, match="data.access"):
        load_config("demo_digits", ["data.access=sometimes"])
    with pytest.raises(ConfigError, match="train.mode"):
        load_config("demo_digits", ["data.root=https://h/d", "train.mode=cached"])
    assert load_config("demo_digits", ["data.root=https://h/x/digits", "train.mode=stream"]).data.name == "digits"


@pytest.mark.parametrize("counts", [[40, 40], [100, 0, 3], [7, 13, 29, 1], [0, 0, 50], [31]])
@pytest.mark.parametrize("g", [1, 8, 16, 37])
def test_step_sizes_fill_every_global_batch_and_never_overdraw(counts, g):
    steps = sum(counts) // g
    sizes = step_sizes(counts, g, steps)
    assert sizes.shape == (steps, len(counts)) and (sizes >= 0).all()
    assert (sizes.sum(1) == g).all()
    assert (sizes.sum(0) <= np.array(counts)).all()
    if steps > 4:  # proportional: a rank's share of the first half is about half of what it takes
        half = sizes[: steps // 2].sum(0)
        assert (np.abs(half - sizes.sum(0) / 2) <= g).all()


def test_deal_shards_is_disjoint_covering_and_seeded():
    for readers in (1, 3, 7, 20):
        dealt = deal_shards(list(range(12)), 12, 0, 1, readers)
        flat = [s for d in dealt for s in d]
        assert sorted(flat) == list(range(12)) and len(dealt) == readers
    assert deal_shards(list(range(12)), 12, 0, 1, 2) != deal_shards(list(range(12)), 12, 0, 2, 2)
    left = [1, 5, 7, 8]  # a resume deals what is left, in the epoch's order
    order = [s for s in sum(deal_shards(list(range(12)), 12, 0, 1, 1), []) if s in left]
    assert sum(deal_shards(left, 12, 0, 1, 1), []) == order


# --- random access over HTTP ------------------------------------------------------------------------


def test_http_random_access_gives_the_local_batches(ds):
    with http_server(ds) as srv:
        assert choose_access(f"{srv.url}/train", cfg()) == "random"
        for world, rank, e in ((1, 0, 0), (2, 1, 1)):
            local, remote = epoch(train(ds, world, rank), e), epoch(train(srv.url, world, rank), e)
            assert [b.keys for b in local] == [b.keys for b in remote] and len(local) == N // G
            for a, b in zip(local, remote, strict=True):
                assert torch.equal(a.views[0], b.views[0]) and torch.equal(a.views[1], b.views[1])
                assert torch.equal(a.labels, b.labels)
        # one request per sample read (label and image in one range: 90 + 45), and the one-byte probe
        # of range support per loader built (1 + 2)
        tars = sum(v for k, v in srv.range_requests.items() if k.endswith(".tar"))
        assert tars == 90 + 45 + 3
        ev = open_eval_loader(srv.url, "train", cfg(), world_size=1, rank=0, batch_size=32, image_size=8,
                              mean=MEAN, std=STD, device=CPU)
        assert [k for b in ev for k in b.keys] == [f"k{i:05d}" for i in range(N)]


def test_auto_streams_without_ranges_or_indices_and_random_access_says_why(ds):
    with http_server(ds, ranges=False) as srv:
        assert choose_access(f"{srv.url}/train", cfg()) == "stream"
        with pytest.raises(ConfigError, match="data.access.*range requests"):
            choose_access(f"{srv.url}/train", cfg(access="random"))
        assert isinstance(train(srv.url), StreamTrainLoader)
    with http_server(ds, faults=Faults(missing={"shard-000000.idx"})) as srv:
        assert choose_access(f"{srv.url}/train", cfg()) == "stream"
    with http_server(ds, faults=Faults(missing={"manifest.json"})) as srv, \
            pytest.raises(Exception, match="cannot list a folder"):
        train(srv.url)


# --- streaming ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 2)])
def test_streamed_epochs_use_each_sample_once_with_equal_steps(ds, world, workers):
    with http_server(ds, ranges=False) as srv:
        seen = []
        for e in (0, 1):
            per_rank = [epoch(train(srv.url, world, r, num_workers=workers, shuffle_buffer=16), e)
                        for r in range(world)]
            seen.append(check_epoch(per_rank, N // G))
        assert seen[0] != seen[1]  # another shard order and shuffle each epoch
        # a streamed sample gets the views random access draws for it: (seed, epoch, global index)
        local = {k: (a, b) for bt in epoch(train(ds), 1) for k, a, b in zip(bt.keys, *bt.views, strict=True)}
        streamed = {k: (a, b) for bt in per_rank[0] for k, a, b in zip(bt.keys, *bt.views, strict=True)}
        common = set(local) & set(streamed)
        assert common and all(torch.equal(local[k][0], streamed[k][0]) and torch.equal(local[k][1], streamed[k][1])
                              for k in common)


def test_fewer_shards_than_readers_does_not_stall(tmp_path):
    root = make_split(tmp_path / "ds", n=40, per_shard=20)  # 2 shards, 3 ranks x 2 workers
    with http_server(root, ranges=False) as srv:
        per_rank = [epoch(train(srv.url, 3, r, num_workers=2, batch=8)) for r in range(3)]
        check_epoch(per_rank, 40 // 8, 8)
        # one shard each for ranks 0 and 1 (ranks first), nothing for rank 2, which yields empty batches
        assert [sum(len(b.keys) for b in r) for r in per_rank] == [20, 20, 0]


def test_stream_order_is_the_order_the_loader_reads(ds):
    """The randomness study computes streamed orders without reading (stream_order); this is the
    check that it is the loader's order, sample for sample."""
    order = stream_order([PER_SHARD] * (N // PER_SHARD), G, 2, 0, 3, 12)
    with http_server(ds, ranges=False) as srv:
        for rank in range(2):
            got = [b.indices for b in epoch(train(srv.url, 2, rank, shuffle_buffer=12), 3)]
            assert got == [o[rank].tolist() for o in order]


def test_a_missing_shard_is_counted_and_skipped_or_raised(ds, caplog):
    with http_server(ds, ranges=False, faults=Faults(missing={"shard-000003.tar"})) as srv:
        ld = train(srv.url, batch=8)
        batches = epoch(ld)
        assert len(batches) == N // 8 and ld.stats.as_dict()["missing_shard"] == PER_SHARD
        keys = [k for b in batches for k in b.keys]
        assert len(keys) == len(set(keys)) == N - PER_SHARD
        assert "shard-000003.tar" in caplog.text
        with pytest.raises(DataError, match=r"missing_shard.*shard-000003\.tar.*data\.on_error=raise"):
            epoch(train(srv.url, on_error="raise"))


@pytest.mark.parametrize("ranges", [True, False])
def test_a_dropped_connection_is_resumed_where_it_broke(ds, ranges):
    cut = (ds / "train" / "shard-000002.tar").stat().st_size // 2
    with http_server(ds, ranges=ranges, faults=Faults(drop={"shard-000002.tar": cut})) as srv:
        ld = train(srv.url, access="stream", batch=8)
        keys = [k for b in epoch(ld) for k in b.keys]
        assert srv.dropped["shard-000002.tar"] == 1 and srv.requests["train/shard-000002.tar"] == 2
        assert srv.range_requests["train/shard-000002.tar"] == (1 if ranges else 0)  # resumed at the byte
        assert sum(ld.stats.as_dict().values()) == 0 and len(set(keys)) == N


def test_a_connection_that_always_drops_costs_the_rest_of_its_shard_only(ds):
    cut = (ds / "train" / "shard-000005.tar").stat().st_size // 2
    # no range requests: every retry reads from the start and meets the cut again
    with http_server(ds, ranges=False, faults=Faults(drop={"shard-000005.tar": cut}, drop_times=-1)) as srv:
        ld = train(srv.url, access="stream", retries=2, batch=8)
        keys = [k for b in epoch(ld) for k in b.keys]
        lost = ld.stats.as_dict()["truncated"]
        assert 0 < lost < PER_SHARD and len(keys) == len(set(keys)) == N - lost
        assert srv.requests["train/shard-000005.tar"] == 3  # the first try and two retries
        assert {f"k{i:05d}" for i in range(5 * PER_SHARD, 5 * PER_SHARD + PER_SHARD - lost)} <= set(keys)


def test_a_stalled_server_times_out_instead_of_hanging(ds):
    with http_server(ds, faults=Faults(stall={"shard-000001.tar": (3000, 60.0)})) as srv:
        t0 = time.monotonic()
        ld = train(srv.url, access="stream", timeout_s=0.3, retries=1, batch=8)
        keys = [k for b in epoch(ld) for k in b.keys]
        assert time.monotonic() - t0 < 20
        lost = ld.stats.as_dict()["truncated"]
        assert lost > 0 and len(keys) == N - lost


def test_the_cache_spares_the_second_download_and_stays_bounded(ds, tmp_path):
    with http_server(ds, ranges=False) as srv:
        cache = tmp_path / "cache"
        ld = train(srv.url, access="stream", cache_dir=str(cache), num_workers=2)
        first = epoch(ld, 0)

        def tar_gets() -> int:
            return sum(v for k, v in srv.requests.items() if k.endswith(".tar"))

        assert tar_gets() == N // PER_SHARD and len(list(cache.glob("*-shard-*.tar"))) == N // PER_SHARD
        second = epoch(ld, 1)
        assert tar_gets() == N // PER_SHARD  # epoch 2 read every shard from the cache
        check_epoch([first], N // G)
        check_epoch([second], N // G)
        assert not list(cache.glob(".*"))  # no temporary left
        shard = (ds / "train" / "shard-000000.tar").stat().st_size
        small = train(srv.url, access="stream", cache_dir=str(tmp_path / "small"),
                      cache_max_gb=3.5 * shard / 2**30)
        epoch(small)
        kept = list((tmp_path / "small").iterdir())
        assert 0 < len(kept) <= 3 and sum(p.stat().st_size for p in kept) <= 3.5 * shard


def test_two_writers_of_one_cached_shard_leave_one_whole_file(ds, tmp_path):
    cache = R.ShardCache(tmp_path / "c")
    stale = tmp_path / "c" / ".left-by-a-killed-writer.part"  # removed once a new file lands
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    src = ds / "train" / "shard-000000.tar"
    a = cache.open("http://x/s.tar", lambda: open(src, "rb"))  # noqa: SIM115 - closed below
    b = cache.open("http://x/s.tar", lambda: open(src, "rb"))  # noqa: SIM115 - closed below
    assert a.read(100) and b.read(100)
    assert not cache.path("http://x/s.tar").exists()  # nothing in place before a copy is whole
    while b.read(4096):
        pass
    while a.read(4096):
        pass
    a.close()
    b.close()
    assert cache.path("http://x/s.tar").read_bytes() == src.read_bytes()
    assert [p.name for p in (tmp_path / "c").iterdir()] == [cache.path("http://x/s.tar").name]


# --- shard sets, no manifest, S3, pipe: -------------------------------------------------------------


def test_a_brace_set_without_manifest_or_index_learns_its_counts(ds):
    missing = {"manifest.json", *(f"shard-{i:06d}.idx" for i in range(N // PER_SHARD))}
    with http_server(ds, faults=Faults(missing=missing)) as srv:
        ld = train(brace(srv.url))
        assert ld.src.counts is None and len(ld) == N // G  # estimated: 12 shards x 8 (the first shard's)
        first = epoch(ld, 0)
        check_epoch([first], N // G + 1, used=N)  # until the shards are used up; the last batch short
        assert len(ld) == len(first) and ld.learned == {s: PER_SHARD for s in range(N // PER_SHARD)}
        second = epoch(ld, 1)  # now with counts: N // G full steps
        check_epoch([second], N // G)
    with http_server(ds, faults=Faults(missing={"manifest.json"})) as srv:
        ld = train(brace(srv.url))
        assert ld.src.counts == [PER_SHARD] * (N // PER_SHARD)  # from the .idx headers


def test_s3_streams_and_reads_ranges_like_local(ds):
    with s3_server({"ds": ds}) as s3:
        so = s3.storage_options
        root = f"s3://{s3.bucket}/ds"
        assert choose_access(f"{root}/train", cfg(storage_options=so)) == "random"
        local = epoch(train(ds))
        ranged = epoch(train(root, storage_options=so))
        assert [b.keys for b in ranged] == [b.keys for b in local]
        assert all(torch.equal(a.views[0], b.views[0]) for a, b in zip(local, ranged, strict=True))
        for world in (1, 2):
            per_rank = [epoch(train(root, world, r, access="stream", storage_options=so)) for r in range(world)]
            check_epoch(per_rank, N // G)
        ev = StreamEvalLoader(f"{root}/train", cfg(storage_options=so), _spec(), world_size=2, rank=1, batch_size=16,
                              device=CPU)
        keys = [k for b in ev for k in b.keys]
        assert keys == [f"k{i:05d}" for i in range(N // 2, N)]  # rank 1's half, in canonical order


def test_s3_without_manifest_lists_the_bucket_found_by_the_environment(ds, tmp_path, monkeypatch):
    bare = tmp_path / "bare"
    shutil.copytree(ds / "train", bare, ignore=shutil.ignore_patterns("manifest.json", "*.idx"))
    with s3_server({"bare/train": bare}) as s3:
        # botocore's own sources, no data.storage_options
        for k, v in {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        ld = train(f"s3://{s3.bucket}/bare", access="stream")
        assert len(ld.src.urls) == N // PER_SHARD and ld.src.manifest is None
        check_epoch([epoch(ld)], N // G + 1, used=N)


def test_a_pipe_command_streams_the_shards(ds):
    cmd = f"pipe:cat {ds}/train/shard-{{000000..{N // PER_SHARD - 1:06d}}}.tar"
    ld = train(cmd)
    assert isinstance(ld, StreamTrainLoader) and ld.src.counts is None
    check_epoch([epoch(ld)], N // G + 1, used=N)
    bad = train(f"pipe:cat {ds}/train/shard-000000.tar", batch=4)
    bad.src.urls.append(f"pipe:cat {ds}/train/no-such.tar")
    bad.src.names.append("no-such.tar")
    keys = [k for b in epoch(bad) for k in b.keys]
    assert len(keys) == PER_SHARD and bad.stats.as_dict()["truncated"] + bad.stats.as_dict()["missing_shard"] == 1


def _spec():
    from scp_dist.data.augment_torch import ViewSpec

    return ViewSpec(8, MEAN, STD)


# --- resume -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("counts", ["manifest", "learned", "none"])
def test_a_resumed_streamed_epoch_skips_what_it_used_on_any_world_size(ds, counts):
    """Killed after 4 steps of epoch 1 and resumed from the state a checkpoint holds: on two ranks
    with counts (the manifest's, or learned in epoch 0 and carried by the state); on one rank when
    nothing is known (several ranks would agree through the process group: the test below)."""
    bare = Faults(missing={"manifest.json", *(f"shard-{i:06d}.idx" for i in range(12))})
    with http_server(ds, ranges=False, faults=Faults() if counts == "manifest" else bare) as srv:
        root = srv.url if counts == "manifest" else brace(srv.url)
        ld = train(root, shuffle_buffer=12)
        if counts == "learned":
            epoch(ld, 0)
        ld.set_epoch(1)
        it = iter(ld)
        before = [next(it) for _ in range(4)]
        state = ld.state_dict()
        it.close()
        assert sum(-1 if isinstance(p, int) else len(p) for p in state["used"].values()) != 0
        used = {k for b in before for k in b.keys}
        world = 1 if counts == "none" else 2
        after: list = []
        for rank in range(world):
            other = train(root, world, rank, shuffle_buffer=12)
            other.load_state_dict(state)
            after.append(epoch(other, 1, start=4))
        assert len({len(a) for a in after}) == 1
        rest = [k for r in after for b in r for k in b.keys]
        assert not used & set(rest) and len(rest) == len(set(rest))
        if counts != "none":
            assert len(after[0]) == N // G - 4 and len(used) + len(rest) == N // G * G
            assert all(sum(len(r[s].keys) for r in after) == G for s in range(N // G - 4))
        else:
            assert len(used) + len(rest) == N  # no counts: the epoch runs until the shards are used up
        restarted = train(root, shuffle_buffer=12)  # the counter-check: without the state it repeats
        if counts == "learned":
            restarted.load_state_dict({**state, "used": {}})
        restarted.set_epoch(1, 4)
        assert used & {k for b in restarted for k in b.keys}


def _stream_ranks(rank: int, world: int, url: str, out: str) -> None:
    """Both counting modes on `world` gloo ranks: per epoch, every rank's keys and step count."""
    got = {}
    for name, root in (("manifest", url), ("learned", brace(url, 3))):
        ld = train(root, world, rank, batch=6)
        for e in (0, 1):
            batches = epoch(ld, e)
            t = torch.tensor([len(batches)])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            assert int(t) == len(batches) == len(ld), (name, e, len(batches), len(ld))
            got[(name, e)] = [b.keys for b in batches]
    torch.save(got, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_agree_on_steps_with_and_without_counts(ds, tmp_path):
    missing = {f"shard-{i:06d}.idx" for i in range(3)}  # brace set of 3 shards: no counts for 2 ranks
    with http_server(ds, ranges=False, faults=Faults(missing=missing)) as srv:
        run_gloo(_stream_ranks, 2, srv.url, str(tmp_path))
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for (name, e), keys0 in parts[0].items():
        per_rank = [keys0, parts[1][(name, e)]]
        flat = [k for r in per_rank for b in r for k in b]
        assert len(flat) == len(set(flat))
        if name == "manifest":
            assert len(flat) == N // 6 * 6 and all(len(a) + len(b) == 6 for a, b in zip(*per_rank, strict=True))
        else:  # 3 shards of 8, dealt 2 and 1: the ranks agree each step while one runs dry
            assert len(flat) == 24 if e == 0 else len(flat) == 24 // 6 * 6


# --- the job: streaming from HTTP, killed, resumed --------------------------------------------------


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_job_streams_from_http_and_a_kill_resumes_on_two_ranks_without_rereading_used_shards(tmp_path, digits_root):
    from scp_dist.data.reader import SampleReader
    from scp_dist.shards.manifest import read_manifest

    reader = SampleReader(read_manifest(digits_root / "train"))
    items = [reader.read(i) for i in range(len(reader))]
    write_shards((Sample(r.key, r.image, r.ext, r.label) for r in items), tmp_path / "digits" / "train",
                 source="digits", split="train", classes=[str(c) for c in range(10)], max_count=100, progress=False)
    with http_server(tmp_path / "digits", ranges=False) as srv:
        args = [f"data.root={srv.url}", "data.access=stream", "data.shuffle_buffer=1", "data.prepare=",
                "data.num_workers=0", "data.loader=torch", "train.mode=stream", "train.epochs=1",
                "train.global_batch=64", "train.checkpoint_every=6", "train.checkpoint_minutes=0", "train.log_every=1",
                f"output.dir={tmp_path / 'runs'}", "output.run_name=s", "output.report=false", "output.kmeans=false"]
        run = tmp_path / "runs" / "s"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "scp_dist.train", "--config", "demo_digits", *args]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        ckpt = run / "checkpoints" / "step-000000012.pt"
        try:
            wait_for(lambda: ckpt.is_file() or proc.poll() is not None, timeout=240)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            out = proc.communicate()[0].decode(errors="replace")
        assert ckpt.is_file(), out[-3000:]
        state = torch.load(ckpt, weights_only=False)
        used_up = {n for n, p in state["data"]["used"].items() if isinstance(p, int)}
        assert len(used_up) >= 12 * 64 // 100 - 1  # shards fully trained on by step 12
        srv.requests.clear()
        # resumed on two ranks (torchrun): the used samples are dealt away on another world size too
        two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
        done = subprocess.run(two, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert "resumed at epoch 1, step" in done.stdout + done.stderr
        # The rest of the epoch read only the shards not used up, once each; the evaluation then read
        # every shard once (in canonical order, after training)
        again = {p.rsplit("/", 1)[-1]: n for p, n in srv.requests.items() if p.endswith(".tar")}
        assert len(again) == 18 and all(again[n] == 1 for n in used_up)
        assert all(n == 2 for name, n in again.items() if name not in used_up)
        steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in steps if r["kind"] == "step") == 1797 // 64
        assert json.loads((run / "eval.json").read_text())["splits"]["train"]["num_samples"] == 1797
