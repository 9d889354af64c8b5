"""Activation memory of one micro-batch of a Llama-style decoder (HF transformers, SDPA attention).

Counted the way Korthikanti et al. ("Reducing Activation Recomputation in Large Transformer Models",
2022, section 4.1) count GPT's 34*s*b*h: the tensors autograd saves for the backward pass, per layer,
in bytes. Adapted to Llama (RMSNorm, GQA, RoPE, SwiGLU MLP of width I, flash/efficient SDPA that saves
no s*s scores). With s = sequence, b = micro-batch, h = hidden, q = heads*head_dim, kv = kv_heads*head_dim,
c = compute-dtype bytes, r = residual-stream bytes (4 under autocast with fp32 weights, else = weights):

  per layer = s*b*[ 2 norms * (4 (fp32 upcast) + r (normed) + c (autocast copy, when r != c)) * h
                  + c * (3q + 2kv)      SDPA saves q, k, v, out; o_proj saves its input
                  + 4 * heads           SDPA log-sum-exp
                  + 4 * c * I           SwiGLU: gate out, silu out, up out, down input
                  + LoRA dropout copies and masks of the targeted layers' inputs ]

A frozen base (LoRA, QLoRA) keeps a linear's input only where its LoRA A needs it without dropout: with
dropout the normed states, o_proj's and down_proj's inputs are not kept (the dropped-out copies are).

  logits = s*b*V*(o + 12): the logits the output holds (o = c, or 4 where accelerate's autocast wrapper
           converts the outputs to fp32), fp32 log-softmax saved by the loss, its gradient and the fp32
           gradient of the upcast, all alive at the start of backward.

Under Liger's fused linear cross-entropy (train.kernels: liger) no full logits exist: the loss runs in
chunks of C = min(next_pow2(ceil(s*b / ceil(V/h))), s*b) tokens, holding one chunk's logits (C*V, in the
dtype of the head's input: i) and, from the forward on, the gradient of the head's input (s*b*h*i) and
the fp32 per-token loss (4*s*b); the output holds no logits (fused_loss_bytes).

With gradient checkpointing (HF, per decoder layer) only each layer's input (r*s*b*h) is kept; backward
recomputes one layer at a time, so the peak is the kept inputs plus the larger of the logits and one
layer's full activations (plus its backward temporaries).

torch.compile (train.compile) is not modelled: a compiled cell is predicted as the eager one. Inductor may
save fewer or other tensors for backward (fused elementwise chains, recomputed cheap ops) and adds its own
buffers; by how much, and in which direction, no GPU record has said yet. Until records of compiled cells
(matrices/kernels-h200.yaml's setting with a compile axis, tests/gpu/test_kernels_gpu.py's compile cells)
are checked against their prediction (`bench estimate-check`), `bench estimate` says so on compile cells.

Pure arithmetic: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.spec.models import ModelShape

LOGITS_BYTES_OVER_COMPUTE = 12  # fp32 log-softmax out + its grad + fp32 grad of the upcast, per logit
LORA_TARGET_INPUTS = {"q_proj": "h", "k_proj": "h", "v_proj": "h", "o_proj": "q",
                      "gate_proj": "h", "up_proj": "h", "down_proj": "I"}


@dataclass(frozen=True)
class ActivationBytes:
    """Activation bytes of one rank at the two moments that can hold the peak."""

    per_layer: float  # one decoder layer, not checkpointed
    kept: float  # what the forward leaves for the backward (all layers, or only their inputs)
    logits_peak: float  # the loss and its first backward ops
    logits_kept: float  # the bf16 logits the model output still holds at the optimizer step
    at_backward_start: float  # the activation peak: kept + logits or recompute
    layer_temp: float = 0.0  # one layer's backward temporaries beside its activations

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def lora_input_width(shape: ModelShape, target: str | tuple[str, ...]) -> int:
    """Sum of the input widths of the LoRA-targeted linear layers of one decoder layer."""
    widths = {"h": shape.hidden, "q": shape.heads * shape.head_dim, "I": shape.intermediate}
    names = LORA_TARGET_INPUTS if target == "all-linear" else target
    return sum(widths[LORA_TARGET_INPUTS[n]] for n in names)


def _inputs_saved(frozen_base: bool, targets: frozenset[str], dropout: bool, consumers: tuple[str, ...]) -> bool:
    """Whether autograd keeps the input of these linears: a trained linear saves it for its weight gradient;
    a frozen one does not, but its LoRA A saves it where there is no dropout (with dropout, A saves the
    dropped-out copy instead, counted with the LoRA terms)."""
    return not frozen_base or (not dropout and any(c in targets for c in consumers))


def layer_bytes_per_token(shape: ModelShape, compute_bytes: int, residual_bytes: int,
                          lora_dropout_width: int = 0, lora_rank_width: int = 0,
                          frozen_base: bool = False, lora_targets: frozenset[str] = frozenset(),
                          liger: bool = False, input_kept: bool = False) -> float:
    """Bytes one decoder layer saves for backward, per token (the formula in the module docstring).

    ``frozen_base`` (LoRA/QLoRA): the base linears' inputs are kept only where LoRA saves them (see
    _inputs_saved): the normed hidden states feeding q/k/v and gate/up, o_proj's and down_proj's inputs.
    ``liger``: Liger's RMSNorm and SwiGLU in place of transformers' (liger_norm_mlp_bytes); ``input_kept``: the
    layer's input is kept anyway (the checkpoint's), so its norm saving it costs nothing more.
    """
    h, c, r = shape.hidden, compute_bytes, residual_bytes
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    dropout = lora_dropout_width > 0

    def saved(*consumers: str) -> bool:
        return _inputs_saved(frozen_base, lora_targets, dropout, consumers)

    normed = r + (c if c != r else 0)  # the norm's output, and the linears' autocast copy of it
    norms = normed * h * (saved("q_proj", "k_proj", "v_proj") + saved("gate_proj", "up_proj"))
    attention = c * (2 * q + 2 * kv) + 4 * shape.heads + c * q * saved("o_proj")  # SDPA: q, k, v, out, lse
    mlp = c * shape.intermediate * saved("down_proj")  # down's input
    if liger:
        norms_mlp = liger_norm_mlp_bytes(shape, c, r, input_kept)
    else:
        norms_mlp = 2 * 4 * h + 3 * c * shape.intermediate  # each norm's fp32 upcast; gate, silu, up
    lora = (c + 1) * lora_dropout_width + c * lora_rank_width  # dropout output + bool mask; A's output
    return norms + norms_mlp + attention + mlp + lora


def liger_norm_mlp_bytes(shape: ModelShape, compute_bytes: int, residual_bytes: int, input_kept: bool) -> float:
    """What Liger's kernels save per token for backward where transformers' norms and MLP save 2 x 4h + 3 x c*I
    (liger-kernel 0.8, ops/rms_norm.py and ops/swiglu.py): LigerRMSNormFunction saves its input X in its own dtype
    (the residual stream's: the input norm's is the layer's input, the post-attention norm's the residual sum) and
    the fp32 inverse RMS per row, no fp32 upcast; LigerSiLUMulFunction saves the gate and up outputs and makes the
    product in one kernel (SiLU's output is never stored) and its backward writes their gradients in place."""
    norm_inputs = 1 if input_kept else 2
    return norm_inputs * residual_bytes * shape.hidden + 2 * 4 + 2 * compute_bytes * shape.intermediate


def liger_chunk_tokens(tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk of Liger's fused linear cross-entropy (its chunk_mem_const 1: a chunk's logits are
    about as large as the whole head input)."""
    inc_factor = -(-vocab // hidden)
    chunk = 1 << max(0, (-(-tokens // inc_factor) - 1).bit_length())  # the next power of two
    return min(chunk, tokens)


def liger_backward_temp(shape: ModelShape, compute_bytes: int, lora_widest_input: int = 0,
                        fp32_adapter_inputs: bool = False) -> int:
    """One Liger layer's backward temporaries per token, at their largest: down_proj's backward (the layer's
    widest input, I), where the base linear's input gradient (c*I) meets, for a LoRA on it, its adapter's chain:
    A's input gradient through the dropout's backward to the module's input. Under autocast with fp32 adapters
    peft casts each module's input to the adapter's dtype (LoraLayer._cast_input_dtype), so that chain runs in
    fp32: the autocast copy's gradient upcast (4) and the dropout's gradient (4) live together, 8 bytes per input
    element where a 16-bit adapter holds c + c. Liger's SwiGLU and RMSNorm write their gradients in place: beyond
    down_proj's, nothing as large (the calibrated fraction of the layer's activations stands for transformers'
    out-of-place ones elsewhere)."""
    chain = (4 + 4 if fp32_adapter_inputs else 2 * compute_bytes) * lora_widest_input
    return compute_bytes * shape.intermediate + chain


def fused_loss_bytes(shape: ModelShape, tokens: int, input_bytes: int) -> int:
    """The fused loss's peak: one chunk's logits, the head input's gradient and the fp32 per-token loss."""
    chunk = liger_chunk_tokens(tokens, shape.vocab, shape.hidden)
    return chunk * shape.vocab * input_bytes + tokens * shape.hidden * input_bytes + 4 * tokens


