"""Shared test helpers: write small matrices, run the real `bench` CLI in a subprocess; the launch lanes
under pytest-xdist; the Slurm test cluster's check and its one long wait, run in the background."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
WORKER_VARIANTS = TESTS / "worker_variants"  # `--worker fault_worker` / `slow_worker` import from here

# A tiny CPU cell: seconds per launch on 2 cores. Exactly 3 timed steps (train.timing.max_steps = steps):
# a shared CPU would rarely reach the ±1 % interval, and tests count on the steps they asked for.
TINY = {
    "model": "tiny-llama",
    "device": "cpu",
    "train": {"seq_len": 64, "micro_batch": 2, "precision": "fp32", "warmup_steps": 1, "steps": 3,
              "timing": {"max_steps": 3, "max_timed_s": 30}},
    "limits": {"timeout_s": 180, "hang_s": 60, "collective_timeout_s": 30, "startup_s": 150},
}


def write_matrix(folder: Path, name: str = "t", **fields) -> Path:
    """A matrix file based on TINY; nested dicts in ``fields`` are merged one level deep."""
    data = {"name": name, **{k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}}
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bench_env(env: dict | None = None) -> dict:
    """The environment of a `bench` subprocess: this one's, the fault-injecting workers importable."""
    # Keep any PYTHONPATH already set (the GPU machines bring packages through it).
    path = os.pathsep.join(p for p in [str(WORKER_VARIANTS), str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    return {**os.environ, "PYTHONPATH": path, "COLUMNS": "200", **(env or {})}


def bench(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None,
          check: bool = False) -> subprocess.CompletedProcess:
    """Run the real CLI (`python -m bench.cli ...`) as a user would, the fault-injecting workers importable."""
    proc = subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=cwd or REPO, env=bench_env(env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"bench {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def cpu_results(tmp_path_factory) -> Path:
    """Records from real CPU runs, made once per session: ddp and zero3 at 1 and 2 processes."""
    folder = tmp_path_factory.mktemp("cpu_results")
    matrix = write_matrix(folder, "cpu", grid={"strategy": ["ddp", "zero3"], "gpus": [1, 2]})
    proc = bench("run", str(matrix), "--results", str(folder / "results"), check=True)
    (folder / "run-console.txt").write_text(proc.stdout)  # what the user saw, for tests of the console
    return folder / "results"


# ---------------------------------------------------------------- what a run selected, said even under -q
# pytest -q prints no "collected ... / N selected" line, and an interrupted run's summary names only the
# deselected tests ("104 deselected in 211s"), which reads as if nothing had been selected while a selected
# test's fixture (e.g. tests/worker/test_qlora.py's GPU cells) was still running real launches.

def pytest_report_collectionfinish(config, start_path, items):
    if config.getoption("markexpr") or config.getoption("keyword"):
        return f"selected {len(items)} test(s)" + (f", the first: {items[0].nodeid}" if items else "")
    return None


# ---------------------------------------------------------------- launch lanes under pytest-xdist
# The suite runs as `pytest -n 2 --dist loadgroup` (README): the pure-Python majority spreads over both workers,
# while tests that start real ranks (accelerate, torch.distributed, Slurm jobs) run one at a time in one of two
# lanes, each lane one xdist group on one worker, as they ran before xdist:
#   "launch":       DeepSpeed cells (their ops build into and load from torch's extension cache), the Slurm
#                   cluster (two jobs at most fit at once), the session's `cpu_results`, and any `slow` test
#                   that names no lane (marker `launch` for a quick one). A launch test with none of these marks
#                   would run beside both lanes as if it were pure Python: mark it.
#   "launch-aside": DDP / FSDP / plain-gloo launches only (marker `launch_aside`), with a TORCH_EXTENSIONS_DIR of
#                   their own: a cell that ends non-ok releases every build lock made since it started
#                   (bench/launch/build_locks.py), which must never be the other lane's live DeepSpeed build.
ASIDE = "launch_aside"


def launch_lane(item: pytest.Item) -> str | None:
    if item.get_closest_marker(ASIDE):
        return "launch-aside"
    if any(item.get_closest_marker(m) for m in ("launch", "slow", "slurm")) or "cpu_results" in item.fixturenames:
        return "launch"
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        lane = launch_lane(item)
        if lane:
            item.add_marker(pytest.mark.xdist_group(lane))
    # Slurm's own time-limit test only waits for its job, submitted with the first Slurm test: it runs last.
    items.sort(key=lambda item: item.originalname == SLURM_TIME_LIMIT_TEST)


class _LanesHeld:
    """On an xdist worker, after xdist's own collection hook: --dist loadgroup sends a group to one worker by the
    "@group" suffix that hook puts on the node ids. Where it cannot (pytest 9.2 with pytest-xdist 3.8: xdist
    issue #1386) the lanes would mix silently, each worker setting up its own `cpu_results`: every test then
    fails at setup with the reason instead (an error raised in collection reaches the user only as xdist's
    INTERNALERROR, without it)."""

    problem: str | None = None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if not config.getoption("loadgroup", False):
            return
        lost = [item.nodeid for item in items if launch_lane(item) and "@" not in item.nodeid.rsplit("]", 1)[-1]]
        if lost:
            self.problem = (f"pytest-xdist did not group the launch lanes ({len(lost)} tests, e.g. {lost[0]}): "
                            f"pytest {pytest.__version__} with this pytest-xdist cannot (xdist issue #1386); "
                            "pip install -e '.[test]' installs a pytest that can")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        if self.problem:
            pytest.fail(self.problem, pytrace=False)


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and config.getoption("dist") != "loadgroup":
        raise pytest.UsageError("tests that launch ranks run in lanes (tests/conftest.py): "
                                "with -n N, pass --dist loadgroup")
    config.pluginmanager.register(_LanesHeld(), "bench-lanes-held")


@pytest.fixture(autouse=True)
def _aside_extension_cache(request, tmp_path_factory, monkeypatch):
    if request.node.get_closest_marker(ASIDE):
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.getbasetemp() / "torch_extensions_aside"))


@pytest.fixture
def one_rank_group():
    """A one-rank gloo process group in this process: enough for real FSDP1 and DTensors, no process launched."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- the Slurm test cluster (.ci/slurm-cluster.sh)
SLURM_NODES = ("n1", "n2")
SLURM_TIME_LIMIT_TEST = "test_a_job_past_slurms_own_time_limit_is_a_timeout_keeping_the_slurm_state"


def slurm_cluster_problem() -> str | None:
    """Why the two-node cluster is not usable here, or None."""
    if shutil.which("sinfo") is None:
        return "sinfo not found: no Slurm client here (start a test cluster: sudo .ci/slurm-cluster.sh start)"
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"sinfo failed ({proc.stderr.strip()}): is slurmctld up? (.ci/slurm-cluster.sh start)"
    states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
    usable = [n for n in SLURM_NODES if states.get(n, "").rstrip("*") in ("idle", "mix", "alloc", "comp")]
    if len(usable) < 2:
        return f"nodes n1 n2 not both up (sinfo: {states}): .ci/slurm-cluster.sh status"
    return None


def require_slurm_cluster() -> None:
    """Skip without the cluster, with the reason; fail instead under CI=true, so that a cluster that did not
    come up cannot pass CI silently."""
    problem = slurm_cluster_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and the Slurm test cluster is not usable: {problem}", pytrace=False)
    pytest.skip(problem)


@dataclass
class BackgroundBench:
    """A `bench` subprocess started earlier; its output goes to files (nobody reads a pipe while it runs)."""

    proc: subprocess.Popen
    folder: Path

    def wait(self, timeout: float) -> tuple[int, str]:
        returncode = self.proc.wait(timeout=timeout)
        return returncode, (self.folder / "bench-output.txt").read_text()


@pytest.fixture(scope="session")
def slurm_time_limit_run(tmp_path_factory):
    """`bench run` of one 2-node cell whose ranks sleep in their first step until Slurm's own time limit (1 minute,
    its least) ends the job TIMEOUT; slurmctld checks limits every 30 s, so that takes 60-95 s of waiting only.
    The cluster fixture of tests/launch/test_slurm_cluster.py starts it with the first Slurm test and its test
    runs last (pytest_collection_modifyitems above): the wait overlaps the other tests. The job takes one CPU of
    each node, leaving room for the one job at a time of the other Slurm tests. Its own TORCH_EXTENSIONS_DIR:
    the cell ends non-ok, and bench then releases the build locks made since it started (never another's)."""
    require_slurm_cluster()
    folder = tmp_path_factory.mktemp("slurm_time_limit")
    matrix = write_matrix(folder, "slurm-time", launcher="slurm", slurm={"time_limit_s": 60},
                          limits={"timeout_s": 400, "hang_s": 400, "startup_s": 300, "collective_timeout_s": 400},
                          grid={"nodes": [2], "gpus": [1]})
    env = bench_env({"BENCH_FAULT": "stuck", "BENCH_FAULT_RANK": "all",
                     "TORCH_EXTENSIONS_DIR": str(folder / "torch_extensions")})
    with open(folder / "bench-output.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "run", str(matrix), "--results",
                                 str(folder / "results"), "--worker", "fault_worker"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    yield BackgroundBench(proc, folder)
    if proc.poll() is None:  # its test did not wait for it (-x stopped the session): Ctrl-C, bench cancels the job
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
