from pathlib import Path

import pytest

from scp_dist.config import ConfigError, check_world_size, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_are_the_papers():
    cfg = load_config()
    assert cfg.optim.lr == 1e-3 and cfg.optim.schedule == "cosine"
    assert cfg.train.epochs == 30 and cfg.train.global_batch == 512
    assert list(cfg.head.hidden) == [1024, 786, 512, 1024]
    assert cfg.augment.crop_p == 0.5 and cfg.augment.blur_p == 0.5


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.head.num_clusters >= 2


def test_paper_alphas():
    expected = {"cifar10": 1, "stl10": 1, "imagenet10": 1, "cifar20": 2, "imagenet_dogs": 2, "cifar100": 3}
    for name, alpha in expected.items():
        assert load_config(f"{name}.yaml").loss.alpha == alpha, name


def test_override_and_types():
    cfg = load_config("demo_digits", ["head.num_clusters=12", "loss.alpha=2.5"])
    assert cfg.head.num_clusters == 12 and cfg.loss.alpha == 2.5


@pytest.mark.parametrize(
    "override,key",
    [
        (["train.epoch=3"], "train.epoch"),  # typo: unknown key
        (["head.num_clusters=abc"], "head.num_clusters"),  # wrong type
        (["head.num_clusters=1"], "head.num_clusters"),  # K < 2
        (["loss.alpha=-1"], "loss.alpha"),
        (["augment.crop_p=1.5"], "augment.crop_p"),
        (["backbone.name=resnet"], "backbone.name"),
        (["optim.lr=0"], "optim.lr"),
        (["backbone.max_batch=-1"], "backbone.max_batch"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("demo_digits", override)


def test_batch_smaller_than_world():
    cfg = load_config("demo_digits", ["train.global_batch=4"])
    check_world_size(cfg, 4)
    with pytest.raises(ConfigError, match="train.global_batch"):
        check_world_size(cfg, 8)


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["+foo=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")


def test_config_is_read_only():
    cfg = load_config()
    with pytest.raises(Exception):  # noqa: B017 - omegaconf raises its own ReadonlyConfigError
        cfg.train.epochs = 3
