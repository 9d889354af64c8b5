"""Build a model on the meta device, then give it real, randomly initialised storage one module at a time.

A model built on ``meta`` has shapes and dtypes but no storage, so an 8B or 70B architecture costs no
memory until FSDP has decided which shard each rank keeps. Materialising then happens per module:

* FSDP1 (``FullyShardedDataParallel(..., param_init_fn=...)``): torch calls ``param_init_fn(module)`` once
  for *every* module of a wrapping unit, in breadth-first order, not once on the unit's root
  (``torch/distributed/fsdp/_init_utils.py``: ``_init_param_handle_from_module`` ->
  ``_materialize_with_param_init_fn`` -> ``_get_modules_to_materialize``). The BFS stops at children that
  already are FSDP units, and those units were materialised when they were wrapped. So the function must
  touch only the module's *own* tensors (``recurse=False``); a recursive one would re-allocate children
  again and again. Bind the extra arguments with ``functools.partial``.
* FSDP2 (``fully_shard``): shard the meta model first, then call ``materialise(model, device)``. The
  parameters are then DTensors whose local shard is on meta; each rank allocates and initialises only its
  shard. FSDP2's lazy init (first forward) re-reads the new local tensors (``FSDPParam.reset_sharded_param``),
  so initialising before the first forward is all it needs.

Values follow Hugging Face's random init, by calling the model's own ``_init_weights(module)``. In the
installed transformers (5.x, ``PreTrainedModel._init_weights`` in ``modeling_utils.py``; Llama does not
override it) that covers every Llama module type: Linear normal(0, initializer_range) with zero bias,
Embedding normal(0, initializer_range) with a zero padding row, modules named ``*RMSNorm`` to ones, and
``*RotaryEmbedding`` with an ``original_inv_freq`` buffer gets ``inv_freq``/``original_inv_freq`` recomputed
from the config (rope type included, e.g. ``llama3`` scaling). Reusing it keeps us in step with whatever
transformers changes; re-implementing the table here would silently drift. The rotary buffers are the trap:
they are non-persistent, never in a checkpoint, and allocation leaves garbage in them. transformers 4.x has
no rotary branch in ``_init_weights`` (its ``original_inv_freq`` is a plain attribute), so there we refuse
rather than train with garbage frequencies.

LoRA adapters (peft, on a meta base) are the exception: peft initialises them itself, B to zero, which
``_init_weights`` would not; ``mark_lora_init`` attaches peft's rule to each adapter Linear.

Determinism: draws come from torch's default generator in module order, so a fixed ``torch.manual_seed``,
the same wrapping and the same world size give the same weights. They are *not* the same numbers as
``from_config`` on a real device (different order), and on CPU each rank draws its shard from its own
generator, so with equal seeds the shards of one tensor can repeat values across ranks (CUDA DTensor has
an offset-based RNG tracker for that). Statistically it is the same init, which is what a benchmark needs.

Through accelerate (1.15) this needs care; none of it is done here:
* FSDP1: keep ``sync_module_states`` and ``cpu_ram_efficient_loading`` off, because
  ``FullyShardedDataParallelPlugin.__post_init__`` replaces ``param_init_fn`` with a bare ``to_empty`` when
  ``sync_module_states`` is on (and ``cpu_ram_efficient_loading`` turns it on).
* FSDP2: ``Accelerator._prepare_fsdp2`` maps the optimizer's parameters to the sharded ones by
  ``data_ptr()``, which is 0 for every meta tensor, so all optimizer slots would map to one parameter. Build
  or re-point the optimizer after ``materialise``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


# Set on a LoRA adapter Linear by mark_lora_init: its init, used instead of the base model's _init_weights.
LORA_INIT_ATTRIBUTE = "_bench_lora_init"


def build_on_meta(config, dtype: torch.dtype, attn_impl: str):
    """The Causal-LM for ``config`` with every parameter and buffer on ``meta`` (no storage at all)."""
    from transformers import AutoModelForCausalLM

    # The device context makes every tensor factory inside __init__ (and transformers' init, which on meta
    # is a no-op) produce meta tensors, buffers such as the rotary inv_freq included.
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_impl)


def _allocate_own_meta_tensors(module: nn.Module, device: torch.device) -> bool:
    """Give the module's own meta parameters/buffers uninitialised storage on ``device``; True if any was meta."""
    allocated = False
    for param in module._parameters.values():
        if param is None or not param.is_meta:
            continue
        new = nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
        # swap_tensors keeps the Parameter *object* and only replaces its contents (what nn.Module._apply does
        # for DTensors). Unlike to_empty on plain tensors, which registers a new Parameter, it keeps tied
        # weights (lm_head.weight is embed_tokens.weight) tied, and keeps FSDP2's FSDPParam pointing at the
        # module's parameter. It also drops attributes of the meta tensor, e.g. transformers'
        # `_is_hf_initialized`, which would make its init functions skip the tensor.
        torch.utils.swap_tensors(param, new)
        allocated = True
    for name, buf in module._buffers.items():
        if buf is None or not buf.is_meta:
            continue
        # Buffers are plain tensors (never tied, not sharded by FSDP), so replacing the entry is enough and
        # keeps the buffer's persistence flag, which lives on the module, not on the tensor.
        module._buffers[name] = torch.empty_like(buf, device=device)
        allocated = True
    return allocated


