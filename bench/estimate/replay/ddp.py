"""One process (single) and PyTorch DDP: the model built on the device in its weights' dtype, DDP's
broadcast and gradient buckets, gradients accumulated in place, the optimizer over every parameter."""

from __future__ import annotations

from bench.estimate.replay.base import Run
from bench.estimate.replay.tensors import model_params
from bench.strategies import Strategy
from bench.strategies.constants import TORCH_DDP
from bench.strategies.precision import policy_for



class DdpRun(Run):
    """Replicated parameters: no sharding, no offload (one process is DDP without its constructor)."""

    @classmethod
    def handles(cls, strategy: Strategy) -> bool:
        return strategy.is_plain and not strategy.splits_layers  # tensor parallelism alone: tp.py

    def build(self) -> None:
        self.build_on_device({"float32": 4, "bfloat16": 2, "float16": 2}[policy_for(self.cell).weight_dtype])
        if self.n > 1:
            self.ddp_prepare()

    def ddp_prepare(self) -> None:
        """DDP's constructor: rank 0's parameters broadcast in flat chunks of up to 250 MiB (a larger tensor
        is sent as it is), then the Reducer's gradient buckets (gradient_as_bucket_view=False), filled in
        reverse parameter order, 1 MiB first then 25 MiB, a larger tensor alone in its bucket."""
        params = model_params(self.shape)
        chunk, i = 0, 0
        for _, numel in params:
            size = 4 * numel
            if size >= TORCH_DDP.broadcast_bucket_bytes:
                continue
            if chunk + size > TORCH_DDP.broadcast_bucket_bytes:
                self.alloc(f"broadcast{i}", chunk)
                self.free(f"broadcast{i}")
                chunk, i = 0, i + 1
            chunk += size
        self.alloc(f"broadcast{i}", chunk)
        self.free(f"broadcast{i}")
        cap, filled, i = TORCH_DDP.first_bucket_bytes, 0, 0
        for _, numel in reversed(params):
            size = 4 * numel
            if filled and filled + size > cap:
                self.alloc(f"ddp_bucket{i}", filled)
                filled, cap, i = 0, TORCH_DDP.bucket_bytes, i + 1
            filled += size
        self.alloc(f"ddp_bucket{i}", filled)

    def grad_ready(self, key: str, numel: int, from_buffer: bool = False) -> None:
        src = "grad_tied:embed_tokens" if from_buffer else f"grad_new:{key}"
        if not self.mem.live(f"grad:{key}"):  # AccumulateGrad steals the first gradient
            self.mem.rename(src, f"grad:{key}")
        else:
            self.free(src)

    def optimizer_step(self) -> None:
        self.adam_states([(n, k) for n, k in model_params(self.shape)])
        self.free_all("grad:")
