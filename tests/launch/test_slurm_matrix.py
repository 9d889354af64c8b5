"""The matrix's launcher, slurm: section and nodes axis, checked before anything launches (no cluster needed)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from bench.launch.plan import build_plan
from bench.launch.slurm_runner import job_options, node_command
from bench.spec import CellSettings, Limits
from bench.spec.slurm import SlurmOptions
from conftest import REPO, bench, write_matrix


def test_one_node_cells_keep_their_ids_and_more_nodes_get_new_ones():
    """The records on file were written before nodes existed: a one-node cell hashes as it did then (its
    settings without nodes), so resume and baselines still find them."""
    for cell in (CellSettings(), CellSettings(gpus=2, strategy="zero2", device="cuda")):
        before = cell.model_dump(mode="json")
        before.pop("nodes")
        canonical = json.dumps(before, sort_keys=True, separators=(",", ":"))
        assert cell.cell_id == hashlib.sha256(canonical.encode()).hexdigest()[:12]
    one = CellSettings(gpus=2)
    assert CellSettings(gpus=2, nodes=1).cell_id == one.cell_id
    two = CellSettings(gpus=2, nodes=2)
    assert two.cell_id != one.cell_id and two.processes == 4 and two.setting_key == one.setting_key
    assert "2nodes" in two.label and "nodes" not in one.label


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
