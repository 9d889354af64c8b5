"""Users' own configs as the strategy: a DeepSpeed JSON or an accelerate config YAML, run unmodified.

A file is read, its shape checked (a mapping where one is needed, a ZeRO stage 0-3, an FSDP sharding strategy
and version accelerate knows, a distributed_type bench runs) and described as a Strategy; its ``"auto"``
values are filled from the cell as the user's stack fills them (bench/strategies/deepspeed_auto.py). A JSON's
own optimizer and scheduler blocks are kept (DeepSpeed builds them) and the record's strategy_info says so.
The plan writes the resolved files into the cell's folder beside a copy of the original (``original_<name>``).
Whatever is wrong with a user's file is a MatrixError naming the file, the key and the fix: the cell it is
the strategy of is then recorded ``unsupported`` with the reason (bench/strategies/runnable.py), and no
exception from reading a file of a shape not foreseen escapes as a traceback (``_read_guard``).
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from bench.spec import CellSettings, MatrixError
from bench.strategies.deepspeed_auto import AUTO, check_shape, offload_device, resolve_deepspeed, zero_stage
from bench.strategies.strategy import FSDP1_SHARDING, Strategy

_FIX = "Fix: give the path of a DeepSpeed JSON (.json) or an accelerate config written by `accelerate config` (.yaml)"


# ---------------------------------------------------------------- reading

@contextmanager
def _read_guard(path: str):
    """The second guard: a file of a shape the checks below did not foresee is still the cell's MatrixError
    naming the file, never a traceback that stops the whole matrix."""
    try:
        yield
    except MatrixError:
        raise
    except Exception as e:  # noqa: BLE001 - anything a user's file can make the reading code raise
        raise MatrixError(f"strategy {path!r}: bench cannot read this file ({type(e).__name__}: {e}). Fix: compare "
                          "it with a file `accelerate config` writes, or with DeepSpeed's configuration documentation "
                          "for a JSON") from e


def _read_text(path: Path, source: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MatrixError(f"strategy {source!r}: {str(path)!r} is not a text file (byte {e.start} is not UTF-8). "
                          f"{_FIX}") from None


def load_user_config(path: str) -> dict[str, Any]:
    """The file's content as a dict; MatrixError naming the key (strategy) and the fix otherwise."""
    p = Path(path)
    if not p.is_file():
        raise MatrixError(f"strategy {path!r}: no such file. {_FIX}")
    text = _read_text(p, path)
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
    p = Path(str(name))
    if not p.is_absolute() and not p.is_file():
        p = Path(yaml_path).parent / p
    return p


# ---------------------------------------------------------------- an accelerate YAML's shape

# What bench launches of accelerate's distributed types; the others (TPUs, other accelerators, Megatron-LM)
# accelerate knows but bench does not run.
_RUN_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP")
_FSDP_SHARDING_BY_NUMBER = ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"]
_PRECISIONS = ("no", "fp16", "bf16", "fp8")  # accelerate's PrecisionType


def _accelerate_types() -> list[str]:
    try:
        from accelerate.utils import DistributedType
    except ImportError:  # a dry run on a machine without accelerate: what bench runs is known anyway
        return list(_RUN_TYPES)
    return [t.value for t in DistributedType]


def _distributed_type(accel: dict) -> str:
    """accelerate's distributed_type, upper-cased (NO where absent); call after accelerate_problems."""
    return str(accel.get("distributed_type", "NO")).upper()


def _mixed_precision(accel: dict) -> str | None:
    """mixed_precision as accelerate means it: YAML reads an unquoted `no` as False, which means "no"."""
    mp = accel.get("mixed_precision")
    return "no" if mp is False else mp


