"""The estimator's mechanisms found from the first judge run (results/estimate-judge-h200, now in-sample):
ZeRO-3's replayed build and gathers (bench/estimate/replay/zero3.py) and FSDP1's parameter-offload blocks
(bench/estimate/offload_blocks.py). Each test fails if its mechanism is taken out. CPU only."""

from __future__ import annotations

import pytest

from bench.estimate import GIB, predict
from bench.estimate.activations import activation_bytes
from bench.estimate.additive import backward_buffers, model_states
from bench.estimate.allocator import CachingAllocator
from bench.estimate.offload_blocks import free_at_peak, init_blocks, peak_tensors
from bench.estimate.prediction import CALIBRATION
from bench.estimate.replay import replay
from bench.estimate.replay.zero3 import Zero3Run
from bench.spec import Adapter, CellSettings, Train
from bench.spec.models import ModelShape
from bench.strategies import get


def cell(model="llama-3.2-3b", strategy="zero3", gpus=2, adapter="none", **train) -> CellSettings:
    train = {"precision": "bf16", "seq_len": 2048, "micro_batch": 1, "optimizer": "adamw_torch",
             "grad_checkpointing": True, **train}
    return CellSettings(model=model, strategy=strategy, gpus=gpus, device="cuda", adapter=Adapter(type=adapter),
                        train=Train(**train))


class _Recorder(CachingAllocator):
    """The allocator model, noting each malloc: its name, stream, phase and what was live then."""

    def __init__(self):
        super().__init__()
        self.log: list[tuple[str, str, str, frozenset[str]]] = []

    def malloc(self, name, size, stream="compute"):
        self.log.append((name, stream, self.phase, frozenset(self._live)))
        super().malloc(name, size, stream)


def _zero3_run(c: CellSettings) -> Zero3Run:
    run = Zero3Run(c, ModelShape.of(c.model), get(c.strategy))
    run.mem = _Recorder()
    run.replay()
    return run


# ---------------------------------------------------------------- ZeRO-3

def test_zero3_fp32_copy_of_a_sub_group_lives_until_the_next_one_is_made():
    """_create_fp32_partitions keeps ``converted`` in a loop variable: with two sub-groups (3B on 2 ranks:
    1.6e9 elements over sub_group_size 1e9) the first copy is still live when the second is made."""
    run = _zero3_run(cell())
    assert len(run.sub_groups()) == 2
    live_at_second = next(live for name, *_, live in run.mem.log if name == "ds_fp32_converted1")
    assert "ds_fp32_converted0" in live_at_second
    assert not any(n.startswith("ds_fp32_converted") for n in run.mem._live)


def test_zero3_gathered_parameters_come_from_the_allgather_streams_pool():
    """The coordinator gathers and waits inside ``with stream(allgather_stream)``: every gathered parameter
    and flat buffer is allocated on that stream."""
    run = _zero3_run(cell())
    gathered = [(name, stream) for name, stream, *_ in run.mem.log if name.startswith(("z3_param:", "ag_flat"))]
    assert gathered and {stream for _, stream in gathered} == {"allgather"}


def test_zero3_one_parameter_gather_is_its_own_buffer_and_prefetch_coalesces():
    """all_gather_coalesced of one parameter runs _all_gather_sequential (the buffer is the parameter: no flat
    buffer); the first pass fetches one module at a time, the traced passes prefetch several at once."""
    run = _zero3_run(cell())
    first_step = next(i for i, (_, _, phase, _) in enumerate(run.mem.log) if phase == "optimizer step")
    first_forward = [name for name, _, phase, _ in run.mem.log[:first_step] if phase == "forward"]
    assert any(n.startswith("z3_param:") for n in first_forward)
    assert not any(n.startswith("ag_flat") for n in first_forward)
    assert any(name.startswith("ag_flat") for name, *_ in run.mem.log)  # the prefetches of later steps


def test_zero3_3b_reserved_before_the_first_step_counts_both_fp32_copies():
    """3B, 2 ranks: flat bf16 partition, the first sub-group's copy and partition, the second's copy in its
    own segment (the first copy is live), the zeroed gradient buffer in a new one: 16.45 GiB, as the record
    reads (results/estimate-judge-h200: 16.449 GiB); freeing the copy at once gave 15.71."""
    c = cell()
    shape = ModelShape.of(c.model)
    g0, g1 = Zero3Run(c, shape, get(c.strategy)).sub_groups()
    # flat 16-bit partition; copy 0 (its segment later takes partition 1); partition 0; copy 1; gradient buffer
    expected = 2 * shape.params / 2 + 4 * g0 + 4 * g0 + 4 * g1 + 4 * g0
    rep = replay(c, shape, get(c.strategy))
    assert rep.reserved_after_prepare == pytest.approx(expected, rel=0.002)
    assert rep.reserved_after_prepare / GIB == pytest.approx(16.449, rel=0.01)


