"""The layout holds: import-linter's contracts (pyproject.toml) are kept, they catch a broken one, no source
file is over 500 lines, every package's public front gives what its ``__all__`` lists, and the tree stays small
enough to travel to the GPU machine."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

MAX_LINES = 500
PACKAGES = ["spec", "strategies", "machine", "records", "estimate", "worker", "launch", "report", "check"]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the bench package under ``root`` (its pyproject.toml holds the contracts)."""
    exe = Path(sys.executable).with_name("lint-imports")
    command = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*command, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_are_kept():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_a_worker_importing_the_launch_side_breaks_a_contract(tmp_path):
    shutil.copytree(REPO / "bench", tmp_path / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    data = tmp_path / "bench" / "worker" / "data.py"
    data.write_text(data.read_text() + "\nfrom bench.launch import plan  # noqa: E402,F401 - the violation under test\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "bench.worker is not allowed to import bench.launch" in proc.stdout


def test_no_source_file_is_over_500_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in (REPO / "bench").rglob("*.py")}
    assert sizes, "no source files found under bench/"
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("name", PACKAGES)
def test_each_front_gives_what_it_lists(name):
    front = importlib.import_module(f"bench.{name}")
    assert front.__all__, f"bench.{name} lists no public names"
    missing = [n for n in front.__all__ if getattr(front, n, None) is None]
    assert missing == []


# The device tool sends the tree (tracked files and untracked ones git does not ignore) and the carried wheels
# (.whl/, ~12.4 MiB slimmed: ../shared/gpu/README.md) to the GPU machine, at most 64 MiB in all. This leaves
# the wheels and a session's new results room; past it the next GPU session cannot start.
MAX_TRACKED_MIB = 48


def test_the_tree_that_travels_to_the_gpu_machine_stays_under_the_cap():
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    sizes = [(REPO / name).stat().st_size for name in proc.stdout.decode().split("\0")
             if name and (REPO / name).is_file()]
    total_mib = sum(sizes) / 2**20
    assert total_mib < MAX_TRACKED_MIB, (
        f"tracked files take {total_mib:.1f} MiB: with the wheels the device copy nears its 64 MiB cap. Fix: "
        "commit leaner results (no duplicated logs, reports with --html-images linked) or prune old evidence")
