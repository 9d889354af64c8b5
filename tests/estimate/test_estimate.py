"""Memory estimates: ZeRO accounting by hand, activations by hand, the pre-flight decision, records."""

from __future__ import annotations

import json
import math

import pytest

from bench import strategies
from bench.estimate import GIB, capacity_for, predict, predicted_oom
from bench.estimate.activations import activation_bytes, layer_bytes_per_token
from bench.estimate.additive import step_buffers
from bench.estimate.cell_states import model_states
from bench.estimate.prediction import with_capacity
from bench.estimate.states import NF4_BYTES
from bench.estimate.terms import sharding_for
from bench.records import load_records
from bench.spec import Adapter, CellSettings, Train
from bench.spec.models import ModelShape
from conftest import REPO, bench, write_matrix


def cell(model="llama-3.1-8b", strategy="zero3", gpus=2, adapter="none", device="cuda", **train) -> CellSettings:
    train = {"precision": "bf16", "seq_len": 2048, "micro_batch": 1, **train}
    return CellSettings(model=model, strategy=strategy, gpus=gpus, device=device, adapter=Adapter(type=adapter),
                        train=Train(**train))


def states_of(c: CellSettings):
    return model_states(c, ModelShape.of(c.model), strategies.get(c.strategy))


# ---------------------------------------------------------------- parameter counts anchor everything

def test_parameter_counts_match_the_published_ones():
    assert ModelShape.of("llama-3.1-8b").params == 8_030_261_248
    assert ModelShape.of("llama-3.2-1b").params == 1_235_814_400


# ---------------------------------------------------------------- ZeRO paper accounting

# Mixed-precision Adam per parameter: 2 (bf16 weights) + 2 (bf16 grads) + 12 (fp32 master, m, v).
# ZeRO-1 divides the 12 by N, ZeRO-2 the 2 + 12, ZeRO-3 all 16 (Rajbhandari et al. 2020, figure 1).
ZERO_PAPER_BYTES = {1: lambda n: 2 + 2 + 12 / n, 2: lambda n: 2 + (2 + 12) / n, 3: lambda n: 16 / n}


@pytest.mark.parametrize("model", ["llama-3.2-1b", "llama-3.1-8b", "llama-3-70b"])
@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_model_states_follow_the_paper(model, gpus, stage):
    s = states_of(cell(model, f"zero{stage}", gpus))
    params = ModelShape.of(model).params
    assert s.base.gpu_total == pytest.approx(params * ZERO_PAPER_BYTES[stage](gpus), rel=1e-12)
    assert s.base.master == pytest.approx(4 * params / gpus)  # the fp32 master is part of the sharded 12


