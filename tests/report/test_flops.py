"""FLOP convention and GPU peak lookup (unit tests, nothing launched)."""

from __future__ import annotations

import pytest

from bench.report import flops
from bench.spec.models import ModelShape

# A shape small enough to count by hand: 2 layers, hidden 8, MLP 16, 2 heads of 4, 1 KV head, vocab 10.
SMALL = ModelShape(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10,
                   tied_embeddings=False)
# per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192, gate/up 8x16 x2 + down 16x8 = 384 -> 576;
# matmul weights = 2 x 576 + LM head 10 x 8 = 1232; attention forward at seq 16 over the full matrix
# = 4 x 2 layers x 16 keys x 2 heads x 4 = 1024; causal: (16 + 1) / 2 = 8.5 keys on average -> 544
N, ATTN, CAUSAL_ATTN = 1232, 1024, 544


def test_full_finetune_is_6n_plus_3x_attention():
    count = flops.training_flops_per_token(SMALL, seq_len=16, causal=False)
    assert count.model_per_token == 6 * N + 3 * ATTN == 10464
    assert count.hardware_per_token == count.model_per_token  # no recomputation


def test_causal_attention_counts_the_keys_each_token_attends():
    assert flops.training_flops_per_token(SMALL, seq_len=16).model_per_token == 6 * N + 3 * CAUSAL_ATTN
    # one token attends to itself only: 1 key
    assert flops.attention_forward_per_token(SMALL, 1) == flops.attention_forward_per_token(SMALL, 1, causal=False)
    assert "causal" in flops.CONVENTION and "honest" in flops.CONVENTION


def test_attention_at_the_real_length_and_the_8b_gap():
    """A shorter real length costs less attention; for Llama-3.1-8B LoRA at 2048 the full-matrix count is a
    few percent above the causal one (the figure the issue measured the old MFU against)."""
    short = flops.training_flops_per_token(SMALL, seq_len=8).model_per_token
    assert short < flops.training_flops_per_token(SMALL, seq_len=16).model_per_token
    settings = {"model": "llama-3.1-8b", "adapter": {"type": "lora", "r": 32, "target": "all-linear"},
                "train": {"seq_len": 2048, "grad_checkpointing": True}}
    causal = flops.flops_for_settings(settings).model_per_token
    full = flops.flops_for_settings(settings, causal=False).model_per_token
    assert 1.03 < full / causal < 1.06
    assert flops.flops_for_settings(settings, seq_len=1024).model_per_token < causal


def test_frozen_base_is_4n_plus_6x_adapter():
    adapter = SMALL.lora_params(2, "all-linear")
    assert adapter == 512  # 2 layers x r=2 x sum(in + out) = 2 x 2 x 128
    for kind in ("lora", "qlora"):
        count = flops.training_flops_per_token(SMALL, 16, kind, adapter)
        assert count.model_per_token == 4 * N + 6 * adapter + 3 * CAUSAL_ATTN


def test_recomputation_counts_only_in_hardware_flops():
    plain = flops.training_flops_per_token(SMALL, 16)
    ckpt = flops.training_flops_per_token(SMALL, 16, grad_checkpointing=True)
    assert ckpt.model_per_token == plain.model_per_token
    assert ckpt.hardware_per_token == plain.model_per_token + 2 * N + CAUSAL_ATTN  # one more forward


def test_real_model_near_textbook_figures():
    """Llama-3.1-8B at 2048 tokens: full ~ 6 x params (within attention and embedding terms); LoRA ~ 2/3 of it."""
    shape = ModelShape.of("llama-3.1-8b")
    full = flops.training_flops_per_token(shape, 2048).model_per_token
    assert 6 * shape.params * 0.9 < full < 6 * shape.params * 1.25
    lora = flops.training_flops_per_token(shape, 2048, "lora", shape.lora_params(16, "all-linear")).model_per_token
    assert 0.6 < lora / full < 0.75


def test_flops_for_settings_reads_the_record_settings():
    settings = {"model": "tiny-llama", "adapter": {"type": "lora", "r": 4, "target": "all-linear"},
                "train": {"seq_len": 64, "grad_checkpointing": True}}
    shape = ModelShape.of("tiny-llama")
    expected = flops.training_flops_per_token(shape, 64, "lora", shape.lora_params(4, "all-linear"), True)
    assert flops.flops_for_settings(settings) == expected
    assert flops.flops_for_settings({**settings, "model": "/no/such/model"}) is None


@pytest.mark.parametrize("nvml_name, model, tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5),
    ("NVIDIA H200", "H200 SXM", 989.4),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("NVIDIA L40S", "L40S", 362.05),
    ("NVIDIA L4", "L4", 121.0),
    ("NVIDIA A10", "A10", 125.0),
    ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", "GeForce RTX 3090", 71.0),
    ("Tesla V100-SXM2-32GB", "V100 SXM2", 125.0),
    ("Tesla V100-PCIE-16GB", "V100 PCIe", 112.0),
])
def test_gpu_peak_matches_nvml_names(nvml_name, model, tflops):
    peak = flops.gpu_peak(nvml_name)
    assert peak is not None and (peak.model, peak.tflops) == (model, tflops)
    assert "datasheet" in peak.source or "whitepaper" in peak.source


@pytest.mark.parametrize("name", [None, "", "NVIDIA A10G", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 4090 D", "AMD EPYC", "Some Future GPU"])
def test_unknown_gpu_has_no_peak(name):
    assert flops.gpu_peak(name) is None
