"""`hpcmoe calibrate --out MACHINE.yaml`: measure this machine and write its machine file.

Started as one process (no mpiexec); it launches its own MPI runs, each under `timeout`. About a
minute in all:
1. in this process, one thread (a rank's share of a core when ranks fill the cores): GEMM rates by
   dtype, prefill-shaped (FLOP/s, the median of three shapes) and decode-shaped (4 rows: weight
   bytes per second); attention (masked SDPA, as the engine calls it) against sequence length:
   prefill FLOP/s from the growth between two lengths, decode KV bytes per second likewise; copy
   bandwidth; the decode GEMM's rate against its rows and the weights a step reads (decode_rates:
   in the cache or streamed); the engine's own attention profiled for its passes over the activations
   (elementwise rate); how long time.sleep overshoots; the OS's time slice (one more busy process than cores);
2. `mpiexec -n 2 python -m hpcmoe.sim.calibrate probe OUT`: ping-pong latency and bandwidth between two
   ranks, a two-rank Ialltoall, and the engine's own cost of posting a message (comm.Sender.send,
   comm.Receives);
3. short `hpcmoe run`s, alternated three times: the debug model at -n 1 and -n 2 and a wider one at
   -n 2 (one thread per rank). Each phase's mean cost per call minus its modelled math is that
   phase's fixed cost (a rank alone: -n 1; what exchanging adds: -n 2); how much longer the same
   calls take with both cores busy is shared_node_slowdown; the per-step cost (-n 1), the cost of
   resuming a waiting coroutine (-n 2), and the first step's warm-up (a share of the wide model's
   work, then a fixed part from the debug model) are fitted so that simulations of these runs give
   their measured TPOT and TTFT; the wide runs' per-call costs against the debug runs' give how
   they grow once the weights stream past the cache (fixed_by_working_set).
Means of the runs (TPOT is a mean, and this machine's slow spells are part of it); medians of the
kernel timings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

CALIBRATION_RUN = ["run.max_new_tokens=12", "parallel.threads=1"]  # on inputs/debug.yaml
WIDE = [
    "model.hidden=256",
    "model.head_dim=32",
    "model.expert_hidden=1024",
    "model.dense_hidden=1024",
    "run.batch=8",
    "run.prompt_len=64",
    "run.prompt_len_min=64",
]  # a second size, for the first step's warm-up
REPEATS = 3
# the engine runs the fit is made on, by kind: (ranks, settings on the calibrated config). Validation
# (tools/validate_sim.py) must use configurations outside these: same_configuration tells.
CALIBRATION_RUNS = {
    "one": (1, CALIBRATION_RUN),
    "two": (2, CALIBRATION_RUN),
    "wide": (2, CALIBRATION_RUN + WIDE),
}


def seconds_per_call(function, min_seconds: float = 0.05, reps: int = 5) -> float:
    """Median over `reps` timings of a loop long enough to take min_seconds."""
    function()
    calls, start = 1, time.perf_counter()
    while time.perf_counter() - start < min_seconds / 5:
        function()
        calls += 1
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        samples.append((time.perf_counter() - start) / calls)
    return float(np.median(samples))


def measure_kernels() -> dict:
    """GEMM, attention, elementwise and memory rates of one thread of this machine."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    found = {"gemm_tflops": {}, "gemm_decode_gb_per_s": {}, "attention_tflops": {}}
    for dtype in ("float32", "bfloat16"):
        kind = getattr(torch, dtype)
        rates = []  # prefill-shaped: the median over a few shapes of the models run here
        for rows, inner, outer in ((512, 256, 2048), (512, 1024, 256), (256, 1024, 4096)):
            x, w = torch.randn(rows, inner, dtype=kind), torch.randn(outer, inner, dtype=kind)
            rates.append(2 * rows * inner * outer / seconds_per_call(lambda: F.linear(x, w)) / 1e12)
        found["gemm_tflops"][dtype] = float(np.median(rates))
        x, w = torch.randn(4, 1024, dtype=kind), torch.randn(4096, 1024, dtype=kind)  # decode-shaped
        found["gemm_decode_gb_per_s"][dtype] = (
            w.numel() * w.element_size() / seconds_per_call(lambda: F.linear(x, w)) / 1e9
        )
        cost = {}  # masked prefill attention, as the engine calls it: the growth from 64 to 256 positions
        for t in (64, 256):
            q, mask = (
                torch.randn(4, 8, t, 32, dtype=kind),
                torch.ones(t, t, dtype=torch.bool).tril()[None, None],
            )
            cost[t] = seconds_per_call(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=mask))
        found["attention_tflops"][dtype] = 4 * 4 * 8 * 32 * (256**2 - 64**2) / (cost[256] - cost[64]) / 1e12
    kv = {}
    for s in (1024, 8192):  # decode attention: KV bytes per second, from the growth with the context
        k, q = torch.randn(1, 8, s, 64), torch.randn(1, 8, 1, 64)
        mask = torch.ones(1, 1, 1, s, dtype=torch.bool)
        kv[s] = seconds_per_call(lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=mask))
    found["attention_gb_per_s"] = 2 * 8 * 64 * 4 * (8192 - 1024) / (kv[8192] - kv[1024]) / 1e9
    block = torch.empty(2**24)  # 64 MiB, past the caches
    target = torch.empty_like(block)
    found["memory_gb_per_s"] = 2 * block.numel() * 4 / seconds_per_call(lambda: target.copy_(block)) / 1e9
    asked = 20e-6
    found["sleep_overshoot_us"] = 1e6 * (seconds_per_call(lambda: time.sleep(asked), 0.02) - asked)
    found["elementwise_gb_per_s"] = elementwise_rate()
    found["decode_rates"] = decode_rates(found["gemm_decode_gb_per_s"]["float32"])
    found["scheduler_quantum_us"] = scheduler_quantum_us()
    return found


