"""What `hpcmoe simulate` refuses, each in one line naming the setting: features it does not model,
message tags that would repeat, an ma split left to `auto`, and a rank's requests that the engine
would not start in one batch. Separate from the simulation so that calibrate can ask the same
question of its own runs before it measures anything.
"""

from __future__ import annotations

from hpcmoe.config import Config
from hpcmoe.parallel.layout import MALayout
from hpcmoe.runtime import tags


def check_simulable(config: Config) -> None:
    """ValueError (one line) for a config the simulator does not model: rebalancing, attention
    standbys, more micro-batches than message tags tell apart, an ma split not set."""
    p = config.parallel
    unsupported = [
        name
        for name, on in (
            ("parallel.rebalance", p.rebalance is not None),
            ("parallel.attention_standby", p.attention_standby),
        )
        if on
    ]
    if unsupported:
        raise ValueError(f"hpcmoe simulate does not model {unsupported[0]}")
    micro_batches, layers = config.run.micro_batches, config.model.num_layers
    tags_in_use = tags.KINDS * micro_batches * (layers + 1)  # tags.tag_for's range
    if tags_in_use > tags.LAST_EXCHANGE - tags.FIRST_EXCHANGE:
        raise ValueError(
            f"hpcmoe simulate tells messages apart by their tags, which repeat at run.micro_batches="
            f"{micro_batches} over {layers} layers: use fewer micro-batches"
        )
    if p.layout == "ma" and "auto" in (p.attention_ranks, p.moe_ranks):
        raise ValueError(
            "hpcmoe simulate needs parallel.attention_ranks and moe_ranks set "
            "(`hpcmoe predict propose --machine` ranks the splits with the simulator)"
        )


def check_one_batch(config: Config, layout, ranks: int, memory_per_rank: float) -> None:
    """The simulator starts every request of a rank in the first step, its whole prompt in that step's
    prefill. The engine's Batch does the same only where run.max_batch (unset: what the start-up
    check allows in `memory_per_rank`, plan.default_max_batch) holds all of a rank's requests and,
    batching continuous, run.prefill_chunk all of their prompt tokens: ValueError (one line, naming
    the setting) otherwise, rather than a simulation of another schedule."""
    from hpcmoe.parallel.plan import default_max_batch

    r, requests = config.run, config.requests
    is_ma = isinstance(layout, MALayout)
    held = r.max_batch or default_max_batch(config, ranks, memory_per_rank)
    for rank in range(ranks):
        if is_ma and not layout.is_attention(rank):
            continue
        mine = layout.group_requests(len(requests), rank) if is_ma else range(rank, len(requests), ranks)
        if len(mine) > held:
            limit = (
                f"run.max_batch={held}" if r.max_batch else f"run.max_batch unset: {held}, what memory allows"
            )
            raise ValueError(
                f"hpcmoe simulate starts every request of a rank at once: rank {rank} holds {len(mine)} "
                f"requests and the engine would start {held} ({limit}); continuous batching is not "
                f"simulated (use --steady-decode, or more ranks)"
            )
        prompt = sum(len(requests[i].prompt_ids) for i in mine)
        if r.batching == "continuous" and prompt > r.prefill_chunk:
            raise ValueError(
                f"hpcmoe simulate prefills a rank's prompts in the first step: rank {rank}'s {prompt} "
                f"prompt tokens take more than one step at run.prefill_chunk={r.prefill_chunk}; set "
                f"run.prefill_chunk >= {prompt} or run.batching=static (or use --steady-decode)"
            )
