"""The launch did what the cell asked: accelerate's distributed setup checked against the cell's strategy.

A launch config that silently did not take effect (once: DeepSpeed cells running as plain MULTI_CPU)
would otherwise be measured and reported under the wrong strategy; as an error the cell is a crash.
"""

from __future__ import annotations

from pathlib import Path

from bench import strategies
from bench.strategies import Strategy
from bench.spec.schema import CellSettings, MatrixError


def expected_distributed_types(strategy: Strategy, processes: int, user_config: bool = False) -> set[str]:
    """accelerate's DistributedType names a cell of this strategy and process count must run under.

    ddp at 1 process is the plain run (NO) in the registry; a user's own DDP config may keep MULTI_GPU at
    one process, which is what that config does, so it is accepted there.
    """
    if strategy.uses_deepspeed:
        return {"DEEPSPEED"}
    if strategy.tensor_only and processes > 1:
        return {"MULTI_GPU"}  # tensor parallelism alone: a multi-GPU launch with a parallelism config
    if strategy.is_fsdp:
        return {"FSDP"}
    if strategy.uses_ddp(processes) or (user_config and strategy.is_plain and not strategy.single_process):
        return {"MULTI_GPU", "MULTI_CPU"} | ({"NO"} if processes == 1 else set())
    return {"NO"}


def check_distributed_setup(name: str, strategy: Strategy, processes: int, actual: str, world_size: int,
                            fsdp_version: int | None = None, user_config: bool = False) -> None:
    """Raise RuntimeError if accelerate did not set up what the strategy needs.

    A launch config that silently did not take effect (once: DeepSpeed cells running as plain MULTI_CPU)
    would otherwise be measured and reported under the wrong strategy; as an error the cell is a crash.
    ``actual`` is accelerate's distributed_type (enum or its name), ``world_size`` torch.distributed's.
    """
    actual = str(actual).split(".")[-1]
    expected = expected_distributed_types(strategy, processes, user_config)
    problems = []
    if actual not in expected:
        problems.append(f"expected distributed type {' or '.join(sorted(expected))}, accelerate set up {actual}")
    if world_size != processes:
        problems.append(f"expected {processes} process(es), the process group has {world_size}")
    want_version = strategy.fsdp_version
    if actual == "FSDP" and want_version and fsdp_version is not None and fsdp_version != want_version:
        problems.append(f"expected FSDP version {want_version}, accelerate's plugin has {fsdp_version}")
    if problems:
        raise RuntimeError(f"strategy {name!r} (family {strategy.family}, {processes} process(es)) did not get its "
                           f"distributed setup: {'; '.join(problems)}. The cell is not measured: check the "
                           "cell's accelerate.yaml and launch.log")


def cell_strategy(cell: CellSettings, cell_dir: Path | None = None):
    """The cell's strategy; a user config (.json/.yaml) is read as bench.strategies.get reads it, falling
    back to the resolved accelerate.yaml in the cell's folder if the user's path is not readable here."""
    try:
        return strategies.for_cell(cell)
    except (OSError, MatrixError):
        if cell_dir is None or not strategies.is_user_config(cell.strategy):
            raise
        return strategies.get(str(cell_dir / "accelerate.yaml"))


def strategy_family(cell: CellSettings, cell_dir: Path | None = None) -> str:
    return cell_strategy(cell, cell_dir).family


def check_parallel_degrees(cell: CellSettings, parallelism_config) -> None:
    """Raise RuntimeError if accelerate's ParallelismConfig does not hold the cell's tensor and context degrees
    (a parallelism_config section that did not reach the ranks would measure plain FSDP2 under another name)."""
    if cell.tp == 1 and cell.cp == 1:
        return
    got = (getattr(parallelism_config, "tp_size", 1), getattr(parallelism_config, "cp_size", 1))
    if got != (cell.tp, cell.cp):
        raise RuntimeError(f"the cell asks for tp {cell.tp}, cp {cell.cp}; accelerate's parallelism config has tp "
                           f"{got[0]}, cp {got[1]}. The cell is not measured: check PARALLELISM_CONFIG_* in the "
                           "cell's launch.sh and the parallelism_config section of its accelerate.yaml")


def guard_distributed_setup(cell: CellSettings, accelerator, world_size: int, cell_dir: Path | None = None) -> None:
    check_parallel_degrees(cell, getattr(accelerator, "parallelism_config", None))
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    check_distributed_setup(cell.strategy, cell_strategy(cell, cell_dir), cell.processes,
                            str(accelerator.distributed_type), world_size,
                            fsdp_version=getattr(plugin, "fsdp_version", None),
                            user_config=strategies.is_user_config(cell.strategy))


def check_optimizer_steps_the_model(model, optimizer, strategy: Strategy) -> None:
    """Raise RuntimeError if the prepared optimizer holds parameters the prepared model does not.

    Its step would then update tensors nothing reads (FSDP1 with use_orig_params false replaces the model's
    parameters when it wraps them): a step that trains nothing, timed and reported as training. DeepSpeed's
    optimizer steps its own flat partitions, so it is not asked."""
    if strategy.uses_deepspeed:
        return
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's
    in_model = {id(p) for p in model.parameters()}
    stray = sum(id(p) not in in_model for group in inner.param_groups for p in group["params"])
    if stray:
        raise RuntimeError(f"the optimizer holds {stray} parameter(s) that the prepared model does not: its step "
                           "would train nothing (an optimizer made before the model was wrapped?)")
