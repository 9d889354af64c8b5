"""The worker refuses to measure a cell whose launch did not set up its strategy's distributed type.

Unit tests of the guard (no launch): every catalogue family against what accelerate reports, user config
files through bench.strategies.get, and a fake accelerator through the hook the worker calls. Real CPU
cells (ddp and zero3 at 1 and 2 processes, zero2 x2 in test_end_to_end) pass through it on every run.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from bench import strategies
from bench.spec import CellSettings
from bench.worker.guard import (check_distributed_setup, expected_distributed_types, guard_distributed_setup,
                                strategy_family)


@pytest.mark.parametrize("strategy,processes,actual", [
    ("zero2", 2, "DEEPSPEED"), ("zero3", 1, "DEEPSPEED"), ("zero3_offload", 4, "DistributedType.DEEPSPEED"),
    ("fsdp_full_shard", 2, "FSDP"), ("fsdp_hybrid_shard", 2, "FSDP"), ("fsdp2", 1, "FSDP"),
    ("ddp", 2, "MULTI_GPU"), ("ddp", 2, "MULTI_CPU"), ("ddp", 1, "NO"), ("single", 1, "NO"),
])
def test_the_setup_a_strategy_asks_for_passes(strategy, processes, actual):
    check_distributed_setup(strategy, strategies.get(strategy), processes, actual, processes)


@pytest.mark.parametrize("strategy,processes,actual", [
    ("zero2", 2, "MULTI_CPU"),  # the old bug: DeepSpeed cells measured as plain DDP over gloo
    ("zero3", 1, "NO"), ("fsdp_full_shard", 2, "MULTI_GPU"), ("fsdp2", 2, "DEEPSPEED"),
    ("ddp", 2, "NO"), ("ddp", 1, "MULTI_GPU"), ("single", 1, "MULTI_CPU"), ("ddp", 2, "FSDP"),
])
def test_a_different_setup_is_a_clear_error(strategy, processes, actual):
    described = strategies.get(strategy)
    with pytest.raises(RuntimeError) as err:
        check_distributed_setup(strategy, described, processes, f"DistributedType.{actual}", processes)
    text = str(err.value)
    assert repr(strategy) in text and actual in text and "expected distributed type" in text
    assert all(e in text for e in expected_distributed_types(described, processes))
    assert "not supported" not in text.lower()  # classified as a crash, not as an unsupported combination


def test_world_size_and_fsdp_version_are_checked_too():
    with pytest.raises(RuntimeError, match="expected 2 process.*has 1"):
        check_distributed_setup("zero2", strategies.get("zero2"), 2, "DEEPSPEED", 1)
    with pytest.raises(RuntimeError, match="FSDP version 2.*has 1"):
        check_distributed_setup("fsdp2", strategies.get("fsdp2"), 2, "FSDP", 2, fsdp_version=1)
    check_distributed_setup("fsdp_full_shard", strategies.get("fsdp_full_shard"), 2, "FSDP", 2, fsdp_version=1)


def test_user_configs_take_their_family_from_the_file(tmp_path, monkeypatch):
    ds = tmp_path / "my_zero.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    ddp = tmp_path / "my_ddp.yaml"
    ddp.write_text(yaml.safe_dump({"distributed_type": "MULTI_GPU", "num_processes": 2}))
    zero = CellSettings(strategy=str(ds), gpus=2, device="cpu", model="tiny-llama")
    assert strategy_family(zero) == "deepspeed"
    with pytest.raises(RuntimeError, match="my_zero.json"):
        guard_distributed_setup(zero, SimpleNamespace(distributed_type="MULTI_CPU", state=SimpleNamespace()), 2)
    guard_distributed_setup(zero, SimpleNamespace(distributed_type="DEEPSPEED", state=SimpleNamespace()), 2)
    one = CellSettings(strategy=str(ddp), gpus=1, device="cuda", model="tiny-llama")
    # the user's own DDP config keeps MULTI_GPU at one process: that is what it asks for
    guard_distributed_setup(one, SimpleNamespace(distributed_type="MULTI_GPU", state=SimpleNamespace()), 1)
    with pytest.raises(RuntimeError):
        guard_distributed_setup(one, SimpleNamespace(distributed_type="DEEPSPEED", state=SimpleNamespace()), 1)


def test_a_user_config_unreadable_from_the_rank_falls_back_to_the_cells_resolved_yaml(tmp_path):
    cell_dir = tmp_path / "cell"
    cell_dir.mkdir()
    (cell_dir / "accelerate.yaml").write_text(yaml.safe_dump(
        {"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2}}))
    cell = CellSettings.model_construct(strategy=str(tmp_path / "gone.yaml"), gpus=2)
    assert strategy_family(cell, cell_dir) == "fsdp2"
    plugin = SimpleNamespace(fsdp_version=2)
    guard_distributed_setup(cell, SimpleNamespace(distributed_type="FSDP", state=SimpleNamespace(fsdp_plugin=plugin)),
                            2, cell_dir)
