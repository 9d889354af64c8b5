"""One node's share of the environment fingerprint, written by each node of a multi-node job into the
cell's folder: its host, its software and cards (Python, libraries, CPU, GPU model, driver), the network
settings that decide inter-node speed (NCCL_IB_*, NCCL_SOCKET_IFNAME, NCCL_NET*, GLOO_SOCKET_IFNAME and the
other NCCL_*/GLOO_* variables), its network interfaces (/sys/class/net) and InfiniBand devices
(/sys/class/infiniband, where there are any). ``differences`` names what is not the same on every node.

    python -m bench.machine.node_env OUT.json      (run once per node, inside the job)
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
from pathlib import Path

from bench.machine import envinfo

NET_PREFIXES = ("NCCL_", "GLOO_", "UCX_", "FI_")  # NCCL_IB_*, NCCL_SOCKET_IFNAME, gloo's and libfabric's own


def interfaces(root: Path = Path("/sys/class/net")) -> list[dict]:
    """The node's network interfaces: name, state, speed (Mb/s, None where the driver does not say), MTU."""
    out = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        out.append({"name": path.name, "state": _read(path / "operstate"), "speed_mbps": _int(_read(path / "speed")),
                    "mtu": _int(_read(path / "mtu")), "infiniband": (path / "device" / "infiniband").exists()})
    return out


def infiniband(root: Path = Path("/sys/class/infiniband")) -> list[dict]:
    """The node's InfiniBand (and RoCE) devices: name, and per port its state, rate and link layer."""
    out = []
    for dev in sorted(root.iterdir()) if root.is_dir() else []:
        ports = sorted((dev / "ports").iterdir(), key=lambda p: p.name) if (dev / "ports").is_dir() else []
        out.append({"name": dev.name, "ports": [
            {"port": p.name, "state": _read(p / "state"), "rate": _read(p / "rate"),
             "link_layer": _read(p / "link_layer")} for p in ports]})
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # e.g. speed of a link that is down: EINVAL
        return None


def _int(text: str | None) -> int | None:
    return int(text) if text and text.lstrip("-").isdigit() and int(text) >= 0 else None


def node_fingerprint() -> dict:
    """This node's fingerprint (no torch import: it runs before the node's launch, on every node)."""
    nics = interfaces()
    gpu = envinfo.gpu_info()
    return {
        "hostname": socket.gethostname(),
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
        "node_rank": _int(os.environ.get("SLURM_NODEID")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": envinfo.cpu_model(),
        "cpu_count": os.cpu_count(),
        "libraries": envinfo.library_versions(),
        **{k: gpu.get(k) for k in ("gpu_count", "gpu_model", "driver", "cuda_driver")},
        "network_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(NET_PREFIXES)},
        "nics": [n["name"] for n in nics],
        "interfaces": nics,
        "infiniband": infiniband(),
    }


# What must be the same on every node for the cell's figures to mean one machine type; the node's name,
# rank and host differ by nature. Each key's value is compared as a node shows it (a summary of the IB ports).
COMPARED = ("python", "cpu_model", "cpu_count", "libraries", "gpu_count", "gpu_model", "driver", "cuda_driver",
            "network_env", "nics", "infiniband")


def _shown(key: str, value):
    if key == "infiniband":
        return sorted(f"{d['name']}/{p['port']} {p.get('state')} {p.get('rate')}" for d in value or [] for p in d["ports"])
    return value


def differences(nodes: list[dict]) -> dict[str, dict[str, object]]:
    """Key -> {node name: its value} for every compared key whose value is not the same on every node (keys
    an older fingerprint lacks are left out); {} when the nodes agree (or there is one)."""
    out = {}
    for key in COMPARED:
        if len(nodes) < 2 or not all(key in n for n in nodes):
            continue
        values = {str(n.get("slurm_node") or n.get("hostname") or i): _shown(key, n[key]) for i, n in enumerate(nodes)}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            out[key] = values
    return out


def read_node_fingerprints(folder: Path, pattern: str = "env-node-*.json") -> list[dict]:
    """Every node's fingerprint in a cell's folder, by node rank."""
    found = [json.loads(p.read_text()) for p in folder.glob(pattern)]
    return sorted(found, key=lambda d: d.get("node_rank") or 0)


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(node_fingerprint()))
