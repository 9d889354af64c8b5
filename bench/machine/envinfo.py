"""The environment fingerprint stored in every record: hardware, drivers, library versions, git sha."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import socket
import subprocess
from functools import lru_cache
from pathlib import Path

from bench.machine import bytecode

LIBRARIES = ["torch", "transformers", "accelerate", "deepspeed", "peft", "bitsandbytes", "datasets", "nvidia-ml-py"]


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_sha() -> str | None:
    root = Path(__file__).resolve().parents[2]  # bench/machine/envinfo.py -> the repository
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else None


@lru_cache(maxsize=1)
def code_digest() -> str:
    """A digest of the code a launch runs: every file of the bench package and pyproject.toml (its
    dependencies), by path and content.

    Resume compares it, not the git sha: a commit that changed only the README or the results between two
    halves of a run leaves the measurement unchanged, while two different uncommitted edits of one commit
    (both "<sha>-dirty") do not.
    """
    package = Path(__file__).resolve().parents[1]  # bench/machine/envinfo.py -> bench/
    files = sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    pyproject = package.parent / "pyproject.toml"
    digest = hashlib.sha256()
    for path in files + ([pyproject] if pyproject.is_file() else []):
        digest.update(path.relative_to(package.parent).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def gpu_info() -> dict:
    """Model, count, memory, driver, topology of the GPUs this run may use, via NVML; empty without NVIDIA GPUs.

    The cards are those CUDA_VISIBLE_DEVICES leaves visible (all where it is unset): a run given 2 cards of
    a 4-GPU host is a 2-GPU run, and its results are compared with other 2-GPU runs. The host's own count
    and the NVML indices of the cards used are kept beside it.
    """
    from bench.machine import gpu_state

    pynvml = gpu_state.nvml()
    if pynvml is None:  # no driver / no library: a CPU machine
        return {}
    pairs = gpu_state.cell_handles(gpu_state.visible_count())
    handles = [h for _, h in pairs]
    names = [pynvml.nvmlDeviceGetName(h) for h in handles]
    info = {
        "gpu_count": len(handles),
        "gpu_model": names[0] if names else None,
        "gpu_models": names,
        "gpu_indices": [index for index, _ in pairs],
        "host_gpu_count": pynvml.nvmlDeviceGetCount(),
        "gpu_memory_bytes": [pynvml.nvmlDeviceGetMemoryInfo(h).total for h in handles],
        "driver": pynvml.nvmlSystemGetDriverVersion(),
        "cuda_driver": pynvml.nvmlSystemGetCudaDriverVersion(),
        "power_limit_w": [pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000 for h in handles],
    }
    info["topology"] = _topology(pynvml, handles)
    return info


def _topology(pynvml, handles) -> str | None:
    if len(handles) < 2:
        return None
    try:
        level = pynvml.nvmlDeviceGetTopologyCommonAncestor(handles[0], handles[1])
        nvlinks = sum(
            1 for link in range(18)
            if _safe(lambda link=link: pynvml.nvmlDeviceGetNvLinkState(handles[0], link)) == 1)
        return f"gpu0-gpu1 common ancestor level {level}, {nvlinks} active NVLinks on gpu0"
    except Exception:  # noqa: BLE001
        return None


def _safe(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return None


def library_versions() -> dict[str, str | None]:
    return {lib: _version(lib) for lib in LIBRARIES}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@lru_cache(maxsize=1)
def fingerprint() -> dict:
    import os

    import torch

    fp = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "libraries": library_versions(),
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "git_sha": git_sha(),
        "code_digest": code_digest(),
    }
    fp["bytecode_cache"] = bytecode.cache_state()  # uncached libraries slow every rank's start
    fp.update(gpu_info())
    fp["hardware"] = hardware_key(fp)
    return fp


def hardware_key(fp: dict) -> str:
    """What must match for two results to be compared: the GPU model and count, or the CPU."""
    if fp.get("gpu_count"):
        return f"{fp['gpu_count']}x {fp['gpu_model']}"
    return f"cpu {fp.get('cpu_model')} x{fp.get('cpu_count')}"
