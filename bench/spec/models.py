"""Model architectures: configs shipped with the package, local HF folders, and their shape arithmetic.

No model hub is reachable, so a model is either a config shipped in ``bench/model_configs`` (random
weights: throughput and memory do not depend on weight values) or a local Hugging Face folder
(``config.json`` plus optional safetensors, whose real weights are then loaded).
This module stays free of torch imports so that the CLI, the estimator and the report load fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent / "model_configs"


def shipped_models() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))


def is_local_folder(model: str) -> bool:
    return (Path(model) / "config.json").is_file()


def has_local_weights(model: str) -> bool:
    return is_local_folder(model) and any(Path(model).glob("*.safetensors"))


def check_model_name(model: str) -> str | None:
    """Return an error message if ``model`` is neither a shipped config nor a local HF folder."""
    if model in shipped_models() or is_local_folder(model):
        return None
    return (f"unknown model {model!r}: use a shipped config ({', '.join(shipped_models())}) "
            "or the path of a local Hugging Face model folder that holds config.json")


@lru_cache(maxsize=None)
def config_dict(model: str) -> dict:
    path = SHIPPED_DIR / f"{model}.json"
    if not path.is_file():
        path = Path(model) / "config.json"
    return json.loads(path.read_text())


def training_config(model: str):
    """The transformers config of ``model`` (shipped or a local folder) as training uses it: no KV cache."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**config_dict(model))
    config.use_cache = False
    return config


@dataclass(frozen=True)
class ModelShape:
    """The numbers that parameter, FLOP and memory arithmetic need (decoder-only, Llama-style)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    # Ranks the embedding and LM head are split over by vocabulary (tensor parallelism); 1: whole. The estimator's
    # per-rank view of a tensor-parallel model (bench/estimate/parallel.py) sets it.
    vocab_shards: int = 1

    @classmethod
    def of(cls, model: str) -> "ModelShape":
        c = config_dict(model)
        heads = c["num_attention_heads"]
        return cls(
            layers=c["num_hidden_layers"], hidden=c["hidden_size"], intermediate=c["intermediate_size"],
            heads=heads, kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
            tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        )

    @property
    def attn_linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of q, k, v, o projections."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return [(self.hidden, q), (self.hidden, kv), (self.hidden, kv), (q, self.hidden)]

    @property
    def mlp_linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of gate, up, down projections."""
        return [(self.hidden, self.intermediate), (self.hidden, self.intermediate), (self.intermediate, self.hidden)]

    @property
    def layer_linear_shapes(self) -> list[tuple[int, int]]:
        return self.attn_linear_shapes + self.mlp_linear_shapes

    @property
    def linear_params_per_layer(self) -> int:
        return sum(i * o for i, o in self.layer_linear_shapes)

    @property
    def norm_params_per_layer(self) -> int:
        return 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden // self.vocab_shards

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden // self.vocab_shards

    @property
    def params(self) -> int:
        """Total parameter count, as ``sum(p.numel() for p in model.parameters())`` gives it."""
        per_layer = self.linear_params_per_layer + self.norm_params_per_layer
        return self.layers * per_layer + self.embedding_params + self.lm_head_params + self.hidden

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (embeddings are a lookup, the LM head is a matmul)."""
        return self.layers * self.linear_params_per_layer + self.vocab * self.hidden

    def lora_params(self, r: int, target: str | list[str]) -> int:
        """Trainable LoRA parameters: r * (in + out) for each targeted linear layer."""
        names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        shapes = dict(zip(names, self.layer_linear_shapes))
        chosen = names if target == "all-linear" else [n for n in names if n in set(target)]
        return self.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in chosen)
