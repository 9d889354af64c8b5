"""A launch whose rendezvous port was taken between picking it and binding it is launched again on another.

Seen on 2x H200 (results/llama-full-h200-b2): the port of a 2-GPU cell, picked when the matrix was planned,
was in use minutes later when its turn came; torchrun's TCPStore failed with EADDRINUSE before any rank
started, and the cell was recorded as a crash. The port is now picked at launch and a taken one retried.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bench.launch import runner
from bench.launch.failures import Outcome, rendezvous_port_taken
from bench.launch.plan import build_plan, with_port
from bench.spec import CellSettings, Limits

TAKEN_LOG = ("torch.distributed.DistNetworkError: The server socket has failed to listen on any local network "
             "address. port: 53869, useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use\n")


def _tiny_cell(gpus: int) -> CellSettings:
    return CellSettings.model_validate(dict(model="tiny-llama", strategy="ddp", gpus=gpus, device="cpu",
                                            train=dict(seq_len=32, micro_batch=2, warmup_steps=1, steps=2,
                                                       timing=dict(max_steps=2))))


def _cell_folder(tmp_path: Path, log: str, heartbeat: bool = False) -> tuple[Path, Path]:
    log_path, rank_dir = tmp_path / "launch.log", tmp_path / "ranks"
    rank_dir.mkdir()
    log_path.write_text(log)
    if heartbeat:
        (rank_dir / "heartbeat0.json").write_text('{"rank": 0, "phase": "start", "time": 0}')
    return log_path, rank_dir


def test_a_launcher_that_failed_on_a_taken_port_before_any_rank_is_told_apart(tmp_path):
    log_path, rank_dir = _cell_folder(tmp_path, "Traceback ...\n" + TAKEN_LOG)
    assert "EADDRINUSE" in rendezvous_port_taken(Outcome(returncode=1), log_path, rank_dir)


@pytest.mark.parametrize("case", ["ok exit", "stopped by the watchdog", "a rank had started", "another error"])
def test_other_failures_are_the_cells_own(tmp_path, case):
    outcome = Outcome(returncode=0 if case == "ok exit" else 1,
                      stopped_by="hang" if case == "stopped by the watchdog" else None)
    log = "RuntimeError: CUDA error: an illegal memory access\n" if case == "another error" else TAKEN_LOG
    log_path, rank_dir = _cell_folder(tmp_path, log, heartbeat=case == "a rank had started")
    assert rendezvous_port_taken(outcome, log_path, rank_dir) is None


def test_with_port_changes_the_rendezvous_port_and_the_script_that_reruns_the_cell(tmp_path):
    plan = build_plan(_tiny_cell(2), tmp_path, Limits(), port=29500)
    moved = with_port(plan, 41234)
    assert moved.argv[moved.argv.index("--main_process_port") + 1] == "41234"
    assert "--main_process_port 41234" in moved.files["launch.sh"]
    assert "--main_process_port 29500" in plan.files["launch.sh"]  # the plan itself is left as it was


def test_a_picked_port_binds_and_lies_below_the_ephemeral_range():
    low, _ = runner.ephemeral_port_range()
    for _ in range(5):
        port = runner.free_port()
        assert port < low or low <= 10_000
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))  # free now


@pytest.mark.launch_aside
@pytest.mark.slow
def test_a_taken_rendezvous_port_is_retried_on_a_free_one_and_the_record_says_so(tmp_path, monkeypatch):
    # A real 2-process gloo launch whose first port is bound but not listening, as by an outgoing connection
    # (the GPU case): accelerate's own check, a connect, finds it free and torchrun's store then cannot bind it.
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        taken = holder.getsockname()[1]
        ports = iter([taken])
        real_free_port = runner.free_port
        monkeypatch.setattr(runner, "free_port", lambda: next(ports, None) or real_free_port())
        plan = build_plan(_tiny_cell(2), tmp_path, Limits(), port=taken)
        record = runner.run_plan(plan, "t", {})
    assert record.status == "ok", record.error
    assert [r["port"] for r in record.port_retries] == [taken]
    assert "in use" in record.port_retries[0]["error"].lower() or "EADDRINUSE" in record.port_retries[0]["error"]
    cell_dir = Path(record.cell_dir)
    assert str(taken) in (cell_dir / "attempt-1" / "launch.log").read_text()  # the failed attempt's log is kept
    assert f"--main_process_port {taken}" not in record.command
    assert f"--main_process_port {taken}" not in (cell_dir / "launch.sh").read_text()
