"""The machine: what it is and what its GPUs are doing, read through NVML and the installed packages.

Rooms: ``gpu_state`` (NVML handles of a cell's GPUs, the processes on them, whether they are busy),
``sampler`` (NVML sampled in the parent while a cell runs: power, clocks, energy, throttling),
``envinfo`` (the environment fingerprint every record keeps), ``bytecode`` (whether the training
libraries' bytecode is cached), ``node_env`` and ``node_sampler`` (each node's fingerprint and NVML
sampler inside a multi-node job, run as ``python -m``; the merge of the nodes' samples). Read by the launch side, the estimator (a card's capacity) and the
report (throttle reasons); imports nothing else of bench.
"""

from bench.machine.envinfo import fingerprint, hardware_key
from bench.machine.gpu_state import busy_reason, compute_processes, nvml, visible_count
from bench.machine.sampler import THROTTLE_REASONS, NvmlSampler, sampler_enabled

__all__ = ["NvmlSampler", "THROTTLE_REASONS", "busy_reason", "compute_processes", "fingerprint", "hardware_key", "nvml",
           "sampler_enabled", "visible_count"]
