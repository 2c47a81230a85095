"""Command line: `hpcmoe run CONFIG [--set a.b=value ...] [--output PATH]`.

The config is validated before torch is imported and before any communicator or file is made: a
bad input fails at once with exit 2 on every rank, and rank 0 prints its one line for the whole job
(a rank whose message differs adds its own, naming its ranks).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import NoReturn

from hpcmoe.config import load_config, require

EXIT_BAD_INPUT = 2


def fail(message: str) -> NoReturn:
    sys.stderr.write(f"hpcmoe: error: {message}\n")
    sys.stderr.flush()
    sys.exit(EXIT_BAD_INPUT)


def agree(world, problem: str | None) -> None:
    """Every rank's check, gathered (each rank calls this once per check, failed or not, so no rank
    is left waiting): when any failed, rank 0 prints each distinct message once, naming the ranks
    when not all share it, and every rank exits 2. One line per job, not one per rank at EP 256."""
    problems = world.allgather(problem)
    if not any(problems):
        return
    if world.Get_rank() == 0:
        ranks_of: dict[str, list[int]] = {}
        for rank, message in enumerate(problems):
            if message:
                ranks_of.setdefault(message, []).append(rank)
        for message, ranks in ranks_of.items():
            where = (
                "" if len(ranks) == world.Get_size() else f" (on {rank_list(ranks)} of {world.Get_size()})"
            )
            sys.stderr.write(f"hpcmoe: error: {message}{where}\n")
    sys.stderr.flush()
    sys.exit(EXIT_BAD_INPUT)


def rank_list(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> 'ranks 0-2,5'."""
    spans, start = [], ranks[0]
    for previous, rank in zip(ranks, ranks[1:] + [None]):
        if rank != previous + 1:
            spans.append(f"{start}-{previous}" if previous > start else f"{start}")
            start = rank
    return ("ranks " if len(ranks) > 1 else "rank ") + ",".join(spans)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="hpcmoe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run inference over the MPI ranks and write one HDF5 file")
    run.add_argument("config", help="YAML file with sections model / parallel / run / output")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, value parsed as YAML (repeatable), e.g. model.num_experts=8",
    )
    run.add_argument("--output", help="output HDF5 path (overrides output.path)")
    run.add_argument(
        "--overwrite", action="store_true", help="replace an existing run file (refused otherwise)"
    )
    run.add_argument(
        "--resume",
        metavar="PARTIAL.h5",
        help="continue a run a signal stopped (its NAME.partial.h5) "
        "or a job killed (its NAME.h5.tmp, moved aside): same config, prompts and checkpoint",
    )
    planner = commands.add_parser(
        "plan", help="memory per rank for a config and rank count, without building"
    )
    planner.add_argument("config")
    planner.add_argument("--ranks", type=int, required=True)
    planner.add_argument("--ranks-per-node", type=int, help="ranks sharing a node (default: all of them)")
    planner.add_argument(
        "--device-memory",
        type=float,
        metavar="GIB",
        help="memory per rank in GiB (default: this machine's available memory over the node's ranks)",
    )
    planner.add_argument(
        "--output", "--json", dest="json", metavar="PLAN.json", help="also write the plan as one JSON object"
    )
    planner.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output (refused otherwise)"
    )
    planner.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    bench = commands.add_parser(
        "bench", help="benchmarks: medians of interleaved repetitions, ratios in one run"
    )
    benches = bench.add_subparsers(dest="benchmark", required=True)
    from hpcmoe.analysis.bench import SCENARIOS

    for name, (what, _goal, _) in SCENARIOS.items():
        scenario = benches.add_parser(name, help=what)
        scenario.add_argument("config")
        scenario.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    dispatch = benches.add_parser(
        "dispatch", help="our dispatch + combine against raw Alltoallv of the same bytes"
    )
    dispatch.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    dispatch.add_argument("--hidden", type=int, default=1024)
    dispatch.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    dispatch.add_argument("--top-k", type=int, default=2)
    dispatch.add_argument("--wait", default="yield", choices=["yield", "spin"], help="as parallel.wait")
    reduce = benches.add_parser("reduce", help="the hierarchical sum of ma against a flat Allreduce")
    reduce.add_argument("--tokens", type=int, default=256)
    reduce.add_argument("--hidden", type=int, default=4096)
    reduce.add_argument("--ranks-per-node", type=int, default=2)
    reduce.add_argument(
        "--bandwidth-gbps",
        "--link-gbps",
        dest="link_gbps",
        type=float,
        default=None,
        help="emulated inter-node link bandwidth (as parallel.link.bandwidth_gbps)",
    )
    reduce.add_argument("--latency-us", type=float, default=0.0)
    control = benches.add_parser(
        "control", help="the control path per MoE layer at large rank counts (no MPI)"
    )
    control.add_argument("--ranks", default="64,256,1024", help="comma-separated rank counts")
    control.add_argument("--experts", type=int, default=256)
    control.add_argument("--top-k", type=int, default=8)
    control.add_argument("--tokens", type=int, default=64, help="tokens per rank and micro-batch")
    control.add_argument("--ranks-per-node", type=int, default=8)
    experts = benches.add_parser(
        "experts", help="expert GEMMs against torch.matmul and the device's limits (no MPI)"
    )
    experts.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    experts.add_argument("--hidden", type=int, default=4096)
    experts.add_argument("--inner", type=int, default=16384, help="expert hidden size")
    experts.add_argument("--experts", type=int, default=4)
    experts.add_argument("--tokens", type=int, default=1024, help="prefill rows per expert")
    experts.add_argument("--decode-tokens", type=int, default=4, help="decode rows per expert")
    experts.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    versus = benches.add_parser("transformers", help="one rank against transformers on a checkpoint")
    versus.add_argument("--checkpoint", required=True)
    versus.add_argument("--batch", type=int, default=4)
    versus.add_argument("--prompt-len", type=int, default=32)
    versus.add_argument(
        "--max-new-tokens", "--steps", dest="steps", type=int, default=16, help="as run.max_new_tokens"
    )
    versus.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    for sub in list(benches.choices.values()):
        sub.add_argument("--reps", type=int, default=7, help="interleaved repetitions (median)")
        sub.add_argument(
            "--output", "--out", dest="out", metavar="RESULT.json", help="store the results as JSON here"
        )
        sub.add_argument(
            "--overwrite", action="store_true", help="replace an existing --output (refused otherwise)"
        )
    report = commands.add_parser("report", help="text summary and PNG plots of one or more run files")
    report.add_argument("runs", nargs="+", help="run files (HDF5)")
    report.add_argument(
        "--output",
        "--out",
        dest="out",
        metavar="DIR",
        help="directory for the plots (default: next to the first run)",
    )
    report.add_argument(
        "--json",
        metavar="PATH",
        help="also write each run's figures (TTFT, ITL, latency p50/p90/p99, "
        "tokens/s, requests/s, wall time, ...) as JSON",
    )
    report.add_argument("--csv", metavar="PATH", help="the same as CSV, one row per run")
    report.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing plots, --json and --csv (refused otherwise)",
    )
    report.add_argument(
        "--ranks", metavar="A-B", help="figures of these ranks only (one row per rank up to 64)"
    )
    report.add_argument("--nodes", metavar="A-B", help="figures of the ranks on these nodes only")
    report.add_argument(
        "--step",
        type=int,
        metavar="K",
        help="timeline of step K (default: the prefill and a representative decode step)",
    )
    predict = commands.add_parser("predict", help="the attention/MoE time predictor")
    predictions = predict.add_subparsers(dest="action", required=True)
    train = predictions.add_parser("train", help="train on the /timings of run files")
    train.add_argument("runs", nargs="+")
    train.add_argument("--output", "--out", dest="out", default="predictor.pt")
    train.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output (refused otherwise)"
    )
    train.add_argument("--test", nargs="*", default=[], help="unseen run files to report the error on")
    train.add_argument("--epochs", type=int, default=3000)
    collect = predictions.add_parser(
        "collect", help="timing runs over attention:MoE splits, batches, prompt lengths"
    )
    collect.add_argument("config", nargs="?", help="the model and settings to run (default: the debug model)")
    collect.add_argument(
        "--output", "--out", dest="out", default="runs/predict", help="directory for the run files"
    )
    collect.add_argument("--ranks", default="4", help="rank counts, comma separated")
    collect.add_argument("--batch", default="4,16", help="batches, comma separated")
    collect.add_argument("--prompt-len", default="16,64", help="prompt lengths, comma separated")
    collect.add_argument(
        "--max-new-tokens",
        "--steps",
        dest="steps",
        type=int,
        default=8,
        help="new tokens per run (as run.max_new_tokens)",
    )
    collect.add_argument("--reuse", action="store_true", help="keep complete run files already in --out")
    collect.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    propose = predictions.add_parser("propose", help="propose an attention:MoE split and head shards")
    propose.add_argument("predictor", nargs="?", help="a predictor file (not with --machine)")
    propose.add_argument("config", nargs="?")
    propose.add_argument(
        "--machine", metavar="MACHINE.yaml", help="rank the splits by simulating each on this machine"
    )
    propose.add_argument("--ranks", type=int, required=True)
    propose.add_argument("--threshold", type=float, default=0.05, help="flag rebalancing above this mismatch")
    propose.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    calibrate = commands.add_parser(
        "calibrate", help="measure this machine and write its machine file (one process)"
    )
    calibrate.add_argument("--output", "--out", dest="out", required=True, metavar="MACHINE.yaml")
    calibrate.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output (refused otherwise)"
    )
    calibrate.add_argument(
        "--config",
        default=os.path.join(os.path.dirname(__file__), "..", "inputs", "debug.yaml"),
        help="the model whose short runs give the engine's fixed costs (default: the debug model)",
    )
    export = commands.add_parser(
        "export", help="a run file's requests as JSON lines (id, prompt, completion, ...)"
    )
    export.add_argument(
        "run", metavar="RUN.h5", help="a run file: complete, partial, or left by a killed job (.tmp)"
    )
    export.add_argument(
        "--output",
        "--jsonl",
        dest="jsonl",
        required=True,
        metavar="OUT.jsonl",
        help="where to write (- for stdout)",
    )
    export.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output (refused otherwise)"
    )
    simulate = commands.add_parser(
        "simulate", help="the engine's schedule on a machine file, without running it"
    )
    simulate.add_argument("config")
    simulate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    simulate.add_argument("--machine", required=True, metavar="MACHINE.yaml")
    simulate.add_argument("--ranks", type=int, required=True)
    simulate.add_argument(
        "--routing", metavar="RUN.h5", help="route by a run file's /routing (default: synthetic)"
    )
    simulate.add_argument("--output", metavar="SIM.h5", help="write a run file of the simulated run")
    simulate.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output (refused otherwise)"
    )
    simulate.add_argument(
        "--steady-decode",
        type=int,
        metavar="CONTEXT",
        help="no prefill: every step decodes every request over CONTEXT cached positions",
    )
    return parser.parse_args(argv)