DECODE_POOLS_MIB = (4, 16, 64)  # weights a decode step reads: in the cache, about its size, streamed
DECODE_ROWS = (1, 4, 8, 16, 24)  # rows of a decode-shaped GEMM (per expert for the grouped kernel)


def decode_rates(reference: float) -> dict:
    """Decode kernels (float32) cycling over pools of 4 MiB of weights, as a step reads each layer's
    weights once: a F.linear, and the grouped experts' bmm (4 experts, as MoE.run_grouped), at
    DECODE_ROWS rows -> {kernel: {rows: {pool MiB: weight bytes/s over `reference`}}}
    (gemm_decode_gb_per_s.float32). Measured here, weights GB/s: 1 row 55 in the cache, 14 streamed;
    16 rows 7 and 6; the bmm about 0.6x of that once streamed (a 32 MiB L3 shared with the box)."""
    import torch
    import torch.nn.functional as F

    kernels = {
        "linear": (lambda rows: torch.randn(rows, 1024), (1024, 1024), F.linear),
        "grouped": (
            lambda rows: torch.randn(4, rows, 256),
            (4, 1024, 256),
            lambda x, w: torch.bmm(x, w.transpose(1, 2)),
        ),
    }
    found: dict = {}
    for kernel, (rows_of, shape, run) in kernels.items():
        for mib in DECODE_POOLS_MIB:
            pool, turn = [torch.randn(shape) for _ in range(mib // 4)], [0]
            for rows in DECODE_ROWS:
                x = rows_of(rows)

                def call():
                    turn[0] = (turn[0] + 1) % len(pool)
                    run(x, pool[turn[0]])

                rate = 4 * 2**20 / seconds_per_call(call, 0.03) / 1e9
                found.setdefault(kernel, {}).setdefault(rows, {})[mib] = rate / reference
    return found


BUSY_LOOP = """import time
end = time.perf_counter() + 1.0
last, gaps = time.perf_counter(), []
while (now := time.perf_counter()) < end:
    if now - last > 2e-4:
        gaps.append(now - last)
    last = now
print(*gaps)"""


def scheduler_quantum_us() -> float:
    """One more busy process than cores, for a second: each notes when it did not run (jumps of its
    clock); the median such gap is how long another process kept the core: the OS's quantum here."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = [
        subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdout=subprocess.PIPE, text=True)
        for _ in range(cores + 1)
    ]
    gaps = [float(gap) for process in busy for gap in process.communicate(timeout=60)[0].split()]
    return 1e6 * float(np.median(gaps)) if gaps else 1000.0


def elementwise_rate() -> float:
    """The engine's own attention (norm, GQA with its cache and rotary, residual) on a prefill of 8 x 64
    positions, hidden 256, profiled: the time of every operator but its GEMMs and attention kernel is
    its passes over the activations (costs.ELEMENTWISE_PASSES of [rows, H]) -> their rate, GB/s.
    (Profiled rather than timed twice and subtracted: one measurement, at one moment of this machine.)"""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from hpcmoe.config import load_config
    from hpcmoe.model.attention import GQAttention, RMSNorm, StepInputs
    from hpcmoe.sim.costs import ELEMENTWISE_PASSES

    m = (
        load_config(None, ["model.preset=debug", "model.hidden=256", "model.head_dim=32"])
        .on_device("cpu")
        .model
    )
    b, t, calls = 8, 64, 10
    with torch.no_grad():
        attention, norm = GQAttention(m), RMSNorm(m.hidden, m.norm_eps)
        attention.allocate("cpu", torch.float32)
        for weight in (attention.qkv, attention.o_proj.weight):
            weight.copy_(torch.randn(weight.shape) * m.hidden**-0.5)
        x, inputs = (
            torch.randn(b, t, m.hidden),
            StepInputs.build([[1] * t] * b, torch.zeros(b, dtype=torch.int64)),
        )
        cache = attention.new_cache(b, t, torch.float32)
        x + attention(norm(x), cache, inputs)
        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            for _ in range(calls):
                x + attention(norm(x), cache, inputs)
    other = (
        sum(
            e.self_cpu_time_total
            for e in profiled.key_averages()
            if "mm" not in e.key and "scaled_dot_product" not in e.key
        )
        * 1e-6
        / calls
    )
    return ELEMENTWISE_PASSES * b * t * m.hidden * 4 / other / 1e9


def probe(out: str) -> None:
    """Under `mpiexec -n 2`: point-to-point and collective latency, bandwidth, and the engine's own
    cost of posting a message; rank 0 writes them as JSON to `out`."""
    import torch
    from mpi4py import MPI

    from hpcmoe.runtime.comm import Link, Receives, Sender

    world = MPI.COMM_WORLD
    me, peer = world.Get_rank(), 1 - world.Get_rank()

    def ping_pong(nbytes: int, reps: int) -> float:
        buffer = np.zeros(nbytes, np.uint8)
        world.Barrier()
        start = time.perf_counter()
        for _ in range(reps):
            if me == 0:
                world.Send(buffer, dest=1)
                world.Recv(buffer, source=1)
            else:
                world.Recv(buffer, source=0)
                world.Send(buffer, dest=0)
        return (time.perf_counter() - start) / reps / 2  # one way

    found = {"latency_us": 1e6 * float(np.median([ping_pong(8, 200) for _ in range(5)]))}
    big = 8 * 2**20
    found["gb_per_s"] = (
        big / (float(np.median([ping_pong(big, 10) for _ in range(5)])) - 1e-6 * found["latency_us"]) / 1e9
    )
    counts, received = np.ones(2, np.int64), np.empty(2, np.int64)

    def alltoalls(reps: int) -> float:  # the same number of calls on both ranks
        world.Barrier()
        start = time.perf_counter()
        for _ in range(reps):
            request = world.Ialltoall(counts, received)
            while not request.Test():
                pass
        return (time.perf_counter() - start) / reps

    found["collective_latency_us"] = 1e6 * float(np.median([alltoalls(200) for _ in range(5)]))
    link, many = Link(tuple(range(2))), 200  # the engine's own posting path, many small messages
    sender = Sender(world, link)
    rows = [torch.zeros(4, 16) for _ in range(many)]
    world.Barrier()
    start = time.perf_counter()
    if me == 0:
        for i, row in enumerate(rows):
            sender.send(peer, row, 1000 + i)
    else:
        receives = [Receives(world, {peer: row}, 1000 + i, link) for i, row in enumerate(rows)]
    posting = (time.perf_counter() - start) / many
    world.Barrier()
    if me == 1:
        for receive in receives:
            while peer not in receive.arrived():
                pass
    sender.wait("calibrate")
    posted = world.gather(posting, root=0)
    if me == 0:
        found["message_us"] = 1e6 * float(np.mean(posted))
        with open(out, "w") as f:
            json.dump(found, f)


def mpi_command(ranks: int, *args: str, timeout: int = 300) -> list[str]:
    mpiexec = (
        shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec") or "mpiexec"
    )
    return ["timeout", str(timeout), mpiexec, "-n", str(ranks), sys.executable, "-m", *args]


def launch(command: list[str]) -> None:
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"calibrate: `{' '.join(command[3:])}` failed (exit {result.returncode}): {tail}")


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
    means["ttft"] = float(
        np.median(calls["ttft"])
    )  # one sample a run, warm-up included: one slow run must not decide
    return means


SAME_WORK = (
    "embed",
    "route",
    "lm_head",
    "mlp",
    "shared_experts",
)  # phases whose calls cost about the same at -n 1 and -n 2


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
    from hpcmoe.model.transformer import parameter_bytes
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
    from hpcmoe.model.transformer import parameter_bytes

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
    low, high = (
        0.0,
        1e6 * two["step"],
    )  # resume: the -n 2 runs' mean decode step (bisection; TPOT grows with it)
    for _ in range(30):
        raw["fixed_us"]["resume"] = (low + high) / 2
        if simulate(config, machine_from(raw), 2)["tpot_ms"] < 1e3 * two["step"]:
            low = raw["fixed_us"]["resume"]
        else:
            high = raw["fixed_us"]["resume"]
    small, large = (1e-3 * simulate(c, machine_from(raw), 2)["ttft_ms"] for c in (config, wide_config))
    slowdown = max(
        0.0, wide["ttft"] / large - 1
    )  # the wide model's first step: mostly work, so a share of it
    raw["first_step_slowdown"] = slowdown
    raw["fixed_us"]["first_step"] = max(
        0.0, 1e6 * (two["ttft"] - small * (1 + slowdown))
    )  # the debug model's rest


def same_configuration(a, a_ranks: int, b, b_ranks: int) -> bool:
    """Whether two runs measure the same thing for a fit: the same model, batch, prompts and layout on
    the same rank count. Only how long they decode and thread settings may differ."""
    import dataclasses

    def shape(config):
        d = dataclasses.asdict(config)
        d.pop("output")
        d["run"].pop("max_new_tokens")
        d["parallel"].pop("threads")
        if d["run"]["prompt_len_min"] is None:  # None: every prompt of prompt_len
            d["run"]["prompt_len_min"] = d["run"]["prompt_len"]
        return d

    return a_ranks == b_ranks and shape(a) == shape(b)


def check_inputs(out: str, config_path: str) -> None:
    """Before anything is measured: `out` can be written and the config's calibration runs can run;
    ValueError in one line naming the problem otherwise."""
    from hpcmoe.config import load_config
    from hpcmoe.runfile.paths import check_output_path

    check_output_path(out, "calibrate --out", "machines/this_box.yaml", create=False)
    for settings in (CALIBRATION_RUN, CALIBRATION_RUN + WIDE):
        try:
            check_run(load_config(config_path, settings))
        except ValueError as e:
            raise ValueError(
                f"calibrate --config {config_path} (its runs set {', '.join(settings)}): {e}"
            ) from None


def check_run(config) -> None:
    """One calibration run's config: a dense layer (its MLP is timed), its device, its prompts, and its
    layout and memory at -n 1 and -n 2 (`hpcmoe plan`'s numbers)."""
    from hpcmoe.config import require
    from hpcmoe.parallel.layout import ParallelLayout
    from hpcmoe.parallel.plan import human_bytes, rank_memory
    from hpcmoe.runtime.device import device_kind
    from hpcmoe.runtime.topology import available_memory
    from hpcmoe.sim.simulate import check_one_batch

    require(
        config.model.dense_layers >= 1,
        f"model.dense_layers: expected an integer >= 1 (calibration times a "
        f"dense layer's MLP), got {config.model.dense_layers}; use a model such "
        f"as inputs/debug.yaml",
    )
    device_kind(config.run.device)
    _ = config.requests  # reads and checks run.prompts
    for ranks in (1, 2):
        needed, available = rank_memory(config, ranks)["max_rank_bytes"], available_memory() / ranks
        require(
            needed <= available,
            f"at -n {ranks} the model needs about {human_bytes(needed)} per rank but "
            f"{human_bytes(available)} is available per rank; calibrate with a smaller "
            f"model (as inputs/debug.yaml)",
        )
        # the fit simulates these runs: the simulator must start their requests as the engine does
        check_one_batch(config, ParallelLayout.from_config(config, ranks), ranks, available)


def calibrate(out: str, config_path: str) -> dict:
    """Check the inputs (check_inputs), measure, write `out`; -> the figures written."""
    from hpcmoe.config import load_config
    from hpcmoe.sim.machine import write_machine

    check_inputs(out, config_path)
    started = time.perf_counter()
    kernels, spread = repeated(measure_kernels, REPEATS)
    widest = max(spread, key=spread.get)
    print(
        f"hpcmoe calibrate: kernels measured {REPEATS} times ({time.perf_counter() - started:.0f} s): medians "
        f"kept; the widest spread {spread[widest]:.0f}% ({widest}; max - min over the median)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="hpcmoe-calibrate-") as work:
        launch(mpi_command(2, "hpcmoe.sim.calibrate", "probe", os.path.join(work, "links.json"), timeout=120))
        with open(os.path.join(work, "links.json")) as f:
            links = json.load(f)
        print(f"hpcmoe calibrate: links measured ({time.perf_counter() - started:.0f} s)", flush=True)
        runs = {kind: [] for kind in CALIBRATION_RUNS}
        for rep in range(REPEATS):  # alternated, so that a slow spell of the machine hits all alike
            for kind, (ranks, run_settings) in CALIBRATION_RUNS.items():
                extra = [part for setting in run_settings for part in ("--set", setting)]
                runs[kind].append(os.path.join(work, f"{kind}_{rep}.h5"))
                launch(mpi_command(ranks, "hpcmoe", "run", config_path, *extra, "--output", runs[kind][-1]))
        print(f"hpcmoe calibrate: engine runs done ({time.perf_counter() - started:.0f} s)", flush=True)
        config = load_config(config_path, CALIBRATION_RUN).on_device("cpu")
        one, two, wide = (phase_means(runs[kind]) for kind in ("one", "two", "wide"))
        fixed, shared_node_slowdown = fixed_costs(kernels, links, one, two, config)
        raw = machine_raw(kernels, links, fixed)
        raw["shared_node_slowdown"] = shared_node_slowdown
        wide_config = load_config(config_path, CALIBRATION_RUN + WIDE).on_device("cpu")
        scale = fixed_scale(raw, config, wide_config, wide)
        if scale:  # none when the wide run reads no more weights than the debug runs (a wider --config)
            raw["fixed_by_working_set"] = scale
        fit_step_costs(raw, config, one, two, wide_config, wide)
    header = (
        f"This machine, measured by `hpcmoe calibrate` on {time.strftime('%Y-%m-%d %H:%M')} in "
        f"{time.perf_counter() - started:.0f} s ({os.uname().nodename}, {raw['compute_units_per_node']} cores).\n"
        "Rates of one thread (a rank's share of a core); efficiencies 1.0 because they are measured.\n"
        "Links: MPI between two ranks of this box (shared memory); every rank runs here (one_box), so\n"
        "inter_node is the same: parallel.link emulates slower links on top. fixed_us: the engine's cost per\n"
        f"call beyond the modelled math, from {REPEATS} x `hpcmoe run {os.path.relpath(config_path)}` at -n 1 and -n 2 "
        f"({', '.join(CALIBRATION_RUN)}) and a wider model at -n 2; step, resume and the first step fitted\n"
        "against simulations of those runs; gateway, reduce and gather are not in them and are taken from\n"
        "similar calls. This box is shared: its speed drifts by tens of percent within minutes."
    )
    raw["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    raw["spread_percent"] = spread
    write_machine(out, raw, header)
    return raw


def repeated(measure, times: int) -> tuple[dict, dict]:
    """`measure()` (a nested dict of figures) `times` times -> (the median of each figure, its spread:
    100 x (max - min) / median, by dotted name). This box's speed moves by tens of percent within
    minutes (two calibrations 40 minutes apart differed 24x in the bfloat16 GEMM rate): one sample
    of each figure could be anywhere in that."""
    samples = [measure() for _ in range(times)]

    def combine(parts: list, name: str, spread: dict):
        if isinstance(parts[0], dict):
            return {
                key: combine([p[key] for p in parts], f"{name}.{key}" if name else key, spread)
                for key in parts[0]
            }
        median = float(np.median(parts))
        spread[name] = 100 * (max(parts) - min(parts)) / median if median else 0.0
        return median

    spread: dict = {}
    return combine(samples, "", spread), spread


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "probe":
    probe(sys.argv[2])
