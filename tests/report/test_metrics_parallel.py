"""Throughput and MFU of tensor- and context-parallel cells: a tp x cp group shares one batch, so its tokens
count once per data-parallel replica; per-GPU figures divide by every GPU; each FLOP is counted once."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.records import RunRecord
from bench.report import flops, metrics
from bench.spec import CellSettings
from bench.spec.models import ModelShape

H200 = "NVIDIA H200"


def record(tp: int = 1, cp: int = 1, strategy: str = "fsdp2", step_s: float = 0.5) -> RunRecord:
    """Two ranks, each reporting the batch it ran (micro-batch 2 x seq 2048 = 4,096 tokens) for 4 timed steps."""
    cell = CellSettings(model="llama-3.2-1b", strategy=strategy, gpus=2, tp=tp, cp=cp, device="cuda",
                        train={"seq_len": 2048, "micro_batch": 2})
    steps = [{"step": i, "phase": "timed", "time_s": step_s, "tokens": 4096, "real_tokens": 4096, "loss": 1.0}
             for i in range(4)]
    ranks = [{"rank": r, "steps": steps, "gpu_name": H200} for r in range(2)]
    return RunRecord(matrix="m", cell_id=cell.cell_id, label=cell.label, settings=cell.model_dump(mode="json"),
                     status="ok", ranks=ranks, started_at=0.0, wall_s=10.0)


def test_a_tensor_parallel_pair_counts_its_shared_batch_once():
    pure, data = metrics.figures(record(tp=2, strategy="tp")), metrics.figures(record())
    assert (pure["strategy"], pure["tp"], pure["cp"], pure["dp"]) == ("tp2", 2, 1, 1)
    assert pure["real_tokens_per_step"] == 4096 and data["real_tokens_per_step"] == 8192
    assert pure["real_tokens_per_s"] == pytest.approx(8192) and pure["real_tokens_per_s_per_gpu"] == pytest.approx(4096)
    # the attention length is the sequence the pair trained on, not half of it
    assert pure["attention_length"] == pytest.approx(2048) == data["attention_length"]


def test_mfu_counts_each_flop_once():
    rows = pd.DataFrame([metrics.figures(record(cp=2)), metrics.figures(record())])
    rows = metrics.add_flop_rates(rows)
    per_token = flops.training_flops_per_token(ModelShape.of("llama-3.2-1b"), 2048).model_per_token
    assert rows.loc[0, "strategy"] == "fsdp2+cp2" and rows.loc[0, "model_flops_per_token"] == pytest.approx(per_token)
    # one 4,096-token batch per 0.5 s step for the pair, shared by both GPUs
    assert rows.loc[0, "model_tflops_per_gpu"] == pytest.approx(4096 / 0.5 / 2 * per_token / 1e12)
    assert rows.loc[0, "mfu"] == pytest.approx(rows.loc[1, "mfu"] / 2)  # the same step time, half the work


def test_records_from_before_the_degrees_read_as_1():
    old = record()
    for key in ("tp", "cp"):
        old.settings.pop(key)
    row = metrics.figures(old)
    assert (row["tp"], row["cp"], row["dp"], row["strategy"]) == (1, 1, 2, "fsdp2")
    assert row["real_tokens_per_step"] == 8192
