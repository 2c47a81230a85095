"""`hpcmoe bench`: check a benchmark's flags and config (before MPI where it runs under MPI), then run
it (hpcmoe/analysis/bench). `experts` and `control` run in one process; the others under mpiexec.
"""

from __future__ import annotations

from hpcmoe.commands.errors import agree, fail
from hpcmoe.config import load_config, require

# bench flags that count something: >= 1
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
)


def check_bench(args) -> None:
    """A benchmark's arguments and config, before MPI: ValueError naming the bad one."""
    from hpcmoe.analysis import bench
    from hpcmoe.runfile.paths import check_new_output
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
    problem = None
    try:
        check_bench(args)
    except ValueError as e:
        problem = str(e)
    if args.benchmark in ("experts", "control"):  # one process, no MPI
        if problem:
            fail(problem)
        run_one_process(args)
        return 0
    from hpcmoe.runtime.topology import init_mpi

    world = init_mpi()
    agree(world, problem)
    run_under_mpi(world, args)
    return 0


def run_one_process(args) -> None:
    from hpcmoe.analysis import bench

    if args.benchmark == "experts":
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
    else:
        bench.bench_control(
            [int(r) for r in args.ranks.split(",")],
            args.experts,
            args.top_k,
            args.tokens,
            args.ranks_per_node,
            args.reps,
            args.out,
        )


def run_under_mpi(world, args) -> None:
    import torch

    from hpcmoe.analysis import bench

    if args.benchmark in bench.SCENARIOS:
        problem = None
        try:  # every variant's layout at this rank count
            bench.check_scenario(args.benchmark, args.config, args.set, world.Get_size())
        except ValueError as e:
            problem = str(e)
        agree(world, problem)
    torch.set_num_threads(1 if args.benchmark != "transformers" else torch.get_num_threads())
    if args.benchmark == "dispatch":
        bench.bench_dispatch(args.tokens, args.hidden, args.dtype, args.top_k, args.reps, args.out, args.wait)
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
