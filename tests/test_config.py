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
        (["output.reprot=false"], "output.reprot"),  # typo of output.report
        (["output.tensorboard=maybe"], "output.tensorboard"),
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


@pytest.mark.parametrize("text,where", [
    ("train:\n  epochs: 3\n  global_batch: [1, 2\nhead:\n  num_clusters: 4\n",
     "line 4, column 5: did not find expected ',' or ']' (while parsing a flow sequence at line 3, column 17)"),
    ("train:\n\tepochs: 3\n", "line 2, column 1: found character that cannot start any token"),
    ("train:\n  epochs: 3\n global_batch: 8\n", "line 3, column 2:"),
], ids=["unclosed-list", "tab", "indent"])
def test_a_malformed_config_file_is_one_line_naming_the_file_and_line(tmp_path, text, where):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"config file {path}, {where}") and "\n" not in str(err.value)


def test_a_config_file_that_is_not_sections_or_not_text_is_named(tmp_path):
    (tmp_path / "list.yaml").write_text("- train\n- head\n")
    with pytest.raises(ConfigError, match=r"list\.yaml must hold sections \(data:, train:, \.\.\.\), not a list"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"bin\.yaml is not UTF-8 text"):
        load_config(tmp_path / "bin.yaml")
    (tmp_path / "ok.yaml").write_text("train:\n  epochs: 3\n")  # the counter-check: a good file loads
    assert load_config(tmp_path / "ok.yaml").train.epochs == 3


def test_a_malformed_override_value_is_named():
    with pytest.raises(ConfigError, match=r"^override 'head\.hidden=\[1,2': did not find expected ',' or '\]'$"):
        load_config(None, ["train.epochs=3", "head.hidden=[1,2"])
    assert list(load_config(None, ["train.epochs=3", "head.hidden=[1,2]"]).head.hidden) == [1, 2]


def test_config_is_read_only():
    cfg = load_config()
    with pytest.raises(Exception):  # noqa: B017 - omegaconf raises its own ReadonlyConfigError
        cfg.train.epochs = 3


def _recipe(cfg) -> dict:
    """Everything but what names the data: the data set's own keys and K."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(cfg, resolve=True)
    for key in ("root", "name", "prepare", "test_split"):
        d["data"].pop(key)
    d["head"].pop("num_clusters")
    d["output"].pop("run_name")  # derived from data.name
    return d


def test_the_small_set_configs_are_one_recipe():
    # The default recipe is one recipe: the built-in sets differ in their data and K only, so a user
    # pointing demo_digits_lite0 at new images runs what the benchmarks measured.
    base = _recipe(load_config("demo_digits_lite0"))
    for name in ("animals_lite0", "fashion_mnist_lite0", "mnist5k_lite0", "lfw_faces_lite0"):
        assert _recipe(load_config(name)) == base, name
    # the comparison sees a recipe key set for one data set
    assert _recipe(load_config("animals_lite0", ["train.epochs=30"])) != base
