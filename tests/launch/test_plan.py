"""The generated accelerate YAML and DeepSpeed JSON, read back by accelerate 1.15's own launcher code.

No GPU needed: accelerate's launch parser turns the YAML into the FSDP_* environment the ranks see, and
its FullyShardedDataParallelPlugin is built from that environment exactly as in a rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench import strategies
from bench.launch.plan import build_plan, write_plan_files
from bench.spec import CellSettings, Limits, expand, load_matrix
from bench.strategies.precision import policy_for

from conftest import REPO

FSDP1 = ["fsdp_full_shard", "fsdp_shard_grad_op", "fsdp_hybrid_shard", "fsdp_no_shard"]
FSDP2 = ["fsdp2", "fsdp2_no_reshard"]
V1_ONLY_KEYS = {"fsdp_sharding_strategy", "fsdp_backward_prefetch", "fsdp_use_orig_params",
                "fsdp_sync_module_states", "fsdp_forward_prefetch"}


def plan_for(tmp_path: Path, strategy: str, **kw):
    cell = CellSettings(strategy=strategy, gpus=kw.pop("gpus", 2), device="cuda", model="tiny-llama", **kw)
    plan = build_plan(cell, tmp_path, Limits())
    write_plan_files(plan)
    return plan


def launcher_plugin(plan, monkeypatch):
    """The FSDP plugin a rank builds from the environment accelerate's launcher derives from our YAML."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(plan.argv[plan.argv.index("--config_file"):])
    args, _, _ = _validate_launch_command(args)
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith("FSDP_") or key == "ACCELERATE_USE_FSDP":
            monkeypatch.setenv(key, value)
    return FullyShardedDataParallelPlugin()


@pytest.mark.parametrize("name", FSDP1)
def test_fsdp1_yaml_gives_the_sharding_strategy(tmp_path, monkeypatch, name):
    plan = plan_for(tmp_path, name)
    fsdp = yaml.safe_load(plan.files["accelerate.yaml"])["fsdp_config"]
    assert fsdp["fsdp_version"] == 1 and fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    plugin = launcher_plugin(plan, monkeypatch)
    assert plugin.fsdp_version == 1
    assert plugin.sharding_strategy.name == strategies.get(name).fsdp_sharding
    assert plugin.use_orig_params is True  # frozen and trainable parameters side by side (LoRA)


