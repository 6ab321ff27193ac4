"""Timing for the benchmarks: the median time per call of several functions, measured in interleaved
rounds so that load from other processes (and clock changes) falls on all of them alike, which is what
makes their ratios steady on a shared machine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Waits for the work queued on `device` when it is a CUDA device; nothing otherwise."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[Hashable, Callable[[], object]], warmup: int = 1, iters: int = 7,
                     min_ms: float = 0.0, device: torch.device | str | None = None) -> dict[Hashable, float]:
    """Median milliseconds per call of each function of `fns`.

    Each is called `warmup` times untimed, then `iters` rounds each time a batch of calls of every function
    in turn, as many calls as make the batch last about `min_ms` (at least one; sized from one timed call).
    On a CUDA `device` every batch ends with a synchronisation.
    """
    if iters < 1 or warmup < 0 or min_ms < 0:
        raise ValueError(f"iters must be >= 1, warmup >= 0 and min_ms >= 0; got {iters}, {warmup}, {min_ms}")
    calls = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        calls[name] = max(1, round(min_ms / max((time.perf_counter() - start) * 1e3, 1e-3)))
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3 / calls[name])
    return {name: statistics.median(t) for name, t in times.items()}