def test_zero2_step_matches_deepspeeds_own_estimator():
    """DeepSpeed counts 2P + 18P/N for ZeRO-2 (its 18 adds the fp32 gradient partition of the step)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for gpus in (1, 2, 4):
        c = cell("llama-3.2-1b", "zero2", gpus, optimizer="adamw_torch_fused")
        s = states_of(c)
        ours = s.base.gpu_total + step_buffers(c, strategies.get("zero2"), s)["zero_fp32_grad_partition"]
        _, ds_gpu = estimate_zero2_model_states_mem_needs(ModelShape.of(c.model).params, gpus, cpu_offload=False)
        assert ours == pytest.approx(ds_gpu, rel=1e-6)
        off = states_of(cell("llama-3.2-1b", "zero2_offload", gpus))
        _, ds_off = estimate_zero2_model_states_mem_needs(ModelShape.of(c.model).params, gpus, cpu_offload=True)
        assert off.base.gpu_total == pytest.approx(ds_off)  # only the bf16 weights stay on the GPU
        assert off.base.host == pytest.approx(ModelShape.of(c.model).params * 16 / gpus)


def test_autocast_ddp_and_fsdp_hold_fp32_everything():
    params = ModelShape.of("llama-3.2-1b").params
    ddp = states_of(cell("llama-3.2-1b", "ddp", 2))
    assert (ddp.base.weights, ddp.base.grads, ddp.base.master, ddp.base.optimizer) == (4 * params, 4 * params, 0, 8 * params)
    fsdp = states_of(cell("llama-3.2-1b", "fsdp_full_shard", 4))
    assert fsdp.base.gpu_total == pytest.approx(16 * params / 4)
    grad_op = states_of(cell("llama-3.2-1b", "fsdp_shard_grad_op", 4))
    assert grad_op.base.gpu_total == pytest.approx(16 * params / 4)  # sharded at rest; gathered copy is overhead
    bnb = states_of(cell("llama-3.2-1b", "ddp", 1, optimizer="adamw_bnb_8bit"))
    assert bnb.base.optimizer == pytest.approx(params * (2 + 2 * 4 / 256))


def test_lora_and_qlora_bases_and_adapter():
    shape = ModelShape.of("llama-3.1-8b")
    adapter = shape.lora_params(16, "all-linear")
    lora = states_of(cell(adapter="lora", strategy="ddp", gpus=1))
    assert lora.base.weights == 2 * shape.params and lora.base.grads == 0 and lora.base.optimizer == 0
    assert lora.adapter.gpu_total == 16 * adapter  # fp32 weights + grads + Adam m, v
    qlora = states_of(cell(adapter="qlora", strategy="ddp", gpus=1))
    linear = shape.layers * shape.linear_params_per_layer
    # ddp: peft's k-bit recipe upcasts embeddings, head and norms to fp32; FSDP keeps them bf16 and shards
    # only the packed 4 bits, every rank keeping all quantization constants.
    assert qlora.base.weights == pytest.approx(linear * NF4_BYTES + (shape.params - linear) * 4)
    fsdp = states_of(cell(adapter="qlora", strategy="fsdp_full_shard", gpus=2))
    assert fsdp.base.weights == pytest.approx(linear * (0.5 / 2 + NF4_BYTES - 0.5) + (shape.params - linear) * 2 / 2)
    assert 0.5 < NF4_BYTES < 0.52  # 4 bits + double-quantized absmax
    zero3 = states_of(cell(adapter="lora", strategy="zero3", gpus=4))
    assert zero3.base.weights == pytest.approx(2 * shape.params / 4)
    assert zero3.adapter.gpu_total == pytest.approx(16 * adapter / 4)


def test_offload_moves_states_to_the_host():
    params = ModelShape.of("llama-3.2-1b").params
    z3 = states_of(cell("llama-3.2-1b", "zero3_offload", 2))
    assert z3.base.gpu_total == 0
    assert z3.base.host == pytest.approx(params * (2 + 4 + 8 + 4) / 2)  # bf16 weights, master, m, v, fp32 grads
    pred = predict(cell("llama-3.2-1b", "zero3_offload", 2))
    assert pred.host_gib > 2 * z3.base.host / GIB
    assert pred.components_gib["optimizer"] == 0 and pred.components_gib["params"] == 0


# ---------------------------------------------------------------- activations

def test_layer_activation_bytes_by_hand():
    """tiny-llama (h 128, q 128, kv 64, I 344, 4 heads), bf16 weights and compute:
    norms 2*(4+2)*128 = 1536, attention 2*(3*128+2*64) + 4*4 = 1040, MLP 4*2*344 = 2752."""
    shape = ModelShape.of("tiny-llama")
    assert layer_bytes_per_token(shape, compute_bytes=2, residual_bytes=2) == 1536 + 1040 + 2752
    # autocast: fp32 residual stream adds 2 bytes per norm output and a bf16 copy for the linears
    assert layer_bytes_per_token(shape, 2, 4) == 2 * (4 + 4 + 2) * 128 + 1040 + 2752


def test_checkpointing_keeps_one_hidden_state_per_layer():
    shape = ModelShape.of("llama-3.1-8b")
    s, b = 2048, 2
    full = activation_bytes(shape, s, b, 2, 2, False, 0.5)
    ckpt = activation_bytes(shape, s, b, 2, 2, True, 0.5)
    assert ckpt.kept == shape.layers * s * b * shape.hidden * 2 + s * b * shape.hidden * (4 + 2 + 2)
    assert full.kept == pytest.approx(shape.layers * full.per_layer + s * b * shape.hidden * 8)
    assert ckpt.at_backward_start < full.at_backward_start / 3
    assert full.logits_peak == s * b * shape.vocab * (2 + 12)  # bf16 logits + fp32 loss tensors: big at 128k vocab
    double = activation_bytes(shape, s, 2 * b, 2, 2, False, 0.5)
    assert double.at_backward_start == pytest.approx(2 * full.at_backward_start)


def test_peak_is_the_larger_moment_and_components_add_up():
    big_acts = predict(cell("llama-3.2-1b", "ddp", 1, seq_len=4096, micro_batch=8))
    assert big_acts.peak_phase == "backward"
    small_acts = predict(cell("llama-3.2-1b", "ddp", 1, seq_len=128, micro_batch=1))
    assert small_acts.peak_phase == "optimizer step"
    for p in (big_acts, small_acts):
        assert sum(p.components_gib.values()) == pytest.approx(p.peak_reserved_gib)
        assert p.peak_reserved_gib > p.peak_allocated_gib
        assert p.device_total_gib > p.peak_reserved_gib  # CUDA context outside torch


def test_sharding_lowers_the_peak_in_the_expected_order():
    peaks = {s: predict(cell("llama-3.1-8b", s, 4, grad_checkpointing=True)).peak_reserved_gib
             for s in ("ddp", "zero1", "zero2", "zero3", "fsdp_full_shard", "fsdp2")}
    # ZeRO-1 and ZeRO-2 peak alike: with overlap_comm (bench/strategies/render.py) stage 1 reduces its gradients through
    # the buckets into its partition like stage 2; the H100 records measured identical peaks for the two
    # (results/llama-full-h100x4: 1B and 3B at 2 and 4 GPUs).
    assert peaks["ddp"] > peaks["zero1"] >= peaks["zero2"] > peaks["zero3"]
    assert peaks["fsdp2"] < peaks["ddp"] / 2
    assert sharding_for(strategies.get("fsdp_no_shard")).weights is False


# ---------------------------------------------------------------- capacity and the pre-flight decision

def test_predicted_oom_only_beyond_the_margin():
    assert predicted_oom(10.5, 10.0, 0.10) is False
    assert predicted_oom(11.5, 10.0, 0.10) is True
    assert predicted_oom(10.5, 10.0, 0.0) is True
    assert predicted_oom(1e9, None, 0.10) is False  # unknown capacity never skips


def test_capacity_and_fit_fields():
    c = cell("llama-3.1-8b", "ddp", 1)  # full fine-tune of 8B on one GPU: about 130+ GiB
    pred = predict(c)
    assert pred.capacity_gib is None and pred.fits and not pred.predicted_oom
    on_h100 = with_capacity(pred, 80.0, "--capacity-gib")
    assert on_h100.predicted_oom and not on_h100.fits and on_h100.required_gib == pred.device_total_gib
    capped = with_capacity(pred, 80.0, "gpu_memory_gib")
    assert capped.required_gib == pred.peak_reserved_gib  # a cap limits torch's allocator only
    assert capacity_for(c.model_copy(update={"gpu_memory_gib": 20.0})) == (20.0, "gpu_memory_gib")
    assert capacity_for(c, 141.0) == (141.0, "--capacity-gib")
    assert capacity_for(cell(device="cpu", strategy="ddp", gpus=1)) == (None, None)


# ---------------------------------------------------------------- the CLI, on real tiny CPU cells

def test_estimate_command_prints_every_cell(tmp_path):
    matrix = write_matrix(tmp_path, "est", grid={"strategy": ["ddp", "zero1", "zero3"], "gpus": [1, 2]})
    out = bench("estimate", str(matrix), "--json", check=True).stdout
    rows = json.loads(out)
    assert len(rows) == 6
    zero3_x2 = next(r for r in rows if "zero3 x2" in r["label"])["prediction"]
    assert zero3_x2["bytes_per_param"]["per_rank"] == "20/2"  # fp32 under DeepSpeed: 4 + 4 + 4 + 8, all sharded
    assert set(zero3_x2["components_gib"]) == {"params", "grads", "optimizer", "master_weights", "activations",
                                               "adapter", "overhead"}
    table = bench("estimate", str(matrix), "--device", "cuda", "--capacity-gib", "1.5", check=True).stdout
    assert "skip (" in table and "fits (" in table  # ZeRO's 5e8-element reduce buckets alone exceed 1.5 GiB


@pytest.mark.launch_aside
def test_run_skips_a_cell_predicted_not_to_fit_and_force_launches_it(tmp_path):
    matrix = write_matrix(tmp_path, "pre", strategy="ddp", gpus=1)
    results = tmp_path / "results"
    skipped = bench("run", str(matrix), "--results", str(results), "--capacity-gib", "0.001", check=True)
    [record] = load_records(results)
    assert record.status == "predicted_oom", skipped.stdout
    assert record.prediction["predicted_oom"] and record.prediction["capacity_gib"] == 0.001
    assert not (results / "cells" / record.cell_id / "ranks").exists() or not any(
        (results / "cells" / record.cell_id / "ranks").iterdir())  # nothing was launched
    bench("run", str(matrix), "--results", str(results), "--capacity-gib", "0.001", "--force", check=True)
    records = load_records(results)
    assert [r.status for r in records] == ["predicted_oom", "ok"]
    launched = records[-1]
    assert launched.prediction["version"] == 1 and launched.prediction["predicted_oom"] is True
    assert launched.prediction["peak_reserved_gib"] > 0 and launched.ranks


def test_frozen_linears_keep_inputs_only_where_lora_needs_them():
    """LoRA with dropout: frozen q/k/v/gate/up, o_proj and down_proj do not keep their inputs (the dropped-out
    copies are kept instead); without dropout LoRA A keeps them; ZeRO-3's linear keeps them anyway."""
    shape = ModelShape.of("llama-3.2-1b")
    all_linear = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    full = layer_bytes_per_token(shape, 2, 2)
    width = 6 * shape.hidden + shape.intermediate
    lora = layer_bytes_per_token(shape, 2, 2, width, 0, frozen_base=True, lora_targets=all_linear)
    not_kept = 2 * 2 * shape.hidden + 2 * shape.heads * shape.head_dim + 2 * shape.intermediate
    assert lora == full - not_kept + 3 * width
    no_dropout = layer_bytes_per_token(shape, 2, 2, 0, 0, frozen_base=True, lora_targets=all_linear)
    assert no_dropout == full
    only_qv = layer_bytes_per_token(shape, 2, 2, 0, 0, frozen_base=True, lora_targets=frozenset({"q_proj", "v_proj"}))
    assert only_qv == full - 2 * shape.hidden - 2 * shape.heads * shape.head_dim - 2 * shape.intermediate
    ddp = predict(cell("llama-3.2-1b", "ddp", 2, adapter="lora")).activations_detail_gib["per_layer"]
    zero3 = predict(cell("llama-3.2-1b", "zero3", 2, adapter="lora")).activations_detail_gib["per_layer"]
    assert zero3 > ddp


