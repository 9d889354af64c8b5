"""Reading a matrix file: YAML in, a validated Matrix out, or a MatrixError naming the key and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from bench.spec.schema import Matrix, MatrixError, _SECTIONS, known_keys, resolve_key


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
    if field is None or field.is_required() or field.default is None or isinstance(field.default, BaseModel):
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
    if kind == "int_from_float":
        return f"give a whole number{_example(loc)}"
    if kind in ("model_type", "model_attributes_type", "dict_type") and _dotted(loc) in _SECTIONS:
        return _section_fix(_dotted(loc))
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"give a value of the right type ({err['msg'].lower()}){_example(loc)}"
    if kind == "string_pattern_mismatch":
        return f"use letters, digits and _ . - only (the pattern {err['ctx']['pattern']}){_example(loc)}"
    return f"give a value this key takes{_example(loc)}"


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _section_fix(section: str) -> str:
    """A section (train, adapter, ...) given as something else: its keys, two of them with their defaults."""
    fields = [(name, f.default) for name, f in _SECTIONS[section].model_fields.items()
              if isinstance(f.default, (int, float, str)) and not isinstance(f.default, bool)][:2]
    shown = ", ".join(f"{name}: {json.dumps(d) if isinstance(d, str) else d}" for name, d in fields)
    leaf = section.rsplit(".", 1)[-1]
    return (f"give its keys as a mapping, e.g. {leaf}: {{{shown}}}, or remove {section} to keep every default "
            f"(its keys: {', '.join(_SECTIONS[section].model_fields)})")


def format_validation_error(source: str, exc: ValidationError, where: str = "") -> str:
    lines = [f"{source}: invalid matrix{where}"]
    for err in exc.errors():
        key = _dotted(err["loc"]) or "(top level)"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        if err["type"] == "value_error":  # a validator's own message says what the key takes: said once
            said = err["msg"].removeprefix("Value error, ")
            # A check across the whole matrix has no place of its own: its message begins with the key it is about.
            lines.append(f"  {said}" if not err["loc"] else f"  {key}: {said}{'' if 'Fix:' in said else got}")
            continue
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
    if raw is None:
        raise MatrixError(f"{path}: the file is empty. Fix: write a matrix in it, e.g. the two lines "
                          "`model: tiny-llama` and `grid: {strategy: [ddp, zero2]}` (matrices/smoke.yaml is a whole one)")
    if not isinstance(raw, dict):
        raise MatrixError(f"{path}: a matrix file must be a mapping of keys, not a {type(raw).__name__}. Fix: write "
                          "`key: value` lines at the top level (name, model, train, grid, ...), as matrices/smoke.yaml does")
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
