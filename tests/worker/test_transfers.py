"""Host-device traffic: the copy summary of a profiled step, and which strategies get one.

The profiled step itself needs CUDA (CUPTI); on GPUs it runs in every offloading cell and its figures are
checked in tests/worker/test_qlora.py's GPU cells.
"""

from __future__ import annotations

import pandas as pd

from bench import strategies
from bench.report.tables import memory_table
from bench.worker import transfers

TRACE = [
    {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "dur": 1500.0, "args": {"bytes": 3 << 20}},
    {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "dur": 500.0, "args": {"bytes": 1 << 20}},
    {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "dur": 250.0, "args": {"bytes": 2 << 20}},
    {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "dur": 9999.0, "args": {"bytes": 1 << 30}},
    {"ph": "X", "cat": "kernel", "name": "ampere_bf16_gemm HtoD-looking name", "dur": 7777.0},
    {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "dur": 100.0},
]


def test_copies_are_summed_by_direction_and_device_copies_ignored():
    out = transfers.summarise_memcpy(TRACE, step_s=0.5)
    assert out == {"htod_s": 0.002, "dtoh_s": 0.00025, "htod_bytes": 4 << 20, "dtoh_bytes": 2 << 20,
                   "copies": 3, "step_s": 0.5}


def test_only_offloading_strategies_are_profiled():
    profiled = {name for name in strategies.CATALOGUE if transfers.offloads(strategies.get(name))}
    assert {"zero2_offload", "zero3_offload", "zero3_offload_optimizer", "fsdp_full_shard_offload",
            "fsdp2_offload"} <= profiled
    assert not profiled & {"single", "ddp", "zero1", "zero2", "zero3", "fsdp_full_shard", "fsdp2"}
    assert not transfers.offloads(None)  # an unreadable user config


def test_memory_table_shows_copies_only_where_measured():
    base = {"status": "ok", "device": "cuda", "gpus": 2, "peak_allocated_gib": 10.0, "peak_reserved_gib": 12.0}
    group = pd.DataFrame([
        {**base, "strategy": "zero3_offload", "host_device_copy_s": 1.25, "profiled_step_s": 8.5,
         "host_device_gib": 70.0},
        {**base, "strategy": "zero2_offload", "host_device_copy_s": 0.000245, "profiled_step_s": 0.08,
         "host_device_gib": 3.5 / 1024},
        {**base, "strategy": "zero3"},
    ])
    table = memory_table(group).set_index("run")
    column = "host<->device copies per step"
    assert table.loc["zero3_offload x2 GPU", column] == "1.25 s of 8.50 s, 70.00 GiB"
    assert table.loc["zero2_offload x2 GPU", column] == "0.245 ms of 0.08 s, 3.5 MiB"  # a tiny model's copies
    assert table.loc["zero3 x2 GPU", column] == "-"
    assert column not in memory_table(group.drop(columns=["host_device_copy_s"]))
