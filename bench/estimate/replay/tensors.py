"""The model's tensors as the replay sees them: parameters by name and size in the orders the frameworks walk
them, and the activations and backward temporaries of one decoder layer."""

from __future__ import annotations

from bench.spec.models import ModelShape


def layer_params(shape: ModelShape) -> list[tuple[str, int]]:
    """One decoder layer's parameters in module order: (name, elements)."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    linears = [(n, i * o) for n, (i, o) in zip(names, shape.layer_linear_shapes)]
    return linears + [("input_layernorm", shape.hidden), ("post_attention_layernorm", shape.hidden)]


def backward_order(params: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The order in which a decoder layer's weight gradients are complete: autograd runs the nodes created
    last first (down_proj, then up_proj, created after gate_proj and its activation, ...), which decides
    where ZeRO's reduce buckets are cut."""
    order = ("down_proj", "up_proj", "gate_proj", "post_attention_layernorm", "o_proj", "v_proj", "k_proj",
             "q_proj", "input_layernorm")
    sizes = dict(params)
    return [(name, sizes[name]) for name in order]


def root_params(shape: ModelShape) -> list[tuple[str, int]]:
    """The parameters outside the decoder layers: FSDP's root unit."""
    out = [("embed_tokens", shape.embedding_params), ("norm", shape.hidden)]
    if shape.lm_head_params:
        out.append(("lm_head", shape.lm_head_params))
    return out


def model_params(shape: ModelShape) -> list[tuple[str, int]]:
    """All parameters in ``model.parameters()`` order."""
    out = [("embed_tokens", shape.embedding_params)]
    for layer in range(shape.layers):
        out += [(f"layers.{layer}.{n}", k) for n, k in layer_params(shape)]
    out.append(("norm", shape.hidden))
    if shape.lm_head_params:
        out.append(("lm_head", shape.lm_head_params))
    return out


def layer_activations(shape: ModelShape, tokens: int, c: int, r: int) -> list[tuple[str, int]]:
    """The tensors one decoder layer saves for backward (bytes), the terms of
    estimate.activations.layer_bytes_per_token (full fine-tuning) one by one."""
    h, q = shape.hidden, shape.heads * shape.head_dim
    kv, inter = shape.kv_heads * shape.head_dim, shape.intermediate
    out = []
    for norm in ("input", "post"):
        out += [(f"{norm}_norm_fp32", 4 * h), (f"{norm}_norm_out", r * h)]
        if r != c:
            out.append((f"{norm}_norm_cast", c * h))
        if norm == "input":
            out += [("q", c * q), ("k", c * kv), ("v", c * kv), ("sdpa_out", c * q), ("sdpa_lse", 4 * shape.heads),
                    ("o_proj_in", c * q)]
        else:
            out += [("gate", c * inter), ("silu", c * inter), ("up", c * inter), ("down_proj_in", c * inter)]
    return [(n, b * tokens) for n, b in out]


def backward_temporaries(acts: list[tuple[str, int]], fraction: float) -> list[tuple[str, int]]:
    """A layer's backward temporaries (gradients of its activations), ``fraction`` of its activations, taken
    largest first: the calibration constant backward_temp_fraction, as tensors."""
    budget, out = fraction * sum(b for _, b in acts), []
    for name, size in sorted(acts, key=lambda t: -t[1]):
        if budget <= 0:
            break
        out.append((f"grad_{name}", size))
        budget -= size
    return out


def ring_attention_forward(shape: ModelShape, tokens: int, cp: int, c: int) -> list[tuple[str, int]]:
    """What torch's context parallelism allocates in one layer's attention forward beyond plain SDPA, and frees
    when the attention returns (torch 2.11-2.13 _templated_ring_attention; accelerate 1.15's default
    cp_comm_strategy "allgather"), ``tokens`` being the rank's share (seq / cp x micro-batch):
    - ``kv_contiguous``: key and value made contiguous (RoPE's output is a transposed view): the local k, v;
    - ``kv_send``: k and v flattened and concatenated, the all-gather's input;
    - ``kv_gathered``: the all-gather's output, every rank's k and v: the full sequence's K/V, kept until the
      last ring step (cp steps over it, each using its chunk);
    - ``merged_out_fp32`` / ``merge_temp_fp32``: _SDPAMerger (convert_to_f32) merges each step's output in fp32,
      one more fp32 tensor of the output's size for the step's correction.
    Nothing here outlives the layer: what the backward needs (q, k, v, out, lse) is saved as for plain SDPA."""
    if cp == 1:
        return []
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return [("kv_contiguous", 2 * c * kv * tokens), ("kv_send", 2 * c * kv * tokens),
            ("kv_gathered", 2 * c * kv * tokens * cp), ("merged_out_fp32", 4 * q * tokens),
            ("merge_temp_fp32", 4 * q * tokens)]


def ring_attention_backward(shape: ModelShape, tokens: int, cp: int, c: int) -> list[tuple[str, int]]:
    """What one layer's ring-attention backward allocates and frees (_templated_ring_attention_backward): fp32
    accumulators of the q, k, v gradients (local), the K/V all-gathered again at full length (the forward kept
    only the local ones), its send buffer, one step's q/k/v gradients from the SDPA backward, and the fp32 k/v
    gradients concatenated to be passed on (all_to_all), with the receive buffer."""
    if cp == 1:
        return []
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return [("grad_acc_fp32", 4 * (q + 2 * kv) * tokens), ("kv_send", 2 * c * kv * tokens),
            ("kv_gathered", 2 * c * kv * tokens * cp), ("step_grads", c * (q + 2 * kv) * tokens),
            ("grad_kv_send_fp32", 4 * 2 * kv * tokens), ("grad_kv_recv_fp32", 4 * 2 * kv * tokens)]
