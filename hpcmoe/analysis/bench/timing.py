"""How the benchmarks time their variants: MPI ones rank-wide, variant after variant within each
repetition (the slowest rank counts); one-device ones with the device drained around each call.
"""

from __future__ import annotations

import time


def time_interleaved(world, variants: dict, reps: int) -> dict:
    """{name: fn} -> {name: {"seconds": [...]}}: each fn timed on all ranks (slowest rank counts),
    variants in turn, `reps` rounds after one warm-up round."""
    from mpi4py import MPI

    samples = {name: {"seconds": []} for name in variants}
    for rep in range(reps + 1):
        for name, fn in variants.items():
            world.Barrier()
            start = time.perf_counter()
            fn()
            seconds = world.allreduce(time.perf_counter() - start, op=MPI.MAX)
            if rep:
                samples[name]["seconds"].append(seconds)
    return samples


def drainer(device):
    """-> fn() that waits for the device's queued work (nothing to wait for on the CPU)."""
    import torch

    return (lambda: torch.accelerator.synchronize(device)) if device.type != "cpu" else (lambda: None)


def synchronized_seconds(fn, device, reps: int) -> list[float]:
    """Wall seconds of fn() per call, the device drained before and after each (one warm-up call)."""
    sync = drainer(device)
    fn()
    seconds = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds
