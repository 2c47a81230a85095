"""Benchmarks: ratios measured in one run, medians of interleaved repetitions (`hpcmoe bench ...`).

Each benchmark runs its variants in turn, rep after rep (A B A B ...), so drifting machine load
hits every variant alike; it prints a table and stores it as JSON (`--out`). None is a pass/fail
test: goals are printed beside the measured ratios. Points with more ranks than cores are
labelled oversubscribed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np

OBSERVED = "@observed"  # in a variant's settings: the file of a first run of the baseline, whose /routing it places by
SCENARIOS = {
    # name: (what it shows, goal, {variant: [--set overrides]}); the first variant is the baseline
    "placement": (
        "one expert per rank against the packed baseline (same model, workload, ranks)",
        "one_per_rank tokens/s > packed",
        {
            "packed": ["parallel.placement=packed", "parallel.experts_per_rank=2"],
            "one_per_rank": ["parallel.placement=one_per_rank"],
        },
    ),
    "overlap": (
        "4 micro-batches against 1 over the configured emulated link, each also run without the link: "
        "wire_hidden = 1 - (TTFT_link - best TTFT_nolink of any variant in the same rep) / T_wire, "
        "clamped to [0, 1]",
        "wire_hidden >= 0.8 in prefill with 4 micro-batches (and low with 1)",
        {"micro_batches_1": ["run.micro_batches=1"], "micro_batches_4": ["run.micro_batches=4"]},
    ),
    "skew": (
        "skewed routing without and with replicas placed from the observed load",
        "replicated lowers max/mean rank load and raises tokens/s",
        {
            "packed": ["parallel.placement=packed"],
            "replicated": [
                "parallel.placement=replicated",
                "parallel.experts_per_rank=2",
                f"parallel.placement_from={OBSERVED}",
            ],
        },
    ),
    "rebalance": (
        "a drifting skew (run.skew_drift): replicas placed once (uniform, or from an earlier run's load) "
        "against online rebalancing (moves in chunks, and in one message per tensor)",
        "online lowers rank load max/mean and raises tokens/s; steps with moves in flight keep >= 0.95x "
        "the decode tokens/s of the others (moving_tps_ratio)",
        {
            "static": [],
            "placement_from": [f"parallel.placement_from={OBSERVED}"],
            "online": ["parallel.rebalance={every_steps: 2, window_steps: 2, chunks_in_flight: 16}"],
            "online_unchunked": [
                "parallel.rebalance={every_steps: 2, window_steps: 2, chunk_kib: 1048576, "
                "chunks_in_flight: 1}"
            ],
        },
    ),
    "wait": (
        "waiting ranks yield the core against spinning",
        "yield >= spin when ranks outnumber cores",
        {"spin": ["parallel.wait=spin"], "yield": ["parallel.wait=yield"]},
    ),
    "ma": (
        "attention/MoE separation 3:1 against co-located attention (ep), same ranks, model, workload",
        "ma TPOT below and TPS above ep (the paper: TPOT 1.82 vs 2.76 ms, TPS 13,289 vs 8,696 on 16 A100s)",
        {
            "ep": ["parallel.layout=ep"],
            "ma_3_1": ["parallel.layout=ma", "parallel.attention_ranks=3", "parallel.moe_ranks=1"],
        },
    ),
    "expert_tp": (
        "expert groups of 2 ranks: rows to every member against rows to a leader that forwards "
        "(and whole experts, one per rank, for reference)",
        "leader sends fewer inter-node bytes than members; measure which has the lower TPOT",
        {
            "members": ["parallel.expert_tp=2", "parallel.expert_tp_dispatch=members"],
            "leader": ["parallel.expert_tp=2", "parallel.expert_tp_dispatch=leader"],
            "whole_experts": ["parallel.expert_tp=1"],
        },
    ),
    "schedule": (
        "experts once per layer and micro-batch over one collective each way (per_layer) against experts "
        "run per arriving source over point-to-point messages (per_source), and auto (per_source in a "
        "prefill, per_layer in decode)",
        "decode TPOT per_source >= 1.5x per_layer; per_layer experts_ms_per_layer within 2x of "
        "weight_read_ms_per_layer",
        {
            "per_source": ["parallel.expert_schedule=per_source"],
            "per_layer": ["parallel.expert_schedule=per_layer"],
            "auto": ["parallel.expert_schedule=auto"],
        },
    ),
    "dispatch_mode": (
        "two-stage node-aware dispatch against flat",
        "two_stage sends fewer inter-node bytes",
        {"flat": ["parallel.dispatch=flat"], "two_stage": ["parallel.dispatch=two_stage"]},
    ),
}


def oversubscribed(world) -> bool:
    from hpcmoe.runtime.topology import available_cores

    return world.Get_size() > available_cores()


def report(
    name: str, rows: dict, baseline: str, goal: str, meta: dict, out: str | None, spread: tuple[str, ...] = ()
) -> dict:
    """Print medians and ratios against the baseline; store them as JSON. spread: keys whose
    [min, max] over the repetitions is stored too (result["spread"][variant][key])."""
    keys = sorted({k for r in rows.values() for k in r})
    result = {"benchmark": name, "goal": goal, **meta, "median": {}, "ratio_to_" + baseline: {}}
    if spread:
        result["spread"] = {
            v: {k: [float(np.min(s[k])), float(np.max(s[k]))] for k in spread if k in s}
            for v, s in rows.items()
        }
    print(
        f"hpcmoe bench {name}: {meta.get('what', '')}"
        + ("  [oversubscribed]" if meta.get("oversubscribed") else "")
    )
    width = {k: max(len(k) + 2, 12) for k in keys}
    print(f"  {'variant':<18}" + "".join(f"{k:>{width[k]}}" for k in keys))
    for variant, samples in rows.items():
        medians = {k: float(np.median(samples[k])) for k in keys if k in samples}
        result["median"][variant] = medians
        result["ratio_to_" + baseline][variant] = {
            k: medians[k] / rows_median(rows[baseline], k) for k in medians if rows_median(rows[baseline], k)
        }
        print(f"  {variant:<18}" + "".join(f"{medians.get(k, float('nan')):>{width[k]}.4g}" for k in keys))
    for variant, ranges in result.get("spread", {}).items():
        print(
            f"  {variant:<18}"
            + ", ".join(f"{k} from {lo:.4g} to {hi:.4g} over the reps" for k, (lo, hi) in ranges.items())
        )
    print(f"  goal: {goal}")
    return store(result, out)


def store(result: dict, out: str | None) -> dict:
    """Write a benchmark's result as JSON to `out` (when given) and return it."""
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"  wrote {out}")
    return result


