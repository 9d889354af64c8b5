"""Build the model of a cell: architecture from config, random init (or local weights), adapter.

Random weights are created straight on the target device in the storage dtype; an 8B model never
passes through fp32 on the host. Under ZeRO-3 transformers builds inside deepspeed.zero.Init. Under FSDP
(full fine-tuning or LoRA, random init, on CUDA) the model is built on the meta device and each rank materialises
only what FSDP leaves it (bench/worker/meta_init.py; the worker drives it around accelerate's prepare).
"""

from __future__ import annotations

import torch

from bench.spec import CellSettings, models
from bench.strategies.precision import PrecisionPolicy


def _init_device(cell: CellSettings, device: torch.device) -> torch.device:
    from transformers.integrations import is_deepspeed_zero3_enabled

    # zero.Init places and partitions parameters itself.
    return torch.device("cpu") if is_deepspeed_zero3_enabled() else device


def build_causal_lm(cell: CellSettings, device: torch.device, policy: PrecisionPolicy, on_meta: bool = False):
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, policy.weight_dtype)
    if on_meta:
        from bench.worker.meta_init import build_on_meta

        model = build_on_meta(models.training_config(cell.model), dtype, cell.train.attn_impl)
    elif cell.adapter.type == "qlora":
        from bench.worker.qlora import build_qlora_model

        model = build_qlora_model(cell, device, policy)
    elif models.has_local_weights(cell.model):
        model = AutoModelForCausalLM.from_pretrained(cell.model, dtype=dtype, attn_implementation=cell.train.attn_impl,
                                                     device_map=None if _init_device(cell, device).type == "cpu" else {"": device})
    else:
        with torch.device(_init_device(cell, device)):
            model = AutoModelForCausalLM.from_config(models.training_config(cell.model), dtype=dtype,
                                                     attn_implementation=cell.train.attn_impl)
    if cell.train.grad_checkpointing:
        enable_checkpointing(model)
    if cell.adapter.type != "none":
        model = apply_lora(cell, model)
        if on_meta:
            from bench.worker.meta_init import mark_lora_init

            mark_lora_init(model)
    return model


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer, non-reentrant, the way HF users turn it on: transformers
    renamed gradient_checkpointing_enable to activation_checkpointing_enable (the old name warns from 5.2x and
    goes in v6); the GPU image's older transformers has only the old one."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_lora(cell: CellSettings, model):
    from peft import LoraConfig, get_peft_model

    a = cell.adapter
    target = "all-linear" if a.target == "all-linear" else list(a.target)
    config = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=target,
                        bias="none", task_type="CAUSAL_LM")
    if cell.adapter.type == "qlora":
        from bench.worker.qlora import adapter_dtype_autocast

        # Under FSDP the LoRA weights stay in the base's bf16: one dtype per flat parameter.
        return get_peft_model(model, config, autocast_adapter_dtype=adapter_dtype_autocast(cell))
    return get_peft_model(model, config)
