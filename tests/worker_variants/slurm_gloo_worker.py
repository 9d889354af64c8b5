"""A rank of the two-node Slurm test: join the process group through accelerate (MULTI_CPU over gloo when
ACCELERATE_USE_CPU=1), all-reduce the global ranks, and write what this rank is (global, local and node
rank, world size, node name, accelerate's distributed type) to OUT/rank-<rank>.json. With
KILL_RANK=<r> set, global rank r then SIGKILLs itself while the others wait for it in a barrier."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs


def main() -> None:
    out = Path(sys.argv[1])
    # Accelerator, as a training script would: it reads ACCELERATE_USE_CPU (PartialState alone does not).
    state = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=60))]).state
    total = torch.tensor([dist.get_rank()], dtype=torch.int64)
    dist.all_reduce(total)  # proves the ranks of both nodes talk, not just that they started
    report = {
        "rank": dist.get_rank(), "world_size": dist.get_world_size(),
        "local_rank": int(os.environ["LOCAL_RANK"]), "node_rank": int(os.environ["GROUP_RANK"]),
        "slurm_node": os.environ.get("SLURMD_NODENAME"), "host": socket.gethostname(),
        "rank_sum": int(total.item()), "backend": dist.get_backend(),
        "distributed_type": str(state.distributed_type),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{report['rank']}.json").write_text(json.dumps(report))
    if os.environ.get("KILL_RANK") == str(report["rank"]):
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
