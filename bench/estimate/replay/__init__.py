"""The allocation replay: a full fine-tuning cell's GPU allocations through the caching-allocator model."""

from bench.estimate.replay.base import Replay, covers, layer_activations, replay

__all__ = ["Replay", "covers", "layer_activations", "replay"]
