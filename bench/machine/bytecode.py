"""Whether the training libraries' Python bytecode is cached, so that a cell's ranks start without compiling it.

Every rank is a fresh interpreter that imports torch, transformers, accelerate, peft (and DeepSpeed). Python
reads each module's cached bytecode (``__pycache__/*.pyc``) or, without it, compiles the source again. An
image whose site-packages ship no ``.pyc`` and that sets ``PYTHONDONTWRITEBYTECODE`` (as the GPU machines of
this project do) makes every rank of every cell compile those libraries anew: that time lands in the record's
``startup_breakdown`` (``interpreter_and_torch_s``, ``model_code_imports_s``), not in the model build, and
``results/llama8b-startup-h100*`` measure what it costs. ``bench run`` says so before launching and names
the command that fixes it once; each record keeps the state in ``env.bytecode_cache``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# One heavy module of each library a rank imports: if its bytecode is cached, the library was compiled.
SAMPLE_MODULES = {
    "torch": "_tensor.py",
    "transformers": "modeling_utils.py",
    "accelerate": "accelerator.py",
    "peft": "peft_model.py",
    "deepspeed": "runtime/engine.py",
}


def package_dir(name: str) -> Path | None:
    """Where an installed top-level package lives, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def is_cached(source: Path) -> bool:
    return Path(importlib.util.cache_from_source(str(source))).exists()


def cache_state(samples: dict[str, str] = SAMPLE_MODULES) -> dict:
    """The libraries whose bytecode is not cached, and whether launched interpreters would write it."""
    uncached = {}
    for name, module in samples.items():
        folder = package_dir(name)
        if folder is not None and (folder / module).exists() and not is_cached(folder / module):
            uncached[name] = str(folder)
    return {"writes_bytecode": not sys.dont_write_bytecode, "uncached": uncached}


def would_recompile(state: dict) -> list[str]:
    """Libraries every rank will compile from source: not cached, and nothing will write the cache (the
    interpreter is told not to, or the folder is read-only)."""
    return [name for name, folder in state["uncached"].items()
            if not state["writes_bytecode"] or not os.access(folder, os.W_OK)]


def recompile_warning(state: dict) -> str | None:
    """What to tell the user before a run whose ranks would each compile the libraries again, or None."""
    names = would_recompile(state)
    if not names:
        return None
    folders = sorted({str(Path(state["uncached"][n]).parent) for n in names})
    why = "PYTHONDONTWRITEBYTECODE is set" if not state["writes_bytecode"] else "their folders are read-only"
    return (f"the Python bytecode of {', '.join(names)} is not cached and will not be ({why}): every rank of "
            f"every cell compiles them again before its first step (see startup_breakdown in the records). "
            f"Compile it once: {sys.executable} -m compileall -q -j 0 {' '.join(folders)}")
