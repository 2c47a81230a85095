"""`hpcmoe calibrate`'s measurements in its own process, on one thread (a rank's share of a core
when ranks fill the cores): GEMM rates by dtype and shape, attention against sequence length, copy
bandwidth, decode GEMMs against their rows and the weights a step reads, the engine's own attention
profiled for its elementwise passes, how long time.sleep overshoots, and the OS's time slice; and
`repeated`, which keeps the median of each figure over repeats. Separate from calibrate.py, which
launches the MPI runs and writes the file, and from hpcmoe.sim.fit, which turns runs into costs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np


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
    from hpcmoe.model.attention import GQAttention, RMSNorm
    from hpcmoe.model.step import StepInputs
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