@pytest.mark.parametrize("strategy,expected", [("ddp", True), ("fsdp_full_shard", False), ("zero3", False)])
def test_qlora_fp32_head_costs_a_half_copy_at_the_loss_under_autocast(strategy, expected):
    """peft upcasts the LM head to fp32 for ddp (not FSDP, one dtype per flat parameter); autocast then runs
    the head on a bf16 copy that autograd keeps until the head's backward. DeepSpeed has no autocast."""
    from bench.estimate.additive import backward_buffers
    from bench.estimate.prediction import CALIBRATION

    cell = CellSettings(model="llama-3.2-1b", strategy=strategy, gpus=2, device="cuda",
                        adapter=Adapter(type="qlora"), train=Train(precision="bf16"))
    shape, strat = ModelShape.of(cell.model), strategies.get(strategy)
    states = model_states(cell, shape, strat)
    at_loss = backward_buffers(cell, shape, strat, states, CALIBRATION, moment="loss")
    assert ("autocast_head_copy" in at_loss) is expected
    if expected:
        assert at_loss["autocast_head_copy"] == 2 * 128256 * 2048  # vocab x hidden in bf16
        layers = backward_buffers(cell, shape, strat, states, CALIBRATION, moment="layers")
        assert "autocast_head_copy" not in layers  # freed by the head's backward


