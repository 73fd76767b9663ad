"""Peak dense bf16 FLOP/s of known GPUs, and a matmul microbenchmark for the others (``bench sd-throughput``).

The table holds vendor datasheet figures for dense (not 2:4-sparse) bf16 tensor-core throughput with float32
accumulation, the rate PyTorch's bf16 matmuls and convolutions can reach at best. ``achieved fraction of peak`` in
the benchmarks is counted FLOPs / measured seconds / this peak.
"""
from __future__ import annotations

import re
import time

import torch

# (pattern matched against torch.cuda.get_device_name(), TFLOP/s); the first match wins, so variants come first
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756.0),          # H100 PCIe
    (r"H100.*NVL", 835.0),           # H100 NVL
    (r"H100", 989.4),                # H100 SXM5 (HBM3)
    (r"H200.*NVL", 835.0),           # H200 NVL
    (r"H200", 989.4),                # H200 SXM
    (r"A100", 312.0),                # A100 SXM4 and PCIe, 40 and 80 GB
    (r"\bL4\b", 121.0),              # L4 (242 with sparsity)
    (r"RTX 4090", 165.2),            # GeForce RTX 4090 (bf16 with float32 accumulation)
]


def peak_bf16_tflops(device_name: str) -> float | None:
    """The datasheet peak dense bf16 TFLOP/s of a GPU by its name, or None when it is not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def matmul_tflops(device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                  repeats: int = 20) -> float:
    """Achieved TFLOP/s of repeated n x n x n matmuls (2 n^3 FLOPs each) in ``dtype``: an empirical peak for GPUs
    that are not in the table (and a cross-check for those that are)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def gpu_peak(device_name: str, measure=matmul_tflops) -> dict:
    """The peak used for the achieved fraction: the table's entry, else a measured matmul rate; both recorded."""
    table = peak_bf16_tflops(device_name)
    measured = measure()
    return {"device": device_name, "table_peak_bf16_tflops": table, "matmul_bf16_tflops": measured,
            "peak_bf16_tflops": table if table is not None else measured,
            "peak_source": "datasheet table (sacode/bench/gpus.py)" if table is not None
            else "measured bf16 matmul (the GPU is not in the table)"}
