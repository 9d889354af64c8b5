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