def test_estimate_reads_at_80_columns_and_names_the_smallest_card(tmp_path):
    """No line past 80 columns, every figure still there, each cell ending with the card it fits on; --gpus
    keeps the cells of a 2-GPU box; the JSON's figures are the printed ones."""
    matrix = write_matrix(tmp_path, "est80", device="cuda", model="llama-3.2-1b",
                          grid={"strategy": ["ddp", "zero3", "fsdp_full_shard"], "gpus": [1, 2, 4]})
    args = ("estimate", str(matrix), "--gpus", "2", "--capacity-gib", "80")
    out = bench(*args, env={"COLUMNS": "80"}, check=True).stdout
    rows = json.loads(bench(*args, "--json", check=True).stdout)
    assert len(rows) == 6 and all(" x4gpu" not in r["label"] for r in rows)
    lines = out.splitlines()
    assert max(map(len, lines)) <= 80, max(lines, key=len)
    fits = [line for line in lines if "fits on cards with >=" in line]
    assert len(fits) == 6
    for row in rows:
        p = row["prediction"]
        block = out[out.index(row["label"]):]
        block = block[:block.index("fits on cards with >=") + 60]
        for figure in (p["components_gib"]["params"], p["components_gib"]["activations"], p["peak_reserved_gib"],
                       p["device_total_gib"], p["host_gib"]):
            assert f"{figure:.2f}" in block, (figure, block)
        card = math.ceil(p["device_total_gib"] * (1 + p["fit_margin"]) * 10) / 10
        assert f"fits on cards with >= {card:g} GiB" in block
        assert card >= p["device_total_gib"]
    wide = bench(*args, env={"COLUMNS": "400"}, check=True).stdout
    assert "card >= GiB" in wide and "┃" in wide  # the table where it fits


