"""One config schema with defaults, YAML files on top, `key=value` overrides on top of that.

Everything is validated at start; an error names the offending key so a typo on a 64-GPU
allocation costs seconds, not a queue slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scp_dist.data.plan import ORDERS
from scp_dist.data.remote import (
    RemoteOptions,
    is_remote,
    is_shard_set,
    manifest_digest,
    root_name,
    split_location,
)
from scp_dist.errors import ConfigError as ConfigError  # raised by the data path too: defined below it
from scp_dist.shards.sources import BUILTIN

# Inside the package so an installed wheel resolves configs by name; the top-level configs/ links here.
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Backbone keys that change speed or memory, never the features: toggling them keeps a feature
# cache and lets a checkpoint resume.
BACKBONE_SPEED_ONLY = ("compile", "channels_last", "max_batch", "shrink_on_oom")
LOADERS = ("auto", "dali", "torch")
ACCESS = ("auto", "random", "stream")
HEAD_SELECT = ("loss", "agreement", "consensus")
RESUME = ("false", "true", "auto")


@dataclass
class DataConfig:
    name: str = ""  # "" = the name of the data.root directory
    root: str = "data/digits"  # dataset directory holding one sub-directory per split
    train_split: str = "train"
    test_split: str = ""  # "" = no test split (evaluate on the training split, as clustering papers do)
    loader: str = "auto"  # one of LOADERS (auto: DALI when importable)
    num_workers: int = 2  # reader/decoder workers per rank
    # global: each epoch one seeded permutation of all samples, cut into global batches (uniform
    # batches whatever the order on disk; the same run on any world size). windowed: shards in a
    # random order, shuffled only inside windows of shuffle_buffer samples, for storage that reads
    # sequentially; its batches are only as random as the shards (data/plan.py).
    order: str = "global"
    # order=windowed: the shuffle window. Streamed shards (data.access=stream): the samples each rank
    # holds in its shuffle buffer (split among its workers); how random its batches are for a given
    # size is measured in docs/STREAMING.md.
    shuffle_buffer: int = 2048
    # data.root may also be an http(s):// or s3:// prefix, a brace set of shard URLs
    # (https://host/p/shard-{000000..000999}.tar) or a pipe: command (scp_dist/data/remote.py).
    # auto: random access (the global order) for local folders, and for remote ones with a manifest,
    # .idx files and range requests; stream otherwise. random: refuse anything else. stream: shards
    # read front to back, assigned to ranks by a (seed, epoch) permutation (scp_dist/data/stream.py).
    access: str = "auto"
    timeout_s: float = 60.0  # longest wait for a byte of a remote shard; then the connection counts as dropped
    retries: int = 3  # re-opens per shard of a dropped connection (HTTP resumes at the byte it lost)
    # fsspec/s3fs options for s3:// (endpoint_url, key, secret, client_kwargs, ...); without them
    # botocore's usual sources (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws).
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Local copies of streamed remote shards ("" = none), shared by the ranks of a node: later epochs
    # read them from disk. At most cache_max_gb (least recently used removed first; 0 = no bound).
    cache_dir: str = ""
    cache_max_gb: float = 50.0
    on_error: str = "skip"  # skip | raise: what a corrupt or missing sample does
    # Full sha256 of every shard against the manifest when a loader starts (each rank hashes its
    # share); off, only each shard's size and index count are checked, which costs a stat per shard.
    verify: bool = False
    # A built-in data set written on first use, only ever into its own folder (sources.BUILTIN): a
    # data.root elsewhere is the user's data and must hold shards.
    prepare: str = "digits"


@dataclass
class AugmentConfig:
    crop_p: float = 0.5  # paper: RandomCrop with p=0.5
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # side fraction of the crop
    blur_p: float = 0.5  # paper: GaussianBlur with p=0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # in output pixels
    blur_kernel_frac: float = 0.1  # kernel = odd size >= 3 closest to frac * image size


@dataclass
class BackboneConfig:
    name: str = "pixels"  # pixels | open_clip | timm | mix
    model: str = ""  # open_clip: ViT-B-32 / ViT-L-14; timm: vit_base_patch8_224.dino, tf_efficientnet_lite0
    # open_clip: a pretrained tag (openai, laion2b_s34b_b79k); timm: "hub" fetches the named tag.
    # "" = random init (shape tests only).
    pretrained: str = ""
    checkpoint: str = ""  # local weights file; overrides `pretrained`
    checkpoint_format: str = "auto"  # auto | timm | open_clip | lukemelas_efficientnet
    image_size: int = 0  # 0 = the model's default input size
    compile: bool = False  # torch.compile the frozen forward
    channels_last: bool = True
    # Images per frozen forward call: 0 = the whole batch at once. Chunking changes memory, not the
    # features (the backbone is in eval mode, so no batch statistics), nor the loss.
    max_batch: int = 0
    # On a GPU out-of-memory error in the frozen forward: halve the chunk, retry, and keep the size
    # that fits for the rest of the run (batch-size autotune that costs nothing when memory suffices).
    shrink_on_oom: bool = True
    mix: list[Any] = field(default_factory=list)  # for name=mix: a list of backbone configs


@dataclass
class HeadConfig:
    num_clusters: int = 10  # K
    hidden: list[int] = field(default_factory=lambda: [1024, 786, 512, 1024])  # paper's widths
    activation: str = "relu"  # relu | gelu ; the paper does not say, ReLU is our choice
    num_heads: int = 1  # H heads trained at once (different seeds), chosen without labels
    # How the reported clustering is chosen when num_heads > 1, without labels: "consensus" = every head
    # aligned to the most agreeing one (Hungarian) and a confidence-weighted vote per sample (the
    # smallest seed spread at the same mean on the 5-seed protocols; docs/RESULTS.md, "Five heads by
    # default"); "loss" = the head with the lowest final training loss; "agreement" = the head whose
    # training-split clusters agree most (mean NMI) with the other heads'.
    select: str = "consensus"
    # With select=consensus only the heads whose final training loss is within vote_margin of the
    # lowest vote: the heads of a run see the same batches, so their losses compare, and a head stuck
    # in a worse partition ends clearly higher (Fashion-MNIST seed 1: 0.12 above, 62.6 -> 74.6 ACC;
    # docs/RESULTS.md, "The current code, rerun"). A large value (1e9) lets every head vote.
    vote_margin: float = 0.1


@dataclass
class LossConfig:
    alpha: float = 1.0  # weight of the batch entropy H(Y)
    # The paper writes L_e as a sum over the batch; "mean" divides it by the global batch size.
    # Default "mean": with the literal sum, L_e outweighs α·H by the batch size (512x) and the head
    # collapses to one cluster (measured on the digits demo: ACC 0.10 with sum vs 0.53 with mean).
    ce_reduction: str = "mean"
    eps: float = 1e-8
    # How H(Y) estimates the cluster marginals: "batch" = this global batch's (the paper's; exact
    # over any world size); "ema" = a running estimate over ~1/(1-ema_momentum) steps, for K near or
    # above the global batch (scp_dist/loss.py; docs/RESULTS.md, "Many clusters (K = 1,000)").
    marginal: str = "batch"
    ema_momentum: float = 0.9  # loss.marginal=ema only


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 30
    global_batch: int = 512
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    # auto: continue from the run's newest checkpoint when there is one, else start (a rerun of a
    # finished run only re-evaluates it); true: continue (an error if there is no checkpoint);
    # false: start fresh, refused on a run directory that holds a run unless output.overwrite=true.
    resume: str = "auto"
    # Checkpoints: at epoch ends, every checkpoint_every steps (0: off) and every checkpoint_minutes
    # of training (0: off), the newest keep_checkpoints kept. An epoch end is skipped while the last
    # checkpoint is younger than checkpoint_min_seconds (0: every epoch end), except the run's last:
    # a small set's epoch is one step, and five heads' checkpoint (175 MiB) took longer than the step.
    checkpoint_every: int = 0
    checkpoint_minutes: float = 30.0
    checkpoint_min_seconds: float = 60.0
    keep_checkpoints: int = 3
    max_steps: int = 0  # >0 stops early (debugging); the schedule stays as long as without it
    # >0: the run is min(epochs x steps per epoch, step_budget) steps, its cosine annealed over that
    # (schedule.schedule_steps): one recipe, a bounded cost at any data size.
    step_budget: int = 0
    log_every: int = 10
    eval_batch: int = 1024
    device: str = "auto"  # auto | cpu | cuda
    # stream: fresh views through the backbone every step. cached: backbone features of cache.num_pairs
    # view pairs per image computed once, then the head trains on them (see scp_dist/feature_cache.py).
    mode: str = "stream"


@dataclass
class CacheConfig:
    num_pairs: int = 8  # M: augmented view pairs per image; epoch e trains on pair e % M
    # >0: at most this many view pairs in all, M = min(num_pairs, max(1, pair_budget // N)) for N
    # training images (feature_cache.pairs_to_extract): the extraction's cost stays bounded as N grows.
    pair_budget: int = 0
    # "" = <output.dir>/features/<data.name>-<hash of what the features depend on>
    # (feature_cache.cache_dir): shared by the runs whose features are the same, so in no run's folder
    dir: str = ""
    dtype: str = "fp16"  # fp16 | fp32: how features are stored
    batch_size: int = 256  # images per extraction batch, per rank
    # The seed that draws the cached views; -1 = train.seed (epoch e then sees exactly the views a
    # streaming run of that seed would). A fixed value lets every seed of a data set share one
    # extraction: seeds then differ in the head's init, the batch order and the neighbour draws.
    pair_seed: int = -1


@dataclass
class NeighborsConfig:
    # Nearest neighbours in the frozen feature space as positives (scp_dist/neighbors.py): with k > 0,
    # view b of each sample is, with probability p, view b of one of its k nearest training images
    # instead of its own. cached mode only (the neighbour's features must be at hand). A ceiling: a
    # run draws from at most N / (4K) neighbours, so they stay inside a cluster (neighbors.neighbor_count).
    k: int = 0  # 0: the paper's pairs (two views of one image) only
    p: float = 1.0  # measured: 1 beat 0.5 on the two-class set (docs/RESULTS.md)


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_s: int = 600


@dataclass
class OutputConfig:
    dir: str = "runs"
    run_name: str = ""  # "" = <data.name>_seed<train.seed>
    overwrite: bool = False  # with train.resume=false: delete a run already in the run directory
    save_assignments: bool = True
    # Every evaluation also clusters the same frozen features with faiss k-means (fitted on the
    # training split, seeded by train.seed) and reports it next to the head: each run's own baseline.
    kmeans: bool = True
    kmeans_niter: int = 100
    kmeans_nredo: int = 10
    kmeans_max_points: int = 1024  # per centroid: k-means trains on at most K x this many rows
    # At the end of the run (rank 0): <run>/report/index.html, a static page of the clusters,
    # curves, feature map and scores (scp_dist/report.py; needs the `report` extra, else a warning).
    report: bool = True
    # TensorBoard event files in <run>/tensorboard/ mirroring metrics.jsonl's scalars, and the
    # report's figures at the end (needs the tensorboard package).
    tensorboard: bool = False


@dataclass
class SCPConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    neighbors: NeighborsConfig = field(default_factory=NeighborsConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def _key_of(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    return str(key) if key else "?"


def resolve_config_path(path: str | Path) -> Path:
    """A file path, or a shipped config by name (demo_digits) or by its repository path
    (configs/demo_digits.yaml), from any working directory."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (PACKAGE_CONFIG_DIR / p, PACKAGE_CONFIG_DIR / f"{p}.yaml", PACKAGE_CONFIG_DIR / p.name,
                 PACKAGE_CONFIG_DIR / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file {path} not found (also looked in {PACKAGE_CONFIG_DIR})")


