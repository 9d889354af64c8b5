"""FLOPs per trained token and the GPU peak table that MFU divides by.

Convention (stated in every report):
- A matmul of a token with a weight of N parameters costs 2N FLOPs forward. Backward costs 2N for the
  input gradient plus 2N for the weight gradient. Full fine-tune: 6N per token over all matmul weights
  (the LM head included, the embedding lookup not).
- Frozen base (LoRA, QLoRA): the base weights get no weight gradient, so 4N for them, plus 6 x the
  adapter parameters (which do get weight gradients). QLoRA dequantises to the compute dtype, same count.
- Attention scores (QK^T and AV) per layer and token: 4 x keys attended x (heads x head_dim) forward; x3
  for training, with a frozen base too, since the activation gradients still flow through attention.
  Causal (the headline, and the honest count for causal LMs: a token attends to itself and the tokens
  before it, (L + 1) / 2 keys on average over a sequence of L): what a causal kernel (SDPA/flash with
  is_causal) computes. Full matrix (L keys, as in PaLM's appendix B) is kept beside it, for comparison with
  figures quoted under that convention; it reads 3-5 % higher for 8B models at 2048 tokens.
- L is the actual sequence length where the record tells it: synthetic and packed data fill every
  sequence to seq_len; padded real data has real tokens / sequences per step as its mean length (the
  per-sequence lengths are not recorded, so this slightly undercounts the attention of uneven batches).
- Recomputation (gradient checkpointing) runs the forward once more. It counts only in "hardware FLOPs"
  (HFU), never in model FLOPs (MFU), so that MFU compares settings on the useful work alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bench.spec.models import ModelShape

CONVENTION = (
    "model FLOPs per real (non-padding) token = 6N (full fine-tune) or 4N + 6 x adapter params (LoRA/QLoRA, "
    "frozen base: no weight-gradient matmuls for the base), N = matmul weights incl. LM head; plus attention "
    "scores 12 x layers x heads x head_dim x keys attended, at the actual sequence length L. Headline: causal "
    "attention, (L + 1) / 2 keys per token on average: what a causal LM computes and the honest count for it; "
    "the full-matrix count (L keys, no causal halving, as in PaLM's appendix B) is given beside it (MFU full "
    "attn.). Gradient checkpointing adds one more forward, counted only in hardware FLOPs (HFU), which count "
    "every computed token, padding included. Peak: dense (no sparsity) bf16/fp16 tensor-core datasheet "
    "figure of the GPU model."
)


@dataclass(frozen=True)
class FlopCount:
    model_per_token: float  # useful work: what MFU uses
    hardware_per_token: float  # what the GPU actually executes, recomputation included


def attention_forward_per_token(shape: ModelShape, seq_len: float, causal: bool = True) -> float:
    """QK^T and AV of one token: 2 matmuls x 2 FLOPs x keys attended x heads x head_dim, per layer."""
    keys = (seq_len + 1) / 2 if causal else seq_len
    return 4.0 * shape.layers * keys * shape.heads * shape.head_dim


def training_flops_per_token(shape: ModelShape, seq_len: float, adapter_type: str = "none",
                             adapter_params: int = 0, grad_checkpointing: bool = False,
                             causal: bool = True) -> FlopCount:
    """FLOPs of one training token (forward + backward) under the convention above."""
    n = float(shape.matmul_params)
    attn_fwd = attention_forward_per_token(shape, seq_len, causal)
    frozen_base = adapter_type in ("lora", "qlora")
    if frozen_base:
        model = 4 * n + 6 * adapter_params + 3 * attn_fwd
        forward = 2 * n + 2 * adapter_params + attn_fwd
    else:
        model = 6 * n + 3 * attn_fwd
        forward = 2 * n + attn_fwd
    return FlopCount(model, model + (forward if grad_checkpointing else 0.0))


def flops_for_settings(settings: dict, causal: bool = True, seq_len: float | None = None) -> FlopCount | None:
    """FLOPs per token for a record's resolved settings at sequence length ``seq_len`` (default: the
    configured one); None if the model's config cannot be read."""
    try:
        shape = ModelShape.of(settings["model"])
    except (OSError, KeyError, ValueError):
        return None
    adapter, train = settings["adapter"], settings["train"]
    adapter_params = shape.lora_params(adapter["r"], adapter["target"]) if adapter["type"] != "none" else 0
    length = seq_len if seq_len is not None else train["seq_len"]
    return training_flops_per_token(shape, length, adapter["type"], adapter_params,
                                    train["grad_checkpointing"], causal)


