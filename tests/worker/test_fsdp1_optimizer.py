"""FSDP1's optimizer steps the wrapped model's parameters, whatever use_orig_params says.

With use_orig_params false (bench's QLoRA cells, and users' configs such as LLaMA-Factory's fsdp_config.yaml
and TRL's fsdp_qlora.yaml) FSDP1 replaces a unit's parameters by one FlatParameter; accelerate remaps an
optimizer prepared beside the model under FSDP2 and tensor parallelism only. bench once made the optimizer
from the unwrapped model and prepared both together: on 2x H200 those cells trained nothing and kept the built
model on the GPU (6.07 GiB allocated after prepare for Llama-3.2-1B with parameter offload, results/corpus-gpu).

Real torch FSDP1 on one gloo rank in this process. accelerate refuses FSDP without a GPU, so the accelerator
is a stand-in whose prepare wraps a module as accelerate's does (FullyShardedDataParallel) and hands other
objects back; the real path runs in tests/gpu (FSDP1 QLoRA cells) and in every GPU matrix's FSDP1 cells.
"""

from __future__ import annotations

import pytest
import torch

from bench import strategies
from bench.spec import CellSettings
from bench.worker.guard import check_optimizer_steps_the_model
from bench.worker.prepare import Fsdp1Preparer


class WrappingAccelerator:
    """accelerate's prepare for FSDP1, reduced to what matters here: a module comes back wrapped."""

    def __init__(self, use_orig_params: bool):
        self.use_orig_params = use_orig_params

    def prepare(self, *objects):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = tuple(FSDP(o, use_orig_params=self.use_orig_params, device_id=torch.device("cpu"))
                        if isinstance(o, torch.nn.Module) else o for o in objects)
        return wrapped if len(wrapped) > 1 else wrapped[0]


def flat_weights(model) -> torch.Tensor:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model):
        return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_a_step_after_fsdp1_prepare_trains_the_model(one_rank_group, use_orig_params):
    torch.manual_seed(0)
    cell = CellSettings(strategy="fsdp_full_shard", train={"optimizer": "adamw_torch", "lr": 0.1})
    model, optimizer = Fsdp1Preparer().prepare(cell, torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)),
                                              WrappingAccelerator(use_orig_params), torch.device("cpu"))
    check_optimizer_steps_the_model(model, optimizer, strategies.for_cell(cell))
    before = flat_weights(model)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    assert not torch.equal(flat_weights(model), before)  # with the optimizer made first: unchanged (False)


def test_an_optimizer_of_orphaned_parameters_is_refused(one_rank_group):
    """The old order, made by hand: the optimizer from the unwrapped model, then FSDP1 without orig params."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(module.parameters())
    model = FSDP(module, use_orig_params=False, device_id=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="holds 4 parameter.*would train nothing"):
        check_optimizer_steps_the_model(model, optimizer, strategies.get("fsdp_full_shard"))


def test_deepspeed_s_optimizer_is_not_asked():
    """ZeRO's optimizer steps its own flat fp32 partitions, never the module's parameters."""
    module = torch.nn.Linear(2, 2)
    check_optimizer_steps_the_model(module, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                                    strategies.get("zero2"))
    with pytest.raises(RuntimeError):
        check_optimizer_steps_the_model(module, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                                        strategies.get("ddp"))
