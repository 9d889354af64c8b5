"""How each framework wraps the model and runs a step's backward and optimizer step: one small class per
framework over a shared base, chosen by asking the cell's Strategy which framework implements it.

* plain PyTorch (one process, or DistributedDataParallel): accelerate prepares model and optimizer together,
  ``accelerator.backward``, then clipping, the optimizer step and zeroing, all through accelerate.
* DeepSpeed: the engine owns the optimizer when the JSON names one (accelerate's DummyOptim stands in);
  backward and step are the engine's own, called here directly (what accelerate's DeepSpeedEngineWrapper
  calls) so that the two can be timed apart.
* FSDP1 and FSDP2: as plain PyTorch on a model built on the device; a model built on meta is materialised
  per shard, each version its own way (bench/worker/meta_init.py says why). FSDP1 also gives LoRA adapters
  their own wrapping units.

The training loop (bench/worker/train.py) calls these methods and never asks which framework it runs.
"""

from __future__ import annotations

from functools import partial

import torch

from bench import strategies
from bench.spec import CellSettings, Train
from bench.strategies import Strategy


class Preparer:
    """The shared base: what plain PyTorch does, which the frameworks below change in part."""

    def before_prepare(self, cell: CellSettings, model, accelerator) -> None:
        """Adjust accelerate's plugin to the built model, before the build is timed as done."""

    def make_optimizer(self, cell: CellSettings, model, accelerator):
        return build_optimizer(cell.train, model.parameters())

    def prepare(self, cell: CellSettings, model, accelerator, device: torch.device, on_meta: bool = False):
        """(model, optimizer), both prepared by accelerate."""
        if on_meta:
            return self.prepare_meta(cell, model, accelerator, device)
        return accelerator.prepare(model, self.make_optimizer(cell, model, accelerator))

    def prepare_meta(self, cell: CellSettings, model, accelerator, device: torch.device):
        raise NotImplementedError(f"{type(self).__name__}: only FSDP materialises a model built on meta")

    def backward(self, model, loss, accelerator) -> None:
        accelerator.backward(loss)

    @staticmethod
    def build_peak_bytes(strategy: Strategy, world: int, total_bytes: int, root_bytes: int) -> int:
        raise NotImplementedError(f"strategy {strategy.name!r} builds no meta model: only FSDP's do")

    def step(self, cell: CellSettings, model, optimizer, accelerator) -> bool:
        """Clip (at the accumulation boundary), step and zero the gradients. True when the step skipped the
        update: fp16's loss scaler found inf/NaN gradients (accelerate's ``step_was_skipped``)."""
        if accelerator.sync_gradients and cell.train.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cell.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return accelerator.sync_gradients and bool(getattr(optimizer, "step_was_skipped", False))


class PlainPreparer(Preparer):
    """No wrapper at one process, DistributedDataParallel at more, or tensor parallelism alone (strategy tp)."""

    def prepare_meta(self, cell: CellSettings, model, accelerator, device: torch.device):
        """A plain model built on meta (tensor parallelism: split by its plan before this, bench/worker/parallel.py):
        each rank materialises what it holds, then accelerate prepares it as any other."""
        from bench.worker.meta_init import materialise

        materialise(model, device)
        return accelerator.prepare(model, self.make_optimizer(cell, model, accelerator))


class DeepSpeedPreparer(Preparer):
    def make_optimizer(self, cell: CellSettings, model, accelerator):
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is None or "optimizer" not in plugin.deepspeed_config:
            return super().make_optimizer(cell, model, accelerator)
        from accelerate.utils import DummyOptim

        params = [p for p in model.parameters() if p.requires_grad]
        return DummyOptim(params, lr=cell.train.lr, weight_decay=cell.train.weight_decay)

    def backward(self, model, loss, accelerator) -> None:
        # as accelerate's DeepSpeedEngineWrapper.backward, split in two: this half, then step()
        model.set_gradient_accumulation_boundary(is_boundary=accelerator.sync_gradients)
        model.backward(loss)

    def step(self, cell: CellSettings, model, optimizer, accelerator) -> bool:
        """The engine's step; True when its fp16 loss scaler skipped the update (its ``skipped_steps`` counts)."""
        if not accelerator.sync_gradients:
            return False
        skipped = getattr(model, "skipped_steps", 0)
        model.step()  # clips per the JSON's gradient_clipping, steps, zeroes
        return getattr(model, "skipped_steps", 0) > skipped


