"""The worker's GPU memory cap (gpu_memory_gib) through torch's per-process memory fraction."""

from __future__ import annotations


def test_memory_cap_names_the_card_even_for_a_bare_cuda_device(monkeypatch):
    """A 1-GPU launch gets torch.device("cuda") with no index; torch's cap call refuses that (seen on H200).

    No CUDA on CPU machines, so torch's calls are replaced here; the real call runs in test_failures'
    GPU test (its 1-GPU capped cell).
    """
    import torch

    from bench.spec import CellSettings
    from bench.worker.train import apply_memory_cap

    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: type("Props", (), {"total_memory": 80 * 2**30})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, index: calls.append((f, index)))
    apply_memory_cap(CellSettings(gpu_memory_gib=20, device="cuda"), torch.device("cuda"))
    apply_memory_cap(CellSettings(gpu_memory_gib=40, device="cuda"), torch.device("cuda", 1))
    apply_memory_cap(CellSettings(device="cuda"), torch.device("cuda", 1))  # no cap: nothing set
    assert calls == [(0.25, 3), (0.5, 1)]
