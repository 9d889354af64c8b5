"""A step whose optimizer update fp16's loss scaler skipped is counted, per phase (warm-up, timed).

Such a step does no optimizer work, so timed it reads short. accelerate's own optimizer wrapper with torch's
GradScaler on CPU (accelerate gives a CPU Accelerator no scaler: the wrapper is built around one here); the
DeepSpeed engine's skip counter runs in tests/gpu/test_gpu.py (its fp16 needs CUDA).
"""

from __future__ import annotations

import torch

from bench.spec import CellSettings
from bench.worker.prepare import Preparer
from bench.worker.train import skipped_updates


def test_an_overflowing_step_is_reported_skipped_and_a_finite_one_is_not():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 1)
    scaler = torch.amp.GradScaler("cpu")
    optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), scaler=scaler)
    cell = CellSettings(train={"max_grad_norm": 0.0})
    before = model.weight.detach().clone()
    scaler.scale(model(torch.randn(2, 4)).sum() * float("inf")).backward()
    assert Preparer().step(cell, model, optimizer, accelerator) is True
    assert torch.equal(model.weight, before)  # no update: what the step's time then lacks
    scaler.scale(model(torch.randn(2, 4)).sum()).backward()
    assert Preparer().step(cell, model, optimizer, accelerator) is False
    assert not torch.equal(model.weight, before)


def test_skips_are_counted_per_phase():
    steps = [{"phase": "warmup", "optimizer_skipped": True}, {"phase": "warmup", "optimizer_skipped": True},
             {"phase": "timed", "optimizer_skipped": True}, {"phase": "timed", "optimizer_skipped": False},
             {"phase": "timed"}]  # a step dict from before the field
    assert skipped_updates(steps) == {"warmup": 2, "timed": 1}
