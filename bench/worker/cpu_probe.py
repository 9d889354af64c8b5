"""How fast this host's CPU ran Python just before and just after a rank's timed window.

A step that waits on the host runs at the host's pace. On 2x H200 the same 8B LoRA cells, launched on two
machines of the same kind a day apart (results/llama8b-h200-a, -b), spent the same time in forward and backward
(within 1 %, the cards' clocks under the power cap) but up to 45 % more in the optimizer phase (hundreds of small
kernel launches from Python) on one machine; ZeRO-3 and FSDP LoRA cells, whose cards idle 15-30 % of the window,
moved 5-7 %. Steal and busy shares (bench/worker/host_window.py) were 0 and 4-7 % on both: the host was not
shared, so the question left is whether its CPU simply ran slower (a turbo that follows the physical host's
load, another CPU under the same name). A fixed piece of Python work, timed on the rank's own thread, answers
it: the same work takes the same time on an equally fast CPU.

The work is what framework code does between kernel launches (function calls, attribute and dict lookups,
small lists, integer arithmetic), fixed and allocation-light, about 4 ms on the 2-core development machine; the figure
is the fastest of a few repeats, so a preemption in one of them does not count. It runs outside the timed
window (before the ranks' barrier and after the last step), twice a launch: tens of milliseconds in all. A tenth
of it (``step_probe_ms``) is read before each timed step, outside the step's timed region.
"""

from __future__ import annotations

import time

REPEATS = 7
ROUNDS = 10_000
# The per-step reading (step_probe_ms): a tenth of the work, fastest of two, ~0.4 ms on a fast H200 host and
# ~0.8 ms on a slow one. The host's slow spells last seconds (benchmarks/host_pace.py: each idle vCPU of a 1x H200
# machine slow in 28-47 % of readings, in spells of 2-36 s), longer than a host-bound step, so a reading between
# two steps tells which pace they ran at, at a cost small beside any step (outside the timed region).
STEP_REPEATS = 2
STEP_ROUNDS = 1_000


class _Node:
    __slots__ = ("key", "value")

    def __init__(self, key: int, value: int) -> None:
        self.key, self.value = key, value


def _work(rounds: int = ROUNDS) -> int:
    table: dict[int, _Node] = {}
    total = 0
    for i in range(rounds):
        node = _Node(i % 97, i)
        table[node.key] = node
        items = [node.value, node.key, i & 7]
        total += sum(items) + len(table) + table[i % 97].value % 13
    return total


def probe_ms(repeats: int = REPEATS, rounds: int = ROUNDS) -> float:
    """The fastest of ``repeats`` timings of the fixed work, in milliseconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _work(rounds)
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def step_probe_ms() -> float:
    """The light reading taken before each timed step (bench/worker/train.py); comparable only with its kind."""
    return probe_ms(STEP_REPEATS, STEP_ROUNDS)
