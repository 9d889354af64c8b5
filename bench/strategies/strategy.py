"""A strategy described by its degrees, and the questions code asks it (never its name).

Degrees, as torchtitan's ParallelDims: how the ranks of one cell split the work.

- ``dp_replicate`` x ``dp_shard`` x ``tp`` x ``cp`` = the world. Data parallel ranks either hold a
  replica (replicate) or a slice (shard) of the model states; the ``tp`` (tensor) ranks of a group each hold a
  slice of every layer's weights, the ``cp`` (context) ranks each a slice of every sequence. A catalogue
  strategy has both at 1; a cell's settings ``tp``/``cp`` give them (``with_degrees``), through accelerate's
  ParallelismConfig over FSDP2 (``tensor_only``: tensor parallelism alone, no data parallel wrapper).
  accelerate's FSDP2 shards the states over the flattened dp_shard x cp mesh (``state_shards``).
- ``shard_level``: which states the data-parallel shard degree splits, ZeRO's stages as the scale:
  0 none (DDP, FSDP NO_SHARD), 1 optimizer states, 2 + gradients (ZeRO-2, FSDP SHARD_GRAD_OP),
  3 + parameters (ZeRO-3, FSDP FULL_SHARD, FSDP2).
- ``shard_scope``: "world" shards over all ranks, "node" within a node and replicates across nodes (FSDP1
  HYBRID_SHARD): the shard degree is then the ranks of a node.
- offload (``offload_params``, ``offload_optimizer``: the states' home is the host) and
  ``reshard_after_forward`` (FSDP2: gathered parameters freed after forward, gathered again for backward).
- ``framework``: who implements it, where frameworks behave differently (config rendering, the worker's
  prepare, the estimator's replay): "torch" (no wrapper, or DistributedDataParallel), "deepspeed",
  "fsdp1", "fsdp2".

The record field ``strategy_info.family`` is derived (``family``), as records have always spelled it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

Family = Literal["single", "ddp", "tp", "deepspeed", "fsdp", "fsdp2"]
Framework = Literal["torch", "deepspeed", "fsdp1", "fsdp2"]
ShardScope = Literal["world", "node"]

# FSDP1's sharding strategies, as accelerate spells them, and the degrees each is.
FSDP1_SHARDING: dict[str, tuple[int, ShardScope]] = {
    "NO_SHARD": (0, "world"), "SHARD_GRAD_OP": (2, "world"), "FULL_SHARD": (3, "world"),
    "HYBRID_SHARD": (3, "node"), "HYBRID_SHARD_ZERO2": (2, "node"),
}

# What the record label (``family``) was derived from: (framework, one process without any wrapper). Read back
# only for older records whose strategy can no longer be read (a user's config file gone since).
FAMILY_DEGREES: dict[str, tuple[Framework, bool]] = {
    "single": ("torch", True), "ddp": ("torch", False), "deepspeed": ("deepspeed", False),
    "fsdp": ("fsdp1", False), "fsdp2": ("fsdp2", False),
}


@dataclass(frozen=True)
class Strategy:
    name: str
    framework: Framework
    summary: str
    shard_level: int = 0
    shard_scope: ShardScope = "world"
    offload_optimizer: bool = False
    offload_params: bool = False
    reshard_after_forward: bool | None = None  # FSDP2 only
    single_process: bool = False  # one process, no distributed wrapper at all ("single")
    tensor_only: bool = False  # tensor parallelism over all ranks, no data parallel wrapper ("tp")
    tp: int = 1
    cp: int = 1

    def __post_init__(self):
        if not 0 <= self.shard_level <= 3:
            raise ValueError(f"strategy {self.name!r}: shard_level is 0..3, not {self.shard_level}")
        if self.framework == "fsdp1" and (self.shard_level, self.shard_scope) not in FSDP1_SHARDING.values():
            raise ValueError(f"strategy {self.name!r}: FSDP1 has no sharding strategy of these degrees")

    # ------------------------------------------------------------ tensor and context degrees

    def with_degrees(self, tp: int, cp: int) -> "Strategy":
        """This strategy at a cell's tensor and context degrees."""
        return replace(self, tp=tp, cp=cp)

    @property
    def label(self) -> str:
        """The name tables show, saying the degrees: "fsdp2", "fsdp2+tp2", "fsdp2+cp2", "tp2"."""
        if self.tensor_only:
            return f"tp{self.tp}" + (f"+cp{self.cp}" if self.cp > 1 else "")
        return self.name + "".join(f"+{k}{v}" for k, v in (("tp", self.tp), ("cp", self.cp)) if v > 1)

    @property
    def splits_layers(self) -> bool:
        """Tensor parallel: every rank of a group holds a slice of each layer's weights."""
        return self.tp > 1

    @property
    def splits_sequences(self) -> bool:
        """Context parallel: every rank of a group holds a slice of each sequence."""
        return self.cp > 1

    @property
    def uses_parallelism_config(self) -> bool:
        """Launched with accelerate's ParallelismConfig (a tensor or context degree above 1)."""
        return self.splits_layers or self.splits_sequences

    @property
    def allows_parallel_degrees(self) -> bool:
        """accelerate composes tensor and context parallelism with FSDP2 only (ParallelismConfig), or runs
        tensor parallelism alone (no wrapper); offload is left out (not verified by bench)."""
        return (self.fsdp_version == 2 or self.tensor_only) and not self.offloads

    def state_shards(self, world: int) -> int:
        """Ranks one copy of the (sharded) model states is split over, the tensor split apart: accelerate's FSDP2
        shards over the flattened dp_shard x cp mesh (dp_shard_cp), so context ranks shard states too."""
        if not self.shards:
            return 1
        return self.dp_shard(world) * (self.cp if self.is_fsdp else 1)

    # ------------------------------------------------------------ as a record holds it

    def degrees(self) -> dict:
        """Everything but the name and summary: what a record keeps (strategy_info.degrees) to rebuild it."""
        return {k: v for k, v in asdict(self).items() if k not in ("name", "summary")}

    @classmethod
    def from_degrees(cls, name: str, summary: str, degrees: dict) -> "Strategy":
        """The strategy a record's degrees describe; keys this version does not know are left out."""
        known = {f.name for f in fields(cls)} - {"name", "summary"}
        return cls(name=name, summary=summary, **{k: v for k, v in degrees.items() if k in known})

    # ------------------------------------------------------------ degrees at a world size

    def dp_degree(self, world: int) -> int:
        """Data-parallel ranks: the world over the tensor and context degrees."""
        return world // (self.tp * self.cp)

    def dp_shard(self, world: int, ranks_per_node: int | None = None) -> int:
        """Ranks one copy of the sharded states is split over (1: every rank holds them whole); the world is
        whole nodes of ``ranks_per_node`` (None: one node)."""
        if ranks_per_node and world % ranks_per_node:
            raise ValueError(f"a world of {world} ranks is not whole nodes of {ranks_per_node}")
        if not self.shard_level:
            return 1
        dp = self.dp_degree(world)
        return min(dp, ranks_per_node or dp) if self.shard_scope == "node" else dp

    def dp_replicate(self, world: int, ranks_per_node: int | None = None) -> int:
        """Copies of the (sharded) states: the data-parallel ranks over the shard degree."""
        return self.dp_degree(world) // self.dp_shard(world, ranks_per_node)

    # ------------------------------------------------------------ what it shards and where states live

    @property
    def shards(self) -> bool:
        """Some model state is split across ranks (at more than one rank)."""
        return self.shard_level >= 1

    @property
    def shards_optimizer(self) -> bool:
        return self.shard_level >= 1

    @property
    def shards_grads(self) -> bool:
        return self.shard_level >= 2

    @property
    def shards_params(self) -> bool:
        """Parameters are split across ranks at rest (ZeRO-3, FSDP full/hybrid shard, FSDP2)."""
        return self.shard_level >= 3

    @property
    def reshards_after_forward(self) -> bool:
        """Gathered parameters are freed after their forward and gathered again for backward (ZeRO-3, FSDP1
        FULL/HYBRID_SHARD, FSDP2 unless told not to); SHARD_GRAD_OP keeps them to the backward."""
        return self.shards_params and self.reshard_after_forward is not False

    @property
    def offloads(self) -> bool:
        """Parameters or optimizer states live on the host (ZeRO-Offload, FSDP parameter offload)."""
        return self.offload_params or self.offload_optimizer

    # ------------------------------------------------------------ who implements it

    @property
    def is_plain(self) -> bool:
        """Plain PyTorch: no sharding framework (one process, or DistributedDataParallel)."""
        return self.framework == "torch"

    def uses_ddp(self, world: int) -> bool:
        """DistributedDataParallel wraps the model (a catalogue DDP cell at one process runs plain)."""
        return self.is_plain and not self.single_process and not self.tensor_only and world > 1

    @property
    def uses_deepspeed(self) -> bool:
        return self.framework == "deepspeed"

    @property
    def is_fsdp(self) -> bool:
        return self.fsdp_version is not None

    @property
    def fsdp_version(self) -> int | None:
        return {"fsdp1": 1, "fsdp2": 2}.get(self.framework)

    @property
    def zero_stage(self) -> int | None:
        """DeepSpeed's ZeRO stage: the shard level, under DeepSpeed."""
        return self.shard_level if self.uses_deepspeed else None

    @property
    def fsdp_sharding(self) -> str | None:
        """FSDP1's sharding strategy name, as accelerate spells it."""
        if self.fsdp_version != 1:
            return None
        return next(k for k, v in FSDP1_SHARDING.items() if v == (self.shard_level, self.shard_scope))

    def shards_at(self, world: int) -> bool:
        """Whether states are split at this world size: not on one rank (FSDP1 then runs NO_SHARD)."""
        return self.shards and world > 1

    @property
    def runs_on_cpu(self) -> bool:
        """accelerate enables FSDP only on GPUs; DDP and DeepSpeed run over gloo on CPU."""
        return not self.is_fsdp

    @property
    def family(self) -> Family:
        """The label records carry (strategy_info.family) and reports group by."""
        if self.is_plain:
            return "single" if self.single_process else "tp" if self.tensor_only else "ddp"
        return {"deepspeed": "deepspeed", "fsdp1": "fsdp", "fsdp2": "fsdp2"}[self.framework]
