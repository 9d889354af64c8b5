"""One node's share of the environment fingerprint, written by each node of a multi-node job into the
cell's folder: its host, the network settings that decide inter-node speed (NCCL_IB_*,
NCCL_SOCKET_IFNAME and the other NCCL_*/GLOO_* variables) and its network interfaces.

    python -m bench.machine.node_env OUT.json      (run once per node, inside the job)
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

NET_PREFIXES = ("NCCL_", "GLOO_", "UCX_", "FI_")  # NCCL_IB_*, NCCL_SOCKET_IFNAME, gloo's and libfabric's own


def interfaces(root: Path = Path("/sys/class/net")) -> list[dict]:
    """The node's network interfaces: name, state, speed (Mb/s, None where the driver does not say), MTU."""
    out = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        out.append({"name": path.name, "state": _read(path / "operstate"), "speed_mbps": _int(_read(path / "speed")),
                    "mtu": _int(_read(path / "mtu")), "infiniband": (path / "device" / "infiniband").exists()})
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # e.g. speed of a link that is down: EINVAL
        return None


def _int(text: str | None) -> int | None:
    return int(text) if text and text.lstrip("-").isdigit() and int(text) >= 0 else None


def node_fingerprint() -> dict:
    return {
        "hostname": socket.gethostname(),
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
        "node_rank": _int(os.environ.get("SLURM_NODEID")),
        "network_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(NET_PREFIXES)},
        "interfaces": interfaces(),
    }


def read_node_fingerprints(folder: Path, pattern: str = "env-node-*.json") -> list[dict]:
    """Every node's fingerprint in a cell's folder, by node rank."""
    found = [json.loads(p.read_text()) for p in folder.glob(pattern)]
    return sorted(found, key=lambda d: d.get("node_rank") or 0)


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(node_fingerprint()))
