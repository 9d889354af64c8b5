"""A local Hugging Face model folder (config + safetensors) replaces a shipped config and its real weights load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench.spec import models
from conftest import bench, write_matrix


def _save_tiny_model(folder):
    config = AutoConfig.for_model(**models.config_dict("tiny-llama"))
    torch.manual_seed(1234)  # weights unlike those bench's own random init (seed 0) would make
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _first_batch(vocab: int, seq_len: int, micro_batch: int) -> torch.Tensor:
    """The synthetic batch rank 0 sees first (bench.worker.data.synthetic_batches with seed 0)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (micro_batch, seq_len), generator=g)


@pytest.mark.launch_aside
def test_local_folder_loads_its_weights(tmp_path):
    model = _save_tiny_model(tmp_path / "my-model")
    assert any((tmp_path / "my-model").glob("*.safetensors"))
    matrix = write_matrix(tmp_path, "local", model=str(tmp_path / "my-model"), strategy="single", gpus=1,
                          train={"warmup_steps": 1, "steps": 1})
    bench("run", str(matrix), "--results", str(tmp_path / "res"), check=True)
    record = json.loads((tmp_path / "res" / "runs.jsonl").read_text().splitlines()[0])
    assert record["status"] == "ok", record["error"]
    first_loss = record["ranks"][0]["steps"][0]["loss"]

    ids = _first_batch(model.config.vocab_size, seq_len=64, micro_batch=2)
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    # The first step's loss is computed before any update: equal only if the saved weights were used.
    assert abs(first_loss - expected) < 1e-3, (first_loss, expected)
