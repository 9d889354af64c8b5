"""The registry and the strategies in it: each strategy's degrees agree with what it answers, the registry is
the only place that knows names (no module outside bench/strategies/ compares a strategy's name, family
or framework to a literal), and DeepSpeed's sizes are read by the renderer and the estimator alike."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO
from bench import strategies
from bench.spec import CellSettings
from bench.spec.models import ModelShape
from bench.strategies.constants import DEEPSPEED, FSDP, TORCH_DDP
from bench.strategies.render import accelerate_config, deepspeed_config
from bench.strategies.strategy import FAMILY_DEGREES, FSDP1_SHARDING, Strategy

WORLDS = [1, 2, 3, 4, 8]


@pytest.mark.parametrize("name", strategies.names())
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("ranks_per_node", [None, 2])
def test_degrees_agree_with_the_questions(name, world, ranks_per_node):
    s = strategies.get(name)
    if ranks_per_node and world % ranks_per_node:
        with pytest.raises(ValueError, match="not whole nodes"):
            s.dp_shard(world, ranks_per_node)
        return
    shard, replicate = s.dp_shard(world, ranks_per_node), s.dp_replicate(world, ranks_per_node)
    assert replicate * shard * s.tp * s.cp == world
    assert s.dp_degree(world) == replicate * shard
    # the stages nest: parameters sharded -> gradients sharded -> optimizer states sharded
    assert s.shards_params <= s.shards_grads <= s.shards_optimizer == s.shards
    assert (shard > 1) == (s.shards_at(world) and (s.shard_scope == "world" or (ranks_per_node or world) > 1))
    assert s.reshards_after_forward <= s.shards_params
    assert s.offloads == (s.offload_params or s.offload_optimizer)


@pytest.mark.parametrize("name", strategies.names())
def test_framework_answers_agree(name):
    s = strategies.get(name)
    assert [s.is_plain, s.uses_deepspeed, s.is_fsdp].count(True) == 1
    assert (s.zero_stage is not None) == s.uses_deepspeed and (s.zero_stage in (None, s.shard_level))
    assert (s.fsdp_sharding is not None) == (s.fsdp_version == 1)
    if s.fsdp_sharding:
        assert FSDP1_SHARDING[s.fsdp_sharding] == (s.shard_level, s.shard_scope)
    assert (s.reshard_after_forward is not None) == (s.fsdp_version == 2)
    assert s.single_process <= s.is_plain and not (s.is_plain and s.shards)
    assert s.runs_on_cpu == (not s.is_fsdp)
    assert s.uses_ddp(2) == (s.is_plain and not s.single_process and not s.tensor_only) and not s.uses_ddp(1)
    assert s.family in strategies.families(lambda t: t.framework == s.framework)


def test_the_registry_knows_each_name_once():
    assert strategies.names() == list(strategies.CATALOGUE)
    assert all(strategies.get(n).name == n for n in strategies.names())
    with pytest.raises(ValueError, match="registered already"):
        strategies.register(Strategy("zero3", "deepspeed", "again", shard_level=3))
    with pytest.raises(ValueError, match="FSDP1 has no sharding strategy"):
        Strategy("fsdp_odd", "fsdp1", "optimizer-only FSDP", shard_level=1)
    assert strategies.families(lambda s: s.is_plain) == ("single", "ddp", "tp")


def test_hybrid_shard_shards_within_a_node_and_replicates_across():
    s = strategies.get("fsdp_hybrid_shard")
    assert (s.dp_shard(8, ranks_per_node=4), s.dp_replicate(8, ranks_per_node=4)) == (4, 2)
    assert (s.dp_shard(8), s.dp_replicate(8)) == (8, 1)  # one node holds them all
    full = strategies.get("fsdp_full_shard")
    assert (full.dp_shard(8, ranks_per_node=4), full.dp_replicate(8, ranks_per_node=4)) == (8, 1)


# ---------------------------------------------------------------- nobody else compares names

# Attributes naming a strategy (its name, record family, framework; a cell's strategy name) and bare names.
_STRATEGY_ATTRS = {"family", "framework", "strategy"}
_STRATEGY_NAMES = {"family", "framework", "strategy", "strategy_name"}
# What names a strategy as a value: its name, its record label, its framework (the literals a scan looks for).
_NAME_VALUES = set(strategies.names()) | set(FAMILY_DEGREES) | {s.framework for s in strategies.CATALOGUE.values()}


def _names_strategy(node: ast.AST) -> bool:
    """``strategy.family``, ``cell.strategy``, ``strat.name``, a bare ``family``, and the same keys read from a
    record or a frame (``row["strategy"]``, ``info.get("family")``), or any of these through ``str()``."""
    if isinstance(node, ast.Attribute):
        if node.attr in _STRATEGY_ATTRS:
            return True
        # ``strategy.name`` / ``strat.name``: not other objects' names (a precision policy's)
        return node.attr == "name" and isinstance(node.value, ast.Name) and "strat" in node.value.id
    if isinstance(node, ast.Subscript):
        return _is_key(node.slice)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and _is_key(node.args[0])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "str":
        return bool(node.args) and _names_strategy(node.args[0])
    return isinstance(node, ast.Name) and node.id in _STRATEGY_NAMES


def _is_key(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value in _STRATEGY_ATTRS


def _strings(node: ast.AST) -> list[str] | None:
    """The string literal(s) of a constant or a tuple/list/set of them; None for anything else."""
    if isinstance(node, ast.Constant):
        return [node.value] if isinstance(node.value, str) else None
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts:
        parts = [_strings(e) for e in node.elts]
        return None if any(p is None for p in parts) else [v for p in parts for v in p]
    return None


def _is_literal(node: ast.AST) -> bool:
    return _strings(node) is not None


def _is_a_strategy_name(node: ast.AST) -> bool:
    """A literal that is a strategy's name, family or framework (``x in ("zero3", "zero2")``, whatever x is)."""
    return any(v in _NAME_VALUES for v in _strings(node) or [])


