"""The parallel section's checks that hold whatever the rank count: its choices and counts,
attention/MoE separation (ma), tensor parallelism inside experts, rebalancing and the emulated
link. The checks against the rank count are the layout's (hpcmoe.parallel.layout).
"""

from __future__ import annotations

import os

from hpcmoe.config.schema import MXFP4_BLOCK, LinkConfig, ModelConfig, ParallelConfig, require

PLACEMENTS = ("auto", "packed", "one_per_rank", "replicated", "topology_aware")


def validate_parallel(m: ModelConfig, p: ParallelConfig) -> None:
    """The parallel section, against the model where a choice depends on it."""
    require(p.layout in ("ep", "ma"), f"parallel.layout: {p.layout!r} is not supported; expected ep or ma")
    if p.layout == "ma":
        validate_ma(m, p)
    validate_choices(p)
    for name in ("experts_per_rank", "ranks_per_node", "threads", "expert_tp"):
        value = getattr(p, name)
        require(value is None or value >= 1, f"parallel.{name}: expected an integer >= 1, got {value}")
    if p.expert_tp > 1:
        validate_expert_tp(m, p)
    if p.rebalance is not None:
        validate_rebalance(p)
    require(
        not (p.layout == "ma" and m.qk_norm_all_heads),
        "parallel.layout: ma splits the heads over ranks, but this model's q/k norm (MiniMax-M2) spans every "
        "head at once; use parallel.layout=ep",
    )
    require(
        p.capacity_factor is None or p.capacity_factor > 0,
        f"parallel.capacity_factor: expected a number > 0, got {p.capacity_factor}",
    )
    if p.link is not None:
        validate_link(p.link)


def validate_choices(p: ParallelConfig) -> None:
    """The keys that name one of a few ways: placement, dispatch, expert schedule, the waits."""
    require(
        p.placement in PLACEMENTS,
        f"parallel.placement: {p.placement!r} is not supported; expected one of {', '.join(PLACEMENTS)}",
    )
    require(
        p.dispatch in ("flat", "two_stage"),
        f"parallel.dispatch: {p.dispatch!r} is not supported; expected flat or two_stage",
    )
    require(
        p.expert_schedule in ("per_layer", "per_source", "auto"),
        f"parallel.expert_schedule: {p.expert_schedule!r} is not supported; "
        f"expected per_layer, per_source or auto",
    )
    require(
        p.expert_tp_dispatch in ("members", "leader"),
        f"parallel.expert_tp_dispatch: {p.expert_tp_dispatch!r} is not supported; expected members or leader",
    )
    require(
        p.wait in ("yield", "spin"), f"parallel.wait: {p.wait!r} is not supported; expected yield or spin"
    )
    require(
        p.cuda_aware_mpi in (True, False, "auto"),
        f"parallel.cuda_aware_mpi: {p.cuda_aware_mpi!r} is not supported; expected auto, true or false",
    )


