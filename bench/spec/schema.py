"""Matrix files: the typed schema, full validation before launch, grid expansion into cells.

A matrix file gives defaults for every setting of a cell plus a ``grid`` whose keys may be any
setting (``strategy``, ``gpus``, ``model``, ``seq_len``, ``adapter.r``, ``adapter`` as a whole ...).
The product of the grid, less ``exclude`` rules, plus ``include`` cells, gives the cells; each cell is a
frozen :class:`CellSettings` whose id is a hash of its resolved settings.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bench import models, strategies


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
                raise ValueError(f"use 'all-linear' or a list of module names from {sorted(names)}")
            return v
        unknown = set(v) - names
        if unknown or not v:
            raise ValueError(f"unknown target modules {sorted(unknown)}; choose from {sorted(names)}")
        return tuple(v)


class Timing(_Strict):
    """When a cell stops timing (bench/timing.py): the median step time's interval within ±ci_target, or a cap.

    Defaults sized for the 10-cell Llama-3.1-8B LoRA matrix on 2 H200 (about 1.2 s a step, 13-20 s of
    start-up a launch, 2 warm-up steps) to finish within 15 minutes: 10 x (~25 s start-up, warm-up and
    teardown + at most 60 s timed + one step past the cap) ~ 14.5 min. At 1.2 s a step the time cap binds
    (~50 steps); max_steps binds for fast steps (a 1B model at ~0.16 s: 300 steps ~ 48 s).
    """

    ci_target: float = Field(0.01, gt=0, lt=1, description="relative half-width of the median's interval to stop at")
    confidence: float = Field(0.95, ge=0.5, lt=1, description="confidence of that interval")
    max_steps: int = Field(300, gt=0, description="timed steps at most (train.steps is the minimum)")
    max_timed_s: float = Field(60.0, gt=0, description="timed seconds at most, once train.steps are done")


class Train(_Strict):
    seq_len: int = Field(512, gt=0)
    micro_batch: int = Field(1, gt=0)
    grad_accum: int = Field(1, gt=0)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit"] = "adamw_torch"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    grad_checkpointing: bool = False
    attn_impl: Literal["sdpa", "eager"] = "sdpa"
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


class Data(_Strict):
    source: str = "synthetic"  # "synthetic", or a local JSON lines / parquet file or saved dataset folder
    text_field: str = "text"
    tokenizer: str | None = None  # a local tokenizer folder, needed when source is a file
    padding: Literal["longest", "max_length", "pack"] = "max_length"


class CellSettings(_Strict):
    """Everything that determines one run. Its hash is the cell id."""

    model: str = "tiny-llama"
    strategy: str = "ddp"
    gpus: int = Field(1, gt=0, description="number of processes: GPUs on a GPU machine, CPU processes on CPU")
    device: Literal["cuda", "cpu"] = "cpu"
    gpu_memory_gib: float | None = Field(None, gt=0, description="per-process GPU memory cap")
    adapter: Adapter = Adapter()
    train: Train = Train()
    data: Data = Data()

    @property
    def cell_id(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        adapter = self.adapter.type if self.adapter.type != "none" else "full"
        cap = f" cap{self.gpu_memory_gib:g}G" if self.gpu_memory_gib else ""
        unit = "gpu" if self.device == "cuda" else "proc"
        return f"{self.model} {adapter} {self.strategy} x{self.gpus}{unit}{cap}"

    @property
    def setting_key(self) -> str:
        """Everything but strategy and process count: cells with equal keys are compared in scaling tables."""
        d = self.model_dump(mode="json")
        for k in ("strategy", "gpus"):
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
    device: Literal["auto", "cuda", "cpu"] = "auto"
    gpu_memory_gib: float | None = None
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

    @model_validator(mode="after")
    def _grid_lists_not_empty(self):
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{key} is an empty list: give at least one value or remove the axis")
        return self


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


# ---------------------------------------------------------------- loading and errors

# What HF Trainer, PEFT and accelerate users call these settings: a key they write by habit gets its name here.
_HABITUAL_NAMES = {
    "learning_rate": "lr", "per_device_train_batch_size": "micro_batch", "batch_size": "micro_batch",
    "train_micro_batch_size_per_gpu": "micro_batch", "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "seq_len", "max_length": "seq_len", "seq_length": "seq_len", "block_size": "seq_len",
    "gradient_checkpointing": "grad_checkpointing", "max_steps": "steps", "warmup": "warmup_steps",
    "optim": "optimizer", "gradient_clipping": "max_grad_norm",
    "attn_implementation": "attn_impl", "mixed_precision": "precision", "bf16": "precision", "fp16": "precision",
    "num_processes": "gpus", "num_gpus": "gpus", "nproc_per_node": "gpus", "lora_r": "r", "lora_alpha": "alpha",
    "lora_dropout": "dropout", "target_modules": "target", "model_name_or_path": "model",
}


def _model_at(loc: tuple) -> type[BaseModel]:
    """The schema class that holds the key at ``loc`` (Matrix, or a section such as Train)."""
    parent = ".".join(str(p) for p in loc[:-1])
    return _SECTIONS[parent] if parent in _SECTIONS else Matrix


def _closest_key(name: str, allowed: list[str]) -> str | None:
    import difflib

    if _HABITUAL_NAMES.get(name) in allowed:
        return _HABITUAL_NAMES[name]
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
    return close[0] if close else None


def _example(loc: tuple) -> str:
    """`key: default` of the field at ``loc``, to show a value of the right shape."""
    field = _model_at(loc).model_fields.get(str(loc[-1]))
    if field is None or field.default is None or isinstance(field.default, BaseModel):
        return ""
    return f", e.g. {loc[-1]}: {json.dumps(field.default) if isinstance(field.default, str) else field.default}"


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _fix_for(err: dict) -> str:
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden":
        allowed = list(_model_at(loc).model_fields)
        guess = _closest_key(str(loc[-1]), allowed)
        hint = f"did you mean {guess!r}? " if guess else ""
        return f"{hint}remove it or fix its spelling; allowed keys here: {', '.join(allowed)}"
    if kind == "literal_error":
        return f"use one of {err['ctx']['expected']}"
    if kind == "missing":
        return "add this key"
    if kind in _BOUNDS:
        limit = next(iter(err["ctx"].values()))
        return f"give a value {_BOUNDS[kind]} {limit}{_example(loc)}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"give a value of the right type ({err['msg'].lower()}){_example(loc)}"
    return err["msg"]


def format_validation_error(source: str, exc: ValidationError, where: str = "") -> str:
    lines = [f"{source}: invalid matrix{where}"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "value_error" and "Fix:" in err["msg"]:  # a validator's own message names the fix
            lines.append(f"  {key}: {err['msg'].removeprefix('Value error, ')}")
            continue
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"  {key}: {err['msg']}{got}. Fix: {_fix_for(err)}")
    return "\n".join(lines)


def load_matrix(path: str | Path) -> Matrix:
    path = Path(path)
    if not path.is_file():
        raise MatrixError(f"{path}: no such matrix file. Fix: give the path of a YAML file such as matrices/smoke.yaml")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise MatrixError(f"{path}: not a text file (byte {e.start} is not UTF-8). Fix: give a YAML matrix file, "
                          "such as matrices/smoke.yaml") from None
    except yaml.YAMLError as e:
        raise MatrixError(f"{path}: malformed YAML: {e}. Fix: correct the YAML syntax at the line shown") from e
    if not isinstance(raw, dict):
        raise MatrixError(f"{path}: a matrix file must be a mapping of keys (name, model, train, grid, ...)")
    raw.setdefault("name", path.stem)
    try:
        matrix = Matrix.model_validate(raw)
    except ValidationError as e:
        raise MatrixError(format_validation_error(str(path), e)) from e
    _check_axis_keys(str(path), matrix)
    return matrix


def _check_axis_keys(source: str, matrix: Matrix) -> None:
    for section, entries in [("grid", [matrix.grid]), ("include", matrix.include), ("exclude", matrix.exclude)]:
        for entry in entries:
            for key in entry:
                try:
                    resolve_key(key)
                except KeyError:
                    raise MatrixError(
                        f"{source}: {section}.{key}: not a setting of a cell. "
                        f"Fix: use one of {', '.join(known_keys())} (dotted names such as train.seq_len also work)"
                    ) from None


# ---------------------------------------------------------------- expansion

def detect_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _base_settings(matrix: Matrix, device: str) -> dict[str, Any]:
    base = matrix.model_dump(mode="json", include=set(CellSettings.model_fields))
    base["device"] = device
    return base


def _matches(flat: dict[str, Any], rule: dict[str, Any]) -> bool:
    for key, want in rule.items():
        path = resolve_key(key)
        if path in _SECTIONS and isinstance(want, dict):  # a whole section compared by the fields given
            if any(flat.get(k) != v for k, v in _flatten(want, f"{path}.").items()):
                return False
        elif flat.get(path) != want:
            return False
    return True


def expand(matrix: Matrix, source: str = "matrix", device: str | None = None) -> list[CellSettings]:
    """The cells of a matrix, in grid order, validated; duplicates (same id) appear once."""
    device = device or (detect_device() if matrix.device == "auto" else matrix.device)
    base = _base_settings(matrix, device)
    axes = [(resolve_key(k), v) for k, v in matrix.grid.items()]
    combos = [dict(zip([a for a, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])]
    combos += [{resolve_key(k): v for k, v in inc.items()} for inc in matrix.include]
    cells: dict[str, CellSettings] = {}
    for combo in combos:
        settings = json.loads(json.dumps(base))
        for path, value in combo.items():
            _set_path(settings, path, value)
        try:
            cell = CellSettings.model_validate(settings)
        except ValidationError as e:
            raise MatrixError(format_validation_error(source, e, f" in the cell {combo}")) from e
        if any(_matches(cell.flat(), rule) for rule in matrix.exclude) and combo not in matrix.include:
            continue
        cells.setdefault(cell.cell_id, cell)
    return list(cells.values())


def name_problem(cell: CellSettings) -> str | None:
    """A model or strategy that does not exist: a problem of the matrix file, whatever the machine."""
    if msg := models.check_model_name(cell.model) or strategies.check_strategy_name(cell.strategy):
        return msg
    if strategies.is_user_config(cell.strategy) and not Path(cell.strategy).is_file():
        return (f"strategy {cell.strategy!r}: no such file. Fix: give the path of your DeepSpeed JSON or "
                "accelerate YAML (relative to where bench runs), or a strategy name such as ddp")
    return None


def check_names(cells: list[CellSettings], source: str) -> None:
    """Refuse the matrix (MatrixError) when a cell names a model or strategy that does not exist."""
    problems = [(cell, [msg]) for cell in cells if (msg := name_problem(cell))]
    if problems:
        raise MatrixError(f"{source}: {len(problems)} cell(s) name what does not exist\n"
                          + "\n".join(collapse(problems)))


def cell_problems(cell: CellSettings, visible_gpus: int | None) -> list[str]:
    """Every reason this machine or stack cannot run the cell (an impossible combination), all at once.

    ``visible_gpus`` None plans the cell for its own target (a dry run, an estimate): the GPU count of this
    machine is then not held against it.
    """
    if msg := name_problem(cell):
        return [msg]
    out: list[str] = []
    if strategies.is_user_config(cell.strategy):
        from bench.user_configs import check_user_config

        if msg := check_user_config(cell):  # unreadable, or an explicit value that disagrees with the cell
            out.append(msg)
    try:
        strat = strategies.get(cell.strategy)
    except MatrixError:  # a user config that cannot be read: said above; the rest is checked without it
        strat = None
    if strat is not None and strat.family == "single" and cell.gpus != 1:
        out.append("strategy 'single' runs one process: set gpus: 1, or use ddp/zero*/fsdp* for more")
    if cell.device == "cpu":
        out += _cpu_problems(cell, strat)
    elif visible_gpus == 0:  # one reason for every CUDA cell, so that a whole matrix collapses to one line
        out.append("device: cuda but this machine has 0 GPU(s). Fix: run it on a GPU machine (preview it here with "
                   "--dry-run or bench estimate), or run on CPU with --device cpu")
    elif visible_gpus is not None and cell.gpus > visible_gpus:
        out.append(f"gpus: {cell.gpus} but this machine has {visible_gpus} GPU(s). "
                   f"Fix: select runnable cells with --only gpus=<n,...> or exclude them in the matrix")
    if cell.adapter.type == "qlora" and strat is not None:
        out += _qlora_problems(cell, strat)
    if cell.train.seq_len > models.config_dict(cell.model).get("max_position_embeddings", 1 << 30):
        out.append(f"train.seq_len {cell.train.seq_len} exceeds the model's max_position_embeddings")
    if cell.data.source != "synthetic":
        from bench.local_data import check_data

        if msg := check_data(cell, models.config_dict(cell.model)["vocab_size"]):
            out.append(msg)
    return out


def check_runnable(cell: CellSettings, visible_gpus: int | None) -> str | None:
    """Every reason the cell cannot run, one per line, or None."""
    return "\n".join(problems) if (problems := cell_problems(cell, visible_gpus)) else None


def _cpu_problems(cell: CellSettings, strat: strategies.Strategy | None) -> list[str]:
    out = []
    if strat is not None and not strat.runs_on_cpu:
        out.append(f"strategy {cell.strategy!r} needs GPUs (accelerate enables FSDP only on CUDA). "
                   "Fix: on CPU use single, ddp, zero1, zero2 or zero3, or exclude these cells")
    if cell.adapter.type == "qlora":
        out.append("adapter.type qlora needs a CUDA GPU (bitsandbytes 4-bit). Fix: use lora or none on CPU")
    if cell.train.optimizer == "adamw_bnb_8bit":
        out.append("train.optimizer adamw_bnb_8bit needs a CUDA GPU. Fix: use adamw_torch on CPU")
    if cell.train.precision == "fp16":
        out.append("train.precision fp16 is not supported on CPU. Fix: use bf16 or fp32")
    if cell.gpu_memory_gib:
        out.append("gpu_memory_gib caps GPU memory and needs a CUDA GPU. Fix: remove it on CPU")
    return out


def _qlora_problems(cell: CellSettings, strat: strategies.Strategy) -> list[str]:
    """QLoRA combinations bench builds (see bench/qlora.py)."""
    out = []
    if cell.train.precision != "bf16":
        out.append("adapter.type qlora computes in bf16. Fix: set train.precision: bf16")
    if models.has_local_weights(cell.model):
        out.append("adapter.type qlora builds random 4-bit weights; loading local weights in 4-bit is not supported. Fix: use a shipped config or a folder without weights")
    if strat.family == "fsdp2":
        out.append("adapter.type qlora under FSDP2 is not supported (fully_shard turns 4-bit parameters into DTensors). Fix: use fsdp_full_shard(_offload), ddp or zero3")
    if strat.family == "fsdp" and cell.adapter.quant_storage != "bf16":
        out.append("adapter.quant_storage must be bf16 under FSDP (one dtype per flat parameter, as the bf16 norms and embeddings). Fix: set adapter.quant_storage: bf16")
    return out


def unrunnable(cells: list[CellSettings], visible_gpus: int | None) -> dict[str, list[str]]:
    """cell id -> every reason it cannot run, for the cells that cannot."""
    return {cell.cell_id: problems for cell in cells if (problems := cell_problems(cell, visible_gpus))}


def validate_cells(cells: list[CellSettings], source: str, visible_gpus: int | None) -> None:
    """Refuse the whole matrix when any cell cannot run (``bench run --strict``), naming every reason."""
    check_names(cells, source)
    problems = [(cell, reasons) for cell in cells if (reasons := cell_problems(cell, visible_gpus))]
    if problems:
        raise MatrixError(f"{source}: {len(problems)} cell(s) cannot run on this machine\n"
                          + "\n".join(collapse(problems)))


def collapse(problems: list[tuple[CellSettings, list[str]]], shown: int = 3) -> list[str]:
    """Cells with the same reasons are said once, with their count: 15 identical lines help nobody."""
    groups: dict[tuple[str, ...], list[CellSettings]] = {}
    for cell, reasons in problems:
        groups.setdefault(tuple(reasons), []).append(cell)
    lines = []
    for reasons, cells in groups.items():
        who = f"cell {cells[0].cell_id} ({cells[0].label})" if len(cells) == 1 else f"{len(cells)} cells"
        said = [r.replace("\n", "\n      ") for r in reasons]
        lines.append(f"  {who}: {said[0]}" if len(said) == 1 else f"  {who}:" + "".join(f"\n    - {r}" for r in said))
        if len(cells) > 1:
            more = f" and {len(cells) - shown} more" if len(cells) > shown else ""
            lines.append(f"    ({', '.join(c.label for c in cells[:shown])}{more})")
    return lines


def check_time_budget(cells: list[CellSettings], limits: Limits, source: str) -> None:
    """The runner must not stop a cell for taking the time its settings allow.

    A cell may take up to limits.startup_s before its first step and then time up to
    train.timing.max_timed_s (plus one step past the cap, warm-up and teardown, which a timeout should
    leave room for): both must fit inside limits.timeout_s, else a slow start and a noisy card turn a cell
    that stops on its time cap into a timeout.
    """
    if not cells:
        return
    worst = max(cells, key=lambda c: c.train.timing.max_timed_s)
    need = limits.startup_s + worst.train.timing.max_timed_s
    if need > limits.timeout_s:
        raise MatrixError(
            f"{source}: limits.timeout_s ({limits.timeout_s:g} s) is below limits.startup_s ({limits.startup_s:g} s) + "
            f"train.timing.max_timed_s ({worst.train.timing.max_timed_s:g} s, cell {worst.label}) = {need:g} s: a cell "
            f"that starts slowly and times up to its cap would be stopped as a timeout. Fix: raise limits.timeout_s "
            f"to at least {need:g}, or lower limits.startup_s or train.timing.max_timed_s")


# ---------------------------------------------------------------- selection (--only / --exclude)

def parse_selector(text: str) -> tuple[str, list[Any]]:
    """``gpus=1,2`` -> ("gpus", [1, 2]); values are parsed as YAML scalars."""
    if "=" not in text:
        raise MatrixError(f"selector {text!r}: write KEY=VALUE[,VALUE...], e.g. --only strategy=ddp,zero3")
    key, values = text.split("=", 1)
    try:
        path = resolve_key(key.strip())
    except KeyError:
        raise MatrixError(f"selector {text!r}: {key!r} is not a setting. Fix: use one of {', '.join(known_keys())}") from None
    return path, [yaml.safe_load(v) for v in values.split(",")]


def select(cells: list[CellSettings], only: list[str], exclude: list[str]) -> list[CellSettings]:
    def hit(cell: CellSettings, selectors: list[str]) -> bool:
        flat = cell.flat()
        return all(flat.get(path) in values for path, values in map(parse_selector, selectors))

    return [c for c in cells if (not only or hit(c, only)) and not any(hit(c, [e]) for e in exclude)]
