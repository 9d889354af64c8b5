"""Tensor and context degrees as matrix settings: expansion, names, what they must divide (exit 2), what the
stack cannot run (unsupported), and the accelerate config and environment they render to."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from bench import strategies
from bench.launch.plan import build_plan
from bench.spec import CellSettings, Limits
from bench.spec.expansion import expand
from bench.spec.schema import Matrix, MatrixError
from bench.strategies import cell_problems, check_names
from bench.strategies.render import accelerate_config, parallelism_env
from conftest import bench, write_matrix


def cell(**kw) -> CellSettings:
    base = {"model": "llama-3.2-1b", "strategy": "fsdp2", "gpus": 2, "device": "cuda", "train": {"seq_len": 2048}}
    return CellSettings.model_validate({**base, **kw})


def test_degrees_are_grid_axes_and_keep_old_cell_ids():
    matrix = Matrix.model_validate({"name": "m", "strategy": "fsdp2", "gpus": 4, "device": "cuda",
                                    "grid": {"tp": [1, 2], "cp": [1, 2]}})
    cells = expand(matrix)
    assert [(c.tp, c.cp) for c in cells] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert len({c.cell_id for c in cells}) == 4
    assert [c.label.split()[2] for c in cells] == ["fsdp2", "fsdp2+cp2", "fsdp2+tp2", "fsdp2+tp2+cp2"]
    # at 1 the degrees are left out of the hash: a cell of before them keeps its id
    plain = cells[0]
    later = {"nodes": True, "tp": True, "cp": True, "cpu_affinity": True, "train": {"timing": {"min_timed_s"}}}  # settings of after the records
    old = json.dumps(plain.model_dump(mode="json", exclude=later), sort_keys=True, separators=(",", ":"))
    assert plain.cell_id == hashlib.sha256(old.encode()).hexdigest()[:12]
    assert cells[0].setting_key == cells[3].setting_key  # compared in one scaling table


@pytest.mark.parametrize(("name", "tp", "cp", "label"), [
    ("fsdp2", 1, 1, "fsdp2"), ("fsdp2", 2, 1, "fsdp2+tp2"), ("fsdp2", 1, 2, "fsdp2+cp2"), ("tp", 2, 1, "tp2"),
    ("fsdp2", 2, 2, "fsdp2+tp2+cp2")])
def test_table_names_say_the_degrees(name, tp, cp, label):
    assert strategies.get(name).with_degrees(tp, cp).label == label
    # the cell's own label (progress lines, dry runs, records) says the same, without the registry
    assert cell(strategy=name, gpus=4, tp=tp, cp=cp).strategy_label == label


def test_degrees_split_the_world():
    s = strategies.get("fsdp2").with_degrees(2, 2)
    assert (s.dp_degree(8), s.dp_shard(8), s.dp_replicate(8)) == (2, 2, 1)
    assert s.state_shards(8) == 4  # FSDP2 shards over dp_shard x cp (accelerate's dp_shard_cp)
    pure = strategies.get("tp").with_degrees(2, 1)
    assert (pure.dp_degree(2), pure.state_shards(2), pure.family) == (1, 1, "tp")
    assert not pure.uses_ddp(2) and pure.uses_parallelism_config


@pytest.mark.parametrize(("kw", "says"), [
    ({"tp": 4, "gpus": 2}, "tp x cp = 4 does not divide the cell's 2 rank(s)"),
    ({"strategy": "tp", "tp": 2, "gpus": 4}, "set tp: 4"),
    ({"model": "tiny-llama", "tp": 4, "gpus": 4}, "does not divide the 2 key/value heads"),
    ({"cp": 2, "train": {"seq_len": 2050}}, "not divisible by 2 x cp = 4"),
])
def test_degrees_that_do_not_divide_refuse_the_matrix(kw, says):
    with pytest.raises(MatrixError, match="ask for degrees that do not divide") as e:
        check_names([cell(**kw)], "m.yaml")
    assert says in str(e.value)


@pytest.mark.parametrize(("kw", "says"), [
    ({"strategy": "ddp", "tp": 2}, "cannot take tp/cp: accelerate composes tensor and context parallelism with FSDP2"),
    ({"strategy": "zero3", "cp": 2}, "cannot take tp/cp"),
    ({"strategy": "fsdp2_offload", "tp": 2}, "cannot take tp/cp"),
    ({"tp": 2}, "leaves FSDP nothing to shard over"),
    ({"strategy": "tp", "tp": 2, "adapter": {"type": "lora"}}, "adapter.type lora under tensor parallelism"),
    ({"strategy": "tp", "tp": 2, "cp": 1, "gpus": 2, "device": "cpu", "train": {"precision": "fp32"}},
     "tp/cp need CUDA GPUs"),
    ({"cp": 2, "train": {"attn_impl": "eager"}}, "cp needs train.attn_impl sdpa"),
    ({"strategy": "tp"}, "strategy 'tp' needs tp above 1"),
])
def test_layouts_the_stack_cannot_run_are_unsupported_with_the_reason(kw, says):
    reasons = cell_problems(cell(**kw), None)
    assert any(says in r for r in reasons), reasons


def test_runnable_layouts_have_no_problem():
    for kw in ({"cp": 2}, {"strategy": "tp", "tp": 2}, {"cp": 2, "gpus": 4, "model": "llama-3.1-8b"},
               {"cp": 2, "adapter": {"type": "lora"}}):
        assert cell_problems(cell(**kw), None) == [], kw


def test_parallelism_config_rendered_and_exported():
    fsdp_cp = cell(cp=2)
    config = accelerate_config(strategies.for_cell(fsdp_cp), fsdp_cp, None)
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    assert config["parallelism_config"] == {
        "parallelism_config_dp_replicate_size": 1, "parallelism_config_dp_shard_size": 1,
        "parallelism_config_tp_size": 1, "parallelism_config_cp_size": 2,
        "parallelism_config_cp_backend": "torch", "parallelism_config_cp_comm_strategy": "allgather"}
    four = cell(tp=2, gpus=4, model="llama-3.1-8b")
    env = parallelism_env(strategies.for_cell(four), 4)
    assert env["ACCELERATE_USE_PARALLELISM_CONFIG"] == "true"
    assert (env["PARALLELISM_CONFIG_DP_SHARD_SIZE"], env["PARALLELISM_CONFIG_TP_SIZE"]) == ("2", "2")
    pure = cell(strategy="tp", tp=2)
    plan = build_plan(pure, Path("/tmp/r"), Limits(), parent_visible_devices=None)
    written = yaml.safe_load(plan.files["accelerate.yaml"])
    assert written["distributed_type"] == "MULTI_GPU" and written["parallelism_config"]["parallelism_config_tp_size"] == 2
    assert plan.env["PARALLELISM_CONFIG_TP_SIZE"] == "2"
    plain = build_plan(cell(), Path("/tmp/r"), Limits(), parent_visible_devices=None)
    assert "parallelism_config" not in yaml.safe_load(plain.files["accelerate.yaml"])
    assert not any(k.startswith("PARALLELISM") for k in plain.env)


def test_cli_exits_2_on_degrees_that_do_not_divide(tmp_path):
    path = write_matrix(tmp_path, strategy="fsdp2", gpus=2, tp=3, device="cuda")
    proc = bench("run", str(path), "--dry-run", "--results", str(tmp_path / "r"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "tp x cp = 3 does not divide" in proc.stdout + proc.stderr


def test_cpu_tensor_parallel_cell_is_listed_unsupported_not_refused(tmp_path):
    path = write_matrix(tmp_path, grid={"strategy": ["ddp", "tp"], "tp": [1, 2]}, gpus=2)
    proc = bench("run", str(path), "--dry-run", "--results", str(tmp_path / "r"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "3 run(s) would be recorded unsupported" in out and "tp/cp need CUDA GPUs" in out


def test_the_worker_refuses_degrees_accelerate_did_not_take():
    from types import SimpleNamespace

    from bench.worker.guard import check_parallel_degrees

    check_parallel_degrees(cell(), None)  # no degrees asked, none needed
    check_parallel_degrees(cell(cp=2), SimpleNamespace(tp_size=1, cp_size=2))
    with pytest.raises(RuntimeError, match="accelerate's parallelism config has tp 1, cp 1"):
        check_parallel_degrees(cell(cp=2), None)


def test_fsdp2_with_tp_is_refused_while_accelerate_imports_what_transformers_dropped():
    """accelerate's FSDP2 tensor-parallel preparation imports a name transformers no longer has. If either side
    changes, this test fails: then lift the refusal (bench/strategies/degrees.py) and run fsdp2+tp on 4 GPUs."""
    import inspect

    import accelerate

    assert "ReplicateParallel" in inspect.getsource(accelerate.Accelerator._prepare_tp)
    with pytest.raises(ImportError):
        exec("from transformers.integrations.tensor_parallel import ReplicateParallel")
    from bench.strategies.degrees import fsdp2_tensor_parallel_importable

    assert not fsdp2_tensor_parallel_importable()
    reasons = cell_problems(cell(tp=2, gpus=4, model="llama-3.1-8b"), None)
    assert any("ReplicateParallel" in r for r in reasons), reasons


# transformers' tensor-parallel entry point, in the two shapes bench knows (bench/strategies/tp_api.py)
TP_524 = "def apply_tensor_parallelism(model: nn.Module, tp_mesh: DeviceMesh, tp_plan: dict[str, str]):\n    pass\n"
MIXIN_524 = ("class DistributedMixin:\n    @property\n    def tp_plan(self):\n        pass\n"
             "    def _resolve_parallel_plans(self, distributed_config):\n        pass\n")
TP_517 = "def apply_tensor_parallelism(model, tp_mesh):\n    pass\n"
MIXIN_517 = "class DistributedMixin:\n    @property\n    def tp_plan(self):\n        pass\n"


@pytest.mark.parametrize(("tp_source", "mixin_source", "api"), [
    (TP_524, MIXIN_524, "resolved_plan"), (TP_517, MIXIN_517, "model_plan"),
    (TP_524, MIXIN_517, None),  # a plan argument but no way to resolve one
    ("def shard_model(model, mesh):\n    pass\n", MIXIN_524, None),  # no entry point
])
def test_the_tensor_parallel_entry_point_is_told_by_what_transformers_defines(tp_source, mixin_source, api):
    from bench.strategies.tp_api import api_of

    assert api_of(tp_source, mixin_source) == api


def test_the_installed_transformers_entry_point_is_the_one_detected():
    """What the worker will call (bench/worker/parallel.py) takes the arguments the detection says."""
    import inspect

    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    from bench.strategies.tp_api import MODEL_PLAN, RESOLVED_PLAN, tensor_parallel_api

    params = list(inspect.signature(apply_tensor_parallelism).parameters)
    assert (tensor_parallel_api(), params[:3]) in ((RESOLVED_PLAN, ["model", "tp_mesh", "tp_plan"]),
                                                   (MODEL_PLAN, ["model", "tp_mesh"]))


def test_a_transformers_without_a_tensor_parallel_entry_point_makes_tp_cells_unsupported(monkeypatch):
    import importlib.metadata

    from bench.strategies import degrees

    monkeypatch.setattr(degrees, "tensor_parallel_api", lambda: None)
    reasons = cell_problems(cell(strategy="tp", tp=2), None)
    version = importlib.metadata.version("transformers")
    assert any(f"transformers {version} has neither apply_tensor_parallelism" in r and "Fix:" in r for r in reasons)
    assert cell_problems(cell(cp=2), None) == []  # context parallelism does not use it
