"""Memory per rank, without building anything: `hpcmoe plan CONFIG --ranks N`.

Weights by role are counted on meta-device builds of exactly what a rank holds (the same classes
the engine builds, so the numbers cannot drift from the model); the KV cache from the requests a
rank serves; buffers from the tokens a rank sends and receives in the largest exchange. Also what
the start-up check of `hpcmoe run` uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcmoe.config import Config, ModelConfig, RunConfig
from hpcmoe.parallel.layout import MALayout, ParallelLayout, request_range


class ModelSizes:
    """What the plan needs of a model, computed once: bytes of the whole model, of everything but the
    routed experts, of one expert in every MoE layer, of an attention shard (per shard count)."""

    def __init__(self, config: Config):
        from hpcmoe.model.sizes import parameter_bytes, parameter_count

        self.config, self.requests = config, config.requests
        self.parameters = parameter_count(config.model)
        self.whole, self.base = parameter_bytes(config.model, 0)
        self.per_expert = parameter_bytes(config.model, 1)[1] - self.base
        self.shards: dict[int, tuple[int, int]] = {}
        self.build = build_temporary_bytes(config.model)

    def attention(self, shards: int) -> tuple[int, int]:
        """(weight bytes, KV cache bytes per token) of the largest of `shards` attention shards."""
        from hpcmoe.model.attention import split_heads
        from hpcmoe.model.sizes import attention_shard_bytes

        m = self.config.model
        if shards not in self.shards:
            self.shards[shards] = attention_shard_bytes(
                m, split_heads(m.heads, shards)[0], request_range(m.vocab, shards, 0)
            )
        return self.shards[shards]


def build_temporary_bytes(m) -> int:
    """The largest temporary of a rank's build: a whole tensor in float32 (the seeded init makes each
    whole, then keeps its slice in the model's dtype; a checkpoint's tensor may be converted through
    float32 too). Measured on DeepSeek-V3 shapes: the embedding's 0.86 GiB on top of the weights."""
    from hpcmoe.model.sizes import expected_tensors

    return 4 * max(int(np.prod(shape)) for shape in expected_tensors(m).values())


@dataclass(frozen=True)
class FullestStep:
    """What a rank's KV cache, buffers and activations grow with: the model's widths, the run's
    batching, the requests' prompts (`longest`: the longest prompt plus its new tokens) and the
    requests live at once per attention-holding rank."""

    m: ModelConfig
    r: RunConfig
    prompts: np.ndarray
    longest: int
    itemsize: int
    max_batch: int

    @classmethod
    def of(cls, config: Config, requests, max_batch: int) -> "FullestStep":
        prompts = requests.prompt_lengths
        longest = int((prompts + requests.max_new_tokens).max())
        itemsize = 2 if config.model.dtype_name == "bfloat16" else 4
        return cls(config.model, config.run, prompts, longest, itemsize, max_batch)

    def largest_block(self, parts: int) -> tuple[int, int]:
        """(live requests, tokens fed) of the fullest step of a rank among `parts` that split the requests."""
        prompts, r = self.prompts, self.r
        # the requests go round-robin (rank r: r, r + parts, ...); past one each, a rank has at most one
        share = np.sort(prompts[0::parts])[::-1] if parts <= len(prompts) else prompts.max(keepdims=True)
        rows = min(self.max_batch, len(share))
        fed = int(share[:rows].sum())
        return rows, fed if r.batching == "static" else min(fed, rows - 1 + r.prefill_chunk)

    def activations(self, rows: int, fed: int, heads: int) -> int:
        """One step's padded tensors and attention scores."""
        m, r, prompts = self.m, self.r, self.prompts
        width = int(prompts.max()) if r.batching == "static" else min(int(prompts.max()), r.prefill_chunk)
        return (
            rows * width * (16 * m.hidden * self.itemsize + 3 * heads * self.longest * 4) + fed * m.vocab * 4
        )

    def expert_activations(self, slots: int) -> int:
        """The experts' inputs, gate, up and outputs of the slots a rank receives."""
        return 4 * slots * (self.m.hidden + self.m.expert_hidden) * self.itemsize

    def exchange_buffers(self, tokens: int) -> int:
        """Send and receive buffers of one exchange, k slots per token."""
        return 2 * tokens * self.m.top_k * self.m.hidden * self.itemsize


