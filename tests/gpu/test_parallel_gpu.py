"""Tensor and context parallelism on real GPUs through the real CLI (issue 22): tensor parallelism alone (tp2:
tiny Llama and Llama-3.2-1B), FSDP2 with context parallelism (fsdp2+cp2: tiny Llama and Llama-3.2-1B at 4k
tokens) beside the same tiny cell without it on one GPU (fsdp2 cp1: the batch the cp2 group shares). One
`bench run` per session; each test reads its record. Needs 2 GPUs: skipped otherwise. (FSDP2 with tensor
parallelism is refused on the installed stack: tests/strategies/test_degrees.py says why.)

The estimator's prediction stored in each record is held to the margins these layouts get until GPU records
judge them (bench/estimate/margins.py: the pooled margins floored at the defaults, 15 % fit, 10 % skip), on
the cells the protocol judges (bench/estimate/protocol.py: the model's memory dominates, not tiny Llama).

    pytest -m gpu tests/gpu/test_parallel_gpu.py
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from conftest import bench

torch = pytest.importorskip("torch")
# Marked per test, not per module: the matrix's plan is checked on CPU too (test_the_gpu_matrix_plans_on_any_machine).
def needs_two_gpus(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                              reason="needs 2 CUDA GPUs")(test))

TRAIN = {"seq_len": 512, "micro_batch": 2, "precision": "bf16", "optimizer": "adamw_torch", "grad_checkpointing": True,
         "warmup_steps": 1, "steps": 3, "timing": {"max_steps": 3}}
CELLS = {  # test id -> settings beyond TRAIN
    "tp2": {"model": "tiny-llama", "strategy": "tp", "gpus": 2, "tp": 2},
    "tp2_1b": {"model": "llama-3.2-1b", "strategy": "tp", "gpus": 2, "tp": 2},  # judged: its prediction is checked
    "fsdp2_cp2": {"model": "tiny-llama", "strategy": "fsdp2", "gpus": 2, "cp": 2},
    "fsdp2_cp1": {"model": "tiny-llama", "strategy": "fsdp2", "gpus": 1, "cp": 1},  # fsdp2_cp2's batches, unsplit
    "fsdp2_cp2_1b_4k": {"model": "llama-3.2-1b", "strategy": "fsdp2", "gpus": 2, "cp": 2,
                        "train": {"seq_len": 4096, "micro_batch": 1}},
}
LABELS = {"tp2": "tp2", "tp2_1b": "tp2", "fsdp2_cp2": "fsdp2+cp2", "fsdp2_cp1": "fsdp2", "fsdp2_cp2_1b_4k": "fsdp2+cp2"}
# Step losses are bf16 forward passes; ring attention sums in another order than one SDPA call.
BF16_LOSS_REL = 0.02


def settings(test_id: str) -> dict:
    # Every degree stated: an include entry inherits the matrix's top-level settings, so a cp cell that left
    # tp out ran as tp2+cp2 when the first cell (the top level) was tp2 (found on 2x H200, 2026-11-30).
    c = {"tp": 1, "cp": 1, **CELLS[test_id]}
    c["train"] = {**TRAIN, **c.get("train", {})}
    return c


def write_matrix(folder, test_ids: list[str]):
    matrix = {"name": "parallel-gpu", "device": "cuda", **settings(test_ids[0]),
              "include": [settings(t) for t in test_ids],
              "limits": {"timeout_s": 300, "hang_s": 120, "collective_timeout_s": 60, "startup_s": 240}}
    path = folder / "parallel.yaml"
    path.write_text(yaml.safe_dump(matrix, sort_keys=False))
    return path


def test_the_gpu_matrix_plans_on_any_machine(tmp_path):
    """The matrix below is planned for its 2-GPU target here (a CUDA matrix on a CPU machine is planned for
    elsewhere): each cell comes out once, under its own degrees, so a GPU session is not spent on a typo."""
    proc = bench("run", str(write_matrix(tmp_path, list(CELLS))), "--results", str(tmp_path / "results"), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for label, model in [("tp2", "tiny-llama"), ("tp2", "llama-3.2-1b"), ("fsdp2+cp2", "tiny-llama"),
                         ("fsdp2+cp2", "llama-3.2-1b")]:
        assert f"{model} full {label} x2gpu" in proc.stdout, proc.stdout
    assert "tiny-llama full fsdp2 x1gpu" in proc.stdout, proc.stdout
    assert "recorded unsupported" not in proc.stdout, proc.stdout
    assert "tp2+cp2" not in proc.stdout


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, dict]:
    runnable = [t for t in CELLS if CELLS[t]["gpus"] <= torch.cuda.device_count()]
    folder = tmp_path_factory.mktemp("parallel-gpu")
    path = write_matrix(folder, runnable)
    proc = bench("run", str(path), "--results", str(folder / "results"), timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (folder / "results" / "runs.jsonl").read_text().splitlines()
    found = [json.loads(line) for line in lines]
    return {t: next(r for r in found if all(r["settings"].get(k) == v for k, v in CELLS[t].items() if k != "train"))
            for t in runnable}


@pytest.mark.parametrize("test_id", list(CELLS))
@needs_two_gpus
def test_parallel_cell_runs_under_its_degrees(records, test_id):
    if test_id not in records:
        pytest.skip(f"needs {CELLS[test_id]['gpus']} GPUs")
    r = records[test_id]
    assert r["status"] == "ok", json.dumps(r.get("error"), indent=1)[:4000]
    want = CELLS[test_id]
    for rank in r["ranks"]:
        # accelerate's ParallelismConfig ran the cell's degrees (the worker's guard checks it too); a cell
        # without one (fsdp2_cp1) records its tp 1 / cp 1 all the same
        assert rank["parallel"]["tp"] == want.get("tp", 1) and rank["parallel"]["cp"] == want.get("cp", 1)
        assert rank["model_init"] == "meta, materialised per shard"
        losses = [s["loss"] for s in rank["steps"]]
        assert all(math.isfinite(x) for x in losses)
    # the table's label, as `bench report` makes it from the record's settings; strategy_info records one only
    # where a degree exceeds 1 (absent at 1, as before: fsdp2_cp1)
    from bench.report.metrics import strategy_label
    from bench.spec import CellSettings

    assert strategy_label(CellSettings.model_validate(r["settings"])) == LABELS[test_id]
    has_degrees = want.get("tp", 1) > 1 or want.get("cp", 1) > 1
    assert r["strategy_info"].get("label", r["settings"]["strategy"]) == LABELS[test_id]
    assert ("label" in r["strategy_info"]) is has_degrees, r["strategy_info"]


@pytest.mark.parametrize("test_id", ["tp2", "tp2_1b", "fsdp2_cp2", "fsdp2_cp2_1b_4k"])
@needs_two_gpus
def test_predicted_peak_within_the_margins_of_an_unjudged_layout(records, test_id):
    """The record's prediction (made before launch) against the measured per-rank peak of torch reserved memory
    (max over ranks), as `bench estimate-check` compares them: under-predicted by at most the fit margin,
    over-predicted by at most the skip margin, those the record's prediction carries."""
    from bench.estimate.margins import DEFAULT_FIT, DEFAULT_SKIP
    from bench.estimate.protocol import MIN_JUDGED_GIB, MIN_JUDGED_PARAMS
    from bench.spec.models import ModelShape

    r = records[test_id]
    assert r["status"] == "ok", json.dumps(r.get("error"), indent=1)[:4000]
    pred = r["prediction"]
    # context parallelism under FSDP2 is replayed through the allocator model; tensor parallelism is additive
    want = "additive" if CELLS[test_id].get("tp", 1) > 1 else "replay"
    assert pred is not None and pred["reserved_model"] == want, pred["reserved_model"]
    # tp/cp layouts are not judged yet: their margins are the pooled ones floored at the defaults (item 2)
    assert pred["fit_margin"] >= DEFAULT_FIT and pred["margin"] >= DEFAULT_SKIP, pred["margin_source"]
    measured = max(rank["torch_peak_reserved_bytes"] for rank in r["ranks"]) / 2**30
    predicted = pred["peak_reserved_gib"]
    if measured < MIN_JUDGED_GIB or ModelShape.of(CELLS[test_id]["model"]).params < MIN_JUDGED_PARAMS:
        pytest.skip(f"not judged by the protocol: {measured:.2f} GiB reserved, the allocator's minimums dominate")
    assert measured / predicted - 1 <= pred["fit_margin"], (test_id, predicted, measured)
    assert predicted / measured - 1 <= pred["margin"], (test_id, predicted, measured)