class Fsdp1Preparer(Preparer):
    def before_prepare(self, cell: CellSettings, model, accelerator) -> None:
        """LoRA under FSDP1: give each trainable adapter Linear its own FSDP unit.

        FSDP1 flattens the parameters of a wrapped unit into one FlatParameter of one dtype, so a frozen
        bf16 base layer and its fp32 adapter cannot share a unit. peft's policy wraps every leaf module
        with trainable weights apart, plus the transformer layers (as HF Trainer and TRL do).
        """
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        if plugin is None or cell.adapter.type == "none":
            return
        from peft.utils.other import fsdp_auto_wrap_policy

        plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)

    def prepare(self, cell: CellSettings, model, accelerator, device: torch.device, on_meta: bool = False):
        """The model first, then the optimizer over the wrapped model's parameters, as the HF Trainer delays
        it under FSDP. With use_orig_params false (QLoRA cells, and users' configs that say so) FSDP1 replaces
        each unit's parameters by one FlatParameter, and accelerate remaps an optimizer prepared beside the
        model only under FSDP2 and tensor parallelism: an optimizer made from the unwrapped model would step
        the orphaned originals, training nothing and keeping the built model on the GPU."""
        if on_meta:
            return self.prepare_meta(cell, model, accelerator, device)
        model = accelerator.prepare(model)
        return model, accelerator.prepare(self.make_optimizer(cell, model, accelerator))

    def prepare_meta(self, cell: CellSettings, model, accelerator, device: torch.device):
        """Each rank materialises and initialises only its own shard, unit by unit, through the plugin's
        param_init_fn (accelerate replaces it when sync_module_states is on, so that stays off: there is
        nothing to broadcast from rank 0); the optimizer is made afterwards from the sharded parameters."""
        from bench.worker.meta_init import materialise_module

        plugin = accelerator.state.fsdp_plugin
        plugin.sync_module_states = False
        plugin.param_init_fn = partial(materialise_module, device=device, model=model)
        return self.prepare(cell, model, accelerator, device)

    @staticmethod
    def build_peak_bytes(strategy: Strategy, world: int, total_bytes: int, root_bytes: int) -> int:
        """One wrapping unit is materialised whole, copied into a flat parameter and this rank's slice is
        cloned (``FlatParamHandle.shard``): (2 + 1 / world) x the unit when it is sharded; the largest unit
        is the root (for Llama the embedding: 21 % of the 1B model), wrapped last, beside every layer's shard.
        Without sharding (NO_SHARD, and every FSDP1 strategy on one rank) the flat parameter is the whole
        unit and no clone is made."""
        if not strategy.shards_at(world):  # NO_SHARD; FSDP1 switches any strategy to NO_SHARD on one rank
            return total_bytes + root_bytes
        # FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD (one node: sharded over all its ranks)
        return round((total_bytes - root_bytes) / world + root_bytes * (2 + 1 / world))


class Fsdp2Preparer(Preparer):
    def prepare_meta(self, cell: CellSettings, model, accelerator, device: torch.device):
        """accelerate prepares model and optimizer only together and maps the optimizer's parameters to the
        sharded ones by data_ptr(), 0 for every meta tensor; so the optimizer, still without state, is
        pointed at the materialised shards afterwards."""
        from bench.worker.meta_init import materialise

        model, optimizer = accelerator.prepare(model, self.make_optimizer(cell, model, accelerator))
        materialise(unwrap(model), device)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's
        # one group before and after: the meta model's parameters are all plain, the sharded ones all DTensors
        inner.param_groups[0]["params"] = [p for p in model.parameters() if p.requires_grad]
        return model, optimizer

    @staticmethod
    def build_peak_bytes(strategy: Strategy, world: int, total_bytes: int, root_bytes: int) -> int:
        """Only each rank's shard is materialised: the model / world."""
        return round(total_bytes / world)


def trainable_groups(parameters) -> list[dict]:
    """The trainable parameters as optimizer parameter groups that never mix DTensors and plain tensors: one
    group per kind, so a model of one kind keeps its one group.

    Tensor parallelism (transformers' plan, bench/worker/parallel.py) turns the split weights (linears, the
    embedding and head) into DTensors and leaves the rest (RMSNorm weights) plain. torch's AdamW on CUDA defaults
    to its foreach kernels, one call over a group's list, and DTensor refuses a list that mixes the two kinds
    ("got mixed torch.Tensor and DTensor", 2x H200). Forcing foreach=False would also avoid it, but every step
    would then run a loop of per-parameter ops, each a DTensor dispatch: the slow path torch made foreach to end.
    """
    params = [p for p in parameters if p.requires_grad]
    if not torch.distributed.is_available():  # a torch built without it has no DTensor
        return [{"params": params}]
    from torch.distributed.tensor import DTensor

    kinds = [[p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]]
    return [{"params": kind} for kind in kinds if kind]  # none trainable: torch says its list is empty


def build_optimizer(train: Train, parameters, foreach: bool | None = None):
    """The cell's optimizer over the trainable parameters (trainable_groups), every group with the cell's lr and
    weight decay. foreach (torch's AdamW only) is left to torch's default unless given: the CPU tests force it,
    since on CPU torch defaults to the per-parameter loop that accepts mixed lists and so would hide the bug."""
    groups = trainable_groups(parameters)
    if train.optimizer == "adamw_bnb_8bit":
        import bitsandbytes as bnb  # a torch Optimizer: it takes parameter groups as torch's own do

        return bnb.optim.AdamW8bit(groups, lr=train.lr, weight_decay=train.weight_decay)
    fused = train.optimizer == "adamw_torch_fused"
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay, fused=fused or None,
                             foreach=foreach)


# The Strategy's framework (bench/strategies/strategy.py) -> the class that prepares it.
PREPARERS: dict[str, type[Preparer]] = {
    "torch": PlainPreparer, "deepspeed": DeepSpeedPreparer, "fsdp1": Fsdp1Preparer, "fsdp2": Fsdp2Preparer,
}


def preparer_for(strategy: Strategy) -> Preparer:
    return PREPARERS[strategy.framework]()


def build_peak_bytes(strategy: str, world: int, total_bytes: int, root_bytes: int) -> int:
    """GPU memory that building and sharding a meta model peaks at on one rank, before the first step (FSDP
    strategies only: the others build no meta model). Matches the GPU records of Llama-3.2-1B/3B at 2 and 4
    ranks to within 0.1 % (tests/worker/test_meta_init.py)."""
    s = strategies.get(strategy)
    return preparer_for(s).build_peak_bytes(s, world, total_bytes, root_bytes)


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model