@pytest.mark.parametrize("name,reshard", [("fsdp2", True), ("fsdp2_no_reshard", False)])
def test_fsdp2_yaml_has_no_v1_keys_and_a_bool_reshard(tmp_path, monkeypatch, name, reshard):
    plan = plan_for(tmp_path, name)
    fsdp = yaml.safe_load(plan.files["accelerate.yaml"])["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and not (V1_ONLY_KEYS & set(fsdp))
    assert fsdp["fsdp_reshard_after_forward"] is reshard
    plugin = launcher_plugin(plan, monkeypatch)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is reshard
    assert plugin.forward_prefetch is None and plugin.use_orig_params is None


@pytest.mark.parametrize("name,stage", [("zero1", 1), ("zero2", 2), ("zero3", 3)])
def test_deepspeed_json(tmp_path, name, stage):
    plan = plan_for(tmp_path, name, train={"optimizer": "adamw_bnb_8bit"})
    ds = json.loads(plan.files["deepspeed.json"])
    accel = yaml.safe_load(plan.files["accelerate.yaml"])
    assert ds["zero_optimization"]["stage"] == stage and ds["zero_optimization"]["overlap_comm"] is True
    assert ds["bf16"]["enabled"] is True and "mixed_precision" not in accel
    assert ds["zero_allow_untested_optimizer"] is True  # bnb's AdamW8bit is not on DeepSpeed's list
    assert accel["deepspeed_config"]["zero3_init_flag"] is (stage == 3)


def test_every_gpu_cell_has_gpu_ids_and_the_parent_env_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    plan = plan_for(tmp_path, "ddp")
    assert yaml.safe_load(plan.files["accelerate.yaml"])["gpu_ids"] == "all"
    assert "NCCL_DEBUG" not in plan.env  # the machine's own settings pass through (plan.env only adds)


class UuidNvml:
    """pynvml's index/UUID look-ups over four cards, enough for bench.machine.gpu_state.cell_handles."""

    UUIDS = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc", "GPU-dddd"]

    def nvmlDeviceGetCount(self):
        return len(self.UUIDS)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return self.UUIDS.index(uuid)

    def nvmlDeviceGetIndex(self, handle):
        return handle


def physical(entry: str) -> int:
    return UuidNvml.UUIDS.index(entry) if entry.startswith("GPU-") else int(entry)


@pytest.mark.parametrize("parent,gpus,want", [
    (None, 2, "0,1"),  # unset: a 2-rank cell on a 4-GPU host sees 2 cards, not 4
    (None, 1, "0"),
    ("2,3,0,1", 2, "2,3"),  # the parent's own list, in its order
    (" 3 , 1,", 1, "3"),
    ("GPU-cccc,GPU-aaaa,GPU-dddd", 2, "GPU-cccc,GPU-aaaa"),
])
def test_a_cuda_cell_sees_exactly_its_gpus_the_ones_the_parent_samples(tmp_path, monkeypatch, parent, gpus, want):
    from bench.machine import gpu_state
    from bench.spec import CellSettings, Limits

    if parent is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    cell = CellSettings(strategy="fsdp_hybrid_shard", gpus=gpus, device="cuda", model="tiny-llama")
    plan = build_plan(cell, tmp_path, Limits())  # reads the parent's CUDA_VISIBLE_DEVICES
    assert plan.env["CUDA_VISIBLE_DEVICES"] == want
    assert f"CUDA_VISIBLE_DEVICES={want}" in plan.shell_command().replace("'", "")
    # The parent (busy check, NVML sampler) watches CUDA devices 0..gpus-1 through its own list; the
    # ranks' CUDA devices 0..gpus-1 are the plan's list: the same physical cards, in the same order.
    monkeypatch.setattr(gpu_state, "nvml", lambda: UuidNvml())
    watched = [index for index, _ in gpu_state.cell_handles(gpus)]
    assert watched == [physical(e) for e in want.split(",")]


def test_cpu_cells_hide_every_gpu_and_the_parent_list_can_be_pinned(tmp_path):
    from bench.spec import CellSettings, Limits

    cpu = CellSettings(strategy="ddp", gpus=2, device="cpu", model="tiny-llama")
    assert build_plan(cpu, tmp_path, Limits(), parent_visible_devices="0,1,2,3").env["CUDA_VISIBLE_DEVICES"] == ""
    gpu = CellSettings(strategy="zero3", gpus=4, device="cuda", model="tiny-llama")
    assert build_plan(gpu, tmp_path, Limits(), parent_visible_devices="7,6,5,4,3").env["CUDA_VISIBLE_DEVICES"] == "7,6,5,4"


@pytest.mark.parametrize("strategy,adapter,want", [
    ("ddp", "none", "autocast"), ("fsdp_full_shard", "none", "fsdp-mixed"), ("fsdp2", "none", "fsdp-mixed"),
    ("zero3", "none", "pure"), ("fsdp_full_shard", "lora", "frozen-base"), ("ddp", "lora", "frozen-base"),
])
def test_precision_policy_is_stated(strategy, adapter, want):
    cell = CellSettings(strategy=strategy, gpus=2, device="cuda", adapter={"type": adapter})
    assert policy_for(cell).name == want


@pytest.mark.parametrize("path,count", [("matrices/llama8b.yaml", 15), ("matrices/llama-full.yaml", 46)])
def test_shipped_gpu_matrices_expand_on_cuda(path, count):
    matrix = load_matrix(REPO / path)
    cells = expand(matrix, source=path, device="cuda")
    assert len(cells) == count and all(c.device == "cuda" for c in cells)
    from bench.strategies import check_runnable

    assert [check_runnable(c, visible_gpus=4) for c in cells] == [None] * count


def test_llama8b_matrix_is_the_issue_setting():
    cell = expand(load_matrix(REPO / "matrices/llama8b.yaml"), device="cuda")[0]
    a, t = cell.adapter, cell.train
    assert (cell.model, a.type, a.r, a.alpha, a.dropout, a.target) == ("llama-3.1-8b", "lora", 32, 16, 0.05, "all-linear")
    assert (t.seq_len, t.micro_batch, t.precision, t.optimizer, t.grad_checkpointing) == (
        2048, 4, "bf16", "adamw_bnb_8bit", True)


def test_fsdp1_keeps_original_params_for_lora_but_not_for_qlora(tmp_path):
    from bench.spec import CellSettings, Limits
    from bench.launch.plan import build_plan

    def use_orig(adapter: str) -> bool:
        cell = CellSettings(model="llama-3.2-1b", strategy="fsdp_full_shard", gpus=2, device="cuda",
                            adapter={"type": adapter})
        plan = build_plan(cell, tmp_path, Limits(), parent_visible_devices="0,1")
        return yaml.safe_load(plan.files["accelerate.yaml"])["fsdp_config"]["fsdp_use_orig_params"]

    assert use_orig("lora") is True and use_orig("none") is True
    assert use_orig("qlora") is False
