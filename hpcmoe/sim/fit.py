"""`hpcmoe calibrate`'s fit: from the kernel and link measurements and the engine's calibration runs
to a machine file's figures. Each phase's fixed cost is its mean call in the runs less its modelled
math; shared_node_slowdown, fixed_by_working_set, and the per-step, resume and first-step costs
are fitted so that simulations of the same runs give their measured TPOT and TTFT. Separate from
the measuring (hpcmoe.sim.measure, hpcmoe.sim.probe_links) and from calibrate.py, which runs it all.
"""

from __future__ import annotations

import os

import numpy as np


def phase_means(paths: list[str]) -> dict:
    """Mean seconds per call of each phase over the decode steps of run files (means, not medians:
    TPOT is a mean, and this machine's occasional slow calls are part of it); dispatch_post per
    exchange (with other ranks: its two rows); output of rank 0 without its waits for the records;
    `ttft`: the median run's TTFT; `step`: the mean decode step."""
    import h5py

    calls: dict = {}
    for path in paths:
        with h5py.File(path, "r") as f:
            rows, times = f["timings"][:], f["metrics/token_time_s"][:]
        calls.setdefault("ttft", []).append(times[0])
        calls.setdefault("step", []).extend(np.diff(times))
        rows = rows[rows["step"] >= 1]
        exchange, output = {}, {}
        for row in rows.tolist():
            rank, layer, mb, step, phase, start, end = row
            if phase == b"dispatch_post":
                exchange[rank, step, layer, mb] = exchange.get((rank, step, layer, mb), 0.0) + end - start
            elif phase in (b"output", b"record_wait") and rank == 0:  # rank 0 waits for the records inside
                output[step] = output.get(step, 0.0) + (end - start) * (1 if phase == b"output" else -1)
            else:
                calls.setdefault(phase.decode(), []).append(end - start)
        calls.setdefault("dispatch_post", []).extend(exchange.values())
        calls.setdefault("output_rank0", []).extend(output.values())
    means = {name: float(np.mean(values)) for name, values in calls.items()}
    # one sample a run, warm-up included: one slow run must not decide
    means["ttft"] = float(np.median(calls["ttft"]))
    return means


# phases whose calls cost about the same at -n 1 and -n 2
SAME_WORK = (
    "embed",
    "route",
    "lm_head",
    "mlp",
    "shared_experts",
)


SCALED_PHASES = ("embed", "attention", "mlp", "route", "lm_head")  # a rank's own work, every step


def own_work(costs, config, rows: int) -> dict:
    """The modelled seconds of SCALED_PHASES for a rank decoding `rows` requests, one token each, at the
    middle of the run's context (fixed costs included)."""
    m = config.model
    context = max(len(r.prompt_ids) for r in config.requests) + config.steps // 2
    return {
        "embed": costs.embed(rows, 1),
        "attention": costs.attention(rows, 1, context, m.heads, m.kv_heads),
        "mlp": costs.mlp(rows),
        "route": costs.route(rows),
        "lm_head": costs.lm_head(rows, m.vocab),
    }


