"""Tensor and context parallelism inside a rank: the model split by its tensor-parallel plan, and the training
step inside torch's context-parallel context. accelerate's ParallelismConfig (the cell's accelerate.yaml,
``parallelism_config``) builds the device mesh; this module only uses it.

Tensor parallelism: transformers' own plan for the architecture (Llama: q/k/v and gate/up column-wise, o/down
row-wise, the embedding row-wise by vocabulary, the head column-wise by vocabulary with gathered output), applied
by transformers' ``apply_tensor_parallelism`` on the mesh's "tp" dimension: what
``from_pretrained(tp_plan="auto")`` does, for a model built from a config. Its signature differs between
releases (bench/strategies/tp_api.py says which one is installed): 5.24 takes the plan resolved for the model's
names, 5.17 reads the model's wildcard ``tp_plan`` itself, whose config names the embedding only for a tied head:
the same row-wise rule is added for an untied one, so both releases split the model alike. It shards meta
tensors as well as real ones, so a model built on meta is split before any storage exists
(bench/worker/meta_init.py then gives each rank its slices). A head tied to the embedding: both split the one
(vocab, hidden) weight by rows, so the embedding's split weight is given back to the head (5.24: the plan's
``lm_head.weight`` names a parameter a tied model lists under the embedding only; 5.17: the head's own walk
splits the original weight into a second, untied parameter) and the head keeps its gathering forward.

Context parallelism: accelerate's ``maybe_context_parallel`` shards the listed buffers along the sequence
(load-balanced: 2 x cp chunks) for the forward and backward, and torch swaps SDPA for ring attention. The
model's own label shift would pair tokens across chunk borders, so labels are shifted on the whole sequence
first (``shift_labels``, which transformers' loss takes as they are), and positions are given explicitly
(each rank's chunks are not positions 0..s/cp). The ranks of a tensor/context group read the same batch
(bench/worker/data.py: data_parallel_rank).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from bench.spec import CellSettings
from bench.strategies.tp_api import RESOLVED_PLAN, tensor_parallel_api, unsupported_reason

IGNORE_INDEX = -100


def tensor_parallel_plan(model, tp: int) -> dict[str, str]:
    """transformers 5.24 (``RESOLVED_PLAN``): the model's tensor-parallel plan resolved for its modules and
    parameters (``layers.*`` expanded), less the parameter names a tied model does not list (its head's weight is
    the embedding's: see the module docstring)."""
    from transformers.distributed import DistributedConfig

    plan, _, _ = model._resolve_parallel_plans(DistributedConfig(tp_size=tp))
    names = set(dict(model.named_parameters())) | set(dict(model.named_modules()))
    return {name: style for name, style in plan.items() if name in names}


def wildcard_plan(model) -> dict[str, str]:
    """transformers 5.17 (``MODEL_PLAN``): the model's own wildcard plan, plus the input embedding split by
    vocabulary where the plan does not name it (5.17's config adds that rule only when the head is tied; 5.24
    always does, and the estimator counts the embedding split: bench/estimate/parallel.py)."""
    plan = dict(model.tp_plan)
    embedding = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is embedding)
    if name not in plan:
        plan[name] = "embedding_rowwise"
    return plan


def apply_tensor_parallel(model, tp_mesh, tp: int):
    """Split ``model`` over ``tp_mesh`` by its plan, through the entry point the installed transformers has;
    record the degree where accelerate reads it (``config.distributed_config.tp_size``: accelerate's
    get_model_tp_size)."""
    from transformers.distributed import DistributedConfig
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    api = tensor_parallel_api()
    if api is None:  # refused before launch (bench/strategies/degrees.py); said again if launched by hand
        raise RuntimeError(unsupported_reason())
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embedding.weight
    if api == RESOLVED_PLAN:
        model = apply_tensor_parallelism(model, tp_mesh, tensor_parallel_plan(model, tp))
    else:
        model.tp_plan = wildcard_plan(model)
        model = apply_tensor_parallelism(model, tp_mesh)
    if tied:  # the split replaced the embedding's parameter: the head takes the same split weight
        head.weight = embedding.weight
    model.config.distributed_config = DistributedConfig(tp_size=tp)
    return model


def tensor_mesh(accelerator):
    """The "tp" dimension of the mesh accelerate built from the cell's parallelism config."""
    return accelerator.torch_device_mesh["tp"]


def model_inputs(cell: CellSettings, batch: dict) -> dict:
    """What the model is called with; under context parallelism also the labels shifted on the whole sequence
    and the positions, both split with the inputs."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
    if cell.cp == 1:
        return inputs
    ids = inputs["input_ids"]
    shifted = torch.full_like(inputs["labels"], IGNORE_INDEX)
    shifted[:, :-1] = inputs["labels"][:, 1:]
    positions = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
    inputs.pop("attention_mask", None)  # dropped by accelerate's hook anyway: context parallelism is causal only
    return {**inputs, "shift_labels": shifted, "position_ids": positions}


def split_sequences(accelerator, cell: CellSettings, inputs: dict):
    """The context in which forward and backward run: torch's context parallelism over the sequence dimension
    of every input (in place, not restored: the batch is not used again), or nothing at cp 1."""
    if cell.cp == 1:
        return nullcontext()
    buffers = list(inputs.values())
    return accelerator.maybe_context_parallel(buffers=buffers, buffer_seq_dims=[1] * len(buffers),
                                              no_restore_buffers=set(buffers))


def describe(accelerator, cell: CellSettings, strategy, world: int) -> dict:
    """The degrees the rank ran under, for every cell (tp 1 and cp 1 included, so that no reader guesses): as
    accelerate's ParallelismConfig holds them where it built one (FSDP2, tensor/context parallelism), else the
    cell's degrees with the data-parallel split the strategy gives its ``world`` (torch.distributed's: under
    DeepSpeed accelerate's num_processes reads 1), and no device mesh."""
    pc = accelerator.parallelism_config
    if pc is not None:
        return {"tp": pc.tp_size, "cp": pc.cp_size, "dp_shard": pc.dp_shard_size,
                "dp_replicate": pc.dp_replicate_size, "mesh": list(pc.active_mesh_dims)}
    return {"tp": cell.tp, "cp": cell.cp, "dp_shard": strategy.dp_shard(world, cell.gpus),
            "dp_replicate": strategy.dp_replicate(world, cell.gpus), "mesh": []}
