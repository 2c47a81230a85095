"""What a run checks before it starts: the checkpoint's tensors are there (headers only), run.max_batch
is sized when unset, and each rank's share fits in this process's memory (the numbers of `hpcmoe plan`)."""

from __future__ import annotations

import sys

MEMORY_MARGIN = 0.15  # measured peaks run up to this far above the estimate (docs/bench/memory.json)


def check_model(config, layout, is_root: bool):
    """Check the checkpoint's tensors (headers only), size run.max_batch when it is not set, and
    check that each rank's share fits in memory (hpcmoe.parallel.plan: the same numbers as `hpcmoe plan`, with
    this process's own memory). Returns (the checkpoint loader or None, max_batch)."""
    from hpcmoe.model.sizes import expected_tensors
    from hpcmoe.parallel.plan import ModelSizes, default_max_batch, human_bytes, process_bytes, rank_memory
    from hpcmoe.runtime.topology import available_memory_per_rank

    m = config.model
    load = None
    if m.checkpoint:
        from hpcmoe.model.checkpoint import check_tensors, tensor_loader

        load = tensor_loader(m.checkpoint, check_tensors(m.checkpoint, expected_tensors(m), m.fp8_block))
    sizes, available, runtime = ModelSizes(config), available_memory_per_rank(), process_bytes()
    max_batch = config.run.max_batch or default_max_batch(
        config, layout.world_size, available, runtime, sizes
    )
    memory = rank_memory(config, layout.world_size, sizes, max_batch, runtime)
    if is_root:
        roles = "; ".join(
            f"per {name} rank about {human_bytes(r['total'])} ({human_bytes(r['weights'])} weights"
            + (f" with {r['experts_per_rank']} expert(s) per MoE layer" if "experts_per_rank" in r else "")
            + (f", 1/{r['expert_tp']} of each" if r.get("expert_tp", 1) > 1 else "")
            + f", {human_bytes(r['kv_cache'])} KV cache, {human_bytes(r['activations'])} activations, "
            f"{human_bytes(r['runtime'])} runtime; {human_bytes(r['build'])} build temporary)"
            for name, r in memory["roles"].items()
        )
        print(
            f"hpcmoe: model {human_bytes(memory['total_weight_bytes'])} in {m.dtype_name}; "
            f"{len(config.requests)} requests, up to {max_batch} live per rank ({config.run.batching} "
            f"batching); {roles}; {human_bytes(available)} available per rank",
            file=sys.stderr,
            flush=True,
        )
    needed = memory["max_rank_bytes"]
    if needed > available:
        raise ValueError(
            f"the model needs about {human_bytes(needed)} per rank but only "
            f"{human_bytes(available)} is available per rank; use more ranks, fewer layers "
            f"(--set model.num_layers=N), narrower experts (--set model.expert_hidden=N) or a "
            f"smaller run.max_batch; `hpcmoe plan CONFIG --ranks N` tells what fits"
        )
    if needed * (1 + MEMORY_MARGIN) > available and is_root:
        print(
            f"hpcmoe: warning: the estimate leaves less than {MEMORY_MARGIN:.0%} of the available memory "
            f"free (measured peaks run up to {MEMORY_MARGIN:.0%} above it: tools/bench_memory.py)",
            file=sys.stderr,
            flush=True,
        )
    return load, max_batch