def _is_a_name_prefix(node: ast.AST) -> bool:
    """A literal that begins or ends some strategy name (``x.startswith("zero")``), file suffixes apart."""
    return any(len(v) >= 3 and not v.startswith(".") and any(n.startswith(v) or n.endswith(v) for n in _NAME_VALUES)
               for v in _strings(node) or [])


def name_comparisons(source: str) -> list[int]:
    """Lines comparing a strategy's name/family/framework to a string literal, matching its prefix, or
    comparing anything to a literal that is a strategy's name (the value gives it away whatever the variable)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if (any(_names_strategy(a) for a in sides) and any(_is_literal(a) for a in sides)) \
                    or any(_is_a_strategy_name(a) for a in sides):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("startswith", "endswith") and node.args and _is_literal(node.args[0]) \
                and ((_names_strategy(node.func.value) and not _is_suffix_of_a_file(node.args[0]))
                     or _is_a_name_prefix(node.args[0])):
            lines.append(node.lineno)
        elif isinstance(node, ast.Match) and _names_strategy(node.subject):
            lines.extend(case.pattern.lineno for case in node.cases if isinstance(case.pattern, ast.MatchValue))
    return lines


def _is_suffix_of_a_file(node: ast.AST) -> bool:
    """``strategy.endswith(".json")``: whether a strategy is a user's config file, not which one it is."""
    return isinstance(node, ast.Constant) and str(node.value).startswith(".")


def test_no_module_outside_the_strategies_compares_a_strategy_by_name():
    found = {}
    for path in sorted((REPO / "bench").rglob("*.py")):
        if path.is_relative_to(REPO / "bench" / "strategies"):
            continue
        if lines := name_comparisons(path.read_text()):
            found[str(path.relative_to(REPO))] = lines
    assert found == {}, "ask the strategy a question (bench/strategies/strategy.py) instead of comparing its name"


@pytest.mark.parametrize("code", [
    'if strategy.family == "fsdp": pass',
    'ok = s.family in ("fsdp", "fsdp2")',
    'ok = cell.strategy == "fsdp_no_shard"',
    'ok = strategy.startswith("fsdp2")',
    'ok = "deepspeed" != strat.framework',
    'ok = strategy.name == "zero3"',
    'ok = name in ("zero3", "zero2")',
    'ok = label.startswith("zero")',
    'ok = str(cell.strategy).startswith("fsdp")',
    'ok = row["strategy"] == "my_own"',
    'ok = info.get("family") != "other"',
    'ok = df["family"].str.endswith("_offload")',
])
def test_the_scan_catches_a_name_comparison(code):
    assert name_comparisons(code) == [1]


def test_the_scan_catches_a_match_on_a_name():
    assert name_comparisons('match cell.strategy:\n    case "zero3":\n        pass\n    case _:\n        pass') == [2]