def rows_median(samples: dict, key: str) -> float:
    return float(np.median(samples[key])) if key in samples else float("nan")


def check_scenario(name: str, config_path: str, settings: list[str], world_size: int) -> None:
    """Every variant's config and layout at this world size, before any run: a ValueError (the same on
    every rank) instead of a traceback and MPI_Abort in the middle of the benchmark."""
    from hpcmoe.config import load_config
    from hpcmoe.parallel.layout import ParallelLayout

    for variant, extra in SCENARIOS[name][2].items():
        try:  # OBSERVED stands for a run file that the benchmark writes first
            ParallelLayout.from_config(
                load_config(config_path, settings + [s.replace(OBSERVED, "observed.h5") for s in extra]),
                world_size,
            )
        except ValueError as e:
            raise ValueError(
                f"bench {name}, variant {variant} ({' '.join(extra) or 'the config as given'}) on "
                f"{world_size} ranks: {e}"
            ) from None


def run_scenario(name: str, config_path: str, settings: list[str], reps: int, out: str | None):
    """Engine runs of each variant, interleaved; metrics read back from each run file. The overlap
    benchmark also runs each variant without the link and reports wire_hidden (overlap_figures)."""
    from mpi4py import MPI

    from hpcmoe.config import load_config
    from hpcmoe.parallel.layout import ParallelLayout
    from hpcmoe.runtime.device import choose_device, device_kind
    from hpcmoe.runtime.engine import run
    from hpcmoe.runtime.topology import build_topology

    what, goal, variants = SCENARIOS[name]
    world = MPI.COMM_WORLD
    directory = world.bcast(
        tempfile.mkdtemp(prefix=f"hpcmoe-bench-{name}-") if world.Get_rank() == 0 else None
    )
    rows = {v: {} for v in variants}
    topo = None

    def one_run(extra: list[str], path: str):
        nonlocal topo
        # static batching: every request in the first step, as the earlier numbers were taken (--set wins)
        config = load_config(
            config_path, ["run.batching=static"] + settings + extra + [f"output.path={path}"]
        )
        topo = topo or build_topology(world, config.parallel.ranks_per_node)
        device = choose_device(device_kind(config.run.device), topo.host_rank)
        return config, run(config, topo, ParallelLayout.from_config(config, world.Get_size()), device=device)

    if any(
        OBSERVED in s for extra in variants.values() for s in extra
    ):  # placed by what a baseline run observed
        observed = os.path.join(directory, "observed.h5")
        one_run(next(iter(variants.values())), observed)
        variants = {v: [s.replace(OBSERVED, observed) for s in extra] for v, extra in variants.items()}
    for rep in range(reps + 1):  # the first round warms up and is not recorded
        for variant, extra in variants.items():
            path = os.path.join(directory, f"{variant}.h5")
            config, metrics = one_run(extra, path)
            if name == "overlap":
                _, without_link = one_run(
                    extra + ["parallel.link=null"], os.path.join(directory, f"{variant}_nolink.h5")
                )
            if world.Get_rank() == 0 and rep:
                sample = run_sample(path, config, metrics, topo)
                if name == "overlap":
                    sample["ttft_nolink_ms"] = without_link["ttft_ms"]
                    sample["wire_ms"] = 1e3 * sample.pop("prefill_wire_s")
                for k, v in sample.items():
                    rows[variant].setdefault(k, []).append(v)
    if world.Get_rank() == 0:
        meta = {
            "what": what,
            "config": config_path,
            "settings": settings,
            "ranks": world.Get_size(),
            "reps": reps,
            "oversubscribed": oversubscribed(world),
        }
        if name == "overlap":
            overlap_figures(rows)
        return report(
            name,
            rows,
            next(iter(variants)),
            goal,
            meta,
            out,
            spread=("wire_hidden",) if name == "overlap" else (),
        )


