"""A user's config of the wrong shape is its cell's problem, said with the file, the key and the fix: the cell is
planned `unsupported` and the rest of the matrix runs; no exception from reading the file escapes as a traceback.
Also the "auto" spellings the Trainer and accelerate take (or refuse), and multi-node sizes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from conftest import REPO, write_matrix

from bench.launch.campaign import RunOptions, main_guard, run_matrix
from bench.spec import CellSettings, MatrixError
from bench.strategies import cell_problems, get
from bench.strategies import user_configs
from bench.strategies.user_configs import check_user_config, resolve_user_config

ZERO2 = json.loads((REPO / "configs" / "ds_zero2_auto.json").read_text())


def _ds(**changes) -> str:
    ds = json.loads(json.dumps(ZERO2))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = ds
        for key in parents:
            node = node[key]
        node[leaf] = value
    return json.dumps(ds)


def _accel(distributed_type: str = "FSDP", **keys) -> str:
    """An accelerate YAML as `accelerate config` writes it, with ``keys`` set (fsdp_* keys under fsdp_config)."""
    accel = yaml.safe_load((REPO / "configs" / "accelerate_fsdp.yaml").read_text())
    accel["distributed_type"] = distributed_type
    accel.pop("mixed_precision")
    for key, value in keys.items():
        if key.startswith("fsdp_") and key != "fsdp_config":
            accel["fsdp_config"][key] = value
        else:
            accel[key] = value
    return yaml.safe_dump(accel)


# (file name, content, what the cell's reason must say besides the file's name and "Fix:")
BAD = [
    ("latin1.json", "{\"stage\": \"\xe9\"}".encode("latin-1"), "is not a text file (byte 11 is not UTF-8)"),
    ("stage_three.json", _ds(zero_optimization__stage="three"), "zero_optimization.stage is 'three'"),
    ("stage_five.json", _ds(zero_optimization__stage=5), "zero_optimization.stage is 5"),
    ("zero_list.json", _ds(zero_optimization=[1]), "zero_optimization is [1], not a mapping"),
    ("betas.json", _ds(optimizer__params__betas=["auto", 0.999]), "optimizer.params.betas is ['auto', 0.999]"),
    ("params.json", _ds(optimizer__params="auto"), "optimizer.params is \"auto\""),
    ("sharding7.yaml", _accel(fsdp_sharding_strategy=7), "fsdp_config.fsdp_sharding_strategy is 7"),
    ("sharding0.yaml", _accel(fsdp_sharding_strategy=0), "fsdp_config.fsdp_sharding_strategy is 0"),
    ("version.yaml", _accel(fsdp_version="two"), "fsdp_config.fsdp_version is 'two'"),
    ("fsdp_list.yaml", _accel(fsdp_config=[1]), "fsdp_config is [1], not a mapping"),
    ("ds_list.yaml", _accel("DEEPSPEED", deepspeed_config=[1]), "deepspeed_config is [1], not a mapping"),
    ("ds_stage.yaml", _accel("DEEPSPEED", deepspeed_config={"zero_stage": "x"}), "deepspeed_config.zero_stage is 'x'"),
    ("xla.yaml", _accel("XLA"), "distributed_type XLA is not run by bench"),
    ("unknown.yaml", _accel("TPU_POD"), "'TPU_POD', which accelerate does not know"),
    ("mp_yes.yaml", _accel("MULTI_GPU", mixed_precision=True), "mixed_precision is True, which accelerate does not"),
]


@pytest.mark.parametrize("name,content,expect", BAD, ids=[b[0] for b in BAD])
def test_a_broken_user_config_is_its_cells_problem_and_the_ddp_cell_still_plans(tmp_path, name, content, expect):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    matrix = write_matrix(tmp_path, grid={"strategy": ["ddp", str(path)]}, gpus=2)
    out = io.StringIO()
    rc = main_guard(run_matrix, str(matrix), RunOptions(results_dir=tmp_path / "res", dry_run=True),
                    Console(file=out, width=300))
    text = out.getvalue()
    assert rc == 0, text
    assert text.count("accelerate.commands.launch") == 1  # the ddp cell is planned
    assert "1 run(s) would be recorded unsupported" in text
    (reason,) = cell_problems(CellSettings(strategy=str(path), gpus=2), None)
    assert f"strategy {str(path)!r}" in reason and expect in reason and "Fix:" in reason, reason
    assert "runs one process" not in reason
    with pytest.raises(MatrixError, match="cannot run on this machine"):  # --strict: the whole matrix refused
        run_matrix(str(matrix), RunOptions(results_dir=tmp_path / "res", dry_run=True, strict=True),
                   Console(file=io.StringIO()))


def test_no_exception_from_reading_a_user_config_escapes_as_a_traceback(tmp_path, monkeypatch):
    path = tmp_path / "ds.json"
    path.write_text(_ds())

    def unforeseen(*args, **kwargs):
        raise KeyError("something no check foresaw")

    monkeypatch.setattr(user_configs, "resolve_deepspeed", unforeseen)
    monkeypatch.setattr(user_configs, "zero_stage", unforeseen)
    cell = CellSettings(strategy=str(path), gpus=2)
    reason = check_user_config(cell)
    assert f"strategy {str(path)!r}: bench cannot read this file (KeyError" in reason and "Fix:" in reason
    with pytest.raises(MatrixError, match="cannot read this file"):
        get(str(path))
    assert cell_problems(cell, None) == [reason]


# ---------------------------------------------------------------- what the user's stack fills or takes

def _cell(strategy: Path, **kw) -> CellSettings:
    return CellSettings(model="llama-3.1-8b", strategy=str(strategy), gpus=2, device="cuda",
                        train={"micro_batch": 4, "grad_accum": 2, "precision": "bf16", "lr": 2e-4}, **kw)


def test_auto_stage_and_offload_get_accelerates_defaults(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(_ds(zero_optimization__stage="auto", zero_optimization__offload_optimizer={"device": "auto"}))
    strat = get(str(path))
    assert (strat.zero_stage, strat.offload_optimizer) == (2, False)
    _, ds, notes = resolve_user_config(_cell(path), Path("/x"))
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert "filled zero_optimization.stage = 2 (accelerate's DeepSpeedPlugin default" in "\n".join(notes)


def test_bfloat16_is_deepspeeds_other_spelling_of_bf16(tmp_path):
    ds = json.loads(_ds())
    ds.pop("bf16")
    ds["bfloat16"] = {"enabled": "auto", "immediate_grad_update": True}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    _, out, notes = resolve_user_config(_cell(path), Path("/x"))
    assert "bfloat16" not in out and out["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert any(n.startswith("bfloat16 block written as bf16") for n in notes)
    assert "filled bf16.enabled = True (from train.precision)" in "\n".join(notes)


def test_unquoted_no_is_taken_as_no_with_a_note(tmp_path):
    path = tmp_path / "ddp.yaml"
    path.write_text("distributed_type: MULTI_GPU\nmixed_precision: no\nnum_processes: 8\n")
    cell = CellSettings(strategy=str(path), gpus=2, train={"precision": "fp32"})
    assert cell_problems(cell, None) == []
    accel, _, notes = resolve_user_config(cell, Path("/x"))
    assert accel["mixed_precision"] == "no" and any("quote it, 'no'" in n for n in notes)
    bf16 = CellSettings(strategy=str(path), gpus=2, device="cuda", train={"precision": "bf16"})
    assert "mixed_precision is 'no' in the file" in check_user_config(bf16)


def test_multi_node_sizes_count_every_rank(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(_ds())
    cell = _cell(path, nodes=2)
    accel, ds, _ = resolve_user_config(cell, Path("/x"))
    assert ds["train_batch_size"] == 2 * 2 * 4 * 2  # nodes * gpus * micro_batch * grad_accum
    assert accel["num_processes"] == 4
    yaml_path = tmp_path / "ddp.yaml"
    yaml_path.write_text(_accel("MULTI_GPU", num_processes=8, num_machines=2))
    accel, _, notes = resolve_user_config(_cell(yaml_path, nodes=2), Path("/x"))
    assert (accel["num_processes"], accel["num_machines"]) == (4, 1)
    assert "num_processes 8 -> 4 (the cell's nodes * gpus)" in notes


def test_a_dry_run_shows_where_each_auto_came_from(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(_ds())
    out = io.StringIO()
    run_matrix(str(write_matrix(tmp_path, strategy=str(path), gpus=2)),
               RunOptions(results_dir=tmp_path / "res", dry_run=True), Console(file=out, width=300))
    text = out.getvalue()
    assert "--- resolution_notes.txt" in text
    assert "filled train_micro_batch_size_per_gpu = 2 (from train.micro_batch)" in text
    assert "filled train_batch_size = 4 (from nodes * gpus * micro_batch * grad_accum)" in text