@needs_two_gpus
def test_context_parallel_loss_matches_the_unsplit_cell(records):
    """fsdp2+cp2 (two ranks, one shared batch, each rank the loss of its half of every sequence: the two halves
    hold the same number of tokens but one, so their mean is the sequence's mean) against fsdp2 on one GPU, which
    reads the same batches (data-parallel rank 0). Random init on random tokens keeps the loss near ln(vocab),
    so this catches a broken split (labels paired across chunks, tokens lost or counted twice), not a subtle one."""
    cp2, cp1 = records["fsdp2_cp2"], records["fsdp2_cp1"]
    assert cp2["status"] == "ok" and cp1["status"] == "ok"
    per_rank = [[s["loss"] for s in rank["steps"]] for rank in cp2["ranks"]]
    unsplit = [s["loss"] for s in cp1["ranks"][0]["steps"]]
    steps = min(len(unsplit), *map(len, per_rank))
    assert steps >= 2
    for i in range(steps):
        split = sum(losses[i] for losses in per_rank) / len(per_rank)
        assert split == pytest.approx(unsplit[i], rel=BF16_LOSS_REL), (i, per_rank, unsplit)


@needs_two_gpus
def test_tensor_parallel_alone_has_a_tp_mesh_and_no_wrapper(records):
    for rank in records["tp2"]["ranks"]:
        assert rank["parallel"]["mesh"] == ["tp"] and rank["distributed_type"] == "MULTI_GPU"


@needs_two_gpus
def test_a_shared_batch_counts_once(records):
    from bench.records import RunRecord
    from bench.report import metrics

    row = metrics.figures(RunRecord.model_validate(records["fsdp2_cp2"]))
    assert row["real_tokens_per_step"] == TRAIN["micro_batch"] * TRAIN["seq_len"]  # one replica, one batch
