"""What FSDP1 and FSDP2 share: units (each decoder layer, then the root), a unit's gathered parameters
prefetched in backward, gradients kept per unit until its post-backward reduces them to fp32 shards."""

from __future__ import annotations

from bench.estimate.replay.base import Run
from bench.estimate.replay.tensors import layer_params, root_params


class FsdpRun(Run):
    """The FSDP frameworks' shared hooks; fsdp1.py and fsdp2.py gather, reshard and reduce."""

    def prefetch(self, unit: str) -> None:
        """FSDP1 BACKWARD_PRE and FSDP2's default backward prefetch: the next unit's gather is issued before
        this one's gradients are computed."""
        self.unshard(unit)

    @staticmethod
    def unit_of(key: str) -> str:
        """The FSDP unit holding a parameter: its decoder layer, or the root."""
        return f"layer{key.split('.')[1]}" if key.startswith("layers.") else "root"

    def unit_params(self, unit: str) -> list[tuple[str, int]]:
        return root_params(self.shape) if unit == "root" else layer_params(self.shape)

    def unit_numel(self, unit: str) -> int:
        return sum(k for _, k in self.unit_params(unit))

    def keep_first_sharded_grad(self, unit: str, first: bool) -> None:
        """The new fp32 gradient becomes the unit's sharded gradient on the first backward; later ones are
        accumulated into it and dropped."""
        if first:
            self.mem.rename(f"grad_fp32_new:{unit}", f"grad:{unit}")
        else:
            self.free(f"grad_fp32_new:{unit}")

    def grad_ready(self, key: str, numel: int, from_buffer: bool = False) -> None:
        """The unit's gradients are reduced in its post-backward hook."""
        src = "grad_tied:embed_tokens" if from_buffer else f"grad_new:{key}"
        self.mem.rename(src, f"unit_grad:{self.unit_of(key)}:{key}")
