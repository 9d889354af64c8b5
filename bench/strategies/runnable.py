"""What can run where: every reason a cell cannot run (a name that does not exist, a combination the
stack does not support, a machine without the GPUs it needs), said before anything launches."""

from __future__ import annotations

from pathlib import Path

from bench.spec import models
from bench.spec.schema import CellSettings, MatrixError
from bench.strategies import registry as strategies
from bench.strategies.degrees import degree_errors, degree_problems


def name_problem(cell: CellSettings) -> str | None:
    """A model or strategy that does not exist: a problem of the matrix file, whatever the machine."""
    if msg := models.check_model_name(cell.model) or strategies.check_strategy_name(cell.strategy):
        return msg
    if strategies.is_user_config(cell.strategy) and not Path(cell.strategy).is_file():
        return (f"strategy {cell.strategy!r}: no such file. Fix: give the path of your DeepSpeed JSON or "
                "accelerate YAML (relative to where bench runs), or a strategy name such as ddp")
    return None


def check_names(cells: list[CellSettings], source: str) -> None:
    """Refuse the matrix (MatrixError) when a cell names a model or strategy that does not exist, or asks for
    tensor/context degrees its ranks, model or sequence cannot be split by (bench/strategies/degrees.py)."""
    problems = [(cell, [msg]) for cell in cells if (msg := name_problem(cell))]
    if problems:
        raise MatrixError(f"{source}: {len(problems)} cell(s) name what does not exist\n"
                          + "\n".join(collapse(problems)))
    problems = [(cell, reasons) for cell in cells if (reasons := degree_errors(cell))]
    if problems:
        raise MatrixError(f"{source}: {len(problems)} cell(s) ask for degrees that do not divide\n"
                          + "\n".join(collapse(problems)))


def cell_problems(cell: CellSettings, visible_gpus: int | None) -> list[str]:
    """Every reason this machine or stack cannot run the cell (an impossible combination), all at once.

    ``visible_gpus`` None plans the cell for its own target (a dry run, an estimate): the GPU count of this
    machine is then not held against it.
    """
    if msg := name_problem(cell):
        return [msg]
    if errors := degree_errors(cell):
        return errors
    out: list[str] = []
    if strategies.is_user_config(cell.strategy):
        from bench.strategies.user_configs import check_user_config

        if msg := check_user_config(cell):  # unreadable, or an explicit value that disagrees with the cell
            out.append(msg)
    try:
        strat = strategies.get(cell.strategy)
    except MatrixError:  # a user config that cannot be read: said above; the rest is checked without it
        strat = None
    if strat is not None:
        out += degree_problems(cell, strat)
    if strat is not None and strat.single_process and cell.gpus != 1:
        out.append(f"strategy {cell.strategy!r} runs one process: set gpus: 1, or use ddp/zero*/fsdp* for more")
    if cell.device == "cpu":
        out += _cpu_problems(cell, strat)
    elif visible_gpus == 0:  # one reason for every CUDA cell, so that a whole matrix collapses to one line
        out.append("device: cuda but this machine has 0 GPU(s). Fix: run it on a GPU machine (preview it here with "
                   "--dry-run or bench estimate), or run on CPU with --device cpu")
    elif visible_gpus is not None and cell.gpus > visible_gpus:
        out.append(f"gpus: {cell.gpus} but this machine has {visible_gpus} GPU(s). "
                   f"Fix: select runnable cells with --only gpus=<n,...> or exclude them in the matrix")
    if cell.adapter.type == "qlora" and strat is not None:
        out += _qlora_problems(cell, strat)
    out += fast_path_problems(cell, strat, visible_gpus is not None)
    out += _affinity_problems(cell, visible_gpus is not None)
    if cell.train.seq_len > models.config_dict(cell.model).get("max_position_embeddings", 1 << 30):
        out.append(f"train.seq_len {cell.train.seq_len} exceeds the model's max_position_embeddings")
    if cell.data.source != "synthetic":
        from bench.spec.data_source import check_data

        if msg := check_data(cell, models.config_dict(cell.model)["vocab_size"]):
            out.append(msg)
    return out


def check_runnable(cell: CellSettings, visible_gpus: int | None) -> str | None:
    """Every reason the cell cannot run, one per line, or None."""
    return "\n".join(problems) if (problems := cell_problems(cell, visible_gpus)) else None


def _affinity_problems(cell: CellSettings, here: bool) -> list[str]:
    """cpu_affinity: cores is planned on the launching host (bench/machine/cpu_affinity.py): Linux, one node,
    a CPU per rank (checked against this host's CPUs only when the cell runs here)."""
    import os

    if cell.cpu_affinity == "none":
        return []
    if not hasattr(os, "sched_setaffinity"):
        return ["cpu_affinity: cores needs Linux (os.sched_setaffinity). Fix: cpu_affinity: none on this system"]
    if cell.nodes > 1:
        return ["cpu_affinity: cores is planned on the launching host, not on each node. Fix: cpu_affinity: none "
                "for multi-node cells"]
    if here and len(os.sched_getaffinity(0)) < cell.gpus:
        return [f"cpu_affinity: cores gives each of the {cell.gpus} ranks its own CPU, but this process may use "
                f"{len(os.sched_getaffinity(0))}. Fix: cpu_affinity: none, or fewer ranks (gpus)"]
    return []


