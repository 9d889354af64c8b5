"""cpu_affinity: cores — the parent's plan (bench/machine/cpu_affinity.py), the launch that carries it, the rank
that applies it (bench/worker/affinity.py), and the probe matrix that compares it (matrices/noise-probe.yaml)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.launch.plan import build_plan
from bench.machine import cpu_affinity as ca
from bench.spec import CellSettings, Limits, MatrixError, expand, load_matrix
from bench.strategies.runnable import cell_problems
from conftest import REPO, bench, write_matrix


def smt(cpus: int):
    """Siblings of a host numbering its second hardware threads after all first ones (0 and cpus/2 share a core)."""
    half = cpus // 2
    return lambda c: {c % half, c % half + half}


def test_cpu_lists_round_trip():
    assert ca.parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert ca.format_cpu_list([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"


def test_ranks_get_disjoint_whole_cores():
    shares = ca.plan(2, list(range(32)), None, smt(32))
    assert shares == [list(range(0, 8)) + list(range(16, 24)), list(range(8, 16)) + list(range(24, 32))]
    # a naive halving (0-15 | 16-31) would have put every core under both ranks
    assert not set(shares[0]) & set(shares[1])


def test_near_sets_are_used_and_shared_only_among_their_ranks():
    near = [list(range(0, 8)), list(range(8, 16)), list(range(8, 16))]
    shares = ca.plan(3, list(range(16)), near, lambda c: {c})
    assert shares == [list(range(0, 8)), list(range(8, 12)), list(range(12, 16))]


def test_a_near_set_smaller_than_its_ranks_falls_back_to_every_cpu():
    shares = ca.plan(2, list(range(4)), [[0], [0]], lambda c: {c})
    assert shares == [[0, 1], [2, 3]]


def test_fewer_cores_than_ranks_splits_threads_and_fewer_cpus_is_refused():
    assert ca.plan(2, [0, 1], None, lambda c: {0, 1}) == [[0], [1]]  # one core of two threads
    with pytest.raises(ValueError, match="cpu_affinity: none"):
        ca.plan(3, [0, 1], None, lambda c: {c})


def cell(**kw) -> CellSettings:
    return CellSettings.model_validate({"model": "llama-3.2-1b", "strategy": "zero2", "gpus": 2, "device": "cuda", **kw})


def test_unset_keeps_cell_ids_and_labels_and_set_changes_both():
    # the committed nightly records (written before this setting existed) still hash to their ids
    for line in (REPO / "results/nightly-h200-w60/2026-11-30-213e3ff/runs.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert CellSettings.model_validate(record["settings"]).cell_id == record["cell_id"]
    plain, pinned = cell(), cell(cpu_affinity="cores")
    assert plain.cell_id == cell(cpu_affinity="none").cell_id != pinned.cell_id
    assert pinned.label == plain.label + " pinned"


def test_the_launch_carries_the_plan(tmp_path):
    plan = build_plan(cell(cpu_affinity="cores"), tmp_path, Limits(), parent_visible_devices="0,1",
                      cpu_plan=("0-7,16-23;8-15,24-31", "planned"))
    assert plan.env[ca.ENV] == "0-7,16-23;8-15,24-31" and "planned" in plan.notes
    assert f"{ca.ENV}='0-7,16-23;8-15,24-31'" in plan.files["launch.sh"]
    assert ca.ENV not in build_plan(cell(), tmp_path, Limits(), parent_visible_devices="0,1").env
    too_many = len(os.sched_getaffinity(0)) + 1  # planned here for a cell with more ranks than CPUs: said, not a crash
    with pytest.raises(MatrixError, match="cpu_affinity: none"):
        build_plan(cell(cpu_affinity="cores", gpus=too_many), tmp_path, Limits())


def test_cells_it_cannot_serve_are_refused_with_the_fix():
    assert any("multi-node" in p for p in cell_problems(cell(cpu_affinity="cores", nodes=2), None))
    many = len(os.sched_getaffinity(0)) + 1
    problems = cell_problems(cell(cpu_affinity="cores", gpus=many), visible_gpus=many)
    assert any("cpu_affinity: none" in p and f"each of the {many} ranks" in p for p in problems)
    assert not cell_problems(cell(cpu_affinity="cores", gpus=many), visible_gpus=None)  # planned for elsewhere


def test_the_rank_pins_every_thread_to_its_share():
    """In a child process (pinning pytest itself would slow the other tests): a thread started before the pin
    ends up pinned too; local rank 1 takes the second share."""
    code = (
        "import os, threading, time, json\n"
        "t = threading.Thread(target=time.sleep, args=(2,)); t.start()\n"
        "from bench.worker import affinity\n"
        "asked = affinity.apply_from_env()\n"
        "masks = [sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir('/proc/self/task')]\n"
        "print(json.dumps({'asked': affinity.describe(asked), 'masks': masks}))\n"
    )
    last = sorted(os.sched_getaffinity(0))[-1]
    env = {**os.environ, ca.ENV: f"0;{last}", "LOCAL_RANK": "1", "PYTHONPATH": str(REPO)}
    out = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout)
    assert out["asked"]["planned_cpus"] == out["asked"]["cpus_at_report"] == [last]
    assert len(out["masks"]) >= 2 and all(m == [last] for m in out["masks"])


def test_the_probe_matrix_plans_on_cuda(tmp_path):
    probe = expand(load_matrix(REPO / "matrices/noise-probe.yaml"), device="cuda")
    full = {c.cell_id for c in expand(load_matrix(REPO / "matrices/llama-full.yaml"), device="cuda")}
    assert len(probe) == 4 and sum(c.cpu_affinity == "cores" for c in probe) == 2
    assert {c.cell_id for c in probe if c.cpu_affinity != "cores"} <= full  # the current matrix's own cells
    proc = bench("run", "matrices/noise-probe.yaml", "--dry-run", "--results", str(tmp_path / "r"), check=True)
    launches = [line for line in proc.stdout.splitlines() if "accelerate.commands.launch" in line]
    assert len(launches) == 12 and sum(ca.ENV in line for line in launches) == 6  # 3 launches a cell


@pytest.mark.slow
def test_two_cpu_ranks_run_pinned_apart(tmp_path):
    matrix = write_matrix(tmp_path, "pin", strategy="ddp", gpus=2, cpu_affinity="cores")
    bench("run", str(matrix), "--results", str(tmp_path / "r"), check=True)
    record = json.loads((tmp_path / "r" / "runs.jsonl").read_text().splitlines()[0])
    assert record["status"] == "ok", record["error"]
    held = [rank["cpu_affinity"]["cpus_at_report"] for rank in record["ranks"]]
    assert all(held) and not set(held[0]) & set(held[1])
    assert record["label"].endswith(" pinned")
