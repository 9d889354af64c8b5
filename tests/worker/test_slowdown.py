"""bench/worker/slowdown.py: the opt-in slowdown that proves the nightly gate (``--slow-step``).

The end-to-end proof (a slowed night flagged by the gate, through real launches) is tests/check/test_nightly.py;
these tests check the wrapper itself: off by default, calibrated during warm-up, named for the report.
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


def test_calibrated_during_warm_up_then_named(monkeypatch):
    monkeypatch.setenv(slowdown.ENV, "0.5")
    step = slowdown.from_env(plain_step(0.05), 3, torch.device("cpu"))
    assert isinstance(step, slowdown.SlowedStep)
    run(step, 2)
    assert slowdown.describe(step) is None  # still in warm-up: nothing added yet
    parts = run(step, 3)
    assert parts[-1] == {"loss": 1.0, "tokens": 8, "real_tokens": 6}  # the step's own parts, unchanged
    injected = slowdown.describe(step)
    assert injected["fraction"] == 0.5 and injected["dtype"] == "float32" and injected["calibrated_on_steps"] == 3
    assert 16 <= injected["matmul_n"] <= slowdown.MAX_N["cpu"] and injected["repeats"] >= 1
    assert injected["plain_step_s"] >= 0.05 and injected["target_extra_s"] == pytest.approx(0.5 * injected["plain_step_s"])
    assert injected["measured_extra_s"] > 0
    a, b, out = step.buffers
    assert a.dtype == torch.float32 and a.device.type == "cpu" and a.shape == (injected["matmul_n"],) * 2


def test_a_long_target_repeats_the_capped_matmul(monkeypatch):
    """The matmul's buffers stay small (a cap on n): a longer extra time is made of repeats."""
    monkeypatch.setenv(slowdown.ENV, "8")
    step = slowdown.from_env(plain_step(0.3), 1, torch.device("cpu"))
    run(step, 1)
    injected = slowdown.describe(step)
    assert injected["matmul_n"] == slowdown.MAX_N["cpu"] and injected["repeats"] >= 2


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
    run(slowed, 3)
    injected = slowdown.describe(slowed)
    assert injected["dtype"] == "bfloat16" and slowed.buffers[0].device.type == "cuda"
    # Sized on the measured step: the extra work's own measured time is near the target (GPU timings are steady).
    assert 0.7 < injected["measured_extra_s"] / injected["target_extra_s"] < 1.4, injected
