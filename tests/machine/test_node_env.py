"""Each node's fingerprint (bench/machine/node_env.py): its network settings, NICs, InfiniBand devices, and
what differs between nodes."""

from __future__ import annotations

from pathlib import Path

from bench.machine.node_env import differences, infiniband, node_fingerprint


def test_the_fingerprint_keeps_the_settings_that_decide_inter_node_speed(monkeypatch):
    for name, value in {"NCCL_IB_HCA": "mlx5_0", "NCCL_SOCKET_IFNAME": "ib0", "NCCL_NET": "IB",
                        "GLOO_SOCKET_IFNAME": "eth0", "NCCL_NET_GDR_LEVEL": "PHB"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURMD_NODENAME", "n2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    fp = node_fingerprint()
    assert fp["network_env"] == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_IB_HCA": "mlx5_0", "NCCL_NET": "IB",
                                 "NCCL_NET_GDR_LEVEL": "PHB", "NCCL_SOCKET_IFNAME": "ib0"}
    assert (fp["slurm_node"], fp["node_rank"]) == ("n2", 1)
    assert fp["nics"] == sorted(p.name for p in Path("/sys/class/net").iterdir())
    assert fp["libraries"]["torch"] and fp["python"]


def test_infiniband_devices_and_their_ports_are_read_from_sysfs(tmp_path):
    """A copy of /sys/class/infiniband's layout (no InfiniBand card here)."""
    port = tmp_path / "mlx5_0" / "ports" / "1"
    port.mkdir(parents=True)
    (port / "state").write_text("4: ACTIVE\n")
    (port / "rate").write_text("400 Gb/sec (4X NDR)\n")
    (port / "link_layer").write_text("InfiniBand\n")
    assert infiniband(tmp_path) == [{"name": "mlx5_0", "ports": [
        {"port": "1", "state": "4: ACTIVE", "rate": "400 Gb/sec (4X NDR)", "link_layer": "InfiniBand"}]}]
    assert infiniband(tmp_path / "absent") == []


def _node(name: str, **fields) -> dict:
    base = {"slurm_node": name, "hostname": f"host-{name}", "python": "3.11.7", "driver": "550.54",
            "network_env": {"NCCL_SOCKET_IFNAME": "ib0"}, "nics": ["eth0", "ib0", "lo"],
            "infiniband": [{"name": "mlx5_0", "ports": [{"port": "1", "state": "4: ACTIVE", "rate": "400 Gb/sec"}]}]}
    return {**base, **fields}


def test_differences_name_each_key_that_is_not_the_same_on_every_node():
    same = [_node("n1"), _node("n2")]
    assert differences(same) == {}  # host names differ by nature and are not compared
    other = [_node("n1"), _node("n2", driver="535.104", network_env={"NCCL_SOCKET_IFNAME": "eth0"},
                                infiniband=[{"name": "mlx5_0", "ports": [{"port": "1", "state": "1: DOWN",
                                                                          "rate": "10 Gb/sec"}]}])]
    diff = differences(other)
    assert sorted(diff) == ["driver", "infiniband", "network_env"]
    assert diff["driver"] == {"n1": "550.54", "n2": "535.104"}
    assert diff["infiniband"]["n2"] == ["mlx5_0/1 1: DOWN 10 Gb/sec"]
    old = [{"slurm_node": "n1", "network_env": {}}, {"slurm_node": "n2", "network_env": {}, "driver": "1"}]
    assert differences(old) == {}  # a key one node's (older) fingerprint lacks is not compared
    assert differences([_node("n1")]) == {}
