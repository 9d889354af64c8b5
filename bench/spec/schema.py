"""The matrix schema: every setting of a cell and of a matrix file, typed, and the dotted names of them.

A matrix file gives defaults for every setting of a cell plus a ``grid`` whose keys may be any
setting (``strategy``, ``gpus``, ``model``, ``seq_len``, ``adapter.r``, ``adapter`` as a whole ...).
The product of the grid, less ``exclude`` rules, plus ``include`` cells, gives the cells (bench/spec/
expansion.py); each cell is a frozen :class:`CellSettings` whose id is a hash of its resolved settings.
Reading a file and saying what is wrong with it: bench/spec/loading.py.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bench.spec.slurm import SlurmOptions


class MatrixError(Exception):
    """Bad input: the message names the file, the key and the fix. The CLI exits 2 on it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Adapter(_Strict):
    type: Literal["none", "lora", "qlora"] = "none"
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target: str | tuple[str, ...] = "all-linear"
    quant_storage: Literal["bf16", "fp16", "fp32", "uint8"] = "bf16"  # QLoRA 4-bit storage; bf16 lets FSDP shard it

    @field_validator("target")
    @classmethod
    def _known_modules(cls, v):
        names = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        if isinstance(v, str):
            if v != "all-linear":
                raise ValueError(f"{v!r} names no module set. Fix: use 'all-linear' or a list of module names from "
                                 f"{sorted(names)}")
            return v
        unknown = set(v) - names
        if unknown or not v:
            raise ValueError(f"unknown target modules {sorted(unknown)}. Fix: choose from {sorted(names)}")
        return tuple(v)


class Timing(_Strict):
    """When a cell stops timing (bench/worker/timing.py): the median step time's interval within ±ci_target, or a cap.

    Defaults sized for the 10-cell Llama-3.1-8B LoRA matrix on 2 H200 (about 1.2 s a step, 13-20 s of
    start-up a launch, 2 warm-up steps) to finish within 15 minutes: 10 x (~25 s start-up, warm-up and
    teardown + at most 60 s timed + one step past the cap) ~ 14.5 min. At 1.2 s a step the time cap binds
    (~50 steps); max_steps binds for fast steps (a 1B model at ~0.16 s: 300 steps ~ 48 s).
    """

    ci_target: float = Field(0.01, gt=0, lt=1, description="relative half-width of the median's interval to stop at")
    confidence: float = Field(0.95, ge=0.5, lt=1, description="confidence of that interval")
    max_steps: int = Field(300, gt=0, description="timed steps at most (train.steps is the minimum)")
    max_timed_s: float = Field(60.0, gt=0, description="timed seconds at most, once train.steps are done")
    # Steps that come in episodes (a run of fast steps, then a run of slow ones: ZeRO-3's host-bound step on
    # 2x H200) make the interval, which takes the steps as independent, look tight inside one episode; the
    # nightly's ZeRO-3 launch stopped "converged" after 20 fast steps, 7 % below its other nights. A cell like
    # that times a fixed window instead. 0 (the default) leaves the rule as it was and the cell id unchanged.
    min_timed_s: float = Field(0.0, ge=0, description="timed seconds at least before the interval may stop timing "
                                                      "(max_steps still stops it)")

    @model_validator(mode="after")
    def _time_window_in_order(self):
        if self.min_timed_s > self.max_timed_s:
            raise ValueError(f"train.timing.min_timed_s ({self.min_timed_s:g}) is above train.timing.max_timed_s "
                             f"({self.max_timed_s:g}). Fix: lower train.timing.min_timed_s, or raise "
                             f"train.timing.max_timed_s to at least {self.min_timed_s:g} (equal values time a fixed window)")
        return self


class Train(_Strict):
    seq_len: int = Field(512, gt=0)
    # "auto": the largest micro-batch the estimator says fits the card or the cap, confirmed by the launch
    # itself (bench/launch/auto_batch.py); needs a capacity, so a CUDA cell
    micro_batch: Annotated[int, Field(gt=0)] | Literal["auto"] = 1
    grad_accum: int = Field(1, gt=0)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit"] = "adamw_torch"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    grad_checkpointing: bool = False
    attn_impl: Literal["sdpa", "eager"] = "sdpa"
    kernels: Literal["none", "liger"] = "none"  # liger: Liger's Triton kernels (RoPE, RMSNorm, SwiGLU, fused loss)
    compile: bool = False  # torch.compile each decoder layer; the warm-up steps carry the compilation
    warmup_steps: int = Field(2, ge=0)
    steps: int = Field(5, gt=0, description="timed steps at least; timing goes on until train.timing stops it")
    timing: Timing = Timing()
    seed: int = 0

    @model_validator(mode="after")
    def _step_caps_in_order(self):
        if self.timing.max_steps < self.steps:
            raise ValueError(f"train.timing.max_steps ({self.timing.max_steps}) is below train.steps ({self.steps}), "
                             "the minimum of timed steps. Fix: raise train.timing.max_steps or lower train.steps")
        return self

    @model_validator(mode="after")
    def _compile_outside_timing(self):
        if self.compile and self.warmup_steps < 1:
            raise ValueError("train.compile: true compiles during the first steps, which must not be timed, but "
                             "train.warmup_steps is 0. Fix: set train.warmup_steps to at least 1 (2 covers a "
                             "recompilation), or train.compile: false")
        return self


