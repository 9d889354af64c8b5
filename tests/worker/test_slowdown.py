"""bench/worker/slowdown.py: the opt-in slowdown that proves the nightly gate (``--slow-step``).

The end-to-end proof (a slowed night flagged by the gate, through real launches) is tests/check/test_nightly.py;
these tests check the wrapper itself: off by default, sized during warm-up, each step slowed by the fraction
of itself, named for the report.
"""

from __future__ import annotations

import time

import pytest
import torch

from bench.worker import slowdown


def plain_step(seconds: float):
    """A step that takes ``seconds`` of wall time and returns its parts, as the worker's one_step does."""
    def step() -> dict:
        time.sleep(seconds)
        return {"loss": 1.0, "tokens": 8, "real_tokens": 6}

    return step


def run(step, calls: int) -> list[dict]:
    return [step() for _ in range(calls)]


def test_off_unless_the_environment_asks(monkeypatch):
    monkeypatch.delenv(slowdown.ENV, raising=False)
    step = plain_step(0.0)
    assert slowdown.from_env(step, 2, torch.device("cpu")) is step
    assert slowdown.describe(step) is None
    assert slowdown.launch_env(None) == {} and slowdown.launch_env(0.1) == {slowdown.ENV: "0.1"}


@pytest.mark.parametrize("raw", ["-0.1", "0", "11"])
def test_a_fraction_out_of_range_is_refused(monkeypatch, raw):
    monkeypatch.setenv(slowdown.ENV, raw)
    with pytest.raises(ValueError, match=slowdown.ENV):
        slowdown.from_env(plain_step(0.0), 2, torch.device("cpu"))


def test_sized_during_warm_up_then_every_step_slowed_by_the_fraction_of_itself(monkeypatch):
    monkeypatch.setenv(slowdown.ENV, "0.5")
    step = slowdown.from_env(plain_step(0.05), 3, torch.device("cpu"))
    assert isinstance(step, slowdown.SlowedStep)
    run(step, 2)
    assert slowdown.describe(step) is None and step.buffers is None  # still in warm-up: nothing sized or added
    run(step, 1)
    assert step.buffers is not None and slowdown.describe(step) is None  # sized at the end of warm-up, not slowed
    t0 = time.perf_counter()
    parts = run(step, 4)
    took = time.perf_counter() - t0
    assert parts[-1] == {"loss": 1.0, "tokens": 8, "real_tokens": 6}  # the step's own parts, unchanged
    injected = slowdown.describe(step)
    assert injected["fraction"] == 0.5 and injected["dtype"] == "float32" and injected["slowed_steps"] == 4
    assert slowdown.MIN_N <= injected["matmul_n"] <= slowdown.MAX_N["cpu"]
    # Work runs until the extra time reaches the fraction of each plain step: never less than asked.
    assert injected["reached_fraction_min"] >= 0.5
    assert took >= 4 * 0.05 * 1.5
    a, b, out = step.buffers
    assert a.dtype == torch.float32 and a.device.type == "cpu" and a.shape == (injected["matmul_n"],) * 2


def test_the_matmul_is_a_small_grain_of_the_extra_time(monkeypatch):
    """One matmul costs at most 2 % of the extra time wanted (or is the smallest allowed), so the overshoot
    past the fraction stays small."""
    monkeypatch.setenv(slowdown.ENV, "0.1")
    step = slowdown.from_env(plain_step(0.02), 1, torch.device("cpu"))
    run(step, 1)
    assert step.matmul_s <= 0.02 * 0.1 * 0.02 * 1.5 or step.buffers[0].shape[0] == slowdown.MIN_N


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_matmul_is_bf16_on_the_device_and_costs_about_the_fraction(monkeypatch):
    device = torch.device("cuda", 0)
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)

    def step() -> dict:  # real GPU work of a few tens of milliseconds
        for _ in range(20):
            torch.matmul(x, x)
        return {}

    monkeypatch.setenv(slowdown.ENV, "0.1")
    slowed = slowdown.from_env(step, 3, device)
    run(slowed, 13)
    injected = slowdown.describe(slowed)
    assert injected["dtype"] == "bfloat16" and slowed.buffers[0].device.type == "cuda"
    # Each step slowed by the fraction of itself: at least 10 %, and at most one small matmul more.
    assert 0.10 <= injected["reached_fraction_min"] and injected["reached_fraction_median"] < 0.11, injected
