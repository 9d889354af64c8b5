"""The estimator's per-rank view of tensor- and context-parallel cells (bench/estimate/parallel.py), against
numbers worked out by hand from the published Llama shapes."""

from __future__ import annotations

import pytest

from bench.estimate import GIB, predict
from bench.estimate.activations import layer_bytes_per_token
from bench.estimate.parallel import rank_shape, shard_ranks
from bench.strategies import for_cell
from bench.spec import CellSettings
from bench.spec.models import ModelShape


def cell(**kw) -> CellSettings:
    base = {"model": "llama-3.1-8b", "strategy": "fsdp2", "gpus": 4, "device": "cuda",
            "train": {"seq_len": 2048, "micro_batch": 1, "precision": "bf16", "optimizer": "adamw_torch"}}
    return CellSettings.model_validate({**base, **kw})


def test_fsdp2_with_tp2_on_4_gpus_divides_states_by_shard_and_tensor_degrees():
    """Llama-3.1-8B (32 layers, hidden 4096, MLP 14336, 32 heads, 8 kv heads of 128, vocab 128256, untied):
    one decoder layer's linears hold q 4096x4096 + k, v 4096x1024 + o 4096x4096 + gate, up, down 4096x14336
    = 218,103,808 parameters; tp 2 keeps half of them, 109,051,904, plus the layer's two norms (8,192) whole,
    and half of the embedding and of the head (128256 x 4096 / 2 = 262,668,288 each), plus the final norm:
    32 x 109,060,096 + 2 x 262,668,288 + 4,096 = 4,015,263,744 parameters per tensor rank; FSDP2 shards
    them over dp_shard 2: 2,007,631,872. fp32 weights (4 B), fp32 gradients (4 B), Adam (8 B)."""
    c = cell(tp=2)
    per_rank = 2_007_631_872
    pred = predict(c)
    assert shard_ranks(c, for_cell(c)) == 2
    assert pred.components_gib["params"] * GIB == pytest.approx(4 * per_rank, abs=1)
    assert pred.components_gib["grads"] * GIB == pytest.approx(4 * per_rank, abs=1)
    assert pred.components_gib["optimizer"] * GIB == pytest.approx(8 * per_rank, abs=1)
    # tensor parallelism alone on 2 GPUs: the same tensor share, no data-parallel sharding
    alone = predict(cell(strategy="tp", tp=2, gpus=2))
    assert alone.components_gib["params"] * GIB == pytest.approx(4 * 4_015_263_744, abs=1)


def test_one_tensor_rank_is_the_architecture_with_a_share_of_its_heads_and_width():
    """tiny-llama at tp 2 (hidden 128, 4 -> 2 heads, 2 -> 1 kv heads of 32, MLP 344 -> 172), bf16 compute and
    residual (FSDP2): norms 2 x 4 x 128 + 2 x (128 x 2) = 1,536; attention 2 x (2 x 64 + 2 x 32) + 4 x 2 +
    2 x 64 = 520; MLP 3 x 2 x 172 + 2 x 172 = 1,376: 3,432 bytes per token per layer."""
    shape = rank_shape(ModelShape.of("tiny-llama"), for_cell(cell(model="tiny-llama", tp=2)))
    assert (shape.heads, shape.kv_heads, shape.intermediate, shape.vocab_shards) == (2, 1, 172, 2)
    assert layer_bytes_per_token(shape, 2, 2) == 3_432


def test_context_parallel_gives_each_rank_its_share_of_the_sequence():
    """Llama-3.2-1B (hidden 2048, 32 heads, 8 kv heads of 64, MLP 8192), bf16 compute and residual: norms
    2 x 4 x 2048 + 2 x (2048 x 2) = 24,576; attention 2 x (2 x 2048 + 2 x 512) + 4 x 32 + 2 x 2048 = 14,464;
    MLP 3 x 2 x 8192 + 2 x 8192 = 65,536: 104,576 bytes per token per layer. At seq 16384 and cp 2 a rank holds
    8,192 tokens: 856,686,592 bytes per layer. The states are sharded over dp_shard x cp = 2 all the same."""
    with_cp = predict(cell(model="llama-3.2-1b", gpus=2, cp=2, train={"seq_len": 16384, "micro_batch": 1}))
    without = predict(cell(model="llama-3.2-1b", gpus=2, train={"seq_len": 16384, "micro_batch": 1}))
    assert with_cp.activations_detail_gib["per_layer"] * GIB == pytest.approx(8_192 * 104_576, abs=1)
    assert without.activations_detail_gib["per_layer"] * GIB == pytest.approx(16_384 * 104_576, abs=1)
    assert with_cp.components_gib["params"] == pytest.approx(without.components_gib["params"])
    assert with_cp.reserved_model == "additive"  # the allocator replay does not model these layouts


def test_the_bytes_per_parameter_line_shows_the_tensor_split():
    """tp2 alone showed "16" B/param per rank, as if every rank held the whole model's states."""
    alone = predict(cell(strategy="tp", tp=2, gpus=2)).bytes_per_param
    assert alone["per_rank"] == "16/tp2" and alone["tensor_split"] == 2
    both = predict(cell(tp=2)).bytes_per_param  # fsdp2 + tp 2 on 4 GPUs: dp_shard 2, tensor 2
    assert both["per_rank"] == "16/2/tp2" and both["ranks"] == 2
    assert "tensor_split" not in predict(cell()).bytes_per_param and predict(cell()).bytes_per_param["per_rank"] == "16/4"
