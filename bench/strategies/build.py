"""How bench builds a cell's model, decided once for the worker that builds it and the estimator that
predicts it: on the meta device or not, a QLoRA model kept on the host, peft's fp32 upcast.

Pure questions about a cell and its strategy (no torch): bench/worker/model_build.py and
bench/worker/qlora.py act on the answers, bench/estimate/ replays them.
"""

from __future__ import annotations

from bench.spec import models
from bench.spec.schema import CellSettings
from bench.strategies import registry as strategies
from bench.strategies.registry import is_user_config


def builds_on_meta(cell: CellSettings, strategy) -> bool:
    """Whether the cell's model is built on the meta device and materialised per shard by FSDP.

    Only FSDP's families and tensor parallelism take a meta model (ZeRO-3 has zero.Init): full fine-tuning, and LoRA (on linear
    layers, all a matrix may name; the adapters get peft's own init when materialised:
    meta_init.mark_lora_init). Left out: QLoRA (built layer by layer into 4-bit already), local weights
    (they must be loaded), CPU (accelerate's FSDP is CUDA-only), parameter offload and users' own accelerate configs.
    ``strategy`` is the cell's bench.strategies.Strategy (a user's config included).
    """
    # A user's own accelerate config runs as written (it may load weights its own way, e.g. with
    # cpu_ram_efficient_loading, which broadcasts rank 0's state dict and cannot start from meta).
    # Tensor parallelism (tp alone too) splits the meta model by its plan before any storage exists.
    return ((strategy.is_fsdp or strategy.splits_layers) and cell.device == "cuda"
            and cell.adapter.type in ("none", "lora") and not models.has_local_weights(cell.model) and not strategy.offloads
            and not is_user_config(cell.strategy))


def fsdp_family(cell: CellSettings) -> bool:
    return strategies.get(cell.strategy).is_fsdp


def builds_on_host(cell: CellSettings) -> bool:
    """A QLoRA cell whose 4-bit model is kept on the host as it is built: FSDP with parameter offload
    shards it from there (also what the memory estimate assumes)."""
    s = strategies.get(cell.strategy)
    return cell.adapter.type == "qlora" and s.is_fsdp and s.offload_params


def upcasts_to_fp32(cell: CellSettings) -> bool:
    """Whether peft's k-bit recipe runs, casting every parameter that is not 4-bit to fp32 (not under FSDP,
    whose flat parameters need one dtype, nor above 20B parameters, where it costs gigabytes)."""
    return not fsdp_family(cell) and models.ModelShape.of(cell.model).params < 20e9
