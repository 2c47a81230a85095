"""Machine files: the figures `hpcmoe simulate` runs a config on, each named with its unit.

A machine file is YAML (machines/*.yaml; `hpcmoe calibrate` writes one for the machine it runs on).
Every figure of FIGURES must be there, a number, and not negative (rates above zero): a bad file is
one error naming the figure. Units are in the names: `_tflops` (10^12 FLOP/s), `_gb_per_s`
(10^9 bytes/s), `_us` (microseconds), `_gb` (10^9 bytes). `mfu` multiplies every TFLOP/s figure
and `bandwidth_efficiency` every GB/s figure when the file is loaded, so a file can carry peak
datasheet numbers (GPU files, with the seeds' 0.60 and 0.80) or measured ones (calibrated: 1.0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import yaml

PHASES = (
    "embed",
    "attention",
    "mlp",
    "route",
    "shared_experts",
    "dispatch_post",
    "counts",
    "message",
    "resume",
    "experts",
    "combine",
    "gateway",
    "reduce",
    "gather",
    "lm_head",
    "step",
    "first_step",
    "output",
    "record",
)
FIXED_MEANING = {
    "embed": "per micro-batch: the embedding lookup",
    "attention": "per layer and micro-batch: norms, projections, "
    "rotary, cache write, attention kernel launch",
    "mlp": "per dense layer and micro-batch",
    "route": "per MoE layer and micro-batch: router, top-k, slot choice",
    "shared_experts": "per MoE layer and "
    "micro-batch, a model without shared experts (with them: as a dense MLP)",
    "dispatch_post": "per exchange: the host read of the counts, the gather of the rows",
    "counts": "per exchange with other ranks: posting the counts collective and the answers' receives",
    "message": "per point-to-point message posted (Isend or Irecv)",
    "resume": "per wait of a coroutine: the "
    "scheduler passes and tests that find it can go on, outside any phase",
    "experts": "per run_experts call (one per served source)",
    "combine": "per exchange: weighted sum of the answers",
    "gateway": "per two_stage gateway phase",
    "reduce": "per step of ma's hierarchical sum",
    "gather": "per ma all-gather",
    "lm_head": "per micro-batch: final norm and LM head",
    "step": "per step and rank outside every phase (inputs, scheduler, host read of the tokens)",
    "first_step": "once per rank in the first step (first-call warm-up)",
    "output": "per step and rank: the step's record (rank 0: also the file append)",
    "record": "rank 0, per step and other rank: receiving and unpickling its record",
}
FIGURES = {  # name -> what it is (the unit is in the name)
    "compute_units_per_node": "cores (device cpu) or GPUs (device cuda) of a node: ranks beyond them "
    "share them",
    "device_memory_gb": "memory of one GPU (cuda) or of the whole node (cpu)",
    "gemm_tflops.float32": "float32 GEMM with many rows (prefill shapes): FLOP/s",
    "gemm_tflops.bfloat16": "bfloat16 GEMM with many rows (prefill shapes): FLOP/s",
    "gemm_decode_gb_per_s.float32": "float32 GEMM with few rows (decode shapes): weight bytes streamed "
    "per second",
    "gemm_decode_gb_per_s.bfloat16": "bfloat16 GEMM with few rows (decode shapes): weight bytes streamed "
    "per second",
    "decode_rows_below": "a GEMM with fewer rows than this is decode-shaped",
    "attention_tflops.float32": "attention scores and values (prefill), float32",
    "attention_tflops.bfloat16": "attention scores and values (prefill), bfloat16",
    "attention_gb_per_s": "KV cache read by decode attention",
    "memory_gb_per_s": "memory bandwidth (weights, copies)",
    "elementwise_gb_per_s": "elementwise kernels over activations (norms, rotary, residual adds, gathers)",
    "host_link_gb_per_s": "GPU <-> host copies of an MPI that cannot read GPU memory (unused on a cpu "
    "machine)",
    "mfu": "share of every TFLOP/s figure reached",
    "bandwidth_efficiency": "share of every GB/s figure reached",
    "intra_node.latency_us": "a message between ranks of one node",
    "intra_node.gb_per_s": "one rank's outgoing bandwidth inside a node",
    "inter_node.latency_us": "a message between nodes",
    "inter_node.gb_per_s": "one rank's outgoing bandwidth to other nodes (its share of the node's network)",
    "collective_latency_us": "one round of a small non-blocking collective (ceil(log2 ranks) rounds)",
    "sleep_overshoot_us": "time.sleep(t) returns after t plus this (timer slack): the engine's waits sleep",
    "scheduler_quantum_us": "when ranks outnumber the units: how long one runs before a waiting one gets "
    "its unit",
    "first_step_slowdown": "the first step's work takes this much longer (first calls on new shapes, "
    "fresh memory)",
    "shared_node_slowdown": "work takes this much longer on a node where other ranks run too (shared "
    "caches and memory bandwidth, the OS's other work); 0 for one rank per GPU",
    **{
        f"fixed_us.{phase}": f"engine cost outside the modelled math, {meaning}"
        for phase, meaning in FIXED_MEANING.items()
    },
}
OPTIONAL = {  # name -> what it is; absent: the default said
    "inter_node.nics_per_node": "network cards of a node, shared by its ranks in turn (rank i uses card "
    "i mod this; absent: one per rank, as DeepSeek's and the seeds' GPU nodes have)",
}
DECODE_RATES = "decode_rates"  # optional: {kernel: {rows: {MiB of weights read per step: rate factor}}}
DECODE_KERNELS = {
    "linear": "a decode-shaped GEMM of that many rows (projections, dense MLPs, expert chains, the LM head)",
    "grouped": "the batched GEMMs of grouped experts, that many rows per expert (MoE.run_grouped)",
}
DECODE_RATES_MEANING = (
    "weight bytes/s of each decode kernel over gemm_decode_gb_per_s, by rows, when the ranks "
    "sharing a cache read this many MiB of weights each step (measured in float32 and taken to "
    "hold for every dtype; interpolated on rows and log size, clamped at the ends; absent: 1)"
)
# optional: {MiB of weights read per step: multiplier of fixed_us among them}
FIXED_SCALE = "fixed_by_working_set"
FIXED_SCALE_MEANING = (
    "the fixed_us of the phases among the weights (costs.AMONG_WEIGHTS) times this when the ranks "
    "sharing a cache read this many MiB of weights each step (the weights evict the engine's own code "
    "and data; fitted on the calibration runs; interpolated on log size, clamped at the ends; absent: 1)"
)
RATIOS = ("mfu", "bandwidth_efficiency")
# > 0, not just >= 0
RATES = (
    "tflops",
    "gb_per_s",
    "compute_units_per_node",
    "decode_rows_below",
    "memory_gb",
    "quantum",
)


@dataclass(frozen=True)
class Machine:
    """A machine file in SI units, efficiencies applied: FLOP/s, bytes/s, seconds, bytes."""

    name: str
    device: str  # cpu | cuda: the default model.dtype (float32 | bfloat16)
    one_box: bool  # every rank on this one machine (parallel.ranks_per_node only pretends nodes)
    units_per_node: int
    memory_bytes: float
    gemm_flops: dict  # dtype -> FLOP/s of prefill-shaped GEMMs
    gemm_decode_bytes_per_s: dict  # dtype -> weight bytes/s of decode-shaped GEMMs
    decode_rows_below: int
    attention_flops: dict  # dtype -> FLOP/s
    attention_bytes_per_s: float
    memory_bytes_per_s: float
    elementwise_bytes_per_s: float
    host_link_bytes_per_s: float
    intra: tuple  # (latency s, bytes/s)
    inter: tuple
    collective_s: float
    sleep_overshoot_s: float
    quantum_s: float
    first_step_slowdown: float
    shared_node_slowdown: float
    fixed: dict  # phase -> seconds
    nics_per_node: int = 0  # 0: one network card per rank
    measured_at: str = ""  # calibrated files: when
    decode_rates: dict = field(default_factory=dict)  # kernel -> {rows: ((bytes, factor), ...) ascending}
    fixed_scale: tuple = ()  # ((bytes, multiplier), ...) ascending: fixed_factor's points

    def collective_seconds(self, ranks: int) -> float:
        """A small non-blocking collective among `ranks` ranks (Bruck-like: log2 rounds)."""
        return self.collective_s * max(1, math.ceil(math.log2(max(ranks, 2))))

    def decode_rate_factors(self, weight_bytes: float, kernel: str) -> tuple[list, list]:
        """A decode kernel's weight rate over gemm_decode_bytes_per_s when the ranks sharing a cache read
        `weight_bytes` of weights each step -> (rows, factor at those rows): high while the weights stay
        in the cache and the rows are few. ([1], [1]) without a measured table."""
        table = self.decode_rates.get(kernel)
        if not table or weight_bytes <= 0:
            return [1], [1.0]
        rows = sorted(table)
        return rows, [log_interp(weight_bytes, table[r]) for r in rows]

    def fixed_factor(self, weight_bytes: float) -> float:
        """How much longer the engine's fixed costs take when the ranks sharing a cache read
        `weight_bytes` of weights each step; 1 without a fitted curve."""
        return log_interp(weight_bytes, self.fixed_scale) if self.fixed_scale and weight_bytes > 0 else 1.0


def log_interp(x: float, points) -> float:
    """points: ((size, value), ...) ascending -> the value at x, linear in log size, clamped at the ends."""
    return float(
        np.interp(math.log(x), [math.log(size) for size, _ in points], [value for _, value in points])
    )


def figure(raw: dict, name: str):
    node = raw
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check(raw, where: str) -> None:
    """Every figure present, a number, not negative (rates > 0, ratios in (0, 1]); ValueError naming
    the first bad one."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of figures, got {type(raw).__name__}")
    if raw.get("device") not in ("cpu", "cuda"):
        raise ValueError(f"{where}: device is {raw.get('device')!r}; expected cpu or cuda")
    for name, meaning in FIGURES.items():
        value = figure(raw, name)
        if value is None:
            raise ValueError(f"{where}: figure {name} is missing ({meaning})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{where}: figure {name} is {value!r}; expected a number ({meaning})")
        if name in RATIOS and not 0 < value <= 1:
            raise ValueError(f"{where}: figure {name} is {value}; expected a share in (0, 1] ({meaning})")
        if value < 0 or (value == 0 and any(r in name for r in RATES)):
            raise ValueError(
                f"{where}: figure {name} is {value}; expected a number {'>' if value == 0 else '>='} 0 "
                f"({meaning})"
            )
    if "measured_at" in raw and not isinstance(raw["measured_at"], str):
        raise ValueError(f"{where}: measured_at is {raw['measured_at']!r}; expected a date and time as text")
    spread = raw.get("spread_percent", {})
    if not isinstance(spread, dict) or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in spread.values()
    ):
        raise ValueError(f"{where}: spread_percent must map figure names to numbers >= 0")
    for name, meaning in OPTIONAL.items():
        value = figure(raw, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: figure {name} is {value!r}; expected a whole number >= 1 ({meaning})")
    tables = raw.get(DECODE_RATES)
    positive = lambda v: (
        not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0 and not math.isnan(v)
    )
    curve = lambda c: (
        isinstance(c, dict) and len(c) >= 2 and all(positive(k) and positive(v) for k, v in c.items())
    )
    if raw.get(FIXED_SCALE) is not None and not curve(raw[FIXED_SCALE]):
        raise ValueError(
            f"{where}: {FIXED_SCALE} is {raw[FIXED_SCALE]!r}; expected two or more `MiB: multiplier` "
            f"pairs of numbers > 0 ({FIXED_SCALE_MEANING})"
        )
    if tables is not None and not (
        isinstance(tables, dict)
        and set(tables) <= set(DECODE_KERNELS)
        and all(
            isinstance(t, dict) and t and all(positive(rows) and curve(c) for rows, c in t.items())
            for t in tables.values()
        )
    ):
        raise ValueError(
            f"{where}: {DECODE_RATES} is {tables!r}; expected, for kernels among "
            f"{', '.join(DECODE_KERNELS)}, rows mapped to two or more `MiB: factor` pairs of numbers > 0 "
            f"({DECODE_RATES_MEANING})"
        )


def load_machine(path: str) -> Machine:
    """Read and check a machine file -> Machine; ValueError (one line, naming the figure) when it is bad."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"machine file {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"machine file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return machine_from(raw, f"machine file {path}")


def machine_from(raw: dict, where: str = "machine") -> Machine:
    check(raw, where)
    mfu, bandwidth = raw["mfu"], raw["bandwidth_efficiency"]
    tera, giga = 1e12 * mfu, 1e9 * bandwidth
    link = lambda kind: (1e-6 * raw[kind]["latency_us"], giga * raw[kind]["gb_per_s"])
    return Machine(
        name=str(raw.get("name", "unnamed")),
        device=raw["device"],
        one_box=bool(raw.get("one_box", False)),
        units_per_node=int(raw["compute_units_per_node"]),
        memory_bytes=1e9 * raw["device_memory_gb"],
        gemm_flops={dtype: tera * raw["gemm_tflops"][dtype] for dtype in ("float32", "bfloat16")},
        gemm_decode_bytes_per_s={
            dtype: giga * raw["gemm_decode_gb_per_s"][dtype] for dtype in ("float32", "bfloat16")
        },
        decode_rows_below=int(raw["decode_rows_below"]),
        attention_flops={dtype: tera * value for dtype, value in raw["attention_tflops"].items()},
        attention_bytes_per_s=giga * raw["attention_gb_per_s"],
        memory_bytes_per_s=giga * raw["memory_gb_per_s"],
        elementwise_bytes_per_s=giga * raw["elementwise_gb_per_s"],
        host_link_bytes_per_s=giga * raw["host_link_gb_per_s"],
        intra=link("intra_node"),
        inter=link("inter_node"),
        collective_s=1e-6 * raw["collective_latency_us"],
        sleep_overshoot_s=1e-6 * raw["sleep_overshoot_us"],
        quantum_s=1e-6 * raw["scheduler_quantum_us"],
        first_step_slowdown=float(raw["first_step_slowdown"]),
        shared_node_slowdown=float(raw["shared_node_slowdown"]),
        fixed={phase: 1e-6 * raw["fixed_us"][phase] for phase in PHASES},
        nics_per_node=int(figure(raw, "inter_node.nics_per_node") or 0),
        measured_at=str(raw.get("measured_at", "")),
        decode_rates={
            kernel: {
                rows: tuple((2**20 * size, float(factor)) for size, factor in sorted(curve.items()))
                for rows, curve in table.items()
            }
            for kernel, table in (raw.get(DECODE_RATES) or {}).items()
        },
        fixed_scale=tuple(
            (2**20 * size, float(value)) for size, value in sorted((raw.get(FIXED_SCALE) or {}).items())
        ),
    )


def yaml_number(value: float, digits: int = 6) -> str:
    """A float as YAML reads it back as one: PyYAML takes 1e+09 for text, 1.0e+09 for a number."""
    text = f"{float(value):.{digits}g}"
    return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text


def write_machine(path: str, raw: dict, header: str) -> None:
    """A machine file with every figure's meaning beside it (as `hpcmoe calibrate` writes it)."""
    check(raw, path)
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"name: {raw['name']}", f"device: {raw['device']}", f"one_box: {str(raw['one_box']).lower()}"]
    written = set()
    for name, meaning in FIGURES.items():
        parts = name.split(".")
        for depth in range(1, len(parts)):  # open each section once
            section = ".".join(parts[:depth])
            if section not in written:
                written.add(section)
                lines.append(f"{'  ' * (depth - 1)}{parts[depth - 1]}:")
        lines.append(f"{'  ' * (len(parts) - 1)}{parts[-1]}: {yaml_number(figure(raw, name))}   # {meaning}")
    if raw.get(DECODE_RATES):
        lines.append(f"{DECODE_RATES}:   # {DECODE_RATES_MEANING}")
        for kernel, table in raw[DECODE_RATES].items():
            lines.append(f"  {kernel}:   # {DECODE_KERNELS[kernel]}")
            lines += [
                f"    {rows}: {{"
                + ", ".join(
                    f"{yaml_number(size, 4)}: {yaml_number(factor, 3)}"
                    for size, factor in sorted(curve.items())
                )
                + "}"
                for rows, curve in sorted(table.items())
            ]
    if raw.get(FIXED_SCALE):
        lines.append(
            f"{FIXED_SCALE}: {{"
            + ", ".join(
                f"{yaml_number(size, 4)}: {yaml_number(value, 3)}"
                for size, value in sorted(raw[FIXED_SCALE].items())
            )
            + f"}}   # {FIXED_SCALE_MEANING}"
        )
    if "measured_at" in raw:
        lines.append(f"measured_at: '{raw['measured_at']}'   # when `hpcmoe calibrate` measured it")
    if raw.get("spread_percent"):
        lines.append(
            "spread_percent:   # of each measured figure over its repeats: 100 x (max - min) / median"
        )
        lines += [f"  {name}: {yaml_number(value, 3)}" for name, value in raw["spread_percent"].items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