def _cpu_problems(cell: CellSettings, strat: strategies.Strategy | None) -> list[str]:
    out = []
    if strat is not None and not strat.runs_on_cpu:
        out.append(f"strategy {cell.strategy!r} needs GPUs (accelerate enables FSDP only on CUDA). "
                   "Fix: on CPU use single, ddp, zero1, zero2 or zero3, or exclude these cells")
    if cell.adapter.type == "qlora":
        out.append("adapter.type qlora needs a CUDA GPU (bitsandbytes 4-bit). Fix: use lora or none on CPU")
    if cell.train.optimizer == "adamw_bnb_8bit":
        out.append("train.optimizer adamw_bnb_8bit needs a CUDA GPU. Fix: use adamw_torch on CPU")
    if cell.train.precision == "fp16":
        out.append("train.precision fp16 is not supported on CPU. Fix: use bf16 or fp32")
    if cell.gpu_memory_gib:
        out.append("gpu_memory_gib caps GPU memory and needs a CUDA GPU. Fix: remove it on CPU")
    return out


def fast_path_problems(cell: CellSettings, strat: strategies.Strategy | None, here: bool = True) -> list[str]:
    """train.kernels, train.compile and train.micro_batch auto: what they need (bench/worker/fast_paths.py).
    ``here``: the cell runs on this machine (not planned for its own target), whose packages then count."""
    import importlib.util

    out = []
    t = cell.train
    if t.kernels == "liger":
        if here and importlib.util.find_spec("liger_kernel") is None:
            out.append("train.kernels liger needs the liger-kernel package, not installed here. "
                       "Fix: pip install -e '.[kernels]', or train.kernels: none")
        if cell.device != "cuda":
            out.append("train.kernels liger needs a CUDA GPU (Liger's kernels are Triton kernels). "
                       "Fix: train.kernels: none on CPU")
        model_type = models.config_dict(cell.model).get("model_type")
        if model_type != "llama":  # the one architecture bench ships and applies Liger to (apply_liger_kernel_to_llama)
            out.append(f"train.kernels liger is applied to Llama models only; {cell.model} is {model_type!r}. "
                       "Fix: train.kernels: none for this model")
    if t.compile and strat is not None and strat.fsdp_version == 1:
        # Not use_orig_params (render.py sets it for every FSDP1 cell but QLoRA, and torch's dynamo asks no more):
        # accelerate 1.15 compiles an FSDP1 model last in prepare with compile_regions, whose shallow copy of the
        # FSDP root re-adds its child through FSDP.__getattr__, which recurses without end (RecursionError before
        # anything compiles; tests/worker/test_fast_paths.py holds it and fails once accelerate changes).
        out.append("train.compile under FSDP1 cannot run on this stack: accelerate's regional compilation "
                   "(compile_regions, called last in prepare for FSDP1 models) recurses without end on the "
                   "FullyShardedDataParallel root (RecursionError). Fix: use fsdp2, ddp or zero*, or "
                   "train.compile: false")
    if t.micro_batch == "auto" and cell.device != "cuda":
        out.append("train.micro_batch auto picks the largest micro-batch that fits a GPU's memory; on CPU there "
                   "is no such capacity. Fix: give a number (e.g. train.micro_batch: 4) on CPU")
    return out


def _qlora_problems(cell: CellSettings, strat: strategies.Strategy) -> list[str]:
    """QLoRA combinations bench builds (see bench/worker/qlora.py)."""
    out = []
    if cell.train.precision != "bf16":
        out.append("adapter.type qlora computes in bf16. Fix: set train.precision: bf16")
    if models.has_local_weights(cell.model):
        out.append("adapter.type qlora builds random 4-bit weights; loading local weights in 4-bit is not supported. Fix: use a shipped config or a folder without weights")
    if strat.fsdp_version == 2:
        out.append("adapter.type qlora under FSDP2 is not supported (fully_shard turns 4-bit parameters into DTensors). Fix: use fsdp_full_shard(_offload), ddp or zero3")
    if strat.fsdp_version == 1 and cell.adapter.quant_storage != "bf16":
        out.append("adapter.quant_storage must be bf16 under FSDP (one dtype per flat parameter, as the bf16 norms and embeddings). Fix: set adapter.quant_storage: bf16")
    return out


def unrunnable(cells: list[CellSettings], visible_gpus: int | None) -> dict[str, list[str]]:
    """cell id -> every reason it cannot run, for the cells that cannot."""
    return {cell.cell_id: problems for cell in cells if (problems := cell_problems(cell, visible_gpus))}


def validate_cells(cells: list[CellSettings], source: str, visible_gpus: int | None) -> None:
    """Refuse the whole matrix when any cell cannot run (``bench run --strict``), naming every reason."""
    check_names(cells, source)
    problems = [(cell, reasons) for cell in cells if (reasons := cell_problems(cell, visible_gpus))]
    if problems:
        raise MatrixError(f"{source}: {len(problems)} cell(s) cannot run on this machine\n"
                          + "\n".join(collapse(problems)))


def collapse(problems: list[tuple[CellSettings, list[str]]], shown: int = 3) -> list[str]:
    """Cells with the same reasons are said once, with their count: 15 identical lines help nobody."""
    groups: dict[tuple[str, ...], list[CellSettings]] = {}
    for cell, reasons in problems:
        groups.setdefault(tuple(reasons), []).append(cell)
    lines = []
    for reasons, cells in groups.items():
        who = f"cell {cells[0].cell_id} ({cells[0].label})" if len(cells) == 1 else f"{len(cells)} cells"
        said = [r.replace("\n", "\n      ") for r in reasons]
        lines.append(f"  {who}: {said[0]}" if len(said) == 1 else f"  {who}:" + "".join(f"\n    - {r}" for r in said))
        if len(cells) > 1:
            more = f" and {len(cells) - shown} more" if len(cells) > shown else ""
            lines.append(f"    ({', '.join(c.label for c in cells[:shown])}{more})")
    return lines
