"""The commands that run in one process, without MPI: `plan`, `predict`, `calibrate`, `simulate`,
`export` and `report`. Each checks its flags, calls its layer, and turns a ValueError into one line
and exit 2.
"""

from __future__ import annotations

import os

from hpcmoe.commands.errors import fail
from hpcmoe.config import load_config, require


def check_plan_args(args) -> None:
    """plan's flags, before any config is read: one line naming the flag and its range."""
    import math

    from hpcmoe.runfile.paths import check_new_output, check_output_path

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
    if args.action == "train":
        return predict_train(args)
    if args.action == "collect":
        return predict_collect(args)
    if args.machine:  # the config is the one positional argument
        return propose_by_simulation(args)
    return propose_by_predictor(args)


def predict_train(args) -> int:
    from hpcmoe.analysis import predict
    from hpcmoe.runfile.paths import check_new_output

    try:
        check_new_output(args.out, args.overwrite, "--output")
        predict.command_train(args.runs, args.out, args.test, args.epochs)
    except ValueError as e:
        fail(str(e))
    return 0


def predict_collect(args) -> int:
    from hpcmoe.analysis.collect import collect

    numbers = lambda text: [int(x) for x in text.split(",") if x]
    try:
        written = collect(
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


def propose_by_simulation(args) -> int:
    from hpcmoe.analysis.ma_split import simulate_splits

    try:
        config = load_config(args.config or args.predictor, args.set)
        proposal = simulate_splits(config, args.ranks, args.machine, args.threshold)
    except ValueError as e:
        fail(str(e))
    say_proposal(
        args.ranks,
        proposal,
        f"simulated on {proposal['machine']}: generation {proposal['predicted_total_ms']:.1f} ms, TPOT "
        f"{proposal['predicted_tpot_ms']:.2f} ms, "
        f"busy attention {proposal['busy_fraction_attention']:.2f} vs "
        f"MoE {proposal['busy_fraction_moe']:.2f}",
    )
    return 0


def propose_by_predictor(args) -> int:
    from hpcmoe.analysis import ma_split, predict

    if args.config is None:
        fail("predict propose: give a predictor file and a config, or --machine MACHINE.yaml and a config")
    try:
        config = load_config(args.config, args.set)
        model, machine = predict.load(args.predictor)
        # no split fits: one line
        proposal = ma_split.propose(model, config, args.ranks, machine, args.threshold)
    except ValueError as e:
        fail(str(e))
    say_proposal(
        args.ranks,
        proposal,
        f"predicted {proposal['predicted_attention_ms']:.2f} ms attention vs "
        f"{proposal['predicted_moe_ms']:.2f} ms MoE, mismatch {proposal['mismatch']:.3f}",
    )
    return 0


def say_proposal(ranks: int, proposal: dict, why: str) -> None:
    """`hpcmoe predict: N ranks -> attention A : MoE M, heads per attention rank [...], WHY`."""
    print(
        f"hpcmoe predict: {ranks} ranks -> attention {proposal['attention_ranks']} : MoE "
        f"{proposal['moe_ranks']}, heads per attention rank {proposal['heads_per_rank']}, {why}"
        + (" -> rebalance" if proposal["rebalance"] else "")
    )


def command_calibrate(args) -> int:
    from hpcmoe.runfile.paths import check_new_output
    from hpcmoe.sim.calibrate import calibrate, check_inputs

    try:
        check_new_output(args.out, args.overwrite, "--output")
        check_inputs(args.out, os.path.normpath(args.config))
    except ValueError as e:
        fail(str(e))
    calibrate(args.out, os.path.normpath(args.config))
    print(f"wrote {args.out}")
    return 0


def command_simulate(args) -> int:
    from hpcmoe.runfile.paths import check_new_output
    from hpcmoe.sim.simulate import command

    try:
        check_new_output(args.output, args.overwrite, "--output")
        command(
            args.config, args.set, args.machine, args.ranks, args.routing, args.output, args.steady_decode
        )
    except ValueError as e:
        fail(str(e))
    return 0


def command_export(args) -> int:
    from hpcmoe.runfile.export import export_jsonl
    from hpcmoe.runfile.paths import check_new_output

    try:
        check_new_output(args.jsonl, args.overwrite, "--output")
        count, note = export_jsonl(args.run, args.jsonl)
    except ValueError as e:
        fail(str(e))
    if args.jsonl != "-":
        print(f"wrote {count} requests to {args.jsonl}{note}")
    return 0


def command_report(args) -> int:
    from hpcmoe.analysis.report import main as report_main

    try:
        return report_main(
            args.runs, args.out, args.ranks, args.step, args.nodes, args.json, args.csv, args.overwrite
        )
    except ValueError as e:
        fail(str(e))
