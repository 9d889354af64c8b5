"""The matrix's launcher, slurm: section and nodes axis, checked before anything launches (no cluster needed)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from bench.launch.plan import build_plan
from bench.launch.slurm_runner import job_options, node_command
from bench.records import load_records
from bench.spec import CellSettings, Limits
from bench.spec.slurm import SlurmOptions
from conftest import REPO, bench, write_matrix


def test_one_node_cells_keep_their_ids_and_more_nodes_get_new_ones():
    """The records on file were written before nodes existed: a one-node cell hashes as it did then (its
    settings without nodes), so resume and baselines still find them."""
    for cell in (CellSettings(), CellSettings(gpus=2, strategy="zero2", device="cuda")):
        before = cell.model_dump(mode="json")
        for later in ("nodes", "tp", "cp", "cpu_affinity"):  # settings added after records were on file
            before.pop(later)
        before["train"]["timing"].pop("min_timed_s")  # added later too (0: hashed as before it existed)
        canonical = json.dumps(before, sort_keys=True, separators=(",", ":"))
        assert cell.cell_id == hashlib.sha256(canonical.encode()).hexdigest()[:12]
    one = CellSettings(gpus=2)
    assert CellSettings(gpus=2, nodes=1).cell_id == one.cell_id
    two = CellSettings(gpus=2, nodes=2)
    assert two.cell_id != one.cell_id and two.processes == 4 and two.setting_key == one.setting_key
    assert "2nodes" in two.label and "nodes" not in one.label


def test_committed_records_keep_their_cell_ids():
    """The H200 nights (written before tp and cp existed) still hash to the ids they were recorded under, so the
    promoted baseline keeps matching the nightly matrix."""
    records = load_records(REPO / "results" / "nightly-h200" / "2026-11-30-997c560")
    assert records
    for record in records:
        assert CellSettings(**record.settings).cell_id == record.cell_id


def test_several_nodes_with_the_local_launcher_are_refused(tmp_path):
    matrix = write_matrix(tmp_path, "local", grid={"nodes": [1, 2]})
    proc = bench("run", str(matrix), "--results", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert "launcher is 'local'" in proc.stderr and "launcher: slurm" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_the_slurm_launcher_without_sbatch_is_refused(tmp_path):
    matrix = write_matrix(tmp_path, "nosb", launcher="slurm", grid={"nodes": [2]})
    exe_dir = str(Path(os.sys.executable).parent)
    proc = bench("run", str(matrix), "--results", str(tmp_path / "r"), env={"PATH": exe_dir})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "`sbatch` is not on PATH" in proc.stderr and "Fix:" in proc.stderr


def test_a_bad_slurm_section_names_the_key(tmp_path):
    matrix = write_matrix(tmp_path, "bad", launcher="slurm", slurm={"extra_sbatch": ["qos=high"]})
    proc = bench("run", str(matrix), "--dry-run")
    assert proc.returncode == 2 and "extra_sbatch" in proc.stderr


def test_the_node_command_owns_the_port_and_the_site_env_wins(tmp_path):
    cell = CellSettings(device="cpu", nodes=2, gpus=2)
    plan = build_plan(cell, tmp_path, Limits(), port=29999)
    command = node_command(plan)
    assert "29999" not in command and '--machine_rank "$SLURM_NODEID"' in command
    assert "--num_machines 2 --num_processes 4" in command and "--multi_gpu" in command
    assert "bench.machine.node_env" in command.splitlines()[0]
    options = job_options(plan, SlurmOptions(env={"OMP_NUM_THREADS": "2"}))
    assert options.env["OMP_NUM_THREADS"] == "2" and options.env["ACCELERATE_USE_CPU"] == "1"
    cuda = build_plan(CellSettings(device="cuda", nodes=2, gpus=2), tmp_path, Limits(), parent_visible_devices=None)
    assert "CUDA_VISIBLE_DEVICES" not in job_options(cuda, SlurmOptions()).env  # Slurm's --gres decides


def test_the_node_command_runs_the_nodes_sampler_and_waits_for_it(tmp_path):
    plan = build_plan(CellSettings(device="cuda", nodes=2, gpus=4), tmp_path, Limits(), parent_visible_devices=None)
    lines = node_command(plan, sample=True).splitlines()
    sampler = next(i for i, line in enumerate(lines) if "bench.machine.node_sampler" in line)
    launch = next(i for i, line in enumerate(lines) if "accelerate" in line)
    assert sampler < launch and lines[sampler].endswith("&") and "--gpus 4" in lines[sampler]
    assert 'nvml-node-"$SLURM_NODEID".json' in lines[sampler]
    assert lines[launch + 1:] == ["rc=$?", 'kill -TERM "$sampler_pid" 2>/dev/null', 'wait "$sampler_pid"', "exit $rc"]
    cpu = build_plan(CellSettings(device="cpu", nodes=2, gpus=2), tmp_path, Limits())
    assert "--gpus 0" in node_command(cpu, sample=True)  # a CPU cell samples no card, but its sampler says so
    assert "node_sampler" not in node_command(cpu, sample=False)  # BENCH_SAMPLER=0


def test_a_dry_run_prints_each_cells_batch_script_without_slurm(tmp_path):
    """A user reads the scripts before submitting, on a machine without Slurm: nothing is written or submitted."""
    matrix = write_matrix(tmp_path, "dry", launcher="slurm",
                          slurm={"partition": "gpu", "time_limit_s": 900, "env": {"NCCL_SOCKET_IFNAME": "ib0"}},
                          grid={"strategy": ["ddp", "zero2"], "nodes": [2], "gpus": [2]})
    exe_dir = str(Path(os.sys.executable).parent)  # no sbatch on this PATH
    proc = bench("run", str(matrix), "--results", str(tmp_path / "r"), "--dry-run", env={"PATH": exe_dir})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count("#!/bin/bash") == 2 and out.count("sbatch --parsable") == 2
    for line in ("#SBATCH --nodes=2", "#SBATCH --partition=gpu", "#SBATCH --time=0-00:15:00", "export NCCL_SOCKET_IFNAME=ib0",
                 "srun --nodes=2 --ntasks-per-node=1", "bench.machine.node_sampler", "--deepspeed_multinode_launcher"):
        assert line in out, line
    assert "slurm.sbatch" in out
    assert not (tmp_path / "r").exists()
