"""Memory and speed of reading the latent cache: a synthetic cache written by `build_latent_cache` (a stand-in
encoder, no VAE), read by several processes, each through a DataLoader with workers, in the EpochSampler's
order as training reads it; and the rounding of the float16 and bfloat16 storage against float32.

    python benchmarks/bench_latent_cache.py                      # 50,000 and 200,000 latents, float16 storage
    python benchmarks/bench_latent_cache.py --sizes 2000 --batches 5 --dir /tmp/lc   # a quick check

Memory per reading process: RSS before and after opening the cache and its peak while reading, and the peak of the sums over
the process and its DataLoader workers of PSS (each page split among the processes mapping it, so that pages a
worker shares with its parent, or cache pages both readers map, count once), its anonymous part (what a loaded
cache would grow) and its file-backed part (the mapped cache, shared in the page cache), and of RSS.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import threading
import time
from queue import Empty

import numpy as np
import torch

from unet_dcnv4.data import LatentDataset, build_latent_cache
from unet_dcnv4.training import EpochSampler

LATENT_SHAPE = (4, 32, 32)
SCALING_FACTOR = 0.18215  # Stable Diffusion's, given: no measuring pass
SEED = 0


class SyntheticImages(torch.utils.data.Dataset):
    """`size` placeholder images (3, 8, 8) with labels i % 1000: the stand-in encoder ignores the pixels."""

    resolution = 8
    deterministic = True
    num_classes = 1000
    classes = [str(c) for c in range(1000)]

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        return torch.zeros(3, 8, 8), i % 1000

    def fingerprint(self) -> str:
        return f"synthetic-{self.size}"


class SyntheticEncoder(torch.nn.Module):
    """Posterior means 5 * N(0, 1) and stds exp(N(-3, 0.5^2)) (4, 32, 32), about the range of the Stable
    Diffusion VAE's, drawn in order from one seeded generator."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.generator = torch.Generator().manual_seed(SEED)
        self.config = {}

    def encode(self, x):
        shape = (x.shape[0], *LATENT_SHAPE)
        mean = 5 * torch.randn(shape, generator=self.generator)
        std = torch.exp(-3 + 0.5 * torch.randn(shape, generator=self.generator))
        return type("Out", (), {"latent_dist": type("Dist", (), {"mean": mean, "std": std})})


def write_cache(folder: str, size: int, dtype: str) -> str:
    """A cache of `size` latents without flips, written by `build_latent_cache` in `dtype`."""
    return build_latent_cache(SyntheticImages(size), SyntheticEncoder(), folder, 8, vae_id="synthetic",
                              batch_size=4096, flips=False, scaling_factor=SCALING_FACTOR, dtype=dtype)


def _memory(pid: int) -> dict[str, int]:
    """Rss, Pss, Pss_Anon, Pss_File of a process from /proc/<pid>/smaps_rollup, in bytes (zeros once it exited).

    PSS splits each page among the processes that map it, so that it sums over processes to the memory they
    use together: a DataLoader worker's pages shared with its parent, or a cache page mapped by every reader,
    count once in the sum, where RSS counts them once per process."""
    keys = ("Rss", "Pss", "Pss_Anon", "Pss_File")
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            found = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f if ":" in line[:20])
                     if k in keys}
    except (OSError, ValueError):
        found = {}
    return {k: found.get(k, 0) for k in keys}


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