def accelerate_problems(accel: dict) -> list[str]:
    """Every key of an accelerate config that accelerate or bench cannot take, each with its fix."""
    out = []
    kind = _distributed_type(accel)
    if kind not in _accelerate_types():
        out.append(f"distributed_type is {accel.get('distributed_type')!r}, which accelerate does not know. "
                   f"Fix: use one of {', '.join(_RUN_TYPES)}")
    elif kind not in _RUN_TYPES:
        out.append(f"distributed_type {kind} is not run by bench (it launches CPU and CUDA processes). "
                   f"Fix: use one of {', '.join(_RUN_TYPES)}")
    mp = _mixed_precision(accel)
    if mp is not None and mp not in _PRECISIONS:
        out.append(f"mixed_precision is {accel.get('mixed_precision')!r}, which accelerate does not know. "
                   f"Fix: use one of {', '.join(_PRECISIONS)} (quoted: 'no' unquoted is read as false)")
    # accelerate reads a section only for its own distributed_type: another type's section is left alone, as there.
    section, example = {"FSDP": ("fsdp_config", "fsdp_version: 2"),
                        "DEEPSPEED": ("deepspeed_config", "zero_stage: 2")}.get(kind, (None, None))
    if section and accel.get(section) is not None and not isinstance(accel[section], dict):
        out.append(f"{section} is {accel[section]!r}, not a mapping of keys. Fix: write it as `accelerate "
                   f"config` does, one key per line indented under {section}: (e.g. {example})")
    elif section == "fsdp_config":
        out += _fsdp_problems(accel.get(section) or {})
    elif section == "deepspeed_config":
        stage = (accel.get(section) or {}).get("zero_stage")
        if stage is not None and (isinstance(stage, bool) or str(stage) not in ("0", "1", "2", "3")):
            out.append(f"deepspeed_config.zero_stage is {stage!r}; DeepSpeed's ZeRO stages are 0, 1, 2 and 3. "
                       "Fix: zero_stage: 0, 1, 2 or 3")
    return out


def _fsdp_problems(fsdp: dict) -> list[str]:
    out = []
    version = fsdp.get("fsdp_version")
    if version is not None and (isinstance(version, bool) or str(version) not in ("1", "2")):
        out.append(f"fsdp_config.fsdp_version is {version!r}; accelerate has FSDP versions 1 and 2. "
                   "Fix: fsdp_version: 1 or fsdp_version: 2")
    if "fsdp_sharding_strategy" in fsdp:  # read by accelerate under either version
        try:
            _fsdp_sharding_name(fsdp["fsdp_sharding_strategy"])
        except MatrixError as e:
            out.append(str(e))
    return out


def _check_accelerate(accel: dict, path: str) -> None:
    if problems := accelerate_problems(accel):
        raise MatrixError(f"strategy {path!r}: " + "\n  ".join(problems))


def _fsdp_sharding_name(value: Any) -> str:
    """`accelerate config` writes the name; older files hold its number (1 = FULL_SHARD ... 5), as accelerate reads."""
    if not isinstance(value, bool) and str(value).isdigit() and 1 <= int(value) <= len(_FSDP_SHARDING_BY_NUMBER):
        return _FSDP_SHARDING_BY_NUMBER[int(value) - 1]
    name = str(value).upper()
    if name not in FSDP1_SHARDING:
        numbered = ", ".join(f"{i} = {n}" for i, n in enumerate(_FSDP_SHARDING_BY_NUMBER, 1))
        raise MatrixError(f"fsdp_config.fsdp_sharding_strategy is {value!r}, which FSDP does not have. "
                          f"Fix: use one of {', '.join(FSDP1_SHARDING)} (or its number: {numbered})")
    return name


# ---------------------------------------------------------------- describing

def describe_user_config(path: str) -> Strategy:
    """A catalogue-like Strategy read from the file: family, ZeRO stage, offload, sharding."""
    with _read_guard(path):
        data = load_user_config(path)
        if _is_deepspeed_json(path):
            return _describe_ds(path, data, path)
        _check_accelerate(data, path)
        kind = _distributed_type(data)
        if kind == "DEEPSPEED":
            linked = _linked_ds_path(data, path)
            ds = load_user_config(str(linked)) if linked else _inline_ds(data)
            return _describe_ds(path, ds, str(linked or path))
        if kind == "FSDP":
            return _describe_fsdp(path, data.get("fsdp_config") or {})
        if kind in ("MULTI_GPU", "MULTI_CPU"):
            return Strategy(path, "torch", f"user accelerate config {Path(path).name}: DDP")
        return Strategy(path, "torch", f"user accelerate config {Path(path).name}: one process", single_process=True)


def deepspeed_config_as_written(path: str) -> dict | None:
    """The DeepSpeed config a user's file holds, "auto" values unresolved: the JSON itself, the JSON an accelerate
    YAML links, or the one accelerate builds from its inline keys; None for an accelerate config of another kind.
    For what no "auto" fills (``overlap_comm``: read by the estimator), without importing DeepSpeed."""
    with _read_guard(path):
        data = load_user_config(path)
        if _is_deepspeed_json(path):
            return data
        if _distributed_type(data) != "DEEPSPEED":
            return None
        linked = _linked_ds_path(data, path)
        return load_user_config(str(linked)) if linked else _inline_ds(data)


