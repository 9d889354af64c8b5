"""The fast paths people switch on: Liger's kernels (``train.kernels: liger``) and torch.compile
(``train.compile``), applied the way their authors document, and what was applied kept for the rank report.

Liger patches transformers' Llama module (RMSNorm, SwiGLU MLP, RoPE, and the causal LM's forward with the
fused linear cross-entropy, which never materialises the full logits) before the model is built, as
``liger_kernel.transformers.apply_liger_kernel_to_llama`` is documented to be called; the built model is
then read back to say which modules are Liger's.

torch.compile is accelerate's to apply (``Accelerator(dynamo_plugin=...)``), with regional compilation
(each repeated block compiled once and reused, the rest of the model apart), so that each framework gets
the path accelerate and DeepSpeed support: under DeepSpeed, after ``deepspeed.initialize``, accelerate
compiles ``engine.module``'s blocks in place (``compile_regions_deepspeed``, ``Module.compile``: the
engine's hooks and ZeRO's parameter fetches stay on the call path; DeepSpeed marks its ZeRO-3 hooks
``torch.compiler.disable``); under FSDP2 in place after ``fully_shard`` (``compile_regions_fsdp2``); under
DDP or one process last in ``prepare`` (``compile_regions``). DeepSpeed's own ``engine.compile()`` is
what accelerate calls without regional compilation: the whole model as one graph. The compilation
happens in the first (warm-up) steps, which the schema requires (train.warmup_steps >= 1), and the time
torch itself counts as compiling is recorded apart from the step times, with a flag when any of it fell
in a timed step.
"""

from __future__ import annotations

from bench.spec import CellSettings

LIGER_OPTIONS = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True,
                 "cross_entropy": False}  # the fused loss replaces the plain one: both cannot be on


def apply_kernels_before_build(cell: CellSettings) -> dict | None:
    """Patch transformers' Llama code with Liger's kernels (the model must be built afterwards)."""
    if cell.train.kernels != "liger":
        return None
    from importlib.metadata import version

    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(**LIGER_OPTIONS)
    return {"kernels": "liger", "liger_kernel_version": version("liger-kernel"), "options": dict(LIGER_OPTIONS)}


def kernels_in_model(model) -> dict:
    """What the built model runs: its Liger module classes and counts, and whose forward computes the loss."""
    found: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        if name.startswith("Liger"):
            found[name] = found.get(name, 0) + 1
    causal_lm = next((m for m in model.modules() if type(m).__name__.endswith("ForCausalLM")), None)
    forward = type(causal_lm).forward if causal_lm is not None else None
    return {"liger_modules": found,
            "causal_lm_forward": f"{forward.__module__}.{forward.__qualname__}" if forward else None}


def decoder_layers(model) -> list:
    """The decoder layers: the ModuleList named ``layers`` (under peft's and the frameworks' wrappers too)."""
    import torch

    return [layer for name, module in model.named_modules()
            if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] == "layers" for layer in module]


def dynamo_plugin(cell: CellSettings):
    """accelerate's TorchDynamoPlugin for train.compile (inductor, default mode, regional); None when off."""
    if not cell.train.compile:
        return None
    from accelerate.utils import TorchDynamoPlugin

    return TorchDynamoPlugin(backend="inductor", mode="default", use_regional_compilation=True)


def is_compiled(module) -> bool:
    """Compiled in place (``Module.compile``) or wrapped by ``torch.compile`` (an OptimizedModule)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(module, OptimizedModule) or getattr(module, "_compiled_call_impl", None) is not None


def compiled_regions(cell: CellSettings, model) -> dict | None:
    """What accelerate compiled in the prepared model; None when train.compile is off. A prepared model
    with no compiled decoder layer means the plugin was not applied: an error, not a plain-step record."""
    if not cell.train.compile:
        return None
    layers = sum(is_compiled(layer) for layer in decoder_layers(model))
    if not layers:
        raise RuntimeError("train.compile: accelerate compiled no decoder layer (a ModuleList named 'layers') of "
                           "the prepared model; the step would run uncompiled")
    regions = sum(is_compiled(m) for m in model.modules())
    return {"compiled": "accelerate regional compilation (TorchDynamoPlugin, inductor, default mode)",
            "layers": layers, "regions": regions}


def torch_compile_seconds() -> float:
    """Seconds torch has spent compiling so far in this process, as torch itself counts them."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(sum(times) for name, times in compilation_time_metrics.items()
                     if name.endswith("compile_inner")))


class CompileClock:
    """Wraps one_step: the compile seconds each step carried, so the report says where compilation fell."""

    def __init__(self, one_step, warmup_steps: int):
        self.one_step, self.warmup_steps, self.per_step = one_step, warmup_steps, []

    def __call__(self) -> dict:
        before = torch_compile_seconds()
        parts = self.one_step()
        self.per_step.append(torch_compile_seconds() - before)
        return parts

    def record(self, applied: dict, steps: list[dict]) -> dict:
        warm = [s["time_s"] for s in steps if s["phase"] == "warmup"]
        timed = sorted(s["time_s"] for s in steps if s["phase"] == "timed")
        median = timed[len(timed) // 2] if timed else None
        in_timed = sum(self.per_step[self.warmup_steps:])
        return {**applied, "compile_s": sum(self.per_step[:self.warmup_steps]),
                "compile_s_in_timed_steps": in_timed, "compiled_in_timed_steps": in_timed > 0,
                # what the warm-up steps took beyond a timed step: compilation plus first-step costs
                "warmup_excess_s": sum(max(0.0, w - median) for w in warm) if median is not None else None}
