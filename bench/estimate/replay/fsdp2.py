"""FSDP2 (fully_shard): every parameter split evenly across ranks (DTensor shards), gathered per unit by
foreach_all_gather on its copy-in stream, gradients reduce-scattered by foreach_reduce and upcast to fp32."""

from __future__ import annotations

from bench.estimate.replay.fsdp import FsdpRun
from bench.estimate.replay.tensors import model_params
from bench.strategies import Strategy


class Fsdp2Run(FsdpRun):
    """Parameters split evenly: every rank replays alike."""

    @classmethod
    def handles(cls, strategy: Strategy) -> bool:
        return strategy.fsdp_version == 2

    def build(self) -> None:
        """FSDP2: fully_shard on meta, then each parameter's local shard allocated and initialised."""
        for name, numel in model_params(self.shape):
            self.alloc(f"shard:{name}", 4 * numel / self.n)

    def unshard(self, unit: str) -> None:
        """On one rank too (the 16-bit copies come from a one-rank all-gather). foreach_all_gather: on the copy-in stream a flat copy of the shards and the all-gather output
        (world x shards); the copy-out allocates each parameter's unsharded tensor on the compute stream;
        then the copy-in buffers are dropped."""
        params = self.unit_params(unit)
        if any(self.mem.live(f"unsharded:{unit}.{name}") for name, _ in params):
            return
        numel = sum(k for _, k in params)
        self.alloc(f"ag_input:{unit}", self.c * numel / self.n, "ag_copy_in")
        self.alloc(f"ag_output:{unit}", self.c * numel, "ag_copy_in")
        self.free(f"ag_input:{unit}")
        for name, k in params:
            self.alloc(f"unsharded:{unit}.{name}", self.c * k)
        self.free(f"ag_output:{unit}")

    def reshard_after_forward(self, unit: str) -> None:
        if unit != "root" and self.strategy.reshards_after_forward:  # the root stays for the backward
            self.free_all(f"unsharded:{unit}.")

    def post_backward(self, unit: str) -> None:
        """foreach_reduce: the reduce-scatter input (the group's gradients copied into one 16-bit buffer,
        compute stream) is kept until the next group's reduce-scatter; the output shard is made on the
        reduce-scatter stream and upcast there to fp32 (the sharded gradients, kept until zero_grad); the
        unsharded gradients and parameters are freed."""
        numel = self.unit_numel(unit)
        previous = self.mem.live_names("rs_input:")
        self.alloc(f"rs_input:{unit}", self.c * numel)
        self.free_all(f"unit_grad:{unit}:")
        for name in previous:
            self.free(name)
        first = not self.mem.live(f"grad:{unit}")
        self.alloc(f"rs_out:{unit}", self.c * numel / self.n, "reduce_scatter")
        self.alloc(f"grad_fp32_new:{unit}", 4 * numel / self.n, "reduce_scatter")
        self.free(f"rs_out:{unit}")
        self.keep_first_sharded_grad(unit, first)
        self.free_all(f"unsharded:{unit}.")
        if unit == "root":
            self.free_all("rs_input:")

    def optimizer_step(self) -> None:
        self.adam_states([(n, k / self.n) for n, k in model_params(self.shape)])
        self.free_all("grad:")