class PeakMemory(threading.Thread):
    """Samples, every 50 ms, the sums over this process and its children (the DataLoader workers) of `_memory`;
    keeps the peak of each."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"Rss": 0, "Pss": 0, "Pss_Anon": 0, "Pss_File": 0, "own_Rss": 0}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            memory = [_memory(p) for p in [os.getpid()] + _children(os.getpid())]
            for k in self.peak:
                self.peak[k] = max(self.peak[k], memory[0]["Rss"] if k == "own_Rss" else sum(m[k] for m in memory))
            self.stop.wait(0.05)


def evict(cache_dir: str) -> None:
    """Drops the cache's files from the page cache (posix_fadvise), so that the first pass reads the disk."""
    for name in os.listdir(cache_dir):
        fd = os.open(os.path.join(cache_dir, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def reader(rank: int, world: int, cache_dir: str, batches: int, batch_size: int, workers: int, queue) -> None:
    """One training process: its share of the EpochSampler's batches (as accelerate shards them), twice."""
    torch.set_num_threads(1)
    before = _memory(os.getpid())
    latents = LatentDataset(cache_dir)
    after = _memory(os.getpid())
    sampler, order = EpochSampler(len(latents), SEED), []
    while len(order) < world * batches * batch_size:  # epoch after epoch, whole batches of each (drop_last)
        sampler.set_epoch(sampler.epoch + 1 if order else 0)
        epoch = list(sampler)
        order += epoch[:len(epoch) // batch_size * batch_size]
    mine = [order[b * batch_size:(b + 1) * batch_size] for b in range(rank, world * batches, world)]
    monitor = PeakMemory()
    monitor.start()
    times = []
    for _ in range(2):  # the second pass finds the pages cached
        # Forked workers, as in training (a process started by torchrun forks them); a spawned process would
        # otherwise spawn them, each importing torch afresh.
        loader = torch.utils.data.DataLoader(latents, batch_sampler=mine, num_workers=workers,
                                             multiprocessing_context="fork" if workers else None)
        start = time.perf_counter()
        first = None
        checksum = 0.0
        for batch in loader:
            if first is None:
                first = time.perf_counter() - start
            checksum += float(batch["mean"][:, 0, 0, 0].sum())
        times.append((first, time.perf_counter() - start))
    monitor.stop.set()
    monitor.join()
    queue.put({"rank": rank, "before": before, "after": after, "peak": monitor.peak, "times": times,
               "latents": batches * batch_size})


def read_benchmark(cache_dir: str, processes: int, batches: int, batch_size: int, workers: int) -> list[dict]:
    evict(cache_dir)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=reader, args=(r, processes, cache_dir, batches, batch_size, workers, queue))
             for r in range(processes)]
    for p in procs:
        p.start()
    results = []
    while len(results) < len(procs):
        try:
            results.append(queue.get(timeout=1))
        except Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise SystemExit("a reading process failed (its traceback is above)")
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a reading process failed with exit code {p.exitcode}")
    return sorted(results, key=lambda r: r["rank"])


def dtype_errors(folder: str, size: int) -> None:
    """Max and mean relative error of the scaled mean and std stored in float16 and bfloat16 against float32."""
    reference = LatentDataset(write_cache(os.path.join(folder, "float32"), size, "float32")).read(range(size))
    for dtype in ("float16", "bfloat16"):
        rounded = LatentDataset(write_cache(os.path.join(folder, dtype), size, dtype)).read(range(size))
        for name, exact, approx in (("mean", reference[0], rounded[0]), ("std", reference[1], rounded[1])):
            rel = ((approx.double() - exact.double()).abs() / exact.double().abs()).flatten()
            rel = rel[exact.flatten() != 0]
            print(f"  {dtype:8s} {name:4s}: relative error max {rel.max().item():.2e}, mean {rel.mean().item():.2e}"
                  f" (over {rel.numel():,} elements)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000], help="latents in the cache")
    parser.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"),
                        help="storage of the read benchmark's cache")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    parser.add_argument("--batches", type=int, default=200, help="batches each process reads per pass")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--error_size", type=int, default=8192, help="latents compared for the dtype errors")
    parser.add_argument("--dir", default="/tmp/bench_latent_cache", help="scratch folder, deleted at the end")
    args = parser.parse_args()

    if os.path.exists(args.dir):
        raise SystemExit(f"--dir {args.dir} exists; pass a new folder (it is deleted at the end)")
    mib = 2**20
    try:
        print(f"latents {LATENT_SHAPE}, stored {args.dtype}, without flips (2 arrays a latent: mean and std) to keep "
              f"the disk use down; {args.processes} processes x {args.workers} DataLoader workers, "
              f"{args.batches} batches of {args.batch_size} each per pass, EpochSampler order")
        for size in args.sizes:
            folder = os.path.join(args.dir, f"n{size}")
            start = time.perf_counter()
            cache = write_cache(folder, size, args.dtype)
            disk = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache))
            print(f"\n{size:,} latents: {disk / 2**30:.2f} GiB on disk, written in {time.perf_counter() - start:.0f} s")
            for r in read_benchmark(cache, args.processes, args.batches, args.batch_size, args.workers):
                (first_cold, cold), (first_warm, warm) = r["times"]
                before, after, peak = r["before"], r["after"], r["peak"]
                print(f"  process {r['rank']}: RSS before open {before['Rss'] / mib:.0f} MiB, after open "
                      f"{after['Rss'] / mib:.0f} MiB, peak {peak['own_Rss'] / mib:.0f} MiB "
                      f"(+{(peak['own_Rss'] - before['Rss']) / mib:.0f} MiB); "
                      f"peak with its workers: PSS {peak['Pss'] / mib:.0f} MiB "
                      f"(+{(peak['Pss'] - before['Pss']) / mib:.0f} MiB over the PSS before open; of it anonymous "
                      f"{peak['Pss_Anon'] / mib:.0f}, file-backed {peak['Pss_File'] / mib:.0f}), RSS summed over "
                      f"the processes {peak['Rss'] / mib:.0f} MiB")
                rest = r["latents"] - args.batch_size  # after the first batch: the workers have started
                print(f"             first batch {first_cold:.2f} s from disk, {first_warm:.2f} s cached; latents/s "
                      f"from disk {r['latents'] / cold:,.0f}, cached {r['latents'] / warm:,.0f} (worker start "
                      f"included), cached after the first batch {rest / (warm - first_warm):,.0f}")
            shutil.rmtree(folder)
        print(f"\nstorage rounding against float32 (relative errors reach their largest on means below float16's "
              f"normal range, 6.1e-5, stored as subnormals); {args.error_size:,} latents, scaled as served:")
        dtype_errors(os.path.join(args.dir, "errors"), args.error_size)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
