"""Which of transformers' tensor-parallel entry points the installed release has, told by what its source
defines (not by its version string), so that the worker calls the one that exists and a cell the stack cannot
split is refused before launch.

Two shapes are known (transformers.distributed.tensor_parallel and transformers.distributed.mixin):
- ``RESOLVED_PLAN`` (transformers 5.24): ``apply_tensor_parallelism(model, tp_mesh, tp_plan)`` takes a plan
  resolved for the model's own module and parameter names, which ``model._resolve_parallel_plans(config)``
  gives; the input embedding is always split by vocabulary (``embedding_rowwise``).
- ``MODEL_PLAN`` (transformers 5.17): ``apply_tensor_parallelism(model, tp_mesh)`` reads ``model.tp_plan``
  (wildcards such as ``model.layers.*.self_attn.q_proj``) itself, walking ``named_modules`` and sharding each
  module's own parameters; its config names the embedding only for a tied head (``tie_word_embeddings``), so
  bench adds the same rule for an untied one (bench/worker/parallel.py): one layout on both.

Read with ``ast`` from the installed files, so that planning a matrix imports no torch and none of transformers'
modules but its lazy package front (which finding the files imports).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
from pathlib import Path

RESOLVED_PLAN = "resolved_plan"
MODEL_PLAN = "model_plan"
ENTRY = "apply_tensor_parallelism"


def api_of(tensor_parallel_source: str, mixin_source: str) -> str | None:
    """The entry point's shape from the two modules' source texts; None when neither known shape is there."""
    args = _function_args(tensor_parallel_source, ENTRY)
    defined = _function_names(mixin_source)
    if args is None:
        return None
    if args[2:3] == ["tp_plan"] and "_resolve_parallel_plans" in defined:
        return RESOLVED_PLAN
    if len(args) == 2 and "tp_plan" in defined:
        return MODEL_PLAN
    return None


@functools.lru_cache(maxsize=1)
def tensor_parallel_api() -> str | None:
    """The installed transformers' shape (``RESOLVED_PLAN``, ``MODEL_PLAN``), or None."""
    sources = [_module_source(f"transformers.distributed.{name}") for name in ("tensor_parallel", "mixin")]
    if any(s is None for s in sources):
        return None
    return api_of(*sources)


def unsupported_reason() -> str:
    """Why tensor parallelism cannot run on the installed transformers, and the fix."""
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    return (f"tp needs transformers' tensor-parallel API, and transformers {version} has neither "
            f"{ENTRY}(model, tp_mesh, tp_plan) with PreTrainedModel._resolve_parallel_plans (as in 5.24) nor "
            f"{ENTRY}(model, tp_mesh) reading model.tp_plan (as in 5.17) in transformers.distributed. "
            "Fix: install a transformers release with one of them (5.17 and 5.24 are known to work), or tp: 1")


def _module_source(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # the parent package is missing
        return None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return None
    return Path(spec.origin).read_text(errors="replace")


def _function_args(source: str, name: str) -> list[str] | None:
    """The positional parameter names of the module-level function ``name``; None when it is not defined."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return [a.arg for a in [*node.args.posonlyargs, *node.args.args]]
    return None


def _function_names(source: str) -> set[str]:
    """Every function, method and property defined anywhere in the module."""
    return {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