def rank_memory(
    config: Config,
    ranks: int,
    sizes: ModelSizes | None = None,
    max_batch: int | None = None,
    runtime: int = 0,
) -> dict:
    """-> {"total_weight_bytes", "roles": {role: {weights, kv_cache, buffers, activations, runtime, total,
    ...}}, "max_rank_bytes"}: each role's largest rank (most experts, most requests) for `ranks` ranks
    (the layout is validated first: a rank count that does not fit raises). max_batch: requests live
    at once per attention-holding rank (default run.max_batch, else all); runtime: the process
    itself (the interpreter, torch, MPI: measured by the caller)."""
    sizes = sizes or ModelSizes(config)
    max_batch = max_batch or config.run.max_batch or len(sizes.requests)
    layout = ParallelLayout.from_config(config, ranks)
    step = FullestStep.of(config, sizes.requests, max_batch)
    placement = layout.placement((0,) * ranks)
    moe_ranks = range(layout.attention_ranks, ranks) if isinstance(layout, MALayout) else range(ranks)
    experts = max(len(placement.experts_of_rank(r)) for r in moe_ranks)
    if isinstance(layout, MALayout):
        roles = separated_roles(layout, sizes, step, experts)
    else:
        roles = {"ep": ep_role(config, layout, ranks, sizes, step, experts)}
    for role in roles.values():
        # the build's temporary is gone before the KV cache, buffers and activations exist: the larger counts
        role["runtime"], role["build"] = runtime, sizes.build
        role["total"] = (
            role["weights"]
            + runtime
            + max(sizes.build, role["kv_cache"] + role["buffers"] + role["activations"])
        )
    return {
        "total_weight_bytes": sizes.whole,
        "roles": roles,
        "max_rank_bytes": max(r["total"] for r in roles.values()),
    }