def run_sample(path: str, config, metrics: dict, topo) -> dict:
    """The figures a scenario compares, from one run's metrics and file."""
    import h5py

    with h5py.File(path) as f:
        timings, traffic, placement = f["timings"][:], f["traffic"][:], f["placement"][:]
    sample = {
        k: metrics[k]
        for k in (
            "ttft_ms",
            "tpot_ms",
            "tps",
            "idle_fraction",
            "busy_fraction",
            "rank_load_max_over_mean",
            "rank_load_max_over_mean_per_step",
        )
    }
    sample["internode_bytes"] = internode_traffic(traffic, topo.node_of_rank)
    link = config.parallel.link
    if link is not None:
        sample["prefill_wire_s"] = critical_wire_seconds(
            traffic[0], topo.node_of_rank, link.bandwidth_gbps, link.latency_us
        )
    sample.update(role_compute_ms(timings, config))
    if config.parallel.rebalance is not None:
        sample.update(moving_cost(path))
    sample.update(expert_time(timings, placement, config))
    for key in ("busy_fraction_attention", "busy_fraction_moe"):
        if key in metrics:
            sample[key] = metrics[key]
    return sample


def expert_time(timings: np.ndarray, placement: np.ndarray, config) -> dict:
    """Decode: the slowest rank's `experts` time per MoE layer and step (summed over micro-batches,
    median over layers and steps), against reading the weights of the experts on the rank that holds
    most once, at the memory bandwidth `hpcmoe calibrate` measured here (machines/this_box.yaml).
    placement: the run's /placement [moe_layers, experts, replicas]."""
    from hpcmoe.model.transformer import parameter_bytes
    from hpcmoe.sim.machine import load_machine

    rows = timings[(timings["phase"] == b"experts") & (timings["step"] > 0)]
    if not len(rows):
        return {}
    keys, where = np.unique(rows[["step", "layer", "rank"]], return_inverse=True)
    per_rank = np.bincount(where.reshape(-1), weights=rows["end"] - rows["start"])
    slowest = {}
    for key, seconds in zip(keys, per_rank):
        slowest[key["step"], key["layer"]] = max(slowest.get((key["step"], key["layer"]), 0.0), seconds)
    m = config.model
    total, with_one = parameter_bytes(m, 1)
    expert_bytes = (with_one - parameter_bytes(m, 0)[1]) / m.moe_layers  # one expert of one layer
    most = np.bincount(placement[0][placement[0] >= 0].reshape(-1)).max()  # slots on the fullest rank
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    machine = load_machine(os.path.join(root, "machines", "this_box.yaml"))
    return {
        "experts_ms_per_layer": 1e3 * float(np.median(list(slowest.values()))),
        "weight_read_ms_per_layer": 1e3 * most * expert_bytes / machine.memory_bytes_per_s,
    }


def moving_cost(path: str) -> dict:
    """Online rebalancing from a run file: switches, bytes moved, and moving_tps_ratio."""
    import h5py

    with h5py.File(path) as f:
        history, times = f["placement_history"][:], f["metrics/token_time_s"][:]
        made = np.array([len(c) for c in f["requests/completion_ids"][:]])
        last = f["requests/finished_step"][:]
    # one token per step from a request's first through its last (finished_step)
    tokens = np.zeros(max(len(times), int(last.max(initial=-1)) + 1) + 1, np.int64)
    np.add.at(tokens, last - made + 1, 1)
    np.add.at(tokens, last + 1, -1)
    windows = list(zip(history["decided_at_step"], history["step"]))
    return {
        "switches": len(history),
        "moved_mib": float(history["bytes_moved"].sum()) / 2**20,
        "moving_tps_ratio": moving_tps_ratio(times, np.cumsum(tokens)[: len(times)], windows),
    }


def moving_tps_ratio(token_times: np.ndarray, tokens: np.ndarray, windows) -> float:
    """Generated tokens per wall second over the moving windows over the same for the other decode
    steps (NaN without both). token_times: [steps] when rank 0 held each step's tokens (every step
    made some, as under static batching); tokens: [steps] tokens each step made; windows:
    (decided_at_step, switch step) pairs. A window runs from the step after the decision (moves
    start) through the switch step (the first on the new placement, which pays for the switch)."""
    seconds, made = np.diff(token_times), np.asarray(tokens)[1:]  # decode step i + 1
    moving = np.zeros(len(seconds), bool)
    for decided, switch in windows:
        moving[decided:switch] = True  # steps decided + 1 .. switch
    if not moving.any() or moving.all():
        return float("nan")
    rate = lambda steps: made[steps].sum() / seconds[steps].sum()
    return float(rate(moving) / rate(~moving))