def _yaml_problem(e: yaml.YAMLError, positions: bool = True) -> str:
    """PyYAML's multi-line message as one line, with 1-based positions (it counts from 0)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark, context, start = (getattr(e, a, None) for a in ("problem_mark", "context", "context_mark"))
    if not positions or mark is None:
        return problem
    if context and start is not None and (start.line, start.column) != (mark.line, mark.column):
        problem += f" ({context} at line {start.line + 1}, column {start.column + 1})"
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}, {_yaml_problem(e)}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    if not isinstance(cfg, DictConfig):  # a list or a scalar: merging it fails without naming the file
        raise ConfigError(f"config file {path} must hold sections (data:, train:, ...), not a "
                          f"{type(OmegaConf.to_container(cfg)).__name__}")
    return cfg


def _load_overrides(overrides: list[str]) -> DictConfig:
    try:
        return OmegaConf.from_dotlist(overrides)
    except yaml.YAMLError:
        for o in overrides:  # PyYAML's position is inside the joined list: name the override instead
            try:
                OmegaConf.from_dotlist([o])
            except yaml.YAMLError as e:
                raise ConfigError(f"override {o!r}: {_yaml_problem(e, positions=False)}") from e
        raise


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Schema defaults <- YAML file <- `key=value` overrides; validated; read-only struct config."""
    schema = OmegaConf.structured(SCPConfig)
    layers: list[Any] = [schema]
    try:
        if path is not None:
            layers.append(_load_yaml(resolve_config_path(path)))
        if overrides:
            bad = [o for o in overrides if "=" not in o or o.startswith(("+", "~"))]
            if bad:
                raise ConfigError(f"overrides must be key=value, got {bad}")
            # `key=` means the empty string (omegaconf would read it as null, which str keys reject)
            layers.append(_load_overrides([o + "''" if o.endswith("=") else o for o in overrides]))
        cfg = OmegaConf.merge(*layers)
        OmegaConf.resolve(cfg)
        _derive_names(cfg)
        cfg.train.resume = str(cfg.train.resume).lower()  # `train.resume=true` arrives as the bool True
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config key '{_key_of(e)}': {msg}") from e
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _derive_names(cfg: DictConfig) -> None:
    """Names left empty come from the data and the seed, so each data set and seed gets its own run
    folder and its own label in the printed scores."""
    if not cfg.data.name:
        cfg.data.name = root_name(cfg.data.root) or "data"
    if not cfg.output.run_name:
        cfg.output.run_name = f"{cfg.data.name}_seed{cfg.train.seed}"


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def validate(cfg: DictConfig) -> None:
    """Values that type-check but cannot run. World-size checks happen in check_world_size."""
    _check(cfg.head.num_clusters >= 2, "head.num_clusters", f"K must be >= 2, got {cfg.head.num_clusters}")
    _check(len(cfg.head.hidden) >= 1 and all(h > 0 for h in cfg.head.hidden), "head.hidden", "widths must be > 0")
    _check(cfg.head.activation in ("relu", "gelu"), "head.activation", "must be relu or gelu")
    _check(cfg.head.num_heads >= 1, "head.num_heads", "must be >= 1")
    _check(cfg.head.select in HEAD_SELECT, "head.select", f"must be one of {'|'.join(HEAD_SELECT)}")
    _check(cfg.head.vote_margin >= 0, "head.vote_margin", "must be >= 0 (a large value: every head votes)")
    _check(cfg.loss.alpha >= 0, "loss.alpha", f"must be >= 0, got {cfg.loss.alpha}")
    _check(cfg.loss.ce_reduction in ("sum", "mean"), "loss.ce_reduction", "must be sum or mean")
    _check(0 < cfg.loss.eps < 1e-2, "loss.eps", "must be in (0, 1e-2)")
    _check(cfg.loss.marginal in ("batch", "ema"), "loss.marginal", f"{cfg.loss.marginal!r} is not one of batch|ema")
    _check(0 <= cfg.loss.ema_momentum < 1, "loss.ema_momentum", f"must be in [0, 1), got {cfg.loss.ema_momentum}")
    _check(cfg.optim.lr > 0, "optim.lr", f"must be > 0, got {cfg.optim.lr}")
    _check(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas", "two values in [0, 1)")
    _check(cfg.optim.schedule in ("cosine", "constant"), "optim.schedule", "must be cosine or constant")
    _check(0 <= cfg.optim.min_lr <= cfg.optim.lr, "optim.min_lr", "must be in [0, optim.lr]")
    _check(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(cfg.train.epochs >= 1, "train.epochs", f"must be >= 1, got {cfg.train.epochs}")
    _check(cfg.train.global_batch >= 2, "train.global_batch", f"must be >= 2, got {cfg.train.global_batch}")
    _check(cfg.train.eval_batch >= 1, "train.eval_batch", "must be >= 1")
    _check(cfg.train.max_steps >= 0, "train.max_steps", "must be >= 0")
    _check(cfg.train.step_budget >= 0, "train.step_budget", "must be >= 0 (0: train.epochs alone)")
    _check(cfg.train.resume in RESUME, "train.resume", f"{cfg.train.resume!r} is not one of {'|'.join(RESUME)}")
    _check(cfg.train.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0: epoch ends only)")
    _check(cfg.train.checkpoint_minutes >= 0, "train.checkpoint_minutes", "must be >= 0 (0: off)")
    _check(cfg.train.checkpoint_min_seconds >= 0, "train.checkpoint_min_seconds", "must be >= 0 (0: every epoch end)")
    _check(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _check(cfg.train.log_every >= 1, "train.log_every", "must be >= 1")
    _check(cfg.train.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision", "auto|fp32|bf16|fp16")
    _check(cfg.train.device in ("auto", "cpu", "cuda"), "train.device", "auto|cpu|cuda")
    _check(cfg.train.mode in ("stream", "cached"), "train.mode", "stream|cached")
    _check(cfg.cache.num_pairs >= 1, "cache.num_pairs", f"must be >= 1, got {cfg.cache.num_pairs}")
    _check(cfg.cache.pair_budget >= 0, "cache.pair_budget", "must be >= 0 (0: cache.num_pairs alone)")
    _check(cfg.cache.dtype in ("fp16", "fp32"), "cache.dtype", "fp16|fp32")
    _check(cfg.cache.pair_seed >= -1, "cache.pair_seed", "must be >= 0, or -1 for train.seed")
    _check(cfg.cache.batch_size >= 1, "cache.batch_size", "must be >= 1")
    _check(cfg.neighbors.k >= 0, "neighbors.k", f"must be >= 0, got {cfg.neighbors.k}")
    _check(0.0 <= cfg.neighbors.p <= 1.0, "neighbors.p", f"probability must be in [0, 1], got {cfg.neighbors.p}")
    _check(cfg.neighbors.k == 0 or cfg.train.mode == "cached", "neighbors.k",
           "neighbour pairs need train.mode=cached (the neighbour's features come from the cache)")
    _check(cfg.dist.backend in ("auto", "nccl", "gloo"), "dist.backend", "auto|nccl|gloo")
    _check(cfg.data.loader in LOADERS, "data.loader", f"{cfg.data.loader!r} is not one of {'|'.join(LOADERS)}")
    _check(cfg.data.order in ORDERS, "data.order", f"{cfg.data.order!r} is not one of {'|'.join(ORDERS)}")
    _check(cfg.data.on_error in ("skip", "raise"), "data.on_error", "skip|raise")
    _check(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
    _check(cfg.data.access in ACCESS, "data.access", f"{cfg.data.access!r} is not one of {'|'.join(ACCESS)}")
    _check(cfg.data.timeout_s > 0, "data.timeout_s", f"must be > 0, got {cfg.data.timeout_s}")
    _check(cfg.data.retries >= 0, "data.retries", f"must be >= 0, got {cfg.data.retries}")
    _check(cfg.data.cache_max_gb >= 0, "data.cache_max_gb", "must be >= 0 (0: no bound)")
    _check(not (is_shard_set(cfg.data.root) and cfg.data.test_split), "data.test_split",
           f"data.root {cfg.data.root!r} names the training split's shards, so there is no other split: set "
           "data.test_split= (or make data.root the folder holding the splits)")
    _check(not (is_remote(cfg.data.root) and cfg.train.mode == "cached"), "train.mode",
           f"cached mode reads its shards from a local folder; data.root {cfg.data.root!r} is remote "
           "(train.mode=stream, or copy the shards to a local folder)")
    _check(not (is_shard_set(cfg.data.root) and cfg.data.access == "random"), "data.access",
           "random access needs a folder or URL prefix with a manifest, not a shard set")
    _check(bool(cfg.data.root), "data.root", "must name the dataset directory")
    _check(cfg.data.prepare in ("", *BUILTIN), "data.prepare",
           f"unknown built-in data set {cfg.data.prepare!r} ({'|'.join(BUILTIN)} or empty)")
    _check(cfg.output.kmeans_niter >= 1, "output.kmeans_niter", "must be >= 1")
    _check(cfg.output.kmeans_nredo >= 1, "output.kmeans_nredo", "must be >= 1")
    _check(cfg.output.kmeans_max_points >= 1, "output.kmeans_max_points", "must be >= 1")
    for p in ("crop_p", "blur_p"):
        v = cfg.augment[p]
        _check(0.0 <= v <= 1.0, f"augment.{p}", f"probability must be in [0, 1], got {v}")
    lo, hi = _pair(cfg.augment.crop_scale, "augment.crop_scale")
    _check(0 < lo <= hi <= 1, "augment.crop_scale", "need 0 < min <= max <= 1")
    lo, hi = _pair(cfg.augment.blur_sigma, "augment.blur_sigma")
    _check(0 < lo <= hi, "augment.blur_sigma", "need 0 < min <= max")
    _check(0 < cfg.augment.blur_kernel_frac <= 1, "augment.blur_kernel_frac", "must be in (0, 1]")
    _check(
        cfg.backbone.name in ("pixels", "open_clip", "timm", "mix"),
        "backbone.name",
        f"unknown backbone {cfg.backbone.name!r} (pixels | open_clip | timm | mix)",
    )
    _check(cfg.backbone.image_size >= 0, "backbone.image_size", "must be >= 0")
    _check(cfg.backbone.max_batch >= 0, "backbone.max_batch", "must be >= 0 (0 = the whole batch)")
    if cfg.backbone.name == "mix":
        _check(len(cfg.backbone.mix) >= 2, "backbone.mix", "mix needs a list of at least two backbone configs")
    if cfg.backbone.name in ("open_clip", "timm"):
        _check(bool(cfg.backbone.model), "backbone.model", f"{cfg.backbone.name} needs a model name")


def _pair(v: Any, key: str) -> tuple[float, float]:
    _check(len(v) == 2, key, f"expected [min, max], got {list(v)}")
    return float(v[0]), float(v[1])


def check_world_size(cfg: DictConfig, world_size: int) -> None:
    _check(
        cfg.train.global_batch >= world_size,
        "train.global_batch",
        f"global batch {cfg.train.global_batch} is smaller than the world size {world_size}",
    )


def eval_splits(cfg: DictConfig) -> list[str]:
    """The splits evaluated (and cached as plain features): train, then test when there is one."""
    return list(dict.fromkeys(filter(None, [cfg.data.train_split, cfg.data.test_split])))


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.output.dir) / cfg.output.run_name


def save_config(cfg: DictConfig, path: Path) -> None:
    from scp_dist.fileio import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(cfg))


def backbone_identity(backbone: DictConfig) -> dict:
    """The backbone config less its speed-only keys: what the features depend on."""
    return {k: v for k, v in OmegaConf.to_container(backbone).items() if k not in BACKBONE_SPEED_ONLY}


# Keys a resume may change: speed, memory, logging, where outputs go, and choices made after
# training (head.select). Every other key changes the trained head, and a resume refuses it.
RESUME_FREE = (
    "data.name", "data.root", "data.test_split", "data.num_workers", "data.on_error", "data.prepare", "data.verify",
    "data.timeout_s", "data.retries", "data.storage_options.", "data.cache_dir", "data.cache_max_gb",
    *(f"backbone.{k}" for k in BACKBONE_SPEED_ONLY), "head.select", "head.vote_margin",
    "train.resume", "train.max_steps", "train.log_every", "train.eval_batch", "train.device",
    "train.checkpoint_every", "train.checkpoint_minutes", "train.checkpoint_min_seconds", "train.keep_checkpoints",
    "cache.dir", "cache.batch_size", "dist.", "output.",
)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def schema_defaults() -> dict:
    """Every key's default, flat (`train.step_budget`: 0, ...): what a run written before a key existed ran as."""
    return _flatten(OmegaConf.to_container(OmegaConf.structured(SCPConfig), resolve=True))


def config_fingerprint(cfg: DictConfig) -> dict:
    """What a checkpoint must agree with to be resumed: every key that changes the result, flat
    (`loss.alpha`, ...), with the data identified by its training manifest's content rather than its
    path (the same shards through a symlink, a trailing slash or a new mount are the same data)."""
    flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
    fp = {k: v for k, v in flat.items() if not any(k == f or (f.endswith(".") and k.startswith(f))
                                                  for f in RESUME_FREE)}
    fp["data.train_manifest"] = manifest_digest(split_location(cfg.data.root, cfg.data.train_split),
                                                RemoteOptions.from_config(cfg.data))
    return fp
