"""A user's DeepSpeed JSON made ready for one cell: its shape checked, its ``"auto"`` values filled as the
user's stack fills them.

Files as HF Trainer and axolotl ship them hold ``"auto"`` values; the Trainer fills them from its
TrainingArguments and the model (``HfTrainerDeepSpeedConfig.trainer_config_process`` / ``_finalize``), and
accelerate's DeepSpeedPlugin fills the ZeRO stage and offload devices from its own defaults. Here the cell's
settings play the part of the TrainingArguments, with the same rules: an ``"auto"`` is filled, an explicit
value that disagrees with the cell is an error (as the Trainer raises on a mismatch), anything else is left
exactly as the user wrote it. DeepSpeed accepts two spellings of some keys (``stage3_prefetch_bucket_size``
and ``prefetch_bucket_size``; ``bf16`` and the older ``bfloat16``): the rules fill either. An "auto" no rule
fills is dropped, as DeepSpeed's own config models drop it to keep their default; the notes say which default.
An "auto" neither the Trainer nor DeepSpeed can take (inside a list, or in place of a whole ``params`` block:
the Trainer stops on both) is refused with the fix, as is a section of the wrong shape.
"""

from __future__ import annotations

import copy
from typing import Any

from bench.spec import CellSettings, MatrixError, models

AUTO = "auto"
# accelerate's DeepSpeedPlugin fills these "auto" values before the Trainer sees the file (its zero_stage and
# offload devices default to 2 and "none" when the accelerate config does not set them; bench's never does).
_ACCELERATE_FILLS = {
    "zero_optimization.stage": 2,
    "zero_optimization.offload_optimizer.device": "none",
    "zero_optimization.offload_param.device": "none",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": False,
}
_MAPPINGS = ("zero_optimization", "optimizer", "scheduler", "bf16", "bfloat16", "fp16",
             "zero_optimization.offload_optimizer", "zero_optimization.offload_param")


# ---------------------------------------------------------------- shape