def separated_roles(layout: MALayout, sizes: ModelSizes, step: FullestStep, experts: int) -> dict:
    """Attention/MoE separation: the largest attention rank (a head shard of its group, the group's
    requests) and the largest MoE rank (`experts` experts, the routed slots of every group)."""
    m = step.m
    shards = len(layout.primaries(0))
    weights, per_token = sizes.attention(shards)
    served, tokens = step.largest_block(layout.replicas)
    attention = {
        "ranks": layout.attention_ranks,
        "weights": weights,
        "kv_cache": served * step.longest * per_token,
        "buffers": step.exchange_buffers(-(-tokens // shards)) + 2 * tokens * m.hidden * 4,
        "activations": step.activations(served, tokens, -(-m.heads // shards)),
    }
    routed = tokens * layout.replicas
    moe = {
        "ranks": layout.moe_ranks,
        "weights": experts * sizes.per_expert,
        "kv_cache": 0,
        "buffers": step.exchange_buffers(-(-routed // layout.moe_ranks)),
        "experts_per_rank": experts,
        "activations": step.expert_activations(-(-routed * m.top_k // layout.moe_ranks)),
    }
    return {"attention": attention, "moe": moe}


def ep_role(
    config: Config, layout: ParallelLayout, ranks: int, sizes: ModelSizes, step: FullestStep, experts: int
) -> dict:
    """Expert parallelism: the largest rank, which attends for its requests and serves `experts`
    experts (1/expert_tp of each)."""
    from hpcmoe.model.sizes import cache_bytes_per_token

    m = step.m
    served, tokens = step.largest_block(ranks)
    tp = layout.expert_tp  # each rank holds 1/tp of each of its group's experts
    # expert groups: answers come back as tp partials (members) or the leader holds tp of them
    buffers = step.exchange_buffers(tokens) * (1 + tp) // 2 if tp > 1 else step.exchange_buffers(tokens)
    if config.parallel.rebalance is not None:  # new expert slots beside the old while weights move
        buffers += experts * sizes.per_expert // tp
    return {
        "ranks": ranks,
        "weights": sizes.base + experts * sizes.per_expert // tp,
        "kv_cache": served * step.longest * cache_bytes_per_token(m),
        "buffers": buffers,
        "activations": step.activations(served, tokens, m.heads)
        + step.expert_activations(-(-tokens * ranks * m.top_k * experts // m.num_experts) // tp),
        "experts_per_rank": experts,
        "expert_tp": tp,
    }


MAX_BATCH_CAP = 1024  # the default run.max_batch never exceeds this, however much memory is free


def rank_estimates(config: Config, ranks: int, max_batch: int, runtime: int) -> np.ndarray:
    """-> [ranks] bytes: each rank's estimate, its role's largest rank (the start-up check's numbers),
    stored in the run file beside the measured peak."""
    roles = rank_memory(config, ranks, max_batch=max_batch, runtime=runtime)["roles"]
    if "ep" in roles:
        return np.full(ranks, roles["ep"]["total"], np.int64)
    attention = roles["attention"]["ranks"]
    return np.array([roles["attention" if r < attention else "moe"]["total"] for r in range(ranks)], np.int64)


def default_max_batch(
    config: Config, ranks: int, memory_bytes: float, runtime: int = 0, sizes: ModelSizes | None = None
) -> int:
    """run.max_batch when it is not set: the most live requests per attention-holding rank whose
    KV cache and step activations keep the largest rank within 80% of `memory_bytes` (at least 1,
    at most MAX_BATCH_CAP, at most the requests a rank or attention group has)."""
    from hpcmoe.parallel.layout import requests_per_rank

    sizes = sizes or ModelSizes(config)
    layout = ParallelLayout.from_config(config, ranks)
    # ranks or groups that split the requests
    groups = layout.replicas if isinstance(layout, MALayout) else ranks
    low, high = 1, min(MAX_BATCH_CAP, requests_per_rank(len(sizes.requests), groups))
    fits = lambda b: rank_memory(config, ranks, sizes, b, runtime)["max_rank_bytes"] <= 0.8 * memory_bytes
    while low < high:  # the largest that fits
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def process_bytes() -> int:
    """This process's resident memory now (the interpreter, torch and MPI before any model)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def plan(config: Config, ranks: int, device_memory_bytes: float) -> dict:
    """The memory of `ranks` ranks against `device_memory_bytes` per rank, and the smallest rank
    count that fits (ep: more ranks spread the experts; ma: more MoE ranks, attention ranks kept)."""
    sizes = ModelSizes(config)
    max_batch = config.run.max_batch or default_max_batch(config, ranks, device_memory_bytes, sizes=sizes)
    result = {
        "ranks": ranks,
        "layout": config.parallel.layout,
        "dtype": config.model.dtype_name,
        "device_memory_bytes": int(device_memory_bytes),
        "max_batch": max_batch,
        "total_parameters": sizes.parameters,
        **rank_memory(config, ranks, sizes, max_batch),
    }
    result["fits"] = result["max_rank_bytes"] <= device_memory_bytes
    result["smallest_ranks_that_fit"], result["smallest_fit_expert_tp"] = smallest_fit(
        config, device_memory_bytes, sizes
    )
    return result


def smallest_fit(
    config: Config, device_memory_bytes: float, sizes: ModelSizes
) -> tuple[int | None, int | None]:
    """-> (ranks, expert_tp): the fewest ranks whose largest rank fits (ma: MoE ranks added to the
    attention ranks; ep: up to one expert group per expert, groups of 1, 2, 4 ... 64 ranks when one
    expert per rank is too large, the smallest such expert_tp on a tie); (None, None) when none fits."""
    import dataclasses

    m, p = config.model, config.parallel
    if p.layout == "ma":
        for moe in range(1, m.num_experts + 1):
            candidate = dataclasses.replace(config, parallel=dataclasses.replace(p, moe_ranks=moe))
            if (
                rank_memory(candidate, p.attention_ranks + moe, sizes)["max_rank_bytes"]
                <= device_memory_bytes
            ):
                return p.attention_ranks + moe, None
        return None, None
    groups = sorted(
        {
            *range(1, min(m.num_experts, 64) + 1),
            *(m.num_experts // k for k in (1, 2, 4, 8, 16) if m.num_experts % k == 0),
        }
    )
    fits = []
    for tp in (t for t in (1, 2, 4, 8, 16, 32, 64) if expert_tp_fits_model(m, t)):
        candidate = dataclasses.replace(config, parallel=dataclasses.replace(p, expert_tp=tp))
        for ranks in (g * tp for g in groups):
            try:
                if rank_memory(candidate, ranks, sizes)["max_rank_bytes"] <= device_memory_bytes:
                    fits.append((ranks, tp))
                    break
            except ValueError:  # a rank count the placement cannot take
                continue
    return min(fits) if fits else (None, None)


def expert_tp_fits_model(m, tp: int) -> bool:
    """Whether experts split into `tp` slices (whole FP8 blocks with an FP8 checkpoint, whole MXFP4
    blocks)."""
    from hpcmoe.config import MXFP4_BLOCK

    inner = m.expert_hidden // tp if m.expert_hidden % tp == 0 else 0
    return (
        inner > 0
        and not (m.fp8_block and (inner % m.fp8_block[0] or inner % m.fp8_block[1]))
        and not (m.mxfp4 and inner % MXFP4_BLOCK)
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def describe(result: dict) -> str:
    gib = human_bytes
    lines = [
        f"hpcmoe plan: {result['ranks']} ranks, layout {result['layout']}, {result['dtype']}; whole model "
        f"{result['total_parameters'] / 1e9:.1f} B parameters in {gib(result['total_weight_bytes'])}; "
        f"up to {result['max_batch']} live requests per "
        f"attention-holding rank (run.max_batch)"
    ]
    for name, role in result["roles"].items():
        experts = (
            f", {role['experts_per_rank']} expert(s) per MoE layer" if "experts_per_rank" in role else ""
        )
        experts += f", each 1/{role['expert_tp']} of it" if role.get("expert_tp", 1) > 1 else ""
        lines.append(
            f"  per {name} rank ({role['ranks']} ranks{experts}): {gib(role['total'])} = weights "
            f"{gib(role['weights'])} + KV cache {gib(role['kv_cache'])} + buffers {gib(role['buffers'])}"
            f" + activations {gib(role['activations'])} + runtime {gib(role['runtime'])} (or, while "
            f"building, the build's largest temporary {gib(role['build'])} instead of the KV cache, "
            f"buffers and activations, when larger)"
        )
    verdict = "fits" if result["fits"] else "does not fit"
    lines.append(
        f"  largest rank {gib(result['max_rank_bytes'])} {verdict} in {gib(result['device_memory_bytes'])} "
        f"per rank"
    )
    smallest, tp = result["smallest_ranks_that_fit"], result["smallest_fit_expert_tp"]
    lines.append(
        "  no rank count up to one per expert (in groups of up to 64 ranks) fits: fewer layers, a narrower "
        "dtype, or more memory"
        if not smallest
        else f"  smallest rank count that fits: {smallest}"
        + (f" with parallel.expert_tp={tp}" if tp and tp > 1 else "")
    )
    return "\n".join(lines)
