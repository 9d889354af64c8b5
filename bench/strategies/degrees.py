"""Tensor and context parallel degrees (cell settings ``tp``, ``cp``): what they must divide, and what the
stack can run with them, said before anything launches.

Two kinds of answer, as for names:
- ``degree_errors``: the degrees cannot split this cell at all (they do not divide its ranks, the model's
  attention heads or its sequence): a mistake in the matrix file, refused whole (exit 2) with the key and
  the fix.
- ``degree_problems``: a layout that is well formed but that the installed stack does not run (a strategy
  other than FSDP2 or ``tp``, adapters under tensor parallelism, a CPU cell ...): the cell is recorded
  ``unsupported`` with the reason, and the rest of the matrix runs.

What the stack does, as read from its source (accelerate 1.15, transformers 5.24, peft 0.21, torch 2.13):
- accelerate builds a ParallelismConfig (dp_replicate, dp_shard, tp, cp) only under FSDP2 or a
  multi-GPU launch; its validation refuses FSDP2 with neither a shard nor a context dimension, refuses
  MULTI_CPU, and context parallelism runs under FSDP2 only (FSDP averages the gradients over dp_shard x cp).
- Context parallelism (torch's ``context_parallel``) shards the SDPA ops of CUDA; the CPU's flash kernel has
  no sharding rule (checked: NotImplementedError on gloo). It load-balances by cutting each sequence into
  2 x cp chunks. accelerate drops the attention mask (causal only), so padded batches would attend padding.
- FSDP2 with tensor parallelism: accelerate's preparation imports ``ReplicateParallel`` from transformers'
  old tensor-parallel module, gone from transformers 5.24: the combination fails at prepare, so it is refused
  while that holds (``fsdp2_tensor_parallel_importable``); tensor parallelism alone does not take that path.
- transformers' tensor-parallel entry point changed shape between 5.17 and 5.24; the worker calls the one
  installed (bench/strategies/tp_api.py), and a transformers with neither makes every tp cell ``unsupported``.
- LoRA on transformers' tensor-parallel layers: peft sizes the adapters to the local shard, but the adapter
  path of a row-wise layer is never reduced across ranks: on 2 CPU ranks the loss differs from the same
  adapters on the whole model (tests/worker/test_tensor_parallel_cpu.py keeps that evidence).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from bench.spec import models
from bench.spec.schema import CellSettings
from bench.strategies import registry as strategies
from bench.strategies.strategy import Strategy
from bench.strategies.tp_api import tensor_parallel_api, unsupported_reason


def _parallel(cell: CellSettings) -> bool:
    return cell.tp > 1 or cell.cp > 1


def _strategy(cell: CellSettings) -> Strategy | None:
    """The cell's catalogue strategy at its degrees; None for a user config (it sets its own layout)."""
    if strategies.is_user_config(cell.strategy) or cell.strategy not in strategies.CATALOGUE:
        return None
    return strategies.for_cell(cell)


def degree_errors(cell: CellSettings) -> list[str]:
    """The degrees do not divide the cell's ranks, heads or sequence; [] when they do (or are both 1)."""
    strat = _strategy(cell)
    if not _parallel(cell) or strat is None or not strat.allows_parallel_degrees:
        return []  # a strategy that cannot take them at all is a degree_problem (unsupported), not a typo
    out = []
    ranks, group = cell.processes, cell.tp * cell.cp
    if ranks % group:
        out.append(f"tp x cp = {group} does not divide the cell's {ranks} rank(s) (gpus x nodes). Fix: choose tp "
                   f"and cp whose product divides gpus, or exclude these cells (exclude: [{{gpus: {cell.gpus}, "
                   f"tp: {cell.tp}}}])")
    elif strat.tensor_only and cell.tp != ranks:
        out.append(f"strategy 'tp' is tensor parallelism over all ranks, but tp is {cell.tp} of {ranks} rank(s). "
                   f"Fix: set tp: {ranks}, or use fsdp2 with tp for data parallelism beside it")
    shape = models.ModelShape.of(cell.model)
    for what, count in (("attention heads", shape.heads), ("key/value heads", shape.kv_heads)):
        if count % cell.tp:
            out.append(f"tp {cell.tp} does not divide the {count} {what} of {cell.model}: every tensor rank "
                       f"computes whole heads. Fix: a tp that divides {count}")
    if cell.cp > 1 and cell.train.seq_len % (2 * cell.cp):
        out.append(f"train.seq_len {cell.train.seq_len} is not divisible by 2 x cp = {2 * cell.cp}: context "
                   "parallelism cuts each sequence into 2 x cp chunks (load balancing of causal attention). "
                   f"Fix: a seq_len that is a multiple of {2 * cell.cp}")
    return out