class Data(_Strict):
    source: str = "synthetic"  # "synthetic", or a local JSON lines / parquet file or saved dataset folder
    text_field: str = "text"
    tokenizer: str | None = None  # a local tokenizer folder, needed when source is a file
    padding: Literal["longest", "max_length", "pack"] = "max_length"


class CellSettings(_Strict):
    """Everything that determines one run. Its hash is the cell id."""

    model: str = "tiny-llama"
    strategy: str = "ddp"
    gpus: int = Field(1, gt=0, description="processes per node: GPUs on a GPU machine, CPU processes on CPU")
    nodes: int = Field(1, gt=0, description="machines the cell spans (launcher: slurm); it runs nodes x gpus ranks")
    # Tensor and context parallel degrees (bench/strategies/strategy.py): the ranks of one group split each
    # layer (tp) or each sequence (cp) and share one batch; data parallelism gets gpus x nodes / (tp x cp).
    tp: int = Field(1, gt=0, description="tensor parallel degree: ranks that split each layer's weights")
    cp: int = Field(1, gt=0, description="context parallel degree: ranks that split each sequence")
    device: Literal["cuda", "cpu"] = "cpu"
    gpu_memory_gib: float | None = Field(None, gt=0, description="per-process GPU memory cap")
    # "cores": each rank of the node pinned to its own whole cores (near its GPU where NVML tells), planned by
    # the parent (bench/machine/cpu_affinity.py) and applied by the rank before its first thread starts work
    # (bench/worker/affinity.py). A host-bound step waits on its rank's main thread; "none" leaves placement to
    # the scheduler, as every cell before this setting did.
    cpu_affinity: Literal["none", "cores"] = "none"
    adapter: Adapter = Adapter()
    train: Train = Train()
    data: Data = Data()

    @property
    def processes(self) -> int:
        """Ranks of the cell: nodes x processes per node."""
        return self.nodes * self.gpus

    @property
    def cell_id(self) -> str:
        # nodes, tp and cp (at 1) and train.timing.min_timed_s (at 0) came later: a cell hashes without them at
        # those values, so that existing cells keep their ids.
        # cpu_affinity (at "none") likewise.
        later: dict[str, Any] = {k: True for k in ("nodes", "tp", "cp") if getattr(self, k) == 1}
        if self.cpu_affinity == "none":
            later["cpu_affinity"] = True
        if self.train.timing.min_timed_s == 0:
            later["train"] = {"timing": {"min_timed_s"}}
        canonical = json.dumps(self.model_dump(mode="json", exclude=later or None),
                               sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        adapter = self.adapter.type if self.adapter.type != "none" else "full"
        cap = f" cap{self.gpu_memory_gib:g}G" if self.gpu_memory_gib else ""
        unit = "gpu" if self.device == "cuda" else "proc"
        nodes = f" {self.nodes}nodes" if self.nodes > 1 else ""
        pinned = " pinned" if self.cpu_affinity != "none" else ""
        return f"{self.model} {adapter} {self.strategy_label} x{self.gpus}{unit}{nodes}{cap}{self.fast_path_suffix}{pinned}"

    @property
    def fast_path_suffix(self) -> str:
        """What tells apart cells that differ only in fast paths (kernels, compile, micro-batch auto), which a
        matrix may put on grid axes: " liger compile mb-auto"; empty for the plain step (old labels unchanged)."""
        t = self.train
        words = [t.kernels if t.kernels != "none" else "", "compile" if t.compile else "",
                 "mb-auto" if t.micro_batch == "auto" else ""]
        return "".join(f" {w}" for w in words if w)

    @property
    def strategy_label(self) -> str:
        """The strategy with its tensor and context degrees above 1: "fsdp2", "fsdp2+tp2+cp2"; a strategy named
        after its degree (tensor parallelism alone) is said by the degree: "tp2", not "tp+tp2". The strategy
        registry's own label says the same (tests/strategies/test_degrees.py holds them together)."""
        degrees = [f"{k}{v}" for k, v in (("tp", self.tp), ("cp", self.cp)) if v > 1]
        named_by_its_degree = bool(degrees) and degrees[0] == f"{self.strategy}{self.tp}"
        return "+".join(degrees if named_by_its_degree else [self.strategy, *degrees])

    @property
    def setting_key(self) -> str:
        """Everything but strategy (its degrees too) and process count: cells with equal keys are compared in
        scaling tables."""
        d = self.model_dump(mode="json")
        for k in ("strategy", "gpus", "nodes", "tp", "cp"):
            d.pop(k)
        return json.dumps(d, sort_keys=True)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (``train.seq_len``), used by --only/--exclude and reports."""
        return _flatten(self.model_dump(mode="json"))


class Limits(_Strict):
    timeout_s: float = Field(900, gt=0, description="wall clock per cell, launch to exit")
    hang_s: float = Field(300, gt=0, description="no step progress for this long -> hang")
    collective_timeout_s: int = Field(120, gt=0, description="NCCL/gloo timeout so a stuck collective surfaces")
    startup_s: float = Field(600, gt=0, description="launch to first heartbeat (model build, compile of DeepSpeed ops)")


class TokenBudget(_Strict):
    """A training job to project: e.g. 4 epochs of 50M tokens."""

    tokens: int = Field(gt=0)
    epochs: float = Field(1.0, gt=0)


class Matrix(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    model: str = "tiny-llama"
    strategy: str = "ddp"
    gpus: int = Field(1, gt=0)
    nodes: int = Field(1, gt=0)
    tp: int = Field(1, gt=0)
    cp: int = Field(1, gt=0)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    gpu_memory_gib: float | None = None
    cpu_affinity: Literal["none", "cores"] = "none"
    adapter: Adapter = Adapter()
    train: Train = Train()
    data: Data = Data()
    grid: dict[str, list[Any]] = {}
    include: list[dict[str, Any]] = []
    exclude: list[dict[str, Any]] = []
    limits: Limits = Limits()
    repeats: int = Field(1, gt=0)
    token_budget: TokenBudget | None = None
    # skip a cell predicted above capacity by this fraction; null: the framework's measured margin
    # (bench/estimate/margins.py, from the estimator's out-of-sample errors)
    estimate_margin: float | None = Field(None, ge=0)
    # how cells start: on this host (accelerate launch) or as Slurm batch jobs (bench/launch/slurm_runner.py)
    launcher: Literal["local", "slurm"] = "local"
    slurm: SlurmOptions = SlurmOptions()

    @model_validator(mode="after")
    def _grid_lists_not_empty(self):
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{key}: an empty list gives the matrix no cells. Fix: give at least one value, "
                                 f"or remove grid.{key}{self._left_at(key)}")
        return self

    def _left_at(self, key: str) -> str:
        """What the setting of a grid axis is without the axis: the matrix's own value (where it is one number or
        name), said so that removing the axis is a choice the user sees."""
        try:
            value: Any = self
            for part in resolve_key(key).split("."):
                value = getattr(value, part)
        except (KeyError, AttributeError):  # an unknown axis: said by the loader with the allowed keys
            return ""
        return f" to keep {key} at {value}" if isinstance(value, (int, float, str)) else ""


# ---------------------------------------------------------------- key resolution

def _submodels(model: type[BaseModel], prefix: str = "") -> dict[str, type[BaseModel]]:
    """Dotted path -> model class of every nested settings model: train, train.timing, adapter, data."""
    out = {}
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out[f"{prefix}{name}"] = kind
            out.update(_submodels(kind, f"{prefix}{name}."))
    return out


_SECTIONS = _submodels(CellSettings)
_TOP = [f for f in CellSettings.model_fields if f not in _SECTIONS]
_PATHS = _TOP + [f"{s}.{f}" for s, m in _SECTIONS.items() for f in m.model_fields]  # every setting, nested too


def resolve_key(key: str) -> str:
    """Map a grid/include/exclude key to its dotted path: ``seq_len`` -> ``train.seq_len``,
    ``max_timed_s`` or ``timing.max_timed_s`` -> ``train.timing.max_timed_s``; ambiguous or unknown: KeyError."""
    if key in _PATHS or key in _SECTIONS:
        return key
    owners = [p for p in _PATHS if p.endswith("." + key)]
    if len(owners) == 1:
        return owners[0]
    raise KeyError(key)


def known_keys() -> list[str]:
    return _PATHS + [s for s in _SECTIONS if s not in _PATHS]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _set_path(d: dict, path: str, value: Any) -> None:
    """Set a dotted setting; a whole section given as a mapping is merged into what is there."""
    *parents, last = path.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    if path in _SECTIONS and isinstance(value, dict):
        d[last] = {**d.get(last, {}), **value}
    else:
        d[last] = value