def _get(config: dict, dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def zero_stage(ds: dict) -> int:
    """The ZeRO stage the file runs: its number, 2 for "auto" (accelerate's fill), 0 without a ZeRO section.
    Call after shape_problems found nothing."""
    stage = _get(ds, "zero_optimization.stage")
    return 0 if stage is None else _ACCELERATE_FILLS["zero_optimization.stage"] if stage == AUTO else int(stage)


def offload_device(ds: dict, section: str) -> str:
    """zero_optimization.<section>.device, "none" where absent or "auto" (accelerate's fill)."""
    device = _get(ds, f"zero_optimization.{section}.device")
    return "none" if device in (None, AUTO) else str(device)


def shape_problems(ds: dict) -> list[str]:
    """Every key of the wrong shape for DeepSpeed, the Trainer or accelerate, each with its fix."""
    out = [f"{key} is {_get(ds, key)!r}, not a mapping of keys. Fix: write it as {{...}} with its keys, as "
           "DeepSpeed's configuration documentation shows, or remove it"
           for key in _MAPPINGS if _get(ds, key) is not None and not isinstance(_get(ds, key), dict)]
    stage = _get(ds, "zero_optimization.stage")
    if stage is not None and stage != AUTO and (isinstance(stage, bool) or stage not in (0, 1, 2, 3)):
        out.append(f"zero_optimization.stage is {stage!r}; DeepSpeed's ZeRO stages are 0, 1, 2 and 3. Fix: give one "
                   "of these numbers (written without quotes), or \"auto\" for accelerate's default, 2")
    for block in ("optimizer", "scheduler"):
        if _get(ds, f"{block}.params") == AUTO:
            out.append(f"{block}.params is \"auto\"; the Trainer fills \"auto\" values inside params, not the block "
                       f"itself (it stops on it). Fix: write \"params\": {_params_example(block)}")
        elif _get(ds, f"{block}.params") is not None and not isinstance(_get(ds, f"{block}.params"), dict):
            out.append(f"{block}.params is {_get(ds, f'{block}.params')!r}, not a mapping of keys. "
                       f"Fix: write \"params\": {_params_example(block)}")
    for dotted, value in _autos_in_lists(ds):
        out.append(f"{dotted} is {value!r}: an \"auto\" inside a list is filled by neither the Trainer (it stops on a "
                   "mismatch) nor DeepSpeed. Fix: give the whole value as \"auto\" (e.g. \"betas\": \"auto\", the "
                   "Trainer's [0.9, 0.999]) or give numbers")
    return out


def _params_example(block: str) -> str:
    keys = ("lr", "betas", "eps", "weight_decay") if block == "optimizer" else (
        "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps")
    return "{" + ", ".join(f'"{k}": "auto"' for k in keys) + "}"


def _autos_in_lists(d: Any, prefix: str = "") -> list[tuple[str, list]]:
    if isinstance(d, dict):
        return [hit for key, v in d.items() for hit in _autos_in_lists(v, f"{prefix}{key}.")]
    if isinstance(d, list):
        if any(x == AUTO for x in d):
            return [(prefix.rstrip("."), d)]
        return [hit for i, v in enumerate(d) for hit in _autos_in_lists(v, f"{prefix}{i}.")]
    return []


def check_shape(ds: dict, source: str) -> None:
    """MatrixError naming the file, every key of the wrong shape and its fix."""
    if problems := shape_problems(ds):
        raise MatrixError(f"strategy {source!r}: " + "\n  ".join(problems))


# ---------------------------------------------------------------- resolving "auto" like the Trainer

class _Filler:
    """fill_match / fill_only over a nested dict, keeping a log of what was filled and what mismatched."""

    def __init__(self, config: dict):
        self.config = config
        self.filled: list[str] = []
        self.kept: list[str] = []
        self.mismatches: list[str] = []

    def _node(self, dotted: str) -> tuple[dict | None, str]:
        *parents, leaf = dotted.split(".")
        node = _get(self.config, ".".join(parents)) if parents else self.config
        return (node if isinstance(node, dict) else None), leaf

    def fill_match(self, dotted: str, value: Any, cell_key: str) -> None:
        node, leaf = self._node(dotted)
        if node is None or leaf not in node:
            return
        if node[leaf] == AUTO:
            node[leaf] = value
            self.filled.append(f"{dotted} = {value!r} (from {cell_key})")
        elif not _same(node[leaf], value):
            self.mismatches.append(f"{dotted} is {node[leaf]!r} in the file but the cell's {cell_key} gives {value!r}")

    def fill_only(self, dotted: str, value: Any, why: str) -> None:
        node, leaf = self._node(dotted)
        if node is not None and node.get(leaf) == AUTO:
            node[leaf] = value
            self.filled.append(f"{dotted} = {value!r} ({why})")

    def fill_or_keep(self, dotted: str, value: Any, why: str) -> None:
        """fill_only for a key no matrix setting governs; an explicit value is kept and said so."""
        self.fill_only(dotted, value, why)
        node, leaf = self._node(dotted)
        if node is not None and leaf in node and not _same(node[leaf], value):
            self.kept.append(f"{dotted} = {node[leaf]!r} kept as the file gives it (no matrix setting for it)")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return str(a).lower() == str(b).lower()
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


def resolve_deepspeed(ds: dict, cell: CellSettings, source: str) -> tuple[dict, list[str]]:
    """Fill the DeepSpeed JSON's "auto" values from the cell, the way accelerate and the HF Trainer do."""
    check_shape(ds, source)
    t = cell.train
    config, renamed = _bf16_spelling(copy.deepcopy(ds))
    f = _Filler(config)
    for dotted, value in _ACCELERATE_FILLS.items():  # DeepSpeedPlugin.__post_init__'s fill_match of its defaults
        f.fill_only(dotted, value, "accelerate's DeepSpeedPlugin default, as no accelerate setting gives it")
    # trainer_config_process
    f.fill_match("train_micro_batch_size_per_gpu", t.micro_batch, "train.micro_batch")
    f.fill_match("gradient_accumulation_steps", t.grad_accum, "train.grad_accum")
    # DeepSpeed's train_batch_size spans every rank of every node (the Trainer's world_size)
    f.fill_match("train_batch_size", cell.processes * t.micro_batch * t.grad_accum,
                 "nodes * gpus * micro_batch * grad_accum")
    f.fill_match("gradient_clipping", t.max_grad_norm, "train.max_grad_norm")
    f.fill_match("optimizer.params.lr", t.lr, "train.lr")
    # The Trainer matches these against TrainingArguments the user sets (adam_beta1/2, adam_epsilon); a matrix
    # has no such setting, so an explicit value is the user's choice and kept, "auto" gets the Trainer default.
    f.fill_or_keep("optimizer.params.betas", [0.9, 0.999], "Trainer default adam_beta1+adam_beta2")
    f.fill_or_keep("optimizer.params.eps", 1e-8, "Trainer default adam_epsilon")
    f.fill_match("optimizer.params.weight_decay", t.weight_decay, "train.weight_decay")
    f.fill_only("scheduler.params.warmup_min_lr", 0, "Trainer default")
    f.fill_match("scheduler.params.warmup_max_lr", t.lr, "train.lr")
    f.fill_match("fp16.enabled", t.precision == "fp16", "train.precision")
    f.fill_match("bf16.enabled", t.precision == "bf16", "train.precision")
    # With a bf16 block DeepSpeed reads no bfloat16 one: its "auto" is filled alike, so that no block is left empty.
    f.fill_only("bfloat16.enabled", t.precision == "bf16", "train.precision; DeepSpeed reads the bf16 block first")
    added = _add_precision_block(f.config, t.precision)
    _finalize(f, cell)
    problems = []
    if f.mismatches:
        problems.append("values that disagree with the cell's settings:\n    " + "\n    ".join(f.mismatches)
                        + "\n  Fix: set these keys to \"auto\" in the file, or change the matrix to match")
    if not {"train_batch_size", "train_micro_batch_size_per_gpu"} & set(f.config):
        # Neither the Trainer nor accelerate adds a key the file lacks: DeepSpeed would stop at start-up.
        problems.append("the file gives neither train_micro_batch_size_per_gpu nor train_batch_size, and DeepSpeed "
                        "needs one (it stops at start-up: 'Either train_batch_size or train_micro_batch_size_per_gpu "
                        "needs to be provided'). Fix: add \"train_micro_batch_size_per_gpu\": \"auto\" (filled from "
                        "train.micro_batch, as the Trainer fills it from per_device_train_batch_size)")
    problems += _zero_section_rejected(f.config)
    if problems:
        raise MatrixError(f"strategy {source!r}: " + "\n  ".join(problems))
    defaulted = [_drop_auto(f.config, dotted) for dotted in _autos_left(f.config)]
    return f.config, renamed + [f"filled {x}" for x in f.filled] + f.kept + added + defaulted


def _finalize(f: _Filler, cell: CellSettings) -> None:
    """trainer_config_finalize: sizes from the model's hidden size, the schedule from the step count."""
    t = cell.train
    hidden = models.config_dict(cell.model)["hidden_size"]
    f.fill_only("zero_optimization.reduce_bucket_size", hidden * hidden, f"hidden_size^2, hidden_size {hidden}")
    if _get(f.config, "zero_optimization.stage") == 3:
        # DeepSpeed reads both spellings (stage3_x is the alias of x); the Trainer's rule applies to either.
        for key in ("stage3_prefetch_bucket_size", "prefetch_bucket_size"):
            f.fill_only(f"zero_optimization.{key}", int(0.9 * hidden * hidden), "0.9 * hidden_size^2")
        for key in ("stage3_param_persistence_threshold", "param_persistence_threshold"):
            f.fill_only(f"zero_optimization.{key}", 10 * hidden, "10 * hidden_size")
    # The timed steps' number is decided while running (bench/worker/timing.py): the schedule spans the most a cell
    # may take, so that the learning rate never reaches its end inside the timed window.
    total = t.warmup_steps + t.timing.max_steps
    f.fill_match("scheduler.params.total_num_steps", total, "train.warmup_steps + train.timing.max_steps")
    # The benchmark has no learning-rate warm-up setting; DeepSpeed >= 0.19.6 rejects 0, the Trainer fills
    # max(1, 0). An explicit count (the Trainer's warmup_steps) is the user's and kept: it shapes the rate only.
    f.fill_or_keep("scheduler.params.warmup_num_steps", 1, "no lr warm-up (Trainer fills max(1, warmup))")


def _bf16_spelling(config: dict) -> tuple[dict, list[str]]:
    """A `bfloat16` block without a `bf16` one is DeepSpeed's older spelling of it: written as `bf16` (DeepSpeed
    reads either, bf16 first), so that the bf16 rules fill it and accelerate finds it instead of adding its own."""
    if "bfloat16" not in config or "bf16" in config:
        return config, []
    renamed = {("bf16" if key == "bfloat16" else key): value for key, value in config.items()}
    return renamed, ["bfloat16 block written as bf16: DeepSpeed reads either spelling (bf16 first), and accelerate "
                     "would add a bf16 block beside a bfloat16 one"]


def _add_precision_block(config: dict, precision: str) -> list[str]:
    """The half-precision block a file lacks, added as accelerate does (DeepSpeedPlugin.set_mixed_precision)
    when the Trainer's --bf16/--fp16 meets a JSON without it; else DeepSpeed would train in fp32."""
    block = {"bf16": {"enabled": True}, "fp16": {"enabled": True, "auto_cast": True}}.get(precision)
    if block is None or precision in config:
        return []
    config[precision] = block
    return [f"{precision} = {block!r} added: the file has no {precision} block and train.precision is {precision} "
            "(accelerate adds it for mixed_precision the same way)"]


def _drop_auto(config: dict, dotted: str) -> str:
    """Remove an "auto" no fill rule covers, as DeepSpeed's config models do (they drop "auto" values and
    keep their own default); the note names that default where DeepSpeed's model declares it."""
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node[key]
    del node[leaf]
    default = _deepspeed_default(parents, leaf)
    shown = f" ({default!r})" if default is not None else ""
    return f"{dotted}: \"auto\" left to DeepSpeed's own default{shown}, as DeepSpeed does with an \"auto\" no rule fills"


def _deepspeed_default(parents: list[str], leaf: str):
    """DeepSpeed's default for a ZeRO key (by name or its stage3_ alias); None where not known here."""
    if parents != ["zero_optimization"]:
        return None
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:
        return None
    for name, field in DeepSpeedZeroConfig.model_fields.items():
        if leaf in (name, field.alias):
            default = field.default  # DeepSpeed's pp_int prints with thousands separators: show a plain int
            return int(default) if isinstance(default, int) and not isinstance(default, bool) else default
    return None


def _zero_section_rejected(config: dict) -> list[str]:
    """What DeepSpeed's own model of the zero_optimization section refuses (it would stop at start-up), said
    before launch; nothing where DeepSpeed is not installed here (a dry run on a laptop)."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from pydantic import ValidationError
    except ImportError:
        return []
    zero = {k: v for k, v in (config.get("zero_optimization") or {}).items() if v != AUTO}  # "auto": dropped below
    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as e:
        return [f"zero_optimization.{'.'.join(map(str, err['loc']))} is {err['input']!r}, which DeepSpeed refuses "
                f"({err['msg']}). Fix: give a value DeepSpeed accepts" for err in e.errors()]
    except (ValueError, AssertionError) as e:  # DeepSpeed's own checks across keys
        return [f"zero_optimization: DeepSpeed refuses it ({e}). Fix: give values DeepSpeed accepts"]
    return []


def _autos_left(d: Any, prefix: str = "") -> list[str]:
    if isinstance(d, dict):
        return [k for key, v in d.items() for k in _autos_left(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if d == AUTO else []