def fixed_costs(kernels: dict, links: dict, one: dict, two: dict, config) -> tuple[dict, float]:
    """Each phase's fixed cost: its mean call on this machine, a rank alone (-n 1), minus the modelled
    math of that call; what exchanging adds from the -n 2 runs. -> (fixed_us, shared_node_slowdown:
    how much longer the same calls take at -n 2, both cores busy, the median over SAME_WORK)."""
    from hpcmoe.model.sizes import parameter_bytes
    from hpcmoe.sim.costs import Costs
    from hpcmoe.sim.machine import PHASES, machine_from

    m, batch = config.model, len(config.requests)
    machine = machine_from(machine_raw(kernels, links, {phase: 0.0 for phase in PHASES}))
    costs, costs_two = Costs(m, machine, parameter_bytes(m, 0)[0]), Costs(m, machine, two_rank_weights(m))
    half = -(-batch // 2)  # the -n 2 run's fuller rank, one decode token each
    slowdown = max(0.0, float(np.median([two[phase] / one[phase] for phase in SAME_WORK])) - 1)
    alone = {
        **own_work(costs, config, batch),
        "dispatch_post": costs.dispatch_post(batch * m.top_k),
        "shared_experts": 0.0,
    }
    fixed = {phase: max(0.0, one[phase] - seconds) for phase, seconds in alone.items()}
    slots = np.array([[half * m.top_k // m.num_experts] * (m.num_experts // 2)])  # one source's rows, -n 2
    together = {"combine": costs_two.combine(half), "experts": float(costs_two.experts(slots)[0])}
    fixed.update(
        {phase: max(0.0, two[phase] / (1 + slowdown) - seconds) for phase, seconds in together.items()}
    )
    fixed["message"] = 1e-6 * links["message_us"]
    fixed["counts"] = max(
        0.0, two["dispatch_post"] / (1 + slowdown) - one["dispatch_post"] - 2 * fixed["message"]
    )
    fixed["gateway"] = fixed["combine"]  # not in the calibration runs: taken as a combine
    fixed["reduce"] = fixed["gather"] = 2 * fixed["message"]  # ma's sums and gathers: a few tensor ops each
    fixed["output"] = one["output_rank0"]
    fixed["record"] = max(0.0, two["output_rank0"] / (1 + slowdown) - one["output_rank0"])
    fixed["resume"] = fixed["step"] = fixed["first_step"] = 0.0  # fitted against simulations (fit_step_costs)
    return {phase: 1e6 * seconds for phase, seconds in fixed.items()}, slowdown


def two_rank_weights(m) -> int:
    """Weight bytes two ep ranks of this box read each step: all but the experts twice, the experts once."""
    from hpcmoe.model.sizes import parameter_bytes

    whole, base = parameter_bytes(m, 0)
    return whole + base


def fixed_scale(raw: dict, config, wide_config, wide: dict) -> dict:
    """fixed_by_working_set: 1 at the debug model's -n 2 weights (its runs gave fixed_us); at the wide
    model's, the multiplier of fixed_us with which the wide -n 2 runs' SCALED_PHASES take their
    measured time (less shared_node_slowdown): its weights stream past the cache and evict the
    engine's own code and data, so its per-call overheads grow (measured here: about 1.5x)."""
    from hpcmoe.sim.costs import Costs
    from hpcmoe.sim.machine import machine_from

    small, large = two_rank_weights(config.model), two_rank_weights(wide_config.model)
    costs = Costs(wide_config.model, machine_from(raw), large)
    modelled = own_work(costs, wide_config, -(-len(wide_config.requests) // 2))  # the -n 2 run's fuller rank
    fixed = sum(costs.fixed[phase] for phase in SCALED_PHASES)
    measured = sum(wide[phase] for phase in SCALED_PHASES) / (1 + raw["shared_node_slowdown"])
    multiplier = max(0.1, (measured - sum(modelled.values()) + fixed) / fixed)
    return {small / 2**20: 1.0, large / 2**20: multiplier} if large > small else {}


def machine_raw(kernels: dict, links: dict, fixed_us: dict) -> dict:
    """The machine file's figures from the measurements (measured rates: efficiencies 1.0)."""
    from hpcmoe.runtime.topology import available_memory

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    link = {"latency_us": links["latency_us"], "gb_per_s": links["gb_per_s"]}
    return {
        "name": "this_box",
        "device": "cpu",
        "one_box": True,
        "compute_units_per_node": cores,
        "device_memory_gb": available_memory() / 1e9,
        "gemm_tflops": kernels["gemm_tflops"],
        "gemm_decode_gb_per_s": kernels["gemm_decode_gb_per_s"],
        "decode_rows_below": 32,
        "decode_rates": kernels["decode_rates"],
        "attention_tflops": kernels["attention_tflops"],
        "attention_gb_per_s": kernels["attention_gb_per_s"],
        "memory_gb_per_s": kernels["memory_gb_per_s"],
        "elementwise_gb_per_s": kernels["elementwise_gb_per_s"],
        "host_link_gb_per_s": kernels["memory_gb_per_s"],
        "mfu": 1.0,
        "bandwidth_efficiency": 1.0,
        "intra_node": link,
        "inter_node": dict(link),
        "collective_latency_us": links["collective_latency_us"],
        "sleep_overshoot_us": kernels["sleep_overshoot_us"],
        "scheduler_quantum_us": kernels["scheduler_quantum_us"],
        "first_step_slowdown": 0.0,
        "shared_node_slowdown": 0.0,
        "fixed_us": fixed_us,
    }


def fit_step_costs(raw: dict, config, one: dict, two: dict, wide_config, wide: dict) -> None:
    """Fitted against simulations of the calibration runs: fixed_us.step, what the -n 1 runs' mean
    decode step holds beyond their simulation; fixed_us.resume, the cost per resumed wait at which the
    -n 2 runs' simulation takes their mean decode step (the exchanges' host work that no phase times:
    receives, scheduler passes, polls; it grows with the waits, so with ranks, micro-batches and ma's
    sums); the first step, whose warm-up grows with the work:
    first_step_slowdown, the share the wide model's measured TTFT (-n 2, the median run) adds to its
    simulation, then fixed_us.first_step, what the debug model's TTFT holds beyond that. (A slope
    fitted through both models' TTFTs swung from 0.2 to 1.9 between calibrations: two noisy points.)"""
    from hpcmoe.sim.machine import machine_from
    from hpcmoe.sim.simulate import simulate

    raw["fixed_us"]["step"] = max(
        0.0, 1e6 * one["step"] - 1e3 * simulate(config, machine_from(raw), 1)["tpot_ms"]
    )
    # resume: the -n 2 runs' mean decode step (bisection; TPOT grows with it)
    low, high = 0.0, 1e6 * two["step"]
    for _ in range(30):
        raw["fixed_us"]["resume"] = (low + high) / 2
        if simulate(config, machine_from(raw), 2)["tpot_ms"] < 1e3 * two["step"]:
            low = raw["fixed_us"]["resume"]
        else:
            high = raw["fixed_us"]["resume"]
    small, large = (1e-3 * simulate(c, machine_from(raw), 2)["ttft_ms"] for c in (config, wide_config))
    # the wide model's first step: mostly work, so a share of it
    slowdown = max(0.0, wide["ttft"] / large - 1)
    raw["first_step_slowdown"] = slowdown
    # the debug model's rest
    raw["fixed_us"]["first_step"] = max(0.0, 1e6 * (two["ttft"] - small * (1 + slowdown)))
