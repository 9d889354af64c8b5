"""A TORCH_CUDA_ARCH_LIST that DeepSpeed's JIT op builder can read, for cells that may build ops.

DeepSpeed compiles some ops (FusedAdam for a JSON's own "Adam"/"AdamW" optimizer, CPU Adam for offload)
on first use and reads the target architectures from TORCH_CUDA_ARCH_LIST, parsing each entry as
``major.minor[+PTX]`` with int(). Images built for Hopper set entries such as ``9.0a`` (arch-specific
features), which torch accepts and DeepSpeed's parser does not (``invalid literal for int() with base 10:
'0a'``): the cell would crash in its first optimizer step. Such a cell gets the compute capability of its
own GPUs instead (as NVML reports it), and the record says so.

The rule is here only: a local launch asks ``jit_arch_fix`` in the parent (its GPUs are this host's); a Slurm
job's node runs ``python -m bench.launch.cuda_arch NOTE_FILE`` with the node's own capabilities on stdin (from
nvidia-smi, bench/launch/slurm/script.py), which prints the value to export (nothing: leave it) and writes
the note into NOTE_FILE for the record (bench/launch/slurm_runner.py).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

_DEEPSPEED_ENTRY = re.compile(r"^\d+\.\d+(\+PTX)?$")


def deepspeed_can_parse(arch_list: str) -> bool:
    """Whether every entry of a TORCH_CUDA_ARCH_LIST (';' or whitespace separated) parses in DeepSpeed."""
    entries = [e for e in re.split(r"[;\s]+", arch_list.strip()) if e]
    return bool(entries) and all(_DEEPSPEED_ENTRY.match(e) for e in entries)


@dataclass(frozen=True)
class ArchFix:
    value: str
    note: str


def capabilities_of(gpu_count: int) -> list[str]:
    """Compute capabilities (``major.minor``) of the cell's first ``gpu_count`` visible GPUs, via NVML."""
    from bench.machine.gpu_state import cell_handles, nvml

    lib = nvml()
    if lib is None:
        return []
    found = []
    for _, handle in cell_handles(gpu_count):
        major, minor = lib.nvmlDeviceGetCudaComputeCapability(handle)
        if f"{major}.{minor}" not in found:
            found.append(f"{major}.{minor}")
    return found


def jit_arch_fix(current: str | None, capabilities: list[str]) -> ArchFix | None:
    """The value a DeepSpeed cell should get, or None to leave the environment as it is.

    Unset and readable lists are DeepSpeed's own business (unset: it probes the devices itself, which a
    forked rank cannot always do, so it is set then too); an unreadable one is replaced.
    """
    if current is not None and deepspeed_can_parse(current):
        return None
    if not capabilities:
        return None  # nothing better to offer: leave it, DeepSpeed's error will name the variable
    value = ";".join(capabilities)
    why = "was not set" if current is None else f"was {current!r}, which DeepSpeed's op builder cannot parse"
    return ArchFix(value, f"TORCH_CUDA_ARCH_LIST={value} (the cell's GPUs' compute capability): it {why}")


def capabilities_from_text(text: str) -> list[str]:
    """``major.minor`` entries of nvidia-smi's ``--query-gpu=compute_cap --format=csv,noheader`` (one GPU a
    line), in order, each once; lines that are not a capability (an error message) are left out."""
    found = []
    for line in text.splitlines():
        entry = line.strip()
        if re.fullmatch(r"\d+\.\d+", entry) and entry not in found:
            found.append(entry)
    return found


def main(argv: list[str] | None = None) -> int:
    """On a compute node: stdin holds its GPUs' capabilities; print the TORCH_CUDA_ARCH_LIST to export, or
    nothing, and write the note to the file named by the one argument."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.launch.cuda_arch NOTE_FILE < capabilities", file=sys.stderr)
        return 2
    fix = jit_arch_fix(os.environ.get("TORCH_CUDA_ARCH_LIST"), capabilities_from_text(sys.stdin.read()))
    if fix is not None:
        with open(args[0], "w") as f:
            f.write(fix.note + "\n")
        print(fix.value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