@torch.no_grad()
def materialise_module(module: nn.Module, device: torch.device | str, model) -> nn.Module:
    """Materialise and initialise ``module``'s own meta tensors; children are left alone.

    ``model`` is the Hugging Face model the module belongs to (the root ``PreTrainedModel``): its
    ``_init_weights`` and ``config`` decide the values. (Taking the model rather than only its config means
    a model class that overrides ``_init_weights`` is honoured.) For FSDP1:
    ``param_init_fn=functools.partial(materialise_module, device=dev, model=model)``.

    A module with nothing on meta is not touched: its values are real already (a tied weight first seen
    through the other module, or weights a caller loaded), and re-initialising would overwrite them.

    Returns ``module``: torch ignores the return value, but accelerate wraps ``param_init_fn`` for tied
    models (``accelerate/utils/fsdp_utils.py: ensure_weights_retied``) and reads parameters off what it returns.
    """
    if not _allocate_own_meta_tensors(module, torch.device(device)):
        return module
    if "inv_freq" in module._buffers and "original_inv_freq" not in module._buffers:
        # Only transformers >= 5 re-initialises rotary buffers in _init_weights (see the module docstring).
        raise NotImplementedError(
            f"{type(module).__name__}: this transformers version does not recompute rotary inv_freq in "
            "_init_weights; materialising on meta would leave garbage frequencies")
    adapter_init = getattr(module, LORA_INIT_ATTRIBUTE, None)
    if adapter_init is not None:
        adapter_init(module)
    else:
        model._init_weights(module)
    return module


def _init_lora_a(linear: nn.Linear) -> None:
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _init_lora_b(linear: nn.Linear) -> None:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def mark_lora_init(model) -> None:
    """Give each LoRA adapter Linear of a peft model built on meta the init peft would have given it.

    peft initialises adapters when it creates them (``LoraLayer.reset_lora_parameters``: with the default
    ``init_lora_weights=True``, A as nn.Linear's default kaiming-uniform, B zero, so the adapted model starts
    as the base model). On meta those values never exist, and the base model's ``_init_weights`` would draw B
    from normal(0, 0.02) instead. Materialising may happen module by module inside FSDP units where the
    owning LoraLayer is out of reach, so the rule is attached to each adapter Linear itself.

    Refuses what this does not reproduce: another ``init_lora_weights`` (gaussian, PiSSA, LoftQ ...), and
    LoRA on embeddings (adapter parameters held by the layer, not by a Linear).
    """
    from peft.tuners.lora import LoraLayer

    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        if len(layer.lora_embedding_A) or len(layer.lora_embedding_B):
            raise NotImplementedError(f"{type(layer).__name__}: LoRA on an embedding cannot be built on meta")
        for name in layer.lora_A:
            init = model.peft_config[name].init_lora_weights
            if init is not True:
                raise NotImplementedError(f"init_lora_weights={init!r} cannot be reproduced on meta")
            setattr(layer.lora_A[name], LORA_INIT_ATTRIBUTE, _init_lora_a)
            setattr(layer.lora_B[name], LORA_INIT_ATTRIBUTE, _init_lora_b)


def materialise(model, device: torch.device | str) -> None:
    """Materialise every module of ``model`` still on meta (plain model, or after FSDP2's ``fully_shard``)."""
    for module in model.modules():
        materialise_module(module, device, model)
    # swap_tensors kept tied parameters the same object, so ties need no re-tying; check it rather than
    # call tie_weights(), which under FSDP2 would re-register DTensor parameters behind FSDP's back.
    if getattr(model.config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight is not inp.weight:
            raise RuntimeError("tie_word_embeddings is set but lm_head and the input embedding are not tied")
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"still on meta after materialise: {leftover[:5]}")


def _root_unit_parameters(model) -> list[nn.Parameter]:
    """Parameters outside the decoder layers (embedding, final norm, an untied LM head): the root unit
    that the transformer-layer auto-wrap leaves to FSDP's outermost wrap. named_parameters drops tied
    duplicates: a tied weight counts once."""
    return [param for name, param in model.named_parameters() if ".layers." not in name]


def parameter_bytes(model) -> tuple[int, int]:
    """(whole model, root unit) in bytes, each parameter at its own dtype: a LoRA model keeps a bf16 base
    beside fp32 adapters. Full fine-tuning's fp32 master weights are what the model holds on meta too."""
    def size(params) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    return size(model.parameters()), size(_root_unit_parameters(model))
