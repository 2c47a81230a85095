"""`hpcmoe run`: check the config, the prompts and the layout on every rank (one line per job for a
bad input), agree on the batch the memory allows, run the engine and print the run's summary.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from hpcmoe.commands.errors import agree
from hpcmoe.config import load_config


def command_run(args) -> int:
    problem, config = None, None
    try:
        config = checked_config(args)
    except ValueError as e:
        problem = str(e)
    from hpcmoe.runtime.topology import init_mpi

    world = init_mpi()  # the checks are gathered (agree), so that a bad input prints one line per job
    agree(world, problem)
    if config.run.fault_tolerance:
        from mpi4py import MPI

        from hpcmoe.runtime.fault import check_mpi

        agree(world, check_mpi())
        world.Set_errhandler(MPI.ERRORS_RETURN)  # communicators made from it inherit it
    try:
        config, layout, resume = planned(world, config, args.resume)
    except ValueError as e:
        problem = str(e)
    agree(world, problem)
    try:
        config, load, max_batch, routing = checked_model(world, config, layout)
    except ValueError as e:
        problem = str(e)
    agree(world, problem)
    metrics, topo, fault = launch(world, config, layout, load, routing, resume, max_batch)
    if topo.rank == 0 and "stopped_at_step" in metrics:
        print(
            f"hpcmoe: stopped by signal at step {metrics['stopped_at_step']}: wrote {metrics['path']}",
            flush=True,
        )
    elif topo.rank == 0:
        print(summary(config, topo, layout, metrics), flush=True)
    if fault.recovered:
        from hpcmoe.runtime.fault import leave

        leave(0)  # MPI finalization can hang after a failure
    return 0


def checked_config(args):
    """The config with --set and --output applied, its output path and its prompts checked (before MPI)."""
    from hpcmoe.runfile.paths import check_new_output, check_output_path

    config = load_config(args.config, args.set)
    if args.output:
        config = dataclasses.replace(config, output=dataclasses.replace(config.output, path=args.output))
    check_output_path(config.output.path)
    check_new_output(config.output.path, args.overwrite, "output.path")
    _ = config.requests  # reads and checks run.prompts (every line) on every rank
    return config


def planned(world, config, resume_from: str | None):
    """-> (config with an auto split chosen, its layout at this world size, the partial run to resume)."""
    from hpcmoe.parallel.layout import ParallelLayout

    if config.parallel.layout == "ma" and "auto" in (
        config.parallel.attention_ranks,
        config.parallel.moe_ranks,
    ):
        config = split_on_rank_0(world, config)
    layout = ParallelLayout.from_config(config, world.Get_size())
    if not resume_from:
        return config, layout, None
    if os.path.abspath(resume_from) == os.path.abspath(config.output.path + ".tmp"):
        raise ValueError(
            f"--resume {resume_from}: this run would write over it (output.path "
            f"{config.output.path}): move it aside first"
        )
    from hpcmoe.runtime.device import device_kind
    from hpcmoe.runtime.resume import read_partial

    resume = read_partial(resume_from, config.on_device(device_kind(config.run.device)), world.Get_size())
    return config, layout, resume


def checked_model(world, config, layout):
    """-> (config on its device, the model's loader, the batch this rank's memory allows, the routing
    of run.placement_from); ValueError for a model that does not fit or a checkpoint that is wrong."""
    from hpcmoe.runtime.device import device_kind
    from hpcmoe.runtime.startup import check_model

    config = config.on_device(device_kind(config.run.device))
    load, max_batch = check_model(config, layout, world.Get_rank() == 0)
    routing = None
    if config.parallel.placement_from:
        from hpcmoe.runfile.loads import read_routing

        routing = read_routing(config.parallel.placement_from, config.model.num_experts)
    return config, load, max_batch, routing


def launch(world, config, layout, load, routing, resume, max_batch):
    """The engine's run on this rank's device and threads -> (its metrics, the topology, the run's fault
    state)."""
    import torch
    from mpi4py import MPI

    from hpcmoe.runtime.device import choose_device
    from hpcmoe.runtime.engine import run
    from hpcmoe.runtime.fault import FaultState
    from hpcmoe.runtime.topology import build_topology, default_threads

    topo = build_topology(world, config.parallel.ranks_per_node)
    torch.set_num_threads(config.parallel.threads or default_threads(topo.host_size))
    max_batch = world.allreduce(max_batch, op=MPI.MIN)  # the same on every rank, whatever its node's memory
    device = choose_device(config.run.device, topo.host_rank)
    fault = FaultState.of(config, topo.rank)
    metrics = run(config, topo, layout, load, routing, device, resume, max_batch, fault)
    return metrics, topo, fault


def split_on_rank_0(world, config):
    """parallel.attention_ranks: auto: rank 0 chooses the split (simulating every split, or asking a
    trained predictor) and says why; every rank takes its choice, or its error."""
    from hpcmoe.analysis.ma_split import choose_split
    from hpcmoe.config import validate

    chosen = None
    if world.Get_rank() == 0:
        try:
            made, why = choose_split(config, world.Get_size())
            chosen = (made.parallel.attention_ranks, made.parallel.moe_ranks, None)
            print(why, file=sys.stderr, flush=True)
        except ValueError as e:
            chosen = (None, None, str(e))
    attention, moe, problem = world.bcast(chosen, root=0)
    if problem is not None:
        raise ValueError(problem)
    config = dataclasses.replace(
        config, parallel=dataclasses.replace(config.parallel, attention_ranks=attention, moe_ranks=moe)
    )
    validate(config)
    return config


def summary(config, topo, layout, metrics: dict) -> str:
    requests = config.requests
    groups = f" over groups of {layout.expert_tp}" if getattr(layout, "expert_tp", 1) > 1 else ""
    return "\n".join(
        [
            f"hpcmoe: {topo.size} ranks on {topo.num_nodes} node(s), layout {config.parallel.layout}, "
            f"placement {layout.mode}{groups}, "
            f"{len(requests)} requests, "
            f"{int(requests.prompt_lengths.sum())} prompt tokens, up to {config.steps} new tokens each",
            f"TTFT {metrics['ttft_ms']:.2f} ms | TPOT {metrics['tpot_ms']:.2f} ms | "
            f"prefill {metrics['prefill_tokens_per_s']:.0f} tok/s | "
            f"decode {metrics['decode_tokens_per_s']:.0f} tok/s | "
            f"tps {metrics['tps']:.0f} tok/s",
            *request_lines(metrics),
            f"wrote {config.output.path}",
        ]
    )


def request_lines(metrics: dict) -> list[str]:
    """The figures serving users compare (vLLM's, SGLang's benchmarks), per request and for the run."""
    if "requests_per_s" not in metrics:
        return []
    quantiles = lambda name, unit, digits: (
        " / ".join(f"{metrics[f'{name}_p{q}']:.{digits}f}" for q in (50, 90, 99)) + f" {unit}"
    )
    return [
        f"per request p50 / p90 / p99: TTFT {quantiles('request_ttft_ms', 'ms', 1)} | ITL "
        f"{quantiles('request_itl_ms', 'ms', 2)} | end to end {quantiles('request_latency_s', 's', 3)}",
        f"output {metrics['output_tokens_per_s']:.0f} tok/s | "
        f"prompt {metrics['prompt_tokens_per_s']:.0f} tok/s | "
        f"{metrics['requests_per_s']:.2f} requests/s | wall {metrics['wall_s']:.2f} s "
        f"({metrics['wall_with_load_s']:.2f} s with {metrics['load_s']:.2f} s of start-up and model load)"
        + (
            f" | peak memory {metrics['peak_over_estimate']:.2f}x the start-up estimate"
            if "peak_over_estimate" in metrics
            else ""
        ),
    ]
