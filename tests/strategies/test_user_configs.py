"""Users' own configs as the strategy: Trainer-style "auto" DeepSpeed JSON and `accelerate config` YAML.

A real CPU launch through the CLI (DDP from a user YAML), the plan of a Trainer-style ZeRO-2 JSON, plus
fast checks of the resolution rules and of bad input (exit 2 before anything is launched).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, bench, write_matrix

from bench.launch.campaign import strategy_info
from bench.launch.plan import build_plan
from bench.spec import CellSettings, MatrixError, expand, load_matrix
from bench.strategies.user_configs import describe_user_config, resolve_user_config, resolve_with_originals

CONFIGS = REPO / "configs"


def _records(results: Path) -> list[dict]:
    return [json.loads(line) for line in (results / "runs.jsonl").read_text().splitlines() if line.strip()]


def _user_ddp_yaml(folder: Path) -> Path:
    """What `accelerate config` writes for multi-GPU DDP, for 8 GPUs: bench must use the cell's 2."""
    path = folder / "my_accelerate.yaml"
    path.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "debug": False, "distributed_type": "MULTI_GPU",
        "downcast_bf16": "no", "gpu_ids": "all", "machine_rank": 0, "main_training_function": "main",
        "mixed_precision": "no", "num_machines": 1, "num_processes": 8, "rdzv_backend": "static",
        "same_network": True, "use_cpu": False,
    }))
    return path


# ---------------------------------------------------------------- real launches

def test_trainer_style_zero2_json_is_resolved_and_planned_for_two_cpu_processes(tmp_path):
    """The plan a Trainer-style JSON gets (what the launch runs); a JSON optimizer block's launch is the corpus's
    (tests/strategies/test_corpus.py launches one and checks the ranks' optimizer class), which spares CI a
    second build of DeepSpeed's CPU Adam op."""
    ds = tmp_path / "ds_config.json"
    shutil.copy(CONFIGS / "ds_zero2_auto.json", ds)
    matrix = load_matrix(write_matrix(tmp_path, "userds", strategy=str(ds), gpus=2))
    (cell,) = expand(matrix, device="cpu")
    plan = build_plan(cell, tmp_path / "results", matrix.limits)
    resolved = json.loads(plan.files["deepspeed.json"])
    assert "auto" not in json.dumps(resolved)
    assert resolved["train_micro_batch_size_per_gpu"] == 2 and resolved["train_batch_size"] == 4
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 128 * 128  # tiny-llama hidden 128
    assert resolved["bf16"]["enabled"] is False and resolved["fp16"]["enabled"] is False
    assert plan.files["original_ds_config.json"] == ds.read_text()
    accel = yaml.safe_load(plan.files["accelerate.yaml"])
    assert accel["distributed_type"] == "DEEPSPEED" and accel["num_processes"] == 2
    assert accel["deepspeed_config"]["deepspeed_config_file"] == str(plan.cell_dir / "deepspeed.json")
    # The JSON's own optimizer and scheduler blocks run, and the record will say so.
    info = strategy_info(cell)
    assert info["optimizer"].startswith("DeepSpeed AdamW from the JSON's optimizer block")
    assert info["scheduler"] == "DeepSpeed WarmupDecayLR from the JSON's scheduler block"


@pytest.mark.launch_aside
def test_user_accelerate_yaml_ddp_runs_with_the_cells_process_count(tmp_path):
    user = _user_ddp_yaml(tmp_path)
    matrix = write_matrix(tmp_path, "useryaml", strategy=str(user), gpus=2)
    results = tmp_path / "results"
    bench("run", str(matrix), "--results", str(results), check=True)
    (record,) = _records(results)
    assert record["status"] == "ok", record.get("error")
    assert {r["world_size"] for r in record["ranks"]} == {2}
    cell_dir = Path(record["cell_dir"])
    assert yaml.safe_load((cell_dir / "accelerate.yaml").read_text())["num_processes"] == 2
    assert (cell_dir / "original_my_accelerate.yaml").read_text() == user.read_text()
    assert "num_processes 8 -> 2" in (cell_dir / "resolution_notes.txt").read_text()


# ---------------------------------------------------------------- resolution rules

