"""Each framework's sizes and settings, written once: the renderer (bench/strategies/render.py) writes them
into the configs a cell runs with, the estimator (bench/estimate/) replays them. Sizes in elements unless
named bytes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeepSpeedSizes:
    """zero_optimization sizes: those the generated DeepSpeed JSON writes, and DeepSpeed's defaults it keeps
    (not written, so a user reading the JSON sees DeepSpeed's own)."""

    reduce_bucket_size: int = 500_000_000  # written
    allgather_bucket_size: int = 500_000_000  # written (ZeRO-1/2)
    stage3_prefetch_bucket_size: int = 500_000_000  # written (ZeRO-3)
    stage3_param_persistence_threshold: int = 1_000_000  # written (ZeRO-3)
    stage3_max_live_parameters: int = 1_000_000_000  # DeepSpeed's default, kept
    stage3_max_reuse_distance: int = 1_000_000_000  # DeepSpeed's default, kept
    sub_group_size: int = 1_000_000_000  # DeepSpeed's default, kept

    def written(self, stage: int) -> dict[str, int]:
        """The sizes the generated JSON's zero_optimization holds at this stage."""
        if stage == 3:
            return {"reduce_bucket_size": self.reduce_bucket_size,
                    "stage3_prefetch_bucket_size": self.stage3_prefetch_bucket_size,
                    "stage3_param_persistence_threshold": self.stage3_param_persistence_threshold}
        return {"reduce_bucket_size": self.reduce_bucket_size, "allgather_bucket_size": self.allgather_bucket_size}


@dataclass(frozen=True)
class TorchDDPSizes:
    """torch DistributedDataParallel's defaults (accelerate passes none of its own)."""

    bucket_bytes: int = 25 << 20  # bucket_cap_mb
    first_bucket_bytes: int = 1 << 20  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
    broadcast_bucket_bytes: int = 250 << 20  # _sync_module_states' broadcast_bucket_size


@dataclass(frozen=True)
class FSDPSettings:
    """What the generated accelerate config sets for FSDP, read by the FSDP replays too."""

    transformer_layer: str = "LlamaDecoderLayer"  # the wrapping unit
    backward_prefetch: str = "BACKWARD_PRE"  # FSDP1: the next unit's gather is issued before this one's grads
    forward_prefetch: bool = False


DEEPSPEED = DeepSpeedSizes()
TORCH_DDP = TorchDDPSizes()
FSDP = FSDPSettings()