def validate_ma(m: ModelConfig, p: ParallelConfig) -> None:
    """Attention/MoE separation: the relations that do not need the rank count."""
    a, e, r = p.attention_ranks, p.moe_ranks, p.attention_replicas
    if "auto" in (a, e):
        for name, value in (("attention_ranks", a), ("moe_ranks", e)):
            require(
                value in ("auto", None),
                f"parallel.{name}: {value!r} with an auto split; set both to auto "
                f"(the predictor chooses attention_ranks + moe_ranks = world size)",
            )
        require(
            p.predictor is not None,
            "parallel.attention_ranks: auto needs parallel.predictor: PATH, a machine file (every split "
            "simulated on it, e.g. machines/this_box.yaml from `hpcmoe calibrate`) or a predictor made by "
            "`hpcmoe predict train RUN.h5 ... --out PATH` from runs of `hpcmoe predict collect`",
        )
        require(
            os.path.isfile(p.predictor),
            f"parallel.predictor: {p.predictor!r} is not a file; give a machine "
            f"file (`hpcmoe calibrate --output {p.predictor}` for a .yaml) or "
            f"a predictor (`hpcmoe predict train RUN.h5 ... --out {p.predictor}`)",
        )
        return  # the rest is checked once the predictor has chosen (hpcmoe.analysis.ma_split.choose_split)
    for name, value in (("attention_ranks", a), ("moe_ranks", e)):
        require(
            value is None or isinstance(value, int),
            f"parallel.{name}: expected an integer or auto, got {value!r}",
        )
    require(
        a is not None and a >= 1 and e is not None and e >= 1,
        f"parallel.layout=ma needs parallel.attention_ranks and parallel.moe_ranks >= 1, got {a} and {e}",
    )
    require(
        r >= 1 and a % r == 0,
        f"parallel.attention_ranks ({a}) must be a multiple of parallel.attention_replicas ({r})",
    )
    shards = a // r // (2 if p.attention_standby else 1)
    require(
        not p.attention_standby or (a // r) % 2 == 0,
        f"parallel.attention_standby pairs ranks: attention ranks per replica ({a // r}) must be even",
    )
    require(m.heads >= shards, f"model.heads ({m.heads}) must be >= attention ranks per replica ({shards})")
    require(m.num_experts >= e, f"model.num_experts ({m.num_experts}) must be >= parallel.moe_ranks ({e})")
    require(
        p.dispatch == "flat",
        "parallel.layout=ma sends tokens straight to the MoE ranks: use parallel.dispatch=flat",
    )
    require(
        p.placement in ("auto", "packed"),
        f"parallel.layout=ma packs experts over the MoE ranks: "
        f"parallel.placement must be auto or packed, got {p.placement}",
    )


def validate_expert_tp(m: ModelConfig, p: ParallelConfig) -> None:
    """Tensor parallelism inside experts: the relations that do not need the rank count."""
    t = p.expert_tp
    require(
        p.layout == "ep",
        f"parallel.expert_tp ({t}) splits experts over groups of ep ranks; "
        f"parallel.layout=ma keeps whole experts on its MoE ranks: use expert_tp 1",
    )
    require(
        m.expert_hidden % t == 0,
        f"parallel.expert_tp ({t}) must divide model.expert_hidden ({m.expert_hidden})",
    )
    inner = m.expert_hidden // t
    require(
        not m.fp8_block or (inner % m.fp8_block[0] == 0 and inner % m.fp8_block[1] == 0),
        f"parallel.expert_tp ({t}): each rank's share of model.expert_hidden ({m.expert_hidden} / {t} = "
        f"{inner}) must be whole FP8 blocks ({m.fp8_block}): the block scales are not split",
    )
    require(
        not m.mxfp4 or inner % MXFP4_BLOCK == 0,
        f"parallel.expert_tp ({t}): each rank's share of model.expert_hidden ({m.expert_hidden} / {t} = "
        f"{inner}) must be whole MXFP4 blocks of {MXFP4_BLOCK}: the exponents are not split",
    )


def validate_rebalance(p: ParallelConfig) -> None:
    """Online rebalancing: ep only; its counts and its gain threshold."""
    b = p.rebalance
    require(
        p.layout == "ep",
        "parallel.rebalance moves experts between ep ranks; parallel.layout=ma packs them "
        "over its MoE ranks once",
    )
    for name in ("every_steps", "window_steps", "chunk_kib", "chunks_in_flight"):
        require(
            getattr(b, name) >= 1,
            f"parallel.rebalance.{name}: expected an integer >= 1, got {getattr(b, name)}",
        )
    require(
        0 <= b.min_gain < 1, f"parallel.rebalance.min_gain: expected a number in [0, 1), got {b.min_gain}"
    )


def validate_link(link: LinkConfig) -> None:
    """The emulated inter-node link: a bandwidth, and a latency that may be zero."""
    require(
        link.bandwidth_gbps > 0,
        f"parallel.link.bandwidth_gbps: expected a number > 0, got {link.bandwidth_gbps}",
    )
    require(
        link.latency_us >= 0,
        f"parallel.link.latency_us: expected a number >= 0, got {link.latency_us}",
    )
