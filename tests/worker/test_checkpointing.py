"""Activation checkpointing as HF users turn it on (bench/worker/model_build.py enable_checkpointing): every
decoder layer checkpointed, non-reentrant, through whichever name this transformers has."""

from __future__ import annotations

import warnings

import torch

from bench.spec import CellSettings
from bench.strategies.precision import policy_for
from bench.worker.model_build import build_causal_lm


def _build(grad_checkpointing: bool):
    cell = CellSettings(model="tiny-llama", strategy="ddp", device="cpu",
                        train={"precision": "fp32", "grad_checkpointing": grad_checkpointing})
    return build_causal_lm(cell, torch.device("cpu"), policy_for(cell))


def test_every_layer_is_checkpointed_without_a_deprecation_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated name warns on transformers >= 5.2x
        model = _build(True)
    layers = model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert not any(layer.gradient_checkpointing for layer in _build(False).model.layers)