def degree_problems(cell: CellSettings, strat: Strategy) -> list[str]:
    """Every reason the stack cannot run these degrees for this cell (the cell is then ``unsupported``)."""
    if not _parallel(cell):
        return ["strategy 'tp' needs tp above 1 (set tp to the cell's rank count)"] if strat.tensor_only else []
    if strategies.is_user_config(cell.strategy):
        return ["tp/cp apply to catalogue strategies: a user's accelerate config carries its own parallelism_config, "
                "which bench does not read. Fix: use fsdp2 or tp with the tp/cp settings, or tp: 1, cp: 1"]
    strat = strat.with_degrees(cell.tp, cell.cp)
    if not strat.allows_parallel_degrees:
        return [f"strategy {cell.strategy!r} cannot take tp/cp: accelerate composes tensor and context parallelism "
                "with FSDP2 only (ParallelismConfig), and bench runs tensor parallelism alone as strategy tp "
                "(offload with them is not verified). Fix: use fsdp2 or tp, or tp: 1, cp: 1"]
    out = []
    ranks = cell.processes
    if strat.fsdp_version == 2 and cell.tp > 1 and cell.cp == 1 and strat.dp_degree(ranks) == 1:
        out.append(f"fsdp2 with tp {cell.tp} on {ranks} rank(s) leaves FSDP nothing to shard over (dp_shard 1): "
                   "accelerate refuses it. Fix: strategy tp (tensor parallelism alone), or more ranks")
    if strat.fsdp_version == 2 and cell.tp > 1 and not fsdp2_tensor_parallel_importable():
        out.append("fsdp2 with tp does not run on the installed stack: accelerate's FSDP2 tensor-parallel preparation "
                   "(Accelerator._prepare_tp) imports ReplicateParallel from transformers.integrations.tensor_parallel, "
                   "which this transformers no longer has (ImportError at prepare). Fix: strategy tp (tensor "
                   "parallelism alone), or fsdp2 without tp")
    if cell.tp > 1 and tensor_parallel_api() is None:
        out.append(unsupported_reason())
    if strat.tensor_only and cell.cp > 1:
        out.append("strategy tp with cp: context parallelism needs FSDP2 to average gradients over the context "
                   "ranks (accelerate). Fix: use fsdp2 with cp")
    if cell.tp > 1 and cell.adapter.type != "none":
        out.append(f"adapter.type {cell.adapter.type} under tensor parallelism is not supported: peft (0.21) sizes "
                   "LoRA to the local shard of transformers' tensor-parallel layers but never reduces the adapter "
                   "path of row-wise layers across ranks (the loss differs from the unsplit model). "
                   "Fix: adapter.type none, or tp: 1 (cp or plain fsdp2 for LoRA)")
    if cell.cp > 1:
        out += _context_problems(cell)
    if cell.device == "cpu":
        out.append("tp/cp need CUDA GPUs: accelerate refuses a parallelism config under MULTI_CPU, and torch's "
                   "context parallelism has no sharding rule for the CPU attention kernel. Fix: run on GPUs")
    if cell.train.compile or cell.train.kernels != "none":
        out.append("train.compile and train.kernels with tp/cp are not verified by bench. Fix: train.compile: "
                   "false and train.kernels: none")
    return out


@functools.lru_cache(maxsize=1)
def fsdp2_tensor_parallel_importable() -> bool:
    """Whether transformers still provides the name accelerate's FSDP2 tensor-parallel preparation imports
    (accelerate 1.15: ``from transformers.integrations.tensor_parallel import ReplicateParallel``; transformers 5.24
    moved tensor parallelism to transformers.distributed without it). Read from the module's source, so that
    planning a matrix imports neither torch nor transformers."""
    spec = importlib.util.find_spec("transformers.integrations.tensor_parallel")
    if spec is None or not spec.origin:
        return False
    return "ReplicateParallel" in Path(spec.origin).read_text(errors="replace")


def _context_problems(cell: CellSettings) -> list[str]:
    out = []
    if cell.train.attn_impl != "sdpa":
        out.append("cp needs train.attn_impl sdpa: torch's context parallelism replaces SDPA's kernels")
    if cell.data.source != "synthetic" and cell.data.padding != "pack":
        out.append("cp drops the attention mask (accelerate: causal attention only), so padded batches would "
                   "attend to padding. Fix: data.padding: pack, or synthetic data")
    return out
