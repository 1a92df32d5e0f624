"""What this machine can do at best, measured in a few seconds, and how close a phase of a step comes to it.

    python bench/roofline.py            # the machine's matmul FLOP/s (float32, bfloat16) and memory bandwidth

- Training is bound by matrix products: a forward and backward pass costs ~6 FLOPs per parameter per token
  (2 forward, 4 backward; the same count TRL, nanoGPT and PaLM's MFU use), so a phase reaches
  ``6 * parameters * tokens / seconds`` of the measured peak FLOP/s.
- Decoding is bound by memory: each decoding step reads every weight once for all rows of the batch, so a phase
  reaches ``steps * weight_bytes / seconds`` of the measured bandwidth.
"""

from __future__ import annotations

import time

import torch


def _best_seconds(run, repeats: int) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one square matrix product of ``size`` (2 * size^3 FLOPs), the best of ``repeats``."""
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0), device="cpu").to(dtype)
    b = torch.randn(size, size, generator=torch.Generator().manual_seed(1), device="cpu").to(dtype)
    return 2 * size**3 / _best_seconds(lambda: torch.mm(a, b), repeats)


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved by copying a buffer far larger than the caches (read + write)."""
    source = torch.ones(megabytes * 2**20 // 4, device="cpu")
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / _best_seconds(lambda: target.copy_(source), repeats)


def fraction_of_flops(parameters: int, tokens: int, seconds: float, peak_flops: float) -> float:
    """Share of the peak a forward+backward over ``tokens`` tokens reached in ``seconds``."""
    return 6 * parameters * tokens / seconds / peak_flops


def fraction_of_bandwidth(steps: int, weight_bytes: int, seconds: float, bandwidth: float) -> float:
    """Share of the bandwidth ``steps`` decoding steps (each reading all weights once) reached in ``seconds``."""
    return steps * weight_bytes / seconds / bandwidth


def main() -> None:
    print(f"threads {torch.get_num_threads()}")
    for dtype in (torch.float32, torch.bfloat16):
        print(f"matmul {str(dtype).removeprefix('torch.'):9s} {matmul_flops(dtype) / 1e9:8.1f} GFLOP/s")
    print(f"memory bandwidth   {memory_bandwidth() / 1e9:8.1f} GB/s")


if __name__ == "__main__":
    main()
