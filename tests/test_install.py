"""A non-editable install runs configs by name: the wheel carries scp_dist/configs/*.yaml, and a fresh
virtual environment with only the wheel installed resolves `--config demo_digits` from another directory.

The fresh environment sees this one's packages through a .pth file of plain paths, so torch and the
rest are not installed again; .pth files in those paths are not run, so the editable install of this
checkout (a .pth import hook) stays out and `scp_dist` can only come from the wheel."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

CONFIGS = sorted(p.name for p in (REPO / "scp_dist" / "configs").glob("*.yaml"))

CHECK = """
import json, sys
import scp_dist
from scp_dist.config import PACKAGE_CONFIG_DIR, load_config
by_name = load_config("demo_digits", ["train.max_steps=1"])
by_path = load_config("configs/cifar10.yaml")  # the documented path, from outside a checkout
print(json.dumps({"package": scp_dist.__file__, "configs": str(PACKAGE_CONFIG_DIR),
                  "backbone": by_name.backbone.name, "max_steps": by_name.train.max_steps,
                  "clusters": by_path.head.num_clusters}))
"""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, **kw)
    assert proc.returncode == 0, f"{cmd}: rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_wheel_ships_the_configs_and_resolves_them_by_name(tmp_path):
    # A copy, so the build's egg-info and build/ never land in the checkout other runs share.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "scp_dist", src / "scp_dist", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)])
    assert "project.license" not in build.stdout + build.stderr, "setuptools' license deprecation banner is back"
    (wheel,) = dist.glob("scp_dist-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = sorted(Path(n).name for n in z.namelist() if n.startswith("scp_dist/configs/"))
    assert shipped == CONFIGS

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    # Installed before this environment's packages are visible: pip would take the editable scp_dist
    # for the same version already installed and leave the wheel out.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)])
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    outer = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(purelib) / "outer-env.pth").write_text("".join(f"{p}\n" for p in outer))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    got = json.loads(_run([str(python), "-c", CHECK], cwd=elsewhere, env={**env, "OMP_NUM_THREADS": "1"}).stdout)
    assert Path(got["package"]).is_relative_to(venv.resolve()), got
    assert Path(got["configs"]).is_relative_to(venv.resolve()), got
    assert (got["backbone"], got["max_steps"], got["clusters"]) == ("pixels", 1, 10)


def test_a_first_install_without_room_stops_before_it_starts(tmp_path):
    """launch/setup.sh checks the disk before a first install (torch alone is ~6 GB here): a disk
    that filled halfway through pip left CI with a broken venv and an OSError. Asked for more room
    than any disk has, it stops with a line naming the room and the way out, and creates nothing;
    with the check off (the counter-test) the same call goes on to create the venv, so it is the
    check that stopped it."""
    venv = tmp_path / "sub" / ".venv"
    env = {**os.environ, "VENV": str(venv), "SCP_SETUP_MIN_FREE_GB": "100000000"}
    proc = subprocess.run(["bash", str(REPO / "launch" / "setup.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1 and "GB free under" in proc.stderr and "VENV=" in proc.stderr, proc.stderr
    assert not venv.exists()
    # A missing interpreter makes the go-ahead fail fast, right after the check.
    env.update(SCP_SETUP_MIN_FREE_GB="0", PYTHON=str(tmp_path / "no-python"))
    proc = subprocess.run(["bash", str(REPO / "launch" / "setup.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0 and "GB free under" not in proc.stderr and "creating" in proc.stdout, (proc.stdout, proc.stderr)
