"""The engine scenarios (`hpcmoe bench placement`, `overlap`, `skew`, `rebalance`, `wait`, `ma`,
`expert_tp`, `schedule`, `dispatch_mode`): the table of their variants as config overrides, the check
of every variant before any run, and the runner that runs them interleaved and reports their figures
(figures.py).
"""

from __future__ import annotations

import os
import tempfile

from hpcmoe.analysis.bench.figures import overlap_figures, run_sample
from hpcmoe.analysis.bench.results import oversubscribed, report

# in a variant's settings: the file of a first run of the baseline, whose /routing it places by
OBSERVED = "@observed"
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


class EngineRuns:
    """Engine runs of one scenario's variants: the config and --set overrides they share, and the
    topology, built at the first run and kept."""

    def __init__(self, world, config_path: str, settings: list[str]):
        self.world, self.config_path, self.settings, self.topo = world, config_path, settings, None

    def run(self, extra: list[str], path: str):
        """One engine run with a variant's overrides, its run file at path -> (config, metrics)."""
        from hpcmoe.config import load_config
        from hpcmoe.parallel.layout import ParallelLayout
        from hpcmoe.runtime.device import choose_device, device_kind
        from hpcmoe.runtime.engine import run
        from hpcmoe.runtime.topology import build_topology

        # static batching: every request in the first step, as the earlier numbers were taken (--set wins)
        config = load_config(
            self.config_path, ["run.batching=static"] + self.settings + extra + [f"output.path={path}"]
        )
        self.topo = self.topo or build_topology(self.world, config.parallel.ranks_per_node)
        device = choose_device(device_kind(config.run.device), self.topo.host_rank)
        layout = ParallelLayout.from_config(config, self.world.Get_size())
        return config, run(config, self.topo, layout, device=device)


def with_observed(runs: EngineRuns, variants: dict, directory: str) -> dict:
    """The variants with OBSERVED in their settings replaced by the file of a first run of the baseline
    (placed by what a baseline run observed); as they are when none names it."""
    if not any(OBSERVED in s for extra in variants.values() for s in extra):
        return variants
    observed = os.path.join(directory, "observed.h5")
    runs.run(next(iter(variants.values())), observed)
    return {v: [s.replace(OBSERVED, observed) for s in extra] for v, extra in variants.items()}


def variant_sample(
    name: str, runs: EngineRuns, variant: str, extra: list[str], directory: str, keep: bool
) -> dict:
    """One variant's run (the overlap scenario's also without the link) -> its figures when kept (rank 0,
    after the warm-up round), else {}."""
    path = os.path.join(directory, f"{variant}.h5")
    config, metrics = runs.run(extra, path)
    if name == "overlap":
        _, without_link = runs.run(
            extra + ["parallel.link=null"], os.path.join(directory, f"{variant}_nolink.h5")
        )
    if not keep:
        return {}
    sample = run_sample(path, config, metrics, runs.topo)
    if name == "overlap":
        sample["ttft_nolink_ms"] = without_link["ttft_ms"]
        sample["wire_ms"] = 1e3 * sample.pop("prefill_wire_s")
    return sample


def run_scenario(name: str, config_path: str, settings: list[str], reps: int, out: str | None):
    """Engine runs of each variant, interleaved; metrics read back from each run file. The overlap
    benchmark also runs each variant without the link and reports wire_hidden (overlap_figures)."""
    from mpi4py import MPI

    what, goal, variants = SCENARIOS[name]
    world = MPI.COMM_WORLD
    directory = world.bcast(
        tempfile.mkdtemp(prefix=f"hpcmoe-bench-{name}-") if world.Get_rank() == 0 else None
    )
    rows = {v: {} for v in variants}
    runs = EngineRuns(world, config_path, settings)
    variants = with_observed(runs, variants, directory)
    for rep in range(reps + 1):  # the first round warms up and is not recorded
        for variant, extra in variants.items():
            keep = world.Get_rank() == 0 and rep > 0
            for k, v in variant_sample(name, runs, variant, extra, directory, keep).items():
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
