"""A non-editable install must ship the Hydra configs inside the package (kd_runner/conf)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile

import pytest
from helpers import REPO

IGNORE = shutil.ignore_patterns(".git", ".venv", "outputs", "multirun", "build", "dist", "*.egg-info", "__pycache__",
                                ".pytest_cache", ".ruff_cache", "tests", ".ci")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build a wheel offline from a copy of the source tree (so nothing is written into the checkout)."""
    for module in ("setuptools", "pip"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed in this venv: cannot build without build isolation offline")
    base = tmp_path_factory.mktemp("wheel")
    src, out = base / "src", base / "dist"
    shutil.copytree(REPO, src, ignore=IGNORE)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "No module named" in proc.stderr and ("setuptools" in proc.stderr
                                                                      or "wheel" in proc.stderr):
        pytest.skip(f"build backend missing without build isolation: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("kd_runner-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_ships_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("kd_runner/conf/config.yaml", "kd_runner/conf/method/kd.yaml", "kd_runner/train.py"):
        assert required in names, required
    # every config group option in the checkout is in the wheel
    for path in (REPO / "conf").rglob("*.yaml"):
        assert f"kd_runner/conf/{path.relative_to(REPO / 'conf').as_posix()}" in names


def test_wheel_declares_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as zf:
        entry_points = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = zf.read(entry_points).decode()
    assert "kd-train = kd_runner.train:main" in text


def test_installed_wheel_finds_its_configs(wheel, tmp_path):
    """Unpacked on its own (no checkout conf/ beside it), the package resolves kd_runner/conf."""
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    code = "import kd_runner.train as t; print(t.config_dir())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(target / "kd_runner" / "conf")