def test_estimator_imports_without_torch():
    """The estimator is arithmetic on a cell's settings: `bench estimate`, the report and the pre-flight read
    it in the parent process, which must not pay for (or depend on) torch."""
    import subprocess
    import sys
    
    code = "import bench.estimate, sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    repo = REPO
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert done.returncode == 0, done.stderr


def _nodes(c: CellSettings, nodes: int, gpus: int) -> CellSettings:
    return c.model_copy(update={"nodes": nodes, "gpus": gpus})


@pytest.mark.parametrize("strategy, like_gpus", [("zero3", 8), ("fsdp_full_shard", 8), ("zero2", 8), ("ddp", 8),
                                                  ("fsdp_hybrid_shard", 4)])
def test_a_cell_of_several_nodes_is_predicted_per_card_over_all_its_ranks(strategy, like_gpus):
    """2 nodes x 4 GPUs: ZeRO and FSDP full sharding split the states over all 8 ranks (as one node of 8);
    HYBRID_SHARD over the node's 4 only (as one node of 4)."""
    base = cell(model="llama-3.2-1b", strategy=strategy)
    two_nodes = predict(_nodes(base, 2, 4))
    alike = predict(_nodes(base, 1, like_gpus))
    assert two_nodes.peak_reserved_gib == pytest.approx(alike.peak_reserved_gib)
    assert two_nodes.components_gib == pytest.approx(alike.components_gib)
    assert two_nodes.bytes_per_param == alike.bytes_per_param
    one_node = predict(_nodes(base, 1, 4))
    assert two_nodes.host_gib == pytest.approx(2 * one_node.host_gib)  # every rank of both nodes together
    if strategy != "ddp":  # DDP holds the states whole: as much per card at any world size
        assert (two_nodes.peak_reserved_gib < one_node.peak_reserved_gib) == (like_gpus == 8)


def test_estimate_on_a_slurm_matrix_shows_each_cells_ranks_and_their_shard_degree(tmp_path):
    matrix = write_matrix(tmp_path, "est", device="cuda", launcher="slurm", slurm={"gpus_per_node": 4},
                          train={"precision": "bf16"}, grid={"strategy": ["zero3"], "nodes": [1, 2], "gpus": [4]})
    rows = json.loads(bench("estimate", str(matrix), "--json", check=True).stdout)
    assert [(r["nodes"], r["ranks"]) for r in rows] == [(1, 4), (2, 8)]
    assert [r["prediction"]["bytes_per_param"]["per_rank"] for r in rows] == ["16/4", "16/8"]
    table = bench("estimate", str(matrix), "--device", "cuda", check=True).stdout
    assert "2nodes" in table and "16/8" in table and "nodes x gpus ranks" in table


def test_estimate_says_compile_cells_are_predicted_as_eager(tmp_path):
    """torch.compile is not modelled: a compiled cell's figures are the eager cell's, and the command says so
    (counting the compiled cells) instead of passing them off as a prediction of compile's memory."""
    matrix = write_matrix(tmp_path, "comp", device="cuda", model="llama-3.2-1b", strategy="ddp", gpus=1,
                          grid={"compile": [False, True]})
    args = ("estimate", str(matrix), "--capacity-gib", "80")
    rows = json.loads(bench(*args, "--json", check=True).stdout)
    eager, compiled = sorted(rows, key=lambda r: "compile" in r["label"])
    assert "compile" in compiled["label"] and compiled["prediction"]["peak_reserved_gib"] == \
        eager["prediction"]["peak_reserved_gib"]
    out = " ".join(bench(*args, check=True).stdout.split())
    assert "1 cell(s) with train.compile" in out and "not modelled" in out and "predicted as the same cell" in out
    plain = write_matrix(tmp_path, "plain", device="cuda", model="llama-3.2-1b", strategy="ddp", gpus=1)
    assert "train.compile" not in bench("estimate", str(plain), "--capacity-gib", "80", check=True).stdout
