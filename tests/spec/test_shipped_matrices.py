"""Every matrix shipped in matrices/ validates and expands (on the device it names)."""

from __future__ import annotations


import pytest

from bench.spec import check_time_budget, expand, load_matrix
from bench.strategies import check_runnable
from bench.strategies.runnable import cell_problems

from conftest import REPO

MATRICES = sorted((REPO / "matrices").glob("*.yaml"))


def test_there_are_matrices():
    assert any(p.name == "smoke.yaml" for p in MATRICES)


@pytest.mark.parametrize("path", MATRICES, ids=lambda p: p.name)
def test_matrix_validates_and_expands(path):
    matrix = load_matrix(path)
    device = "cpu" if matrix.device == "cpu" else "cuda"
    cells = expand(matrix, source=str(path), device=device)
    assert cells, "a shipped matrix must have at least one cell"
    # Validated as on a machine with plenty of GPUs: only combinations that can never run fail here.
    # A package not installed on this machine (the kernels extra) is installable: not a matrix problem.
    problems = [f"{c.label}: {msg}" for c in cells
                for msg in cell_problems(c, visible_gpus=8) if "not installed here" not in msg]
    assert not problems, "\n".join(problems)
    check_time_budget(cells, matrix.limits, str(path))  # the longest start-up and timed phase fit the timeout
