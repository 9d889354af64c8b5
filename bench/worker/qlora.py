"""QLoRA: a random-init model built straight into 4-bit NF4 (bitsandbytes), layer by layer, then LoRA (peft).

A 70B model must never exist in bf16 on one GPU, nor in full on the host. So the architecture is built on
the meta device, and each decoder layer in turn is materialised in bf16 with random init on the
build device, each of its nn.Linear is replaced by a ``bnb.nn.Linear4bit`` (NF4, bf16 compute) quantised
from that bf16 weight, and the bf16 copy is dropped before the next layer. Embeddings, norms and the LM
head stay in bf16, as in every QLoRA recipe. Peak memory: the 4-bit model so far plus one bf16 layer.

Sharding: FSDP flattens parameters of one dtype per unit, so the 4-bit weights are stored in
``adapter.quant_storage`` (bf16 by default: the packed 4-bit bytes viewed as bf16), the way
``bnb_4bit_quant_storage`` makes FSDP-QLoRA and ZeRO-3-QLoRA work; the quantisation state (absmax ...)
stays on the module, where bitsandbytes finds it again after FSDP swapped the parameter
(``fix_4bit_weight_quant_state_from_module``). Under FSDP the LoRA weights stay in bf16 too (one dtype
per flat parameter); elsewhere peft keeps them in fp32.

Every rank builds the same model from the same seed (no broadcast needed). Where parameters are
offloaded to the CPU (FSDP param offload), each layer's 4-bit weight is moved to the host once
quantised, so the GPU never holds the whole model: FSDP moves one unit at a time to the GPU to shard it.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.spec import CellSettings, models
from bench.strategies.build import builds_on_host, fsdp_family, upcasts_to_fp32
from bench.strategies.precision import PrecisionPolicy

STORAGE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "uint8": torch.uint8}
COMPUTE = torch.bfloat16


def _meta_model(cell: CellSettings):
    """The architecture with no storage. The class is called directly, not through from_config: under
    ZeRO-3 from_config would wrap it in deepspeed.zero.Init, which cannot partition meta tensors."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = models.training_config(cell.model)
    config._attn_implementation = cell.train.attn_impl
    with torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    return model.to(COMPUTE)


def _init_(module: nn.Module, std: float) -> None:
    """The HF Llama init: normal(0, std) for linear and embedding weights, ones for norms, zero biases."""
    for name, p in module.named_parameters(recurse=False):
        if name == "bias":
            nn.init.zeros_(p)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(p, mean=0.0, std=std)
        else:  # RMSNorm and friends
            nn.init.ones_(p)


def _materialise(module: nn.Module, device: torch.device, std: float) -> None:
    module.to_empty(device=device)
    with torch.no_grad():
        for sub in module.modules():
            _init_(sub, std)


def _quantised(linear: nn.Linear, storage: torch.dtype, device: torch.device):
    """A Linear4bit holding ``linear``'s weight in NF4 (quantised on ``device``)."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=COMPUTE, compress_statistics=True, quant_type="nf4",
                          quant_storage=storage, device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                 quant_type="nf4", quant_storage=storage, module=q)
    q.weight._quantize(device)  # sets q.weight.data to the packed bytes and q.quant_state
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(COMPUTE), requires_grad=False)
    return q


def _quantise_layer(layer: nn.Module, storage: torch.dtype, device: torch.device, host: bool) -> None:
    for name, child in list(layer.named_children()):
        if isinstance(child, nn.Linear):
            q = _quantised(child, storage, device)
            if host:
                # Only the packed weight goes to the host; the small quant state stays with the module on
                # the GPU, where the 4-bit matmul needs it.
                q.weight.data = q.weight.data.cpu()
            setattr(layer, name, q)
            del child  # the bf16 weight is freed here, before the next linear
        else:
            _quantise_layer(child, storage, device, host)


def _rebuild_rotary(model, device: torch.device) -> None:
    """Rotary buffers are computed at construction: on meta they hold nothing, so build them again."""
    inner = model.model
    rot = getattr(inner, "rotary_emb", None)
    if rot is not None:
        with torch.device(device):
            inner.rotary_emb = type(rot)(config=model.config)


def build_quantised_base(cell: CellSettings, device: torch.device):
    """The frozen 4-bit base model, built layer by layer; returns it with nothing trainable yet."""
    storage = STORAGE[cell.adapter.quant_storage]
    host = builds_on_host(cell)
    std = models.config_dict(cell.model).get("initializer_range", 0.02)
    model = _meta_model(cell)
    torch.manual_seed(cell.train.seed)  # every rank builds the same weights
    for layer in model.model.layers:
        _materialise(layer, device, std)
        _quantise_layer(layer, storage, device, host)
        if host:
            for p in layer.parameters():
                if not hasattr(p, "quant_state"):
                    p.data = p.data.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rest = device if not host else torch.device("cpu")
    for name, child in model.model.named_children():
        if name not in ("layers", "rotary_emb"):
            _materialise(child, rest, std)  # embed_tokens, norm
    tied = model.config.tie_word_embeddings
    for name, child in model.named_children():
        if name != "model" and not tied:
            _materialise(child, rest, std)  # lm_head
    if tied:
        # Materialising gives every module its own storage; a tied head must share the embedding's again
        # (Llama-3.2 1B/3B), or the model holds two copies and trains a different network.
        model.tie_weights()
    _rebuild_rotary(model, rest)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_qlora_model(cell: CellSettings, device: torch.device, policy: PrecisionPolicy):
    """The 4-bit base with gradient checkpointing prepared as peft's k-bit recipe does; LoRA is added by
    model_build.apply_lora (peft wraps each Linear4bit in its lora.Linear4bit)."""
    from peft import prepare_model_for_kbit_training

    model = build_quantised_base(cell, device)
    # prepare_model_for_kbit_training would cast every non-4-bit parameter to fp32 (embeddings and LM head:
    # 4 GB more for 70B) and breaks FSDP's one-dtype rule; keep bf16 and only enable input grads for
    # checkpointing, which is what the recipe needs.
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=cell.train.grad_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}) if upcasts_to_fp32(cell) else _enable_input_grads(model)
    return model


def _enable_input_grads(model):
    model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return model


def adapter_dtype_autocast(cell: CellSettings) -> bool:
    """peft's autocast_adapter_dtype: fp32 LoRA weights, except under FSDP (one dtype per flat parameter)."""
    return not fsdp_family(cell)