@dataclass(frozen=True)
class GpuPeak:
    pattern: str  # regex matched against the name NVML reports, e.g. "NVIDIA H100 80GB HBM3"
    model: str
    tflops: float  # dense bf16 tensor-core (fp16 for V100), fp32 accumulate
    source: str


# Most specific first: "H100 PCIe" must win over the plain "H100" (NVML's name for the SXM part).
# A10G (AWS) is left out on purpose: NVIDIA publishes no datasheet figure for it.
GPU_PEAKS = [
    GpuPeak(r"H100.*PCIe", "H100 PCIe", 756.0, "NVIDIA H100 Tensor Core GPU datasheet (1,513 with sparsity)"),
    GpuPeak(r"H100.*NVL", "H100 NVL", 835.5, "NVIDIA H100 Tensor Core GPU datasheet (1,671 with sparsity)"),
    GpuPeak(r"H100", "H100 SXM", 989.4, "NVIDIA H100 Tensor Core GPU datasheet (1,979 with sparsity)"),
    GpuPeak(r"H200.*NVL", "H200 NVL", 835.5, "NVIDIA H200 Tensor Core GPU datasheet (1,671 with sparsity)"),
    GpuPeak(r"H200", "H200 SXM", 989.4, "NVIDIA H200 Tensor Core GPU datasheet (1,979 with sparsity)"),
    GpuPeak(r"A100", "A100", 312.0, "NVIDIA A100 Tensor Core GPU datasheet (624 with sparsity)"),
    GpuPeak(r"L40S", "L40S", 362.05, "NVIDIA L40S datasheet (733 with sparsity)"),
    GpuPeak(r"L40\b", "L40", 181.05, "NVIDIA L40 datasheet (362.1 with sparsity)"),
    GpuPeak(r"\bL4\b", "L4", 121.0, "NVIDIA L4 datasheet (242 with sparsity)"),
    GpuPeak(r"\bA10\b", "A10", 125.0, "NVIDIA A10 datasheet (250 with sparsity)"),
    GpuPeak(r"RTX 4090$", "GeForce RTX 4090", 165.2,
            "NVIDIA Ada GPU architecture whitepaper (bf16, fp32 accumulate)"),
    GpuPeak(r"RTX 3090$", "GeForce RTX 3090", 71.0,
            "NVIDIA Ampere GA102 GPU architecture whitepaper (bf16, fp32 accumulate)"),
    GpuPeak(r"V100S", "V100S PCIe", 130.0, "NVIDIA V100 Tensor Core GPU datasheet (fp16, no bf16)"),
    GpuPeak(r"V100.*PCIE", "V100 PCIe", 112.0, "NVIDIA V100 Tensor Core GPU datasheet (fp16, no bf16)"),
    GpuPeak(r"V100", "V100 SXM2", 125.0, "NVIDIA V100 Tensor Core GPU datasheet (fp16, no bf16)"),
]


def gpu_peak(name: str | None) -> GpuPeak | None:
    """The peak entry for a GPU as NVML names it; None for an unknown GPU or a CPU (MFU is then left empty)."""
    if not name:
        return None
    return next((p for p in GPU_PEAKS if re.search(p.pattern, name, flags=re.IGNORECASE)), None)
