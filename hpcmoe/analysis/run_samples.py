"""The time predictor's data: one sample per (rank, step) of an earlier run file, features from the
workload and targets from its /timings, with a roofline estimate beside them; the machine's figures;
the checks on the run files and the ranges they cover.

The features, all known before the step runs (none is measured from the timings the targets come
from; the seed's "utilization" was such a feature and is replaced by the attended context):
  sequence_length  new tokens the rank ran attention for, times its share of the query heads
  context_length   positions those tokens attended to (summed over requests), times the share
  hidden_size      the model's hidden size
  active_experts   token slots the rank's experts processed (from /traffic)
  memory_bandwidth the machine's measured copy bandwidth, GB/s (constant on one machine)
targets: the rank's compute milliseconds in the step outside its experts (attention with the
norms, embedding, dense layers, routing and LM head that go with it: what an attention rank does)
and inside them (what a MoE rank does). The roofline estimate is FLOPs / peak + weight bytes /
bandwidth, both measured here.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import yaml

from hpcmoe.config import build_config
from hpcmoe.runfile.metrics import is_compute, length, union

FEATURES = ("sequence_length", "context_length", "hidden_size", "active_experts", "memory_bandwidth")
TARGETS = ("attention_ms", "moe_ms")


def machine_profile() -> dict[str, float]:
    """Copy bandwidth (GB/s), single-thread float32 matmul rate (GFLOP/s) and cores of this machine."""
    a = np.ones(2**24, np.float32)
    start = time.perf_counter()
    for _ in range(5):
        b = a.copy()
    bandwidth = 5 * 2 * a.nbytes / (time.perf_counter() - start) / 1e9
    x = torch.randn(512, 512)
    start = time.perf_counter()
    for _ in range(10):
        x @ x
    peak = 10 * 2 * 512**3 / (time.perf_counter() - start) / 1e9
    del b
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"memory_bandwidth": bandwidth, "peak_gflops": peak, "cores": cores}


def samples_from_run(path: str, machine: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (features [n, 5], targets [n, 2] ms, roofline [n, 2] ms) for every (rank, step) of a run file."""
    import h5py

    with h5py.File(path, "r") as f:
        config = build_config(yaml.safe_load(f.attrs["config"]))
        timings, traffic = f["timings"][:], f["traffic"][:]
        prompt_lengths = f["prompt_lengths"][:]
    m = config.model
    # the steps that made tokens (the file may hold a row beyond them: the last record's)
    ranks, steps = traffic.shape[2], min(traffic.shape[0], config.run.max_new_tokens)
    itemsize = 4 if m.dtype_name == "float32" else 2
    row_bytes = m.hidden * itemsize
    slots = traffic.sum(axis=(1, 2)) / row_bytes  # [steps, ranks] token slots received
    attention_params = m.hidden * (2 * m.heads + 2 * m.kv_heads) * m.head_dim
    expert_params = 3 * m.hidden * m.expert_hidden
    features, targets, roofline = [], [], []
    for rank in range(ranks):
        tokens_share, context_share = attention_tokens(config, prompt_lengths, rank, ranks)
        for step in range(steps):
            rows = timings[(timings["rank"] == rank) & (timings["step"] == step)]
            busy = length(union([(r["start"], r["end"]) for r in rows if is_compute(r["phase"])]))
            experts = 1e3 * length(union([(r["start"], r["end"]) for r in rows if r["phase"] == b"experts"]))
            attention = 1e3 * busy - experts
            tokens = tokens_share[step]
            features.append(
                [tokens, context_share[step], m.hidden, slots[step, rank], machine["memory_bandwidth"]]
            )
            targets.append([attention, experts])
            flops = (
                2 * tokens * attention_params * m.num_layers,
                2 * slots[step, rank] * expert_params * m.moe_layers,
            )
            weights = (
                attention_params * m.num_layers * (tokens > 0),
                expert_params * m.moe_layers * (slots[step, rank] > 0),
            )
            roofline.append(
                [
                    1e3
                    * (
                        fl / (machine["peak_gflops"] * 1e9)
                        + itemsize * w / (machine["memory_bandwidth"] * 1e9)
                    )
                    for fl, w in zip(flops, weights)
                ]
            )
    return np.array(features, float), np.array(targets, float), np.array(roofline, float)


def attention_tokens(
    config, prompt_lengths: np.ndarray, rank: int, ranks: int
) -> tuple[list[float], list[float]]:
    """Per step: (new tokens `rank` ran attention for, positions they attended to), each times the
    rank's share of the heads (0 on MoE ranks)."""
    from hpcmoe.parallel.layout import MALayout, ParallelLayout

    batch, steps = len(prompt_lengths), config.run.max_new_tokens
    layout = ParallelLayout.from_config(config, ranks)
    if isinstance(layout, MALayout):
        if not layout.is_attention(rank):
            return [0.0] * steps, [0.0] * steps
        requests, share = layout.group_requests(batch, rank), 1.0 / len(layout.primaries(rank))
    else:
        requests, share = range(rank, batch, ranks), 1.0
    lengths = prompt_lengths[list(requests)].astype(float)
    tokens = [share * lengths.sum()] + [share * len(lengths)] * (steps - 1)
    context = [share * (lengths * (lengths + 1) / 2).sum()] + [
        share * (lengths + step).sum() for step in range(1, steps)
    ]
    return tokens, context


def check_run_files(paths: list[str], what: str) -> None:
    """Every file a complete run file with what training reads, before any training: ValueError in one
    line naming the first that is not (a shell glob that matched nothing arrives as its pattern)."""
    import h5py

    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"{what}: {path}: no such file")
        try:
            with h5py.File(path, "r") as f:
                missing = [n for n in ("timings", "traffic", "prompt_lengths") if n not in f] + [
                    n for n in ("config",) if n not in f.attrs
                ]
                complete = bool(f.attrs.get("complete", False))
        except OSError:
            raise ValueError(f"{what}: {path}: not an HDF5 file") from None
        if missing or not complete:
            raise ValueError(
                f"{what}: {path}: not a complete hpcmoe run file "
                f"({'missing ' + ', '.join(missing) if missing else 'complete is not set'})"
            )


def fitted_ranges(runs: list[str]) -> dict:
    """{ranks, batch, prompt_length: [lowest, highest]} over the training runs (their run files; the
    ranks from the timing rows where the file does not say)."""
    import h5py

    seen = {"ranks": [], "batch": [], "prompt_length": []}
    for path in runs:
        with h5py.File(path, "r") as f:
            seen["ranks"].append(
                int(f.attrs["world_size"])
                if "world_size" in f.attrs
                else len(np.unique(f["timings"]["rank"]))
            )
            seen["batch"].append(len(f["prompt_lengths"]))
            seen["prompt_length"].append(int(f["prompt_lengths"][:].max()))
    return {name: [min(values), max(values)] for name, values in seen.items()}