def check_plan_args(args) -> None:
    """plan's flags, before any config is read: one line naming the flag and its range."""
    import math

    from hpcmoe.runfile.output import check_new_output, check_output_path

    require(args.ranks >= 1, f"--ranks: expected an integer >= 1, got {args.ranks}")
    require(
        args.ranks_per_node is None or args.ranks_per_node >= 1,
        f"--ranks-per-node: expected an integer >= 1, got {args.ranks_per_node}",
    )
    memory = args.device_memory
    require(
        memory is None or (math.isfinite(memory) and memory > 0),
        f"--device-memory: expected a finite number of GiB > 0, got {memory}",
    )
    if args.json:
        check_output_path(args.json, "--output", "plan.json", create=False)
        check_new_output(args.json, args.overwrite, "--output")


def command_plan(args) -> int:
    import json

    from hpcmoe.parallel.plan import describe, plan

    try:
        check_plan_args(args)
        config = load_config(args.config, args.set)
        if args.device_memory is not None:
            memory = args.device_memory * 2**30
        else:
            from hpcmoe.runtime.topology import available_memory

            memory = available_memory() / (args.ranks_per_node or args.ranks)
        result = plan(config, args.ranks, memory)
    except ValueError as e:
        fail(str(e))
    print(describe(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def command_predict(args) -> int:
    from hpcmoe.analysis import predict
    from hpcmoe.runfile.output import check_new_output

    if args.action == "train":
        try:
            check_new_output(args.out, args.overwrite, "--output")
            predict.command_train(args.runs, args.out, args.test, args.epochs)
        except ValueError as e:
            fail(str(e))
        return 0
    if args.action == "collect":
        numbers = lambda text: [int(x) for x in text.split(",") if x]
        try:
            written = predict.collect(
                args.config,
                args.set,
                args.out,
                numbers(args.ranks),
                numbers(args.batch),
                numbers(args.prompt_len),
                args.steps,
                reuse=args.reuse,
            )
        except ValueError as e:
            fail(str(e))
        print(f"hpcmoe predict collect: {len(written)} run files in {args.out}")
        return 0 if written else 1
    if args.machine:  # the config is the one positional argument
        from hpcmoe.analysis.predict import simulate_splits as propose

        try:
            proposal = propose(
                load_config(args.config or args.predictor, args.set), args.ranks, args.machine, args.threshold
            )
        except ValueError as e:
            fail(str(e))
        print(
            f"hpcmoe predict: {args.ranks} ranks -> attention {proposal['attention_ranks']} : MoE "
            f"{proposal['moe_ranks']}, heads per attention rank {proposal['heads_per_rank']}, simulated on "
            f"{proposal['machine']}: generation {proposal['predicted_total_ms']:.1f} ms, TPOT "
            f"{proposal['predicted_tpot_ms']:.2f} ms, busy attention {proposal['busy_fraction_attention']:.2f} vs "
            f"MoE {proposal['busy_fraction_moe']:.2f}" + (" -> rebalance" if proposal["rebalance"] else "")
        )
        return 0
    if args.config is None:
        fail("predict propose: give a predictor file and a config, or --machine MACHINE.yaml and a config")
    try:
        config = load_config(args.config, args.set)
        model, machine = predict.load(args.predictor)
        proposal = predict.propose(
            model, config, args.ranks, machine, args.threshold
        )  # no split fits: one line
    except ValueError as e:
        fail(str(e))
    print(
        f"hpcmoe predict: {args.ranks} ranks -> attention {proposal['attention_ranks']} : MoE "
        f"{proposal['moe_ranks']}, heads per attention rank {proposal['heads_per_rank']}, predicted "
        f"{proposal['predicted_attention_ms']:.2f} ms attention vs {proposal['predicted_moe_ms']:.2f} ms MoE, "
        f"mismatch {proposal['mismatch']:.3f}" + (" -> rebalance" if proposal["rebalance"] else "")
    )
    return 0


BENCH_COUNTS = (
    "tokens",
    "hidden",
    "top_k",
    "reps",
    "experts",
    "inner",
    "decode_tokens",
    "batch",
    "prompt_len",
    "steps",
    "ranks_per_node",
)  # bench flags that count something: >= 1


def check_bench(args) -> None:
    """A benchmark's arguments and config, before MPI: ValueError naming the bad one."""
    from hpcmoe.analysis import bench
    from hpcmoe.runfile.output import check_new_output
    from hpcmoe.runtime.device import device_kind

    check_new_output(args.out, args.overwrite, "--output")
    for name in BENCH_COUNTS:
        value = getattr(args, name, None)
        require(
            value is None or value >= 1,
            f"bench {args.benchmark} --{name.replace('_', '-')}: expected an integer >= 1, got {value}",
        )
    if args.benchmark in bench.SCENARIOS:
        config = load_config(args.config, args.set)
        device_kind(config.run.device)  # run.device=cuda without a GPU: one line, not a traceback
        require(
            args.benchmark != "overlap" or config.parallel.link is not None,
            "bench overlap measures the wire time hidden behind an emulated link: the config sets no "
            "parallel.link (see inputs/bench_overlap.yaml)",
        )
    if getattr(args, "device", None) is not None:  # experts, transformers: --device
        try:
            device_kind(args.device)
        except ValueError:
            import torch

            raise ValueError(
                f"bench {args.benchmark} --device {args.device}: torch sees no GPU (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu "
                f"or auto"
            ) from None


def command_bench(args) -> int:
    """Benchmarks run under mpiexec like `run`; bad settings fail before MPI starts."""
    from hpcmoe.analysis import bench

    problem = None
    try:
        check_bench(args)
    except ValueError as e:
        problem = str(e)
    if args.benchmark in ("experts", "control") and problem:  # one process, no MPI
        fail(problem)
    if args.benchmark == "experts":  # one process, no MPI
        bench.bench_experts(
            args.device,
            args.hidden,
            args.inner,
            args.experts,
            args.tokens,
            args.decode_tokens,
            args.dtype,
            args.reps,
            args.out,
        )
        return 0
    if args.benchmark == "control":  # one process, no MPI
        bench.bench_control(
            [int(r) for r in args.ranks.split(",")],
            args.experts,
            args.top_k,
            args.tokens,
            args.ranks_per_node,
            args.reps,
            args.out,
        )
        return 0
    from hpcmoe.runtime.topology import init_mpi

    world = init_mpi()
    agree(world, problem)
    if args.benchmark in bench.SCENARIOS:
        try:  # every variant's layout at this rank count
            bench.check_scenario(args.benchmark, args.config, args.set, world.Get_size())
        except ValueError as e:
            problem = str(e)
        agree(world, problem)
    import torch

    torch.set_num_threads(1 if args.benchmark != "transformers" else torch.get_num_threads())
    if args.benchmark == "dispatch":
        import hpcmoe.runtime.comm

        hpcmoe.runtime.comm.SPIN = args.wait == "spin"
        bench.bench_dispatch(args.tokens, args.hidden, args.dtype, args.top_k, args.reps, args.out)
    elif args.benchmark == "reduce":
        bench.bench_reduce(
            args.tokens,
            args.hidden,
            args.ranks_per_node,
            args.reps,
            args.out,
            args.link_gbps,
            args.latency_us,
        )
    elif args.benchmark == "transformers":
        bench.bench_transformers(
            args.checkpoint, args.batch, args.prompt_len, args.steps, args.reps, args.out, args.device
        )
    else:
        bench.run_scenario(args.benchmark, args.config, args.set, args.reps, args.out)
    return 0


def command_run(args) -> int:
    from hpcmoe.runfile.output import check_new_output, check_output_path

    try:
        config = load_config(args.config, args.set)
        if args.output:
            config = dataclasses.replace(config, output=dataclasses.replace(config.output, path=args.output))
        check_output_path(config.output.path)
        check_new_output(config.output.path, args.overwrite, "output.path")
        _ = config.requests  # reads and checks run.prompts (every line) on every rank
        problem = None
    except ValueError as e:
        problem = str(e)
    from hpcmoe.runtime.topology import init_mpi

    world = init_mpi()  # the checks are gathered (agree), so that a bad input prints one line per job
    agree(world, problem)
    from hpcmoe.parallel.layout import ParallelLayout

    if config.run.fault_tolerance:
        from mpi4py import MPI

        from hpcmoe.runtime.fault import ENABLED, check_mpi

        agree(world, check_mpi())
        world.Set_errhandler(MPI.ERRORS_RETURN)  # communicators made from it inherit it
        ENABLED[0] = True
    try:
        if config.parallel.layout == "ma" and "auto" in (
            config.parallel.attention_ranks,
            config.parallel.moe_ranks,
        ):
            config = split_on_rank_0(world, config)
        layout = ParallelLayout.from_config(config, world.Get_size())
        resume = None
        if args.resume and os.path.abspath(args.resume) == os.path.abspath(config.output.path + ".tmp"):
            raise ValueError(
                f"--resume {args.resume}: this run would write over it (output.path "
                f"{config.output.path}): move it aside first"
            )
        if args.resume:
            from hpcmoe.runtime.device import device_kind
            from hpcmoe.runtime.resume import read_partial

            resume = read_partial(
                args.resume, config.on_device(device_kind(config.run.device)), world.Get_size()
            )
    except ValueError as e:
        problem = str(e)
    agree(world, problem)
    try:
        from hpcmoe.runtime.device import device_kind

        config = config.on_device(device_kind(config.run.device))
        from hpcmoe.runtime.startup import check_model

        load, max_batch = check_model(config, layout, world.Get_rank() == 0)
        routing = None
        if config.parallel.placement_from:
            from hpcmoe.runfile.output import read_routing

            routing = read_routing(config.parallel.placement_from, config.model.num_experts)
    except ValueError as e:
        problem = str(e)
    agree(world, problem)
    import torch

    from hpcmoe.runtime.device import choose_device
    from hpcmoe.runtime.engine import run
    from hpcmoe.runtime.topology import build_topology, default_threads

    topo = build_topology(world, config.parallel.ranks_per_node)
    torch.set_num_threads(config.parallel.threads or default_threads(topo.host_size))
    from mpi4py import MPI

    max_batch = world.allreduce(max_batch, op=MPI.MIN)  # the same on every rank, whatever its node's memory
    metrics = run(
        config,
        topo,
        layout,
        load,
        routing,
        choose_device(config.run.device, topo.host_rank),
        resume,
        max_batch,
    )
    if topo.rank == 0 and "stopped_at_step" in metrics:
        print(
            f"hpcmoe: stopped by signal at step {metrics['stopped_at_step']}: wrote {metrics['path']}",
            flush=True,
        )
    elif topo.rank == 0:
        print(summary(config, topo, layout, metrics), flush=True)
    from hpcmoe.runtime.fault import RECOVERED, leave

    if RECOVERED[0]:
        leave(0)  # MPI finalization can hang after a failure
    return 0


def split_on_rank_0(world, config):
    """parallel.attention_ranks: auto: rank 0 chooses the split (simulating every split, or asking a
    trained predictor) and says why; every rank takes its choice, or its error."""
    from hpcmoe.analysis.predict import choose_split
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
    return "\n".join(
        [
            f"hpcmoe: {topo.size} ranks on {topo.num_nodes} node(s), layout {config.parallel.layout}, "
            f"placement {layout.mode}{f' over groups of {layout.expert_tp}' if getattr(layout, 'expert_tp', 1) > 1 else ''}, "
            f"{len(requests)} requests, "
            f"{int(requests.prompt_lengths.sum())} prompt tokens, up to {config.steps} new tokens each",
            f"TTFT {metrics['ttft_ms']:.2f} ms | TPOT {metrics['tpot_ms']:.2f} ms | "
            f"prefill {metrics['prefill_tokens_per_s']:.0f} tok/s | decode {metrics['decode_tokens_per_s']:.0f} tok/s | "
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
        f"output {metrics['output_tokens_per_s']:.0f} tok/s | prompt {metrics['prompt_tokens_per_s']:.0f} tok/s | "
        f"{metrics['requests_per_s']:.2f} requests/s | wall {metrics['wall_s']:.2f} s "
        f"({metrics['wall_with_load_s']:.2f} s with {metrics['load_s']:.2f} s of start-up and model load)"
        + (
            f" | peak memory {metrics['peak_over_estimate']:.2f}x the start-up estimate"
            if "peak_over_estimate" in metrics
            else ""
        ),
    ]


class ReaderMayLeave:
    """stdout for `hpcmoe report run.h5 | head`: once the reader has gone, the rest of the text goes
    to /dev/null and the work (the figures, the files) goes on, with no traceback."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.reader_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.reader_gone()

    def reader_gone(self) -> None:
        # the stream's own buffer is flushed at exit too: point its descriptor at /dev/null
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main(argv=None) -> int:
    if sys.stdout is sys.__stdout__ and sys.stdout is not None:  # the process's own, not a test's capture
        sys.stdout = ReaderMayLeave(sys.stdout)
    args = parse_args(argv)
    from hpcmoe.runfile.output import check_new_output

    if args.command == "run":
        return command_run(args)
    if args.command == "bench":
        return command_bench(args)
    if args.command == "plan":
        return command_plan(args)
    if args.command == "predict":
        return command_predict(args)
    if args.command == "calibrate":
        from hpcmoe.sim.calibrate import calibrate, check_inputs

        try:
            check_new_output(args.out, args.overwrite, "--output")
            check_inputs(args.out, os.path.normpath(args.config))
        except ValueError as e:
            fail(str(e))
        calibrate(args.out, os.path.normpath(args.config))
        print(f"wrote {args.out}")
        return 0
    if args.command == "simulate":
        from hpcmoe.sim.simulate import command

        try:
            check_new_output(args.output, args.overwrite, "--output")
            command(
                args.config, args.set, args.machine, args.ranks, args.routing, args.output, args.steady_decode
            )
        except ValueError as e:
            fail(str(e))
        return 0
    if args.command == "export":
        from hpcmoe.runfile.output import export_jsonl

        try:
            check_new_output(args.jsonl, args.overwrite, "--output")
            count, note = export_jsonl(args.run, args.jsonl)
        except ValueError as e:
            fail(str(e))
        if args.jsonl != "-":
            print(f"wrote {count} requests to {args.jsonl}{note}")
        return 0
    if args.command == "report":
        from hpcmoe.analysis.report import main as report_main

        try:
            return report_main(
                args.runs, args.out, args.ranks, args.step, args.nodes, args.json, args.csv, args.overwrite
            )
        except ValueError as e:
            fail(str(e))
    return 1


if __name__ == "__main__":
    sys.exit(main())
