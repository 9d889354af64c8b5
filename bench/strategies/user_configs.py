"""Users' own configs as the strategy: a DeepSpeed JSON or an accelerate config YAML, run unmodified.

Files as HF Trainer and axolotl ship them hold ``"auto"`` values; the Trainer fills them from its
TrainingArguments and the model (``HfTrainerDeepSpeedConfig.trainer_config_process`` / ``_finalize``).
Here the cell's settings play the part of the TrainingArguments, with the same rules: an ``"auto"`` is
filled, an explicit value that disagrees with the cell is an error (as the Trainer raises on a mismatch),
anything else is left exactly as the user wrote it. DeepSpeed accepts two spellings of some ZeRO-3 keys
(``stage3_prefetch_bucket_size`` and ``prefetch_bucket_size``): the Trainer's rules fill either. An "auto"
no rule fills is dropped, as DeepSpeed's own config models drop it to keep their default; the notes say
which default. A JSON's own optimizer and scheduler blocks are kept (DeepSpeed builds them) and the
record's strategy_info says so. Keys the Trainer matches against arguments a matrix does not have (Adam's
betas and eps, the scheduler's warm-up steps) keep an explicit value; a missing bf16/fp16 block is added for
the cell's precision, as accelerate adds it; a file without any batch size key, or with a ZeRO value
DeepSpeed's own config model refuses, is refused before launch (DeepSpeed would stop at start-up). The plan writes the resolved files into the cell's
folder beside a copy of the original (``original_<name>``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from bench.spec import CellSettings, MatrixError, models
from bench.strategies.strategy import FSDP1_SHARDING, Strategy

AUTO = "auto"
_FIX = "Fix: give the path of a DeepSpeed JSON (.json) or an accelerate config written by `accelerate config` (.yaml)"


# ---------------------------------------------------------------- reading

def load_user_config(path: str) -> dict[str, Any]:
    """The file's content as a dict; MatrixError naming the key (strategy) and the fix otherwise."""
    p = Path(path)
    if not p.is_file():
        raise MatrixError(f"strategy {path!r}: no such file. {_FIX}")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if p.suffix == ".json" else "YAML"
        raise MatrixError(f"strategy {path!r}: invalid {kind}: {e}. Fix: correct the file's syntax") from e
    if not isinstance(data, dict):
        raise MatrixError(f"strategy {path!r}: the file must hold a mapping of keys. {_FIX}")
    return data


def _is_deepspeed_json(path: str) -> bool:
    return path.endswith(".json")