def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, compute_bytes: int,
                     residual_bytes: int, checkpointing: bool, backward_temp_fraction: float,
                     lora_dropout_width: int = 0, lora_rank_width: int = 0,
                     output_logits_bytes: int | None = None, frozen_base: bool = False,
                     lora_targets: frozenset[str] = frozenset(), fused_loss: bool = False,
                     lora_widest_input: int = 0, fp32_adapter_inputs: bool = False) -> ActivationBytes:
    """``output_logits_bytes``: the dtype of the logits the model output holds (accelerate's autocast
    wrapper, convert_outputs_to_fp32, hands back fp32 logits: 4); the compute dtype when None.
    ``fused_loss``: Liger's kernels (train.kernels: liger): its fused linear cross-entropy, no full logits
    (fused_loss_bytes), its norms and MLP saving less (liger_norm_mlp_bytes) and backward temporaries written
    down (liger_backward_temp, with the widest LoRA input and whether peft runs the adapters in fp32)."""
    tokens = seq_len * micro_batch
    out_bytes = compute_bytes if output_logits_bytes is None else output_logits_bytes
    per_layer = tokens * layer_bytes_per_token(shape, compute_bytes, residual_bytes, lora_dropout_width,
                                               lora_rank_width, frozen_base, lora_targets, liger=fused_loss,
                                               input_kept=checkpointing)
    head_in = tokens * shape.hidden * (4 + residual_bytes + compute_bytes)  # final norm + lm_head input
    logits_peak = tokens * shape.vocab * (out_bytes + LOGITS_BYTES_OVER_COMPUTE)
    logits_kept = tokens * shape.vocab * out_bytes
    layer_temp = per_layer * backward_temp_fraction
    if fused_loss:  # the head's input is in the residual stream's dtype (Liger's RMSNorm keeps it)
        logits_peak, logits_kept = fused_loss_bytes(shape, tokens, residual_bytes), 0
        layer_temp = tokens * liger_backward_temp(shape, compute_bytes, lora_widest_input, fp32_adapter_inputs)
    if checkpointing:
        kept = shape.layers * tokens * shape.hidden * residual_bytes + head_in
        peak = kept + max(logits_peak, per_layer + layer_temp)
    else:
        kept = shape.layers * per_layer + head_in
        peak = kept + logits_peak
    return ActivationBytes(per_layer, kept, logits_peak, logits_kept, peak, layer_temp)