def test_the_scan_leaves_questions_alone():
    assert name_comparisons('ok = strategy.uses_deepspeed and policy.name == "autocast" and s.fsdp_version == 2') == []
    assert name_comparisons('ok = path.endswith(".json") and t.optimizer == "adamw_torch_fused" and x == row["gpus"]') == []


# ---------------------------------------------------------------- one constant, two readers

def _cell(strategy: str, **kw) -> CellSettings:
    return CellSettings(model="llama-3.2-1b", strategy=strategy, gpus=2, device="cuda", **kw)


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_the_rendered_deepspeed_json_holds_the_estimators_sizes(name):
    from bench.estimate.additive import backward_buffers
    from bench.estimate.cell_states import model_states
    from bench.estimate.prediction import CALIBRATION
    from bench.estimate.replay.zero3 import Zero3Coordinator

    cell, s = _cell(name), strategies.get(name)
    zero = deepspeed_config(s, cell)["zero_optimization"]
    assert zero["reduce_bucket_size"] == DEEPSPEED.reduce_bucket_size
    shape = ModelShape.of(cell.model)
    states = model_states(cell, shape, s)
    grad_bytes = states.base_bpp.grads
    buffers = backward_buffers(cell, shape, s, states, CALIBRATION, "layers")
    buckets = 1 if s.shards_params else CALIBRATION.ds_overlap_buffers
    assert buffers["zero_reduce_buckets"] == buckets * zero["reduce_bucket_size"] * grad_bytes
    if s.shards_params:
        assert Zero3Coordinator.PREFETCH_BUCKET == zero["stage3_prefetch_bucket_size"]
        assert zero["stage3_param_persistence_threshold"] == DEEPSPEED.stage3_param_persistence_threshold
        assert "allgather_bucket_size" not in zero
    else:
        assert zero["allgather_bucket_size"] == DEEPSPEED.allgather_bucket_size


def test_the_defaults_kept_are_deepspeeds_and_torchs_own():
    """Sizes the JSON leaves to DeepSpeed, as its own config model has them; DDP's first bucket as torch's."""
    zero_config = pytest.importorskip("deepspeed.runtime.zero.config")
    torch = pytest.importorskip("torch")
    ds = zero_config.DeepSpeedZeroConfig()
    assert (ds.max_live_parameters, ds.max_reuse_distance, ds.sub_group_size) == (
        DEEPSPEED.stage3_max_live_parameters, DEEPSPEED.stage3_max_reuse_distance, DEEPSPEED.sub_group_size)
    assert torch.distributed._DEFAULT_FIRST_BUCKET_BYTES == TORCH_DDP.first_bucket_bytes


def test_the_rendered_fsdp_config_holds_the_fsdp_settings():
    fsdp = accelerate_config(strategies.get("fsdp_full_shard"), _cell("fsdp_full_shard"), None)["fsdp_config"]
    assert (fsdp["fsdp_backward_prefetch"], fsdp["fsdp_forward_prefetch"], fsdp["fsdp_transformer_layer_cls_to_wrap"]) \
        == (FSDP.backward_prefetch, FSDP.forward_prefetch, FSDP.transformer_layer)
    assert deepspeed_config(strategies.get("fsdp2"), _cell("fsdp2")) is None


# ---------------------------------------------------------------- a strategy as a record keeps it

@pytest.mark.parametrize("name", strategies.names())
def test_a_records_degrees_give_the_strategy_back(name):
    s = strategies.get(name)
    assert strategies.of_record(name, {"summary": s.summary, "degrees": s.degrees()}) == s
    assert strategies.of_record(name, None) == s
    if not s.tensor_only:  # tensor parallelism came after records kept degrees: its records always carry them
        assert FAMILY_DEGREES[s.family] == (s.framework, s.single_process)  # the label read back says the same


def test_an_older_record_of_a_vanished_config_is_known_by_its_label(tmp_path):
    gone = str(tmp_path / "mine.json")
    s = strategies.of_record(gone, {"family": "deepspeed", "summary": "DeepSpeed ZeRO-2"})
    assert (s.framework, s.is_plain, s.single_process) == ("deepspeed", False, False)
    assert strategies.of_record(gone, {"family": "single"}).single_process
    assert strategies.of_record(gone, {}) is None
    kept = {"framework": "fsdp2", "shard_level": 3, "a_degree_of_a_later_version": 2}
    assert strategies.of_record(gone, {"degrees": kept}).fsdp_version == 2