def _linked_ds_path(accel: dict, yaml_path: str) -> Path | None:
    """The DeepSpeed JSON an accelerate YAML points to; relative paths are tried from the cwd, then the YAML's folder."""
    name = (accel.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if not name or name == "none":
        return None
    p = Path(name)
    if not p.is_absolute() and not p.is_file():
        p = Path(yaml_path).parent / name
    return p


# ---------------------------------------------------------------- describing

def describe_user_config(path: str) -> Strategy:
    """A catalogue-like Strategy read from the file: family, ZeRO stage, offload, sharding."""
    data = load_user_config(path)
    if _is_deepspeed_json(path):
        return _describe_ds(path, data)
    kind = str(data.get("distributed_type", "NO")).upper()
    if kind == "DEEPSPEED":
        linked = _linked_ds_path(data, path)
        ds = load_user_config(str(linked)) if linked else _inline_ds(data, None)
        return _describe_ds(path, ds)
    if kind == "FSDP":
        return _describe_fsdp(path, data.get("fsdp_config") or {})
    if kind in ("MULTI_GPU", "MULTI_CPU"):
        return Strategy(path, "torch", f"user accelerate config {Path(path).name}: DDP")
    return Strategy(path, "torch", f"user accelerate config {Path(path).name}: one process", single_process=True)


def _describe_ds(path: str, ds: dict) -> Strategy:
    zero = ds.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    off_opt = _offload_device(zero.get("offload_optimizer")) not in (None, "none")
    off_par = _offload_device(zero.get("offload_param")) not in (None, "none")
    offloaded = [what for what, on in (("optimizer", off_opt), ("parameters", off_par)) if on]
    summary = f"user DeepSpeed config {Path(path).name}: ZeRO-{stage}" + (
        f", {' and '.join(offloaded)} offloaded to the CPU" if offloaded else "")
    return Strategy(path, "deepspeed", summary, shard_level=stage, offload_optimizer=off_opt, offload_params=off_par)


def _offload_device(section: Any) -> str | None:
    return section.get("device") if isinstance(section, dict) else None


def _describe_fsdp(path: str, fsdp: dict) -> Strategy:
    version = int(fsdp.get("fsdp_version", 1))
    offload = bool(fsdp.get("fsdp_offload_params", False))
    if version == 2:
        reshard = bool(fsdp.get("fsdp_reshard_after_forward", True))
        return Strategy(path, "fsdp2", f"user accelerate config {Path(path).name}: FSDP2",
                        shard_level=3, reshard_after_forward=reshard, offload_params=offload)
    sharding = _fsdp_sharding_name(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD"))
    level, scope = FSDP1_SHARDING[sharding]
    return Strategy(path, "fsdp1", f"user accelerate config {Path(path).name}: FSDP {sharding}",
                    shard_level=level, shard_scope=scope, offload_params=offload)


def _fsdp_sharding_name(value: Any) -> str:
    """`accelerate config` writes the name; older files hold its number (1 = FULL_SHARD ...)."""
    names = ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"]
    if isinstance(value, int) or str(value).isdigit():
        return names[int(value) - 1]
    name = str(value).upper()
    if name not in FSDP1_SHARDING:
        raise MatrixError(f"fsdp_config.fsdp_sharding_strategy is {value!r}, which FSDP does not have. "
                          f"Fix: use one of {', '.join(FSDP1_SHARDING)}")
    return name


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
        node = self.config
        for key in parents:
            node = node.get(key)
            if not isinstance(node, dict):
                return None, leaf
        return node, leaf

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
    """Fill the DeepSpeed JSON's "auto" values from the cell, the way the HF Trainer does."""
    t = cell.train
    f = _Filler(copy.deepcopy(ds))
    # trainer_config_process
    f.fill_match("train_micro_batch_size_per_gpu", t.micro_batch, "train.micro_batch")
    f.fill_match("gradient_accumulation_steps", t.grad_accum, "train.grad_accum")
    f.fill_match("train_batch_size", cell.gpus * t.micro_batch * t.grad_accum, "gpus * micro_batch * grad_accum")
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
    added = _add_precision_block(f.config, t.precision)
    # trainer_config_finalize: sizes from the model's hidden size, the schedule from the step count
    hidden = models.config_dict(cell.model)["hidden_size"]
    f.fill_only("zero_optimization.reduce_bucket_size", hidden * hidden, f"hidden_size^2, hidden_size {hidden}")
    if int((f.config.get("zero_optimization") or {}).get("stage", 0)) == 3:
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
    return f.config, [f"filled {x}" for x in f.filled] + f.kept + added + defaulted


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


# ---------------------------------------------------------------- accelerate YAML

_INLINE_DS_KEYS = {"gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
                   "offload_param_device", "offload_optimizer_nvme_path", "offload_param_nvme_path",
                   "zero3_save_16bit_model"}


def _inline_ds(accel: dict, cell: CellSettings | None) -> dict:
    """The DeepSpeed config accelerate builds from inline `deepspeed_config` keys (DeepSpeedPlugin.__post_init__)."""
    d = accel.get("deepspeed_config") or {}
    config: dict[str, Any] = {
        "train_batch_size": AUTO,
        "train_micro_batch_size_per_gpu": AUTO,
        "gradient_accumulation_steps": d.get("gradient_accumulation_steps", AUTO),
        "zero_optimization": {
            "stage": int(d.get("zero_stage", 2)),
            "offload_optimizer": {"device": d.get("offload_optimizer_device", "none")},
            "offload_param": {"device": d.get("offload_param_device", "none")},
            "stage3_gather_16bit_weights_on_model_save": bool(d.get("zero3_save_16bit_model", False)),
        },
        "gradient_clipping": d.get("gradient_clipping", AUTO),
    }
    mp = accel.get("mixed_precision")
    config["bf16"] = {"enabled": AUTO if mp is None else mp == "bf16"}
    config["fp16"] = {"enabled": AUTO if mp is None else mp == "fp16"}
    return config


def _resolve_accelerate(cell: CellSettings, cell_dir: Path) -> tuple[dict, dict | None, list[str], dict[str, str]]:
    path = cell.strategy
    accel = copy.deepcopy(load_user_config(path))
    notes: list[str] = []
    originals: dict[str, str] = {}
    if accel.get("num_processes") != cell.gpus:
        notes.append(f"num_processes {accel.get('num_processes')!r} -> {cell.gpus} (the cell's gpus)")
        accel["num_processes"] = cell.gpus
    accel.setdefault("num_machines", 1)
    if cell.device == "cpu":
        notes += _cpu_adjustments(accel)
    mp = accel.get("mixed_precision")
    want = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[cell.train.precision]
    if str(accel.get("distributed_type", "NO")).upper() != "DEEPSPEED":
        if mp is not None and mp != want:
            raise MatrixError(f"strategy {path!r}: mixed_precision is {mp!r} in the file but the cell's "
                              f"train.precision gives {want!r}. Fix: change one to match")
        accel["mixed_precision"] = want
        return accel, None, notes, originals
    linked = _linked_ds_path(accel, path)
    if linked is not None:
        ds_source = str(linked)
        if not linked.is_file():
            raise MatrixError(f"strategy {path!r}: deepspeed_config.deepspeed_config_file {str(linked)!r}: no such file. "
                              "Fix: give a path that exists (relative to the working folder or to the YAML)")
        ds_in = load_user_config(ds_source)
        originals[f"original_{linked.name}"] = linked.read_text()
        notes.append(f"deepspeed_config_file {linked} -> resolved copy deepspeed.json")
    else:
        ds_source = path
        ds_in = _inline_ds(accel, cell)
        notes.append("inline deepspeed_config turned into deepspeed.json, as accelerate's DeepSpeedPlugin builds it")
    ds, filled = resolve_deepspeed(ds_in, cell, ds_source)
    zero3_init = (accel.get("deepspeed_config") or {}).get("zero3_init_flag", ds["zero_optimization"].get("stage") == 3)
    accel["deepspeed_config"] = {"deepspeed_config_file": str(cell_dir / "deepspeed.json"), "zero3_init_flag": zero3_init}
    # With a config file accelerate refuses precision set twice: the JSON owns it.
    accel.pop("mixed_precision", None)
    return accel, ds, notes + filled, originals


def _cpu_adjustments(accel: dict) -> list[str]:
    """On a CPU machine accelerate needs MULTI_GPU + ACCELERATE_USE_CPU (MULTI_CPU would want mpirun)."""
    notes = []
    if str(accel.get("distributed_type")).upper() == "MULTI_CPU":
        accel["distributed_type"] = "MULTI_GPU"
        notes.append("distributed_type MULTI_CPU -> MULTI_GPU with ACCELERATE_USE_CPU=1 (CPU ranks over gloo, no mpirun)")
    for key in ("use_cpu", "gpu_ids"):
        if key in accel:
            notes.append(f"{key} {accel.pop(key)!r} dropped on CPU (the plan sets ACCELERATE_USE_CPU=1)")
    return notes


# ---------------------------------------------------------------- the entry points

def resolve_user_config(cell: CellSettings, cell_dir: Path) -> tuple[dict, dict | None, list[str]]:
    """(accelerate config, DeepSpeed config or None, notes) for a cell whose strategy is a user file."""
    accel, ds, notes, _ = resolve_with_originals(cell, cell_dir)
    return accel, ds, notes


def resolve_with_originals(cell: CellSettings, cell_dir: Path) -> tuple[dict, dict | None, list[str], dict[str, str]]:
    """As resolve_user_config, plus {original_<name>: text} of every user file, for the cell folder."""
    path = cell.strategy
    originals = {f"original_{Path(path).name}": Path(path).read_text()} if Path(path).is_file() else {}
    if not _is_deepspeed_json(path):
        accel, ds, notes, linked = _resolve_accelerate(cell, cell_dir)
        return accel, ds, notes, {**originals, **linked}
    from bench.strategies.render import accelerate_config

    ds, notes = resolve_deepspeed(load_user_config(path), cell, path)
    accel = accelerate_config(describe_user_config(path), cell, cell_dir / "deepspeed.json")
    return accel, ds, [f"DeepSpeed JSON {path} used as the cell's deepspeed.json"] + notes, originals


def deepspeed_own_blocks(cell: CellSettings) -> dict[str, str]:
    """What a user's DeepSpeed JSON brings of its own: its optimizer and scheduler blocks replace the cell's
    train.optimizer (DeepSpeed builds them; the worker hands accelerate a DummyOptim). For the record."""
    _, ds, _, _ = resolve_with_originals(cell, Path("cell"))
    own = {}
    if ds and isinstance(ds.get("optimizer"), dict):
        own["optimizer"] = (f"DeepSpeed {ds['optimizer'].get('type')} from the JSON's optimizer block "
                            f"(train.optimizer {cell.train.optimizer!r} not used)")
    if ds and isinstance(ds.get("scheduler"), dict):
        own["scheduler"] = f"DeepSpeed {ds['scheduler'].get('type')} from the JSON's scheduler block"
    return own


def check_user_config(cell: CellSettings) -> str | None:
    """Why the cell's user config cannot run (missing, unreadable, mismatching the cell), or None."""
    try:
        resolve_with_originals(cell, Path("cell"))
    except MatrixError as e:
        return str(e)
    return None