def _describe_ds(path: str, ds: dict, source: str) -> Strategy:
    check_shape(ds, source)
    stage = zero_stage(ds)
    off_opt = offload_device(ds, "offload_optimizer") != "none"
    off_par = offload_device(ds, "offload_param") != "none"
    offloaded = [what for what, on in (("optimizer", off_opt), ("parameters", off_par)) if on]
    summary = f"user DeepSpeed config {Path(path).name}: ZeRO-{stage}" + (
        f", {' and '.join(offloaded)} offloaded to the CPU" if offloaded else "")
    return Strategy(path, "deepspeed", summary, shard_level=stage, offload_optimizer=off_opt, offload_params=off_par)


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


# ---------------------------------------------------------------- resolving an accelerate YAML

def _inline_ds(accel: dict) -> dict:
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
    mp = _mixed_precision(accel)
    config["bf16"] = {"enabled": AUTO if mp is None else mp == "bf16"}
    config["fp16"] = {"enabled": AUTO if mp is None else mp == "fp16"}
    return config


def _resolve_accelerate(cell: CellSettings, cell_dir: Path) -> tuple[dict, dict | None, list[str], dict[str, str]]:
    path = cell.strategy
    accel = copy.deepcopy(load_user_config(path))
    _check_accelerate(accel, path)
    notes: list[str] = []
    originals: dict[str, str] = {}
    # num_processes counts every rank of every machine; the cell's own launch (here or a Slurm job) starts
    # them, so that the file runs as the catalogue's strategies do (bench/strategies/render.py).
    for key, value, why in (("num_processes", cell.processes, "the cell's nodes * gpus"),
                            ("num_machines", 1, "a Slurm launch gives --num_machines per node")):
        if accel.get(key) != value:
            notes.append(f"{key} {accel.get(key)!r} -> {value} ({why})")
            accel[key] = value
    if cell.device == "cpu":
        notes += _cpu_adjustments(accel)
    if accel.get("mixed_precision") is False:
        notes.append("mixed_precision False (YAML's reading of an unquoted no) taken as 'no'; `accelerate launch` "
                     "without --mixed_precision stops on it ('bool' object has no attribute 'lower'): quote it, 'no'")
    mp = _mixed_precision(accel)
    want = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[cell.train.precision]
    if _distributed_type(accel) != "DEEPSPEED":
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
        originals[f"original_{linked.name}"] = _read_text(linked, path)
        notes.append(f"deepspeed_config_file {linked} -> resolved copy deepspeed.json")
    else:
        ds_source = path
        ds_in = _inline_ds(accel)
        notes.append("inline deepspeed_config turned into deepspeed.json, as accelerate's DeepSpeedPlugin builds it")
    ds, filled = resolve_deepspeed(ds_in, cell, ds_source)
    zero3_init = (accel.get("deepspeed_config") or {}).get("zero3_init_flag", zero_stage(ds) == 3)
    accel["deepspeed_config"] = {"deepspeed_config_file": str(cell_dir / "deepspeed.json"), "zero3_init_flag": zero3_init}
    # With a config file accelerate refuses precision set twice: the JSON owns it.
    accel.pop("mixed_precision", None)
    return accel, ds, notes + filled, originals


def _cpu_adjustments(accel: dict) -> list[str]:
    """On a CPU machine accelerate needs MULTI_GPU + ACCELERATE_USE_CPU (MULTI_CPU would want mpirun)."""
    notes = []
    if _distributed_type(accel) == "MULTI_CPU":
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
    with _read_guard(path):
        data = load_user_config(path)  # first: its message names what is wrong with the file
        originals = {f"original_{Path(path).name}": _read_text(Path(path), path)}
        if not _is_deepspeed_json(path):
            accel, ds, notes, linked = _resolve_accelerate(cell, cell_dir)
            return accel, ds, notes, {**originals, **linked}
        from bench.strategies.render import accelerate_config

        ds, notes = resolve_deepspeed(data, cell, path)
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
    """Why the cell's user config cannot run (missing, unreadable, of the wrong shape, mismatching the cell), or None."""
    try:
        resolve_with_originals(cell, Path("cell"))
    except MatrixError as e:
        return str(e)
    return None