# ---------------------------------------------------------------- FSDP1 parameter offload

def _fsdp_offload(model, adapter, seq=2048, mb=1, gpus=2):
    c = cell(model=model, strategy="fsdp_full_shard_offload", gpus=gpus, adapter=adapter, seq_len=seq, micro_batch=mb)
    return c, ModelShape.of(model)


def test_offload_init_leaves_two_and_a_half_root_units_cached():
    """A host-built model: each unit moved, flattened, sharded, offloaded; the originals live until the unit
    is done. The root (the largest unit, U) leaves U + U + U/2 on 2 ranks; nothing stays allocated."""
    c, shape = _fsdp_offload("llama-3.2-3b", "qlora")
    mem = CachingAllocator()
    init_blocks(mem, c, shape, layer_bytes=0.5, root_bytes=2, on_host=True)
    root = 2 * (shape.embedding_params + shape.lm_head_params + shape.hidden)
    assert mem.allocated == 0
    assert mem.peak_allocated == pytest.approx(2.5 * root, rel=0.01)
    assert mem.reserved == pytest.approx(2.5 * root, abs=0.15 * GIB)  # + the layers' (small) blocks


def test_no_shard_clone_on_one_rank():
    c, shape = _fsdp_offload("llama-3.2-1b", "none", gpus=1)
    sharded, single = CachingAllocator(), CachingAllocator()
    init_blocks(sharded, c, shape, 4, 4, on_host=False, sharded=True)
    init_blocks(single, c, shape, 4, 4, on_host=False, sharded=False)
    assert single.peak_allocated < sharded.peak_allocated


def _free(model, seq, mb, phase="backward"):
    c, shape = _fsdp_offload(model, "qlora", seq, mb)
    acts = activation_bytes(shape, seq, mb, 2, 2, True, CALIBRATION.backward_temp_fraction, output_logits_bytes=4,
                            frozen_base=True)
    return free_at_peak(c, shape, acts, 0.5, 2, True, True, 2, 4, CALIBRATION.backward_temp_fraction, phase)


def test_logits_that_fit_the_init_blocks_fill_them_and_larger_ones_do_not():
    """1B at 1024 tokens: its fp32 logits (0.49 GiB) fit the root's 0.49 GiB blocks, so little stays free at
    the loss's peak; 3B at 2048 tokens: its fp32 logits (0.98 GiB) do not fit the 0.73 GiB blocks, which stay
    free but for the checkpointed inputs."""
    small = _free("llama-3.2-1b", 512, 2)
    large = _free("llama-3.2-3b", 2048, 1)
    root_3b = 2 * ModelShape.of("llama-3.2-3b").embedding_params
    assert small < 0.5 * GIB
    assert large > 1.8 * root_3b


def test_peak_tensors_follow_the_loss_and_its_backward():
    c, shape = _fsdp_offload("llama-3.2-3b", "qlora")
    acts = activation_bytes(shape, 2048, 1, 2, 2, True, 0.5, output_logits_bytes=4, frozen_base=True)
    names = [n for op, n, _ in peak_tensors(c, shape, acts, 2, 4, 0.5, "backward") if op == "malloc"]
    assert names[-4:] == ["log_softmax", "output_logits", "grad_log_softmax", "grad_logits_fp32"]
    layers = [n for op, n, _ in peak_tensors(c, shape, acts, 2, 4, 0.5, "backward (layers)") if op == "malloc"]
    assert any(n.startswith("recompute") for n in layers)


def test_qlora_fsdp_offload_reserves_the_init_blocks():
    """The judge cell that missed by -10.2 %: its prediction now holds the free init blocks (> 1 GiB)."""
    p = predict(cell(strategy="fsdp_full_shard_offload", adapter="qlora"))
    assert p.overhead_detail_gib["cached:fsdp_offload_init_blocks"] > 1.0
    assert "cached:cached_half_logits" not in p.overhead_detail_gib  # the 16-bit logits sit in those blocks


@pytest.mark.parametrize("adapter, copy", [("qlora", True), ("none", False)])
def test_offloaded_shard_copy_only_without_a_cast(adapter, copy):
    """pre_unshard keeps flat_param_to(device)'s copy while the unit is unsharded (a bf16 root); fp32 weights
    cast to bf16 go through the low-precision shard, freed after the all-gather."""
    c = cell(strategy="fsdp_full_shard_offload", adapter=adapter)
    shape, strategy = ModelShape.of(c.model), get(c.strategy)
    buffers = backward_buffers(c, shape, strategy, model_states(c, shape, strategy), CALIBRATION, "loss")
    assert ("fsdp_offloaded_shard_copy" in buffers) is copy