def critical_wire_seconds(
    traffic: np.ndarray, node_of_rank, bandwidth_gbps: float, latency_us: float
) -> float:
    """The wire time on a step's critical path: traffic [moe_layers, src, dst] dispatch bytes.

    Layer after layer, the dispatch lasts as long as the busiest outgoing inter-node link
    (bytes / bandwidth) plus one latency, and so does the return of the same bytes (exact for
    flat dispatch, where answers are the size of the tokens sent)."""
    nodes = np.asarray(node_of_rank)
    crossing = traffic * (nodes[:, None] != nodes[None, :])  # [layers, src, dst]
    seconds = lambda sent: np.where(sent > 0, sent * 8 / (bandwidth_gbps * 1e9) + latency_us * 1e-6, 0.0)
    out_going, coming_back = (
        crossing.sum(axis=2),
        crossing.sum(axis=1),
    )  # per layer: by sender, by expert rank
    return float(seconds(out_going).max(axis=1).sum() + seconds(coming_back).max(axis=1).sum())


def wire_hidden_raw(ttft_link_ms: float, best_nolink_ms: float, wire_ms: float) -> float:
    """1 - (T_link - T_best_nolink) / T_wire, unclamped: the share of the wire time the schedule hid
    (1 = all of it). Against the fastest schedule without the link, not the variant's own: a schedule
    slower with and without the link must not read well."""
    return 1.0 - (ttft_link_ms - best_nolink_ms) / wire_ms if wire_ms > 0 else float("nan")


def wire_hidden(ttft_link_ms: float, best_nolink_ms: float, wire_ms: float) -> float:
    """wire_hidden_raw clamped to [0, 1] (noise in two runs can push it out); NaN stays NaN."""
    return float(np.clip(wire_hidden_raw(ttft_link_ms, best_nolink_ms, wire_ms), 0.0, 1.0))


def overlap_figures(rows: dict) -> None:
    """Adds best_nolink_ms, wire_hidden_raw and wire_hidden to each variant's samples, rep by rep:
    rows[variant][key] is a list over the reps (every variant ran in every rep), with ttft_ms,
    ttft_nolink_ms and wire_ms. best_nolink_ms: the fastest no-link TTFT of any variant in that rep."""
    best = np.min([samples["ttft_nolink_ms"] for samples in rows.values()], axis=0)
    for samples in rows.values():
        parts = list(zip(samples["ttft_ms"], best, samples["wire_ms"]))
        samples["best_nolink_ms"] = [float(b) for b in best]
        samples["wire_hidden_raw"] = [wire_hidden_raw(*p) for p in parts]
        samples["wire_hidden"] = [wire_hidden(*p) for p in parts]


def role_compute_ms(timings: np.ndarray, config) -> dict[str, float]:
    """Per step, the attention and the expert compute of the busiest rank doing each, measured alone."""
    steps = config.run.max_new_tokens
    out = {}
    for name, phase in (("attention_compute_ms", b"attention"), ("expert_compute_ms", b"experts")):
        rows = timings[timings["phase"] == phase]
        per_rank = [
            1e3 * (rows["end"] - rows["start"])[rows["rank"] == r].sum() / steps for r in set(rows["rank"])
        ]
        out[name] = max(per_rank) if per_rank else 0.0
    return out


def internode_traffic(traffic: np.ndarray, node_of_rank) -> float:
    """Bytes of /traffic [steps, layers, src, dst] between ranks of different nodes."""
    nodes = np.array(node_of_rank)
    return float(traffic[..., nodes[:, None] != nodes[None, :]].sum())


# ---------------------------------------------------------------- dispatch against raw Alltoallv


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


class IdentityMoE:
    """Experts that return their input, routed by fixed expert ids: measures the exchange alone."""

    def __init__(self, expert_ids, weights):
        self.expert_ids, self.weights = expert_ids, weights

    def route(self, h):
        """h [n, H] -> (expert_ids [n, k], weights [n, k]): what moe_layer.route asks of a MoE layer."""
        return self.expert_ids, self.weights

    def run_experts(self, rows, counts, out=None):
        return rows if out is None else out.copy_(rows)

    def shared(self, h):
        return None


