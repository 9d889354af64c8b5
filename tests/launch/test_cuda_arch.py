"""DeepSpeed cells get a TORCH_CUDA_ARCH_LIST its JIT op builder can parse (FusedAdam on Hopper images)."""

from __future__ import annotations

import pytest

from bench.launch.cuda_arch import deepspeed_can_parse, jit_arch_fix
from bench.launch.plan import with_env
from test_plan import plan_for


@pytest.mark.parametrize("value, ok", [("9.0", True), ("8.0;9.0+PTX", True), ("8.0 9.0", True),
                                       ("9.0a", False), ("8.0;9.0a", False), ("10.0f", False), ("", False)])
def test_which_lists_deepspeed_parses(value, ok):
    assert deepspeed_can_parse(value) is ok


def test_unparseable_list_is_replaced_by_the_gpus_capability():
    fix = jit_arch_fix("9.0a", ["9.0"])
    assert fix.value == "9.0" and "'9.0a'" in fix.note and "cannot parse" in fix.note


def test_unset_list_is_set_and_a_readable_one_left_alone():
    assert jit_arch_fix(None, ["9.0"]).value == "9.0"
    assert jit_arch_fix("8.0;9.0", ["9.0"]) is None
    assert jit_arch_fix("9.0a", []) is None  # no GPU to read: nothing better to offer


def test_with_env_keeps_the_plan_and_rewrites_launch_sh(tmp_path):
    plan = plan_for(tmp_path, "zero1")
    fixed = with_env(plan, "TORCH_CUDA_ARCH_LIST", "9.0", "why")
    assert "TORCH_CUDA_ARCH_LIST=9.0" in fixed.files["launch.sh"]
    assert "TORCH_CUDA_ARCH_LIST" not in plan.files["launch.sh"] and "TORCH_CUDA_ARCH_LIST" not in plan.env
    assert fixed.notes[-1] == "why" and fixed.argv == plan.argv


def test_a_local_deepspeed_cell_gets_the_capability_and_its_record_says_why(tmp_path, monkeypatch):
    """The parent asks NVML (here replaced: no GPU) for the cell's GPUs; the note goes into launch_notes."""
    from bench.launch import cuda_arch
    from bench.launch.campaign import with_deepspeed_arch_list, with_launch_notes

    monkeypatch.setattr(cuda_arch, "capabilities_of", lambda gpus: ["9.0"])
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    fixed = with_deepspeed_arch_list(plan_for(tmp_path / "z", "zero1"))
    assert fixed.env["TORCH_CUDA_ARCH_LIST"] == "9.0" and "TORCH_CUDA_ARCH_LIST=9.0" in fixed.files["launch.sh"]
    info = with_launch_notes({"family": "deepspeed"}, fixed)
    assert info["family"] == "deepspeed" and any("'9.0a'" in n and "cannot parse" in n for n in info["launch_notes"])
    ddp = plan_for(tmp_path / "d", "ddp")  # no DeepSpeed, no JIT-built op: left alone, nothing to note
    assert with_deepspeed_arch_list(ddp) == ddp and with_launch_notes({}, ddp) == {}


def _node_arch_lines(tmp_path, strategy: str) -> tuple[list[str], object]:
    from bench.launch.plan import build_plan
    from bench.launch.slurm_runner import node_command
    from bench.spec import CellSettings, Limits

    cell = CellSettings(strategy=strategy, device="cuda", nodes=2, gpus=2, model="tiny-llama")
    plan = build_plan(cell, tmp_path, Limits(), parent_visible_devices=None)
    plan.cell_dir.mkdir(parents=True)  # as run_slurm_plan leaves it before submitting
    return [line for line in node_command(plan, sample=False).splitlines() if "arch_list" in line], plan.cell_dir


@pytest.mark.parametrize("current, expected, noted", [("9.0a", "9.0", "'9.0a'"), (None, "9.0", "was not set"),
                                                      ("8.0;9.0", "8.0;9.0", None)])
def test_a_slurm_node_sets_the_arch_list_from_its_own_gpus(tmp_path, current, expected, noted):
    """The node command's arch lines run in bash as on a compute node, nvidia-smi played by a script that
    prints one H200's capability (there is no GPU here); the rule that decides is cuda_arch's."""
    import os
    import subprocess

    from conftest import REPO

    lines, cell_dir = _node_arch_lines(tmp_path, "zero2")
    assert lines and "nvidia-smi --query-gpu=compute_cap --format=csv,noheader" in lines[0]
    assert _node_arch_lines(tmp_path / "ddp", "ddp")[0] == []  # no DeepSpeed: nothing set
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 9.0\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "SLURM_NODEID": "1"}
    if current is not None:
        env["TORCH_CUDA_ARCH_LIST"] = current
    proc = subprocess.run(["bash", "-c", "\n".join(lines) + '\necho "$TORCH_CUDA_ARCH_LIST"'], capture_output=True,
                          text=True, env=env, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected
    note_file = cell_dir / "arch-node-1.txt"
    if noted is None:
        assert not note_file.exists()
    else:
        assert noted in note_file.read_text() and "TORCH_CUDA_ARCH_LIST=9.0" in note_file.read_text()


def test_the_nodes_notes_reach_the_slurm_record(tmp_path):
    """What each node decided joins the plan's notes in the record's launch_notes, once however many nodes."""
    from bench.launch.slurm_runner import with_node_notes

    note = "TORCH_CUDA_ARCH_LIST=9.0 (the cell's GPUs' compute capability): it was not set"
    for rank in (0, 1):
        (tmp_path / f"arch-node-{rank}.txt").write_text(note + "\n")
    info = with_node_notes({"family": "deepspeed", "launch_notes": ["from the plan"]}, tmp_path)
    assert info["launch_notes"] == ["from the plan", note]
    assert with_node_notes({"family": "ddp"}, tmp_path / "none") == {"family": "ddp"}


def test_a_slurm_launch_hands_the_plans_notes_to_the_record(tmp_path, monkeypatch):
    """The Slurm branch returned before launch_notes were made: a user config's resolution was lost there."""
    import bench.estimate
    from bench.launch import slurm_runner
    from bench.launch.campaign import CellHooks, RunOptions
    from bench.spec import load_matrix
    from conftest import write_matrix

    seen = {}
    monkeypatch.setattr(bench.estimate, "preflight", lambda *a, **k: (None, None))
    monkeypatch.setattr(slurm_runner, "run_slurm_plan", lambda plan, *a, **k: seen.update(k))
    matrix = load_matrix(str(write_matrix(tmp_path, "s", launcher="slurm")))
    plan = with_env(plan_for(tmp_path, "zero1"), "X", "1", "decided at launch")
    CellHooks(matrix, RunOptions()).launch(plan, "s", {})
    assert seen["strategy_info"]["launch_notes"] == ["decided at launch"]