def _cell(strategy: str, **kw) -> CellSettings:
    return CellSettings(model="llama-3.1-8b", strategy=strategy, gpus=2, device="cuda",
                        train={"micro_batch": 4, "grad_accum": 2, "precision": "bf16", "lr": 2e-4}, **kw)


def test_zero3_offload_autos_follow_the_trainer():
    path = str(CONFIGS / "ds_zero3_offload_auto.json")
    accel, ds, notes = resolve_user_config(_cell(path), Path("/x"))
    h = 4096
    z = ds["zero_optimization"]
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == (
        h * h, int(0.9 * h * h), 10 * h)
    assert ds["train_batch_size"] == 2 * 4 * 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["optimizer"]["params"] == {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    assert ds["scheduler"]["params"]["total_num_steps"] == 2 + 300 and ds["bf16"]["enabled"] is True
    assert accel["deepspeed_config"]["zero3_init_flag"] is True
    s = describe_user_config(path)
    assert (s.family, s.zero_stage, s.offload_optimizer, s.offload_params) == ("deepspeed", 3, True, True)


def test_unprefixed_zero3_autos_follow_the_trainer_and_the_rest_get_deepspeeds_defaults(tmp_path):
    """A ZeRO-3 JSON as a popular fine-tuning project ships it: DeepSpeed reads the un-prefixed keys as the
    stage3_ ones, and drops any other "auto" to keep its own default. Both are resolved, with notes."""
    ds = json.loads((CONFIGS / "ds_zero3_offload_auto.json").read_text())
    z = ds["zero_optimization"]
    for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        z.pop(key, None)
    z.update(prefetch_bucket_size="auto", param_persistence_threshold="auto", stage3_max_live_parameters="auto")
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(ds))
    _, out, notes = resolve_user_config(_cell(str(path)), Path("/x"))
    h = 4096
    z = out["zero_optimization"]
    assert (z["prefetch_bucket_size"], z["param_persistence_threshold"]) == (int(0.9 * h * h), 10 * h)
    assert "stage3_max_live_parameters" not in z  # DeepSpeed then keeps its own default
    assert any(n.startswith("filled zero_optimization.prefetch_bucket_size") and "0.9 * hidden_size^2" in n
               for n in notes)
    assert any("stage3_max_live_parameters" in n and "DeepSpeed's own default (1000000000)" in n for n in notes)


def test_accelerate_yaml_pointing_at_a_json_is_resolved_too():
    path = str(CONFIGS / "accelerate_zero2_ds_file.yaml")
    accel, ds, notes, originals = resolve_with_originals(_cell(path), Path("/cells/c1"))
    assert accel["deepspeed_config"]["deepspeed_config_file"] == "/cells/c1/deepspeed.json"
    assert "mixed_precision" not in accel and ds["train_micro_batch_size_per_gpu"] == 4
    assert set(originals) == {"original_accelerate_zero2_ds_file.yaml", "original_ds_zero2_auto.json"}


def test_fsdp_yaml_is_described_from_its_content():
    s = describe_user_config(str(CONFIGS / "accelerate_fsdp.yaml"))
    assert (s.family, s.fsdp_sharding, s.shards_params) == ("fsdp", "FULL_SHARD", True)


def test_explicit_value_that_disagrees_with_the_cell_is_an_error(tmp_path):
    ds = json.loads((CONFIGS / "ds_zero2_auto.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 16
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(MatrixError, match="train_micro_batch_size_per_gpu is 16 .*train.micro_batch"):
        resolve_user_config(_cell(str(path)), Path("/x"))


# ---------------------------------------------------------------- bad input: exit 2, nothing launched

@pytest.mark.parametrize("name,content,expect", [
    ("missing.json", None, "no such file"),
    ("broken.json", "{not json", "invalid JSON"),
    ("broken.yaml", "a: [1, 2\n", "invalid YAML"),
])
def test_bad_user_config_exits_2_naming_the_strategy(tmp_path, name, content, expect):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    matrix = write_matrix(tmp_path, "bad", strategy=str(path), gpus=2)
    proc = bench("run", str(matrix), "--results", str(tmp_path / "results"))
    assert proc.returncode == 2, proc.stderr
    assert f"strategy {str(path)!r}" in proc.stderr and expect in proc.stderr and "Fix:" in proc.stderr
    assert not (tmp_path / "results" / "runs.jsonl").exists()