def bench_dispatch(tokens: int, hidden: int, dtype: str, top_k: int, reps: int, out: str | None):
    """Our dispatch + combine against two raw Alltoallv calls moving the same bytes (plus counts): `ours` is
    the per_layer exchange (decode's default), `ours_per_source` the point-to-point one."""
    import torch
    from mpi4py import MPI

    from hpcmoe.config import load_config
    from hpcmoe.parallel.placement import one_per_rank
    from hpcmoe.runfile.timer import Timer
    from hpcmoe.runtime.comm import Where
    from hpcmoe.runtime.ep import build_exchange, messaging
    from hpcmoe.runtime.moe_layer import StepStats, flat
    from hpcmoe.runtime.scheduler import run_concurrently
    from hpcmoe.runtime.topology import build_topology

    world = MPI.COMM_WORLD
    size, rank = world.Get_size(), world.Get_rank()
    config = load_config(
        None,
        [
            "model.preset=debug",
            f"model.num_experts={size}",
            f"model.top_k={min(top_k, size)}",
            "model.dense_layers=0",
        ],
    )
    topo = build_topology(world, None)
    generator = torch.Generator().manual_seed(rank)
    h = torch.randn(tokens, hidden, generator=generator).to(getattr(torch, dtype))
    ids = torch.stack(
        [torch.randperm(size, generator=generator)[: config.model.top_k] for _ in range(tokens)]
    )
    moe = IdentityMoE(ids, torch.full(ids.shape, 1.0 / ids.shape[1]))
    timer, sender = Timer(rank, 0.0), messaging(config, topo)
    ctx = build_exchange(config, topo, one_per_rank(size, size), timer, list(range(size)), sender)
    calls = [0]

    def exchange(schedule: str):
        stats = StepStats.zeros(1, size, size)
        ctx.schedule.setting, ctx.schedule.prefill = schedule, False
        calls[0] += 1  # each call a step of one MoE layer: the collectives' order is the calls' order
        run_concurrently([flat(ctx, moe, Where(calls[0], 0, 0), h, stats)], timer, 0, sender)
        sender.wait(Where())
        timer.take()

    dest = ids.flatten().sort(stable=True)
    rows = h[dest.indices // ids.shape[1]]
    send_counts = np.bincount(dest.values.numpy(), minlength=size) * hidden * h.element_size()

    def raw():
        recv_counts = np.empty(size, np.int64)
        world.Alltoall(send_counts, recv_counts)
        send = rows.contiguous().view(torch.uint8).numpy().reshape(-1)
        received = np.empty(recv_counts.sum(), np.uint8)
        world.Alltoallv(
            [send, (send_counts, np.cumsum(send_counts) - send_counts), MPI.BYTE],
            [received, (recv_counts, np.cumsum(recv_counts) - recv_counts), MPI.BYTE],
        )
        back = np.empty_like(send)
        world.Alltoallv(
            [received, (recv_counts, np.cumsum(recv_counts) - recv_counts), MPI.BYTE],
            [back, (send_counts, np.cumsum(send_counts) - send_counts), MPI.BYTE],
        )

    samples = time_interleaved(
        world,
        {
            "ours": lambda: exchange("per_layer"),
            "raw_alltoallv": raw,
            "ours_per_source": lambda: exchange("per_source"),
        },
        reps,
    )
    ctx.close()
    if rank == 0:
        meta = {
            "what": f"dispatch+combine of {tokens} tokens/rank x top-{config.model.top_k}, hidden {hidden}, "
            f"{dtype}, {size} ranks",
            "ranks": size,
            "reps": reps,
            "oversubscribed": oversubscribed(world),
            "bytes_per_rank_each_way": int(send_counts.sum()),
        }
        return report(
            "dispatch",
            samples,
            "raw_alltoallv",
            "ours <= 1.3x raw_alltoallv (hidden 1024 and 4096)",
            meta,
            out,
        )


def leader_sum(ctx, x, group: list[int], tag, at):
    """The first wave's sum of attention partials, kept to measure against: node leaders gather their
    node, exchange whole node sums with every other leader, and send the total to each member."""
    from hpcmoe.runtime.comm import Receives
    from hpcmoe.runtime.tags import Kind

    node = ctx.topo.node_of_rank
    mine = [r for r in group if node[r] == node[ctx.rank]]
    leaders = sorted({min(r for r in group if node[r] == node[s]) for s in group})
    receive = lambda peers, kind: Receives(
        ctx.comm, {r: x.new_empty(x.shape) for r in peers}, tag(kind), ctx.link
    )
    if ctx.rank != mine[0]:
        back = receive([mine[0]], Kind.GATHER_BACK)
        ctx.sender.send(mine[0], x, tag(Kind.SCATTER))
        yield back.all_in(at, "reduce_wait")
        return back.received[mine[0]]
    members = receive(mine[1:], Kind.SCATTER)
    yield members.all_in(at, "reduce_wait")
    node_sum = x.clone()
    for r in mine[1:]:
        node_sum += members.received[r]
    others = receive([r for r in leaders if r != ctx.rank], Kind.ACROSS_NODES)
    for r in leaders:
        if r != ctx.rank:
            ctx.sender.send(r, node_sum, tag(Kind.ACROSS_NODES))
    yield others.all_in(at, "reduce_wait")
    total = x.new_zeros(x.shape)
    for r in leaders:
        total += node_sum if r == ctx.rank else others.received[r]
    for r in mine[1:]:
        ctx.sender.send(r, total, tag(Kind.GATHER_BACK))
    return total


class CountingSender:
    """A Sender that counts the bytes this rank sends to other nodes (what crosses the inter-node link)."""

    def __init__(self, sender, node_of_rank):
        self.sender, self.node_of_rank, self.internode_bytes = sender, node_of_rank, 0
        self.staging, self.link = sender.staging, sender.link

    def receives(self, buffers: dict, tag: int):
        return self.sender.receives(buffers, tag)

    def send(self, peer, data, tag, own=None):
        if self.node_of_rank[peer] != self.node_of_rank[self.sender.comm.Get_rank()]:
            self.internode_bytes += data.numel() * data.element_size()
        self.sender.send(peer, data, tag, own)


def bench_reduce(
    tokens: int,
    hidden: int,
    ranks_per_node: int,
    reps: int,
    out: str | None,
    bandwidth_gbps: float | None = None,
    latency_us: float = 0.0,
):
    """The sum of attention partials over the attention ranks: the seed's hierarchical reduction
    (reduce-scatter in the node, all-reduce across nodes, all-gather in the node) against the first
    wave's leader version, both over the (emulated) link, and a flat MPI Allreduce (which cannot go
    through the emulated link: its time is the real MPI's on this machine)."""
    import torch
    from mpi4py import MPI

    from hpcmoe.runfile.timer import Timer
    from hpcmoe.runtime.comm import Link, Sender, Where, tag_for
    from hpcmoe.runtime.ma import hierarchical_sum
    from hpcmoe.runtime.scheduler import run_concurrently
    from hpcmoe.runtime.topology import build_topology

    world = MPI.COMM_WORLD
    topo = build_topology(world, ranks_per_node)
    link = Link(topo.node_of_rank, bandwidth_gbps, latency_us)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(topo.rank))
    tag = lambda kind: tag_for(kind, 0, 0, 1)
    counted = {}

    def through_link(name, algorithm):
        sender = CountingSender(Sender(world, link), topo.node_of_rank)
        ctx = SimpleNamespace(
            comm=world, sender=sender, link=link, topo=topo, rank=topo.rank, timer=Timer(0, 0.0)
        )

        def run():
            sender.internode_bytes = 0
            run_concurrently(
                [algorithm(ctx, x, list(range(topo.size)), tag, Where(0, 0, 0))],
                Timer(0, 0.0),
                0,
                sender.sender,
            )
            sender.sender.wait(Where())
            counted[name] = sender.internode_bytes

        return run

    def flat():
        world.Allreduce(x.numpy(), np.empty_like(x.numpy()), op=MPI.SUM)

    samples = time_interleaved(
        world,
        {
            "flat_allreduce": flat,
            "leader_sum": through_link("leader_sum", leader_sum),
            "hierarchical": through_link("hierarchical", hierarchical_sum),
        },
        reps,
    )
    for name in ("leader_sum", "hierarchical"):
        samples[name]["internode_bytes_per_rank"] = [world.allreduce(counted[name], op=MPI.MAX)]
    if world.Get_rank() == 0:
        link_text = (
            f"emulated link {bandwidth_gbps} Gbit/s + {latency_us} us"
            if bandwidth_gbps
            else "no emulated link"
        )
        meta = {
            "what": f"sum of [{tokens}, {hidden}] float32 over {world.Get_size()} ranks on {topo.num_nodes} nodes, "
            f"{link_text} (flat_allreduce: real MPI, no emulation)",
            "ranks": world.Get_size(),
            "reps": reps,
            "oversubscribed": oversubscribed(world),
            "flat_allreduce_bytes_per_rank_bandwidth_optimal": 2
            * x.numel()
            * 4
            * (world.Get_size() - 1)
            / world.Get_size(),
        }
        return report(
            "reduce",
            samples,
            "leader_sum",
            "hierarchical equals flat (tested); fewer inter-node bytes "
            "and less time than leader_sum over the link",
            meta,
            out,
        )


