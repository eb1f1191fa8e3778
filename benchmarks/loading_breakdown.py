"""Where `from_hf`'s time goes: seconds per weight kind, and the host's cost of fresh memory.

Loads a checkpoint written by `conversion_bench.py --keep` (or any Hugging Face directory)
once in this process, timing every copy of a tensor into its weight's buffer, grouped by the
weight's shape and whether it is transposed on the way. Then measures what the kernel
charges for memory: the first write to fresh pages against a rewrite of the same pages, on
one thread and on all of the process's cores.

Usage:
  python benchmarks/conversion_bench.py --preset deepseek-r1-distill-llama-8b \\
      --num-layers 4 --workdir /tmp/llama8b-4 --keep
  python benchmarks/loading_breakdown.py /tmp/llama8b-4 [--repeats 2]
"""

from __future__ import annotations

import argparse
import collections
import gc
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from gkv_jax.conversion import fast_copy, hf

GB = 1e9


def timed_load(directory: str) -> tuple[float, dict[tuple, list[float]]]:
    """`from_hf(directory, dtype="bfloat16")` with every tensor copy timed."""
    copies: dict[tuple, list[float]] = collections.defaultdict(list)
    original = fast_copy._copy_blocked  # looked up there by `hf` (and by itself) at each call

    depth = [0]  # the copy calls itself for heads' views: time the outer call only

    def copy(destination, source, block=128):
        start = time.perf_counter()
        depth[0] += 1
        try:
            original(destination, source, block)
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            transposed = source.ndim >= 2 and source.strides[-1] != source.itemsize
            copies[(source.shape, transposed, source.nbytes)].append(
                time.perf_counter() - start)

    fast_copy._copy_blocked = copy
    try:
        start = time.perf_counter()
        model = hf.from_hf(directory, dtype="bfloat16", progress=False)
        jax.block_until_ready(model.params())
        return time.perf_counter() - start, copies
    finally:
        fast_copy._copy_blocked = original


def fresh_memory(size: int, threads: int) -> tuple[float, float]:
    """Seconds per GB of the first write to `size` fresh bytes, and of a rewrite."""
    buffer = np.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE), np.uint8)
    parts = [buffer[i * size // threads:(i + 1) * size // threads] for i in range(threads)]
    seconds = []
    for value in (1, 2):
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda part, v=value: part.fill(v), parts))
        seconds.append((time.perf_counter() - start) / (size / GB))
    return seconds[0], seconds[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for repeat in range(args.repeats):
        gc.collect()  # the previous run's model goes first (NNX modules hold cycles)
        total, copies = timed_load(args.directory)
        copied = sum(sum(times) for times in copies.values())
        print(f"\nrun {repeat + 1}: from_hf {total:.2f} s, of which copies {copied:.2f} s\n")
        print("| tensor shape (model layout) | transposed | count | GB | seconds | GB/s |")
        print("|---|---|---:|---:|---:|---:|")
        for (shape, transposed, nbytes), times in sorted(
                copies.items(), key=lambda item: -sum(item[1])):
            gb = nbytes * len(times) / GB
            print(f"| {shape} | {'yes' if transposed else 'no'} | {len(times)} | {gb:.3f} "
                  f"| {sum(times):.3f} | {gb / max(sum(times), 1e-9):.2f} |")
    cores = len(os.sched_getaffinity(0))
    print("\n| fresh memory, 1 GB | threads | first write (s per GB) | rewrite (s per GB) |")
    print("|---|---:|---:|---:|")
    for threads in (1, cores):
        first, again = fresh_memory(10**9, threads)
        print(f"| anonymous, private | {threads} | {first:.3f} | {again:.3f} |")


if __name__ == "__main__":
    main()
