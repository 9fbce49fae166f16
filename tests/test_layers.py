"""The package's import layers (issue 19): read from the source, so a new import that points up the
data path or closes a cycle between config and the data path fails here, not at some later import."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "scp_dist"
SUBPACKAGES = {"data", "shards", "models"}
# The data path, lowest first: a unit imports only units before it (and the leaves: errors, fileio...).
DATA_PATH = ["shards/", "data/", "config", "models/", "feature_cache", "features", "evaluate", "train"]


def _unit(module: str) -> str:
    """scp_dist.data.loader -> data/, scp_dist.config -> config."""
    parts = module.split(".")[1:]
    return f"{parts[0]}/" if parts and parts[0] in SUBPACKAGES else (parts[0] if parts else "")


def _module_imports() -> dict[str, set[str]]:
    """Each module's scp_dist imports (function-level ones too: they are imports all the same)."""
    out: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(("scp_dist", *path.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scp_dist"):
                found |= {f"{node.module}.{a.name}" if node.module == "scp_dist" else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("scp_dist")}
        out[name] = found
    return out


def _unit_imports() -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, imported in _module_imports().items():
        units.setdefault(_unit(module), set()).update(_unit(m) for m in imported if _unit(m) != _unit(module))
    return units


def test_no_unit_imports_one_that_imports_it():
    units = _unit_imports()
    mutual = sorted({tuple(sorted((a, b))) for a, bs in units.items() for b in bs if a in units.get(b, ())})
    assert not mutual, f"units that import each other: {mutual}"


def test_the_data_path_imports_only_downwards():
    units = _unit_imports()
    upward = [(low, high) for i, low in enumerate(DATA_PATH) for high in DATA_PATH[i + 1:] if high in units[low]]
    assert not upward, f"imports up the data path (importer, imported): {upward}"


def test_every_user_error_is_one():
    from scp_dist.checkpoint import CheckpointError
    from scp_dist.config import ConfigError
    from scp_dist.data.batch import DataError
    from scp_dist.errors import USER_ERRORS, UserError
    from scp_dist.feature_cache import CacheMismatchError
    from scp_dist.rundir import RunDirError
    from scp_dist.shards.manifest import ShardError

    for err in (ConfigError, ShardError, DataError, CheckpointError, CacheMismatchError, RunDirError):
        assert issubclass(err, UserError) and issubclass(err, USER_ERRORS)
    assert issubclass(ConfigError, ValueError) and issubclass(ShardError, RuntimeError)