# ---------------------------------------------------------------- one rank against transformers


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

    from hpcmoe.config import load_config
    from hpcmoe.parallel.layout import ParallelLayout
    from hpcmoe.runtime.device import choose_device, device_kind
    from hpcmoe.runtime.engine import run
    from hpcmoe.runtime.startup import check_model
    from hpcmoe.runtime.topology import build_topology

    directory = tempfile.mkdtemp(prefix="hpcmoe-bench-transformers-")
    device = choose_device(device_kind(device_name), 0)
    config = load_config(
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
    prompts = torch.tensor(config.prompts, device=device)  # equal lengths: no padding on either side
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    sync = (lambda: torch.accelerator.synchronize(device)) if device.type != "cpu" else (lambda: None)
    topo = build_topology(MPI.COMM_SELF, None)
    layout = ParallelLayout.from_config(config, 1)
    config = config.on_device(device.type)
    load, max_batch = check_model(
        config, layout, False
    )  # the checkpoint's weights, as `hpcmoe run` loads them
    samples = {"transformers": {}, "hpcmoe": {}}

    def add(variant, key, value):
        samples[variant].setdefault(key, []).append(value)

    for rep in range(reps + 1):  # the first round warms up
        metrics = run(config, topo, layout, load, device=device, max_batch=max_batch)
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
        if rep:
            add("hpcmoe", "prefill_tokens_per_s", metrics["prefill_tokens_per_s"])
            add("hpcmoe", "decode_tokens_per_s", metrics["decode_tokens_per_s"])
            add("transformers", "prefill_tokens_per_s", prompts.numel() / prefill)
            add("transformers", "decode_tokens_per_s", batch * (steps - 1) / max(total - prefill, 1e-9))
    with h5py.File(metrics["path"]) as f:
        ours = f["generated"][:]
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    meta = {
        "what": f"{checkpoint}: {batch} prompts of {prompt_len} tokens, {steps} new tokens, {where}",
        "ranks": 1,
        "reps": reps,
        "oversubscribed": False,
        "device": device.type,
        "tokens_equal": bool(np.array_equal(ours, made[:, prompt_len:].cpu().numpy())),
    }
    return report("transformers", samples, "transformers", "hpcmoe >= 1.0x transformers tokens/s", meta, out)


# ---------------------------------------------------------------- the control path at scale, in one process


def per_source_host(group, plan) -> None:
    """A per_source exchange's host work on one rank: the plan's peers, then for each active peer the
    four point-to-point calls it makes (rows out and answers in; rows in and answers out), posted
    here to this rank itself and completed."""
    from mpi4py import MPI

    _, active, _, _ = group.destinations(plan)
    sent, received = np.zeros(1, np.uint8), np.zeros(2, np.uint8)
    for _ in active:
        requests = [
            MPI.COMM_SELF.Irecv(received[:1], source=0, tag=1),
            MPI.COMM_SELF.Isend(sent, dest=0, tag=1),
            MPI.COMM_SELF.Irecv(received[1:], source=0, tag=2),
            MPI.COMM_SELF.Isend(sent, dest=0, tag=2),
        ]
        MPI.Request.Waitall(requests)


def per_layer_host(group, plan, tables) -> None:
    """A per_layer exchange's host work on one rank: the shares of every member, the receiver's
    counts, displacements and expert-major order (its own counts stand for the received ones), and
    the exchange's three collectives (posted here on a one-rank communicator)."""
    from mpi4py import MPI

    from hpcmoe.parallel.dispatch import expert_major

    send_counts, rows_to, first = group.shares(plan, tables.tp)
    slots = send_counts[:, : tables.served_slots(tables.source_rank)]
    rows_from = slots.sum(1)
    from_first = np.cumsum(rows_from) - rows_from
    expert_major(slots)
    back_first = np.asarray(group.ranks) % tables.tp * len(plan.order) + first
    assert len(from_first) == len(back_first)
    one, got = np.zeros(1, np.int64), np.zeros(1, np.int64)
    requests = [
        MPI.COMM_SELF.Ialltoall(one, got),
        MPI.COMM_SELF.Ialltoallv([one, ([1], [0]), MPI.INT64_T], [got, ([1], [0]), MPI.INT64_T]),
        MPI.COMM_SELF.Ialltoallv([one, ([1], [0]), MPI.INT64_T], [got, ([1], [0]), MPI.INT64_T]),
    ]
    MPI.Request.Waitall(requests)


def bench_control(
    ranks: list[int], experts: int, top_k: int, tokens: int, ranks_per_node: int, reps: int, out: str | None
):
    """Control-path milliseconds per MoE layer and micro-batch of one source rank, at each rank count
    (placement: packed when experts > ranks, one per rank when equal, replicated when fewer)."""
    import torch

    from hpcmoe.parallel.dispatch import choose_slots, compile_placement, node_groups, plan_from_slots
    from hpcmoe.parallel.placement import one_per_rank, packed, replicated
    from hpcmoe.runtime.moe_layer import ExchangeGroup

    generator = torch.Generator().manual_seed(0)
    expert_ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.full(expert_ids.shape, 1.0 / top_k)
    rows, modes = {}, {}
    for count in ranks:
        placement = (
            packed(experts, count)
            if experts > count
            else one_per_rank(experts, count)
            if experts == count
            else replicated(experts, count, 1)
        )
        node_of_rank = [r // ranks_per_node for r in range(count)]
        source = count // 2 + 1  # not rank 0: the replica choice offsets by the source rank
        tables = compile_placement(placement, source, node_of_rank)
        group = ExchangeGroup(tuple(range(count)), (), np.ones(count, bool))
        flat_ms, two_stage_ms, per_source_ms, per_layer_ms = [], [], [], []
        for rep in range(reps + 1):
            start = time.perf_counter()
            for _ in range(20):  # what a rank's host does before any byte moves: slots, plan, counts, peers
                group.destinations(plan_from_slots(choose_slots(expert_ids, tables), tables))
            middle = time.perf_counter()
            for _ in range(20):
                node_groups(choose_slots(expert_ids, tables), weights, tables)  # reads its counts to the host
            end = time.perf_counter()
            for _ in range(20):
                per_source_host(group, plan_from_slots(choose_slots(expert_ids, tables), tables))
            after_per_source = time.perf_counter()
            for _ in range(20):
                per_layer_host(group, plan_from_slots(choose_slots(expert_ids, tables), tables), tables)
            after_per_layer = time.perf_counter()
            if rep:
                flat_ms.append((middle - start) / 20 * 1e3)
                two_stage_ms.append((end - middle) / 20 * 1e3)
                per_source_ms.append((after_per_source - end) / 20 * 1e3)
                per_layer_ms.append((after_per_layer - after_per_source) / 20 * 1e3)
        rows[f"ranks_{count}"] = {
            "flat_ms": flat_ms,
            "two_stage_stage1_ms": two_stage_ms,
            "per_source_exchange_ms": per_source_ms,
            "per_layer_exchange_ms": per_layer_ms,
        }
        modes[count] = placement.mode
    meta = {
        "what": f"control path per MoE layer and micro-batch: {experts} experts, top-{top_k}, {tokens} tokens, "
        f"nodes of {ranks_per_node}; placements {modes}",
        "ranks": ranks,
        "reps": reps,
        "oversubscribed": False,
        "threads": torch.get_num_threads(),
    }
    return report(
        "control",
        rows,
        f"ranks_{ranks[0]}",
        "<= 0.5 ms at 256 ranks, at most linear in ranks beyond",
        meta,
        out,
    )


# ---------------------------------------------------------------- expert GEMMs on one device

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for "fraction of peak".
BF16_PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "GB200": 2500.0,
    "B200": 2250.0,
    "L40S": 362.0,
    "A10": 125.0,
}


def device_peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def synchronized_seconds(fn, device, reps: int) -> list[float]:
    """Wall seconds of fn() per call, the device drained before and after each (one warm-up call)."""
    import torch

    sync = (lambda: torch.accelerator.synchronize(device)) if device.type != "cpu" else (lambda: None)
    fn()
    seconds = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_experts(
    device_name: str,
    hidden: int,
    inner: int,
    experts: int,
    tokens: int,
    decode_tokens: int,
    dtype: str,
    reps: int,
    out: str | None,
):
    """Expert GEMMs as the engine runs them (MoE.run_experts) against torch.matmul on the same shapes
    (prefill) and the weight bytes they stream against a device-to-device copy (decode)."""
    import torch
    import torch.nn.functional as F

    from hpcmoe.config import ModelConfig
    from hpcmoe.model.transformer import MoE
    from hpcmoe.runtime.device import choose_device, device_kind

    device = choose_device(device_kind(device_name), 0)
    torch_dtype = getattr(torch, dtype)
    cfg = ModelConfig(hidden=hidden, expert_hidden=inner, num_experts=experts, top_k=1, dtype=dtype)
    with torch.device("meta"):
        moe = MoE(cfg, list(range(experts)))
    moe.gate = None  # only the experts are measured
    moe.allocate(device, torch_dtype)
    with torch.no_grad():
        for param in moe.parameters():
            param.copy_(torch.randn(param.shape, device=device, dtype=torch_dtype) * param.shape[-1] ** -0.5)
    generator = torch.Generator(device=device).manual_seed(0)
    rows = torch.randn(experts * tokens, hidden, device=device, dtype=torch_dtype, generator=generator)
    out_rows = torch.empty_like(rows)
    weights = [(e.gate_up, e.down_proj.weight) for e in moe.experts.values()]

    def ours():
        with torch.no_grad():
            moe.run_experts(rows, [tokens] * experts, out_rows)

    def matmul():
        with torch.no_grad():
            for e, (gate_up, down) in enumerate(weights):
                gate, up = torch.matmul(rows[e * tokens : (e + 1) * tokens], gate_up.t()).chunk(2, dim=-1)
                torch.matmul(F.silu(gate) * up, down.t())

    small = rows[: experts * decode_tokens]
    small_out = torch.empty_like(small)

    def decode():
        with torch.no_grad():
            moe.run_experts(small, [decode_tokens] * experts, small_out)

    weight_bytes = sum(g.numel() * g.element_size() + d.numel() * d.element_size() for g, d in weights)
    source = torch.empty(weight_bytes // 2, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    samples = {"ours": {}, "torch_matmul": {}}
    for name, fn in (("ours", ours), ("torch_matmul", matmul)):
        samples[name]["prefill_seconds"] = synchronized_seconds(fn, device, reps)
    samples["ours"]["decode_seconds"] = synchronized_seconds(decode, device, reps)
    samples["ours"]["copy_seconds"] = synchronized_seconds(lambda: target.copy_(source), device, reps)
    flops = 2 * experts * tokens * 3 * hidden * inner
    median = lambda xs: float(np.median(xs))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = device_peak_tflops(name)
    prefill = median(samples["ours"]["prefill_seconds"])
    derived = {
        "prefill_tflops": flops / prefill / 1e12,
        "prefill_vs_matmul": median(samples["torch_matmul"]["prefill_seconds"]) / prefill,
        "prefill_fraction_of_bf16_peak": flops / prefill / 1e12 / peak if peak else float("nan"),
        "decode_weight_gbps": weight_bytes / median(samples["ours"]["decode_seconds"]) / 1e9,
        "copy_gbps": 2 * source.numel() / median(samples["ours"]["copy_seconds"]) / 1e9,  # read + write
    }
    derived["decode_vs_copy"] = derived["decode_weight_gbps"] / derived["copy_gbps"]
    result = {
        "benchmark": "experts",
        "device": name,
        "bf16_peak_tflops": peak,
        "what": f"{experts} experts {hidden} x {inner} in {dtype}: prefill {tokens} tokens per expert, "
        f"decode {decode_tokens}",
        "reps": reps,
        "goal": "prefill >= 0.8x torch.matmul and >= 0.5 of the bf16 peak; decode >= 0.7 of copy bandwidth",
        "median": {k: {m: median(v) for m, v in d.items()} for k, d in samples.items()},
        "derived": derived,
    }
    print(f"hpcmoe bench experts on {name}: {result['what']}")
    for key, value in derived.items():
        print(f"  {key:<32}{value:10.3f}")
    print(f"  goal: {result['goal']}")
    return store(result, out)
