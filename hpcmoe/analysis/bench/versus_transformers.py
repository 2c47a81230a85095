"""`hpcmoe bench transformers`: hpcmoe on one rank against transformers' generate on the same
checkpoint, device and thread count (prefill and decode tokens/s, and whether the greedy tokens
agree). Named apart from the transformers package it imports.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from hpcmoe.analysis.bench.results import report
from hpcmoe.analysis.bench.timing import drainer


def checkpoint_config(checkpoint: str, batch: int, prompt_len: int, steps: int):
    """hpcmoe's config on the checkpoint: batch prompts of prompt_len tokens, steps new tokens each
    (all of them: no stop at EOS), float32, the run file in a fresh directory."""
    from hpcmoe.config import load_config

    directory = tempfile.mkdtemp(prefix="hpcmoe-bench-transformers-")
    return load_config(
        None,
        [
            f"model.checkpoint={checkpoint}",
            f"run.batch={batch}",
            f"run.prompt_len={prompt_len}",
            f"run.max_new_tokens={steps}",
            f"output.path={directory}/run.h5",
            "run.stop_at_eos=false",  # transformers makes every token too (min_new_tokens)
            "model.dtype=float32",
        ],
    )


def transformers_round(reference, prompts, steps: int, sync):
    """transformers on prompts [batch, prompt_len]: one forward pass (the prefill), then a greedy
    generate of steps tokens, each timed with the device drained -> (prefill s, generate s, made
    [batch, prompt_len + steps])."""
    import torch

    with torch.no_grad():
        sync()
        start = time.perf_counter()
        reference(prompts, use_cache=True)
        sync()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        made = reference.generate(prompts, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        sync()
        total = time.perf_counter() - start
    return prefill, total, made


def transformers_meta(
    checkpoint: str, batch: int, prompt_len: int, steps: int, reps: int, device, tokens_equal: bool
) -> dict:
    """What the comparison ran, where, and whether both made the same tokens."""
    import torch

    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    return {
        "what": f"{checkpoint}: {batch} prompts of {prompt_len} tokens, {steps} new tokens, {where}",
        "ranks": 1,
        "reps": reps,
        "oversubscribed": False,
        "device": device.type,
        "tokens_equal": tokens_equal,
    }


def bench_transformers(
    checkpoint: str,
    batch: int,
    prompt_len: int,
    steps: int,
    reps: int,
    out: str | None,
    device_name: str = "auto",
):
    """hpcmoe on one rank against transformers' generate on the same checkpoint, device and thread count;
    tokens_equal: whether both made the same greedy tokens (same weights, not seeded random ones)."""
    import h5py
    import torch
    from mpi4py import MPI
    from transformers import AutoModelForCausalLM

    from hpcmoe.parallel.layout import ParallelLayout
    from hpcmoe.runtime.device import choose_device, device_kind
    from hpcmoe.runtime.engine import run
    from hpcmoe.runtime.startup import check_model
    from hpcmoe.runtime.topology import build_topology

    device = choose_device(device_kind(device_name), 0)
    config = checkpoint_config(checkpoint, batch, prompt_len, steps)
    prompts = torch.tensor(config.prompts, device=device)  # equal lengths: no padding on either side
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    sync = drainer(device)
    topo = build_topology(MPI.COMM_SELF, None)
    layout = ParallelLayout.from_config(config, 1)
    config = config.on_device(device.type)
    # the checkpoint's weights, as `hpcmoe run` loads them
    load, max_batch = check_model(config, layout, False)
    samples = {"transformers": {}, "hpcmoe": {}}

    def add(variant, key, value):
        samples[variant].setdefault(key, []).append(value)

    for rep in range(reps + 1):  # the first round warms up
        metrics = run(config, topo, layout, load, device=device, max_batch=max_batch)
        prefill, total, made = transformers_round(reference, prompts, steps, sync)
        if rep:
            add("hpcmoe", "prefill_tokens_per_s", metrics["prefill_tokens_per_s"])
            add("hpcmoe", "decode_tokens_per_s", metrics["decode_tokens_per_s"])
            add("transformers", "prefill_tokens_per_s", prompts.numel() / prefill)
            add("transformers", "decode_tokens_per_s", batch * (steps - 1) / max(total - prefill, 1e-9))
    with h5py.File(metrics["path"]) as f:
        ours = f["generated"][:]
    tokens_equal = bool(np.array_equal(ours, made[:, prompt_len:].cpu().numpy()))
    meta = transformers_meta(checkpoint, batch, prompt_len, steps, reps, device, tokens_equal)
    return report("transformers", samples, "transformers", "hpcmoe >= 1.0x transformers tokens/s", meta, out)
