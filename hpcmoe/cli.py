"""Command line: `hpcmoe run CONFIG [--set a.b=value ...] [--output PATH]`.

The config is validated before torch is imported and before any communicator or file is made: a
bad input fails at once with exit 2 on every rank, and rank 0 prints its one line for the whole job
(a rank whose message differs adds its own, naming its ranks).

This module parses the arguments; hpcmoe/commands/ does what each subcommand asks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {  # subcommand -> (module in hpcmoe.commands, function)
    "run": ("run", "command_run"),
    "bench": ("bench", "command_bench"),
    "plan": ("offline", "command_plan"),
    "predict": ("offline", "command_predict"),
    "calibrate": ("offline", "command_calibrate"),
    "simulate": ("offline", "command_simulate"),
    "export": ("offline", "command_export"),
    "report": ("offline", "command_report"),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="hpcmoe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_run,
        add_plan,
        add_bench,
        add_report,
        add_predict,
        add_calibrate,
        add_export,
        add_simulate,
    ):
        add(commands)
    return parser.parse_args(argv)


def add_run(commands) -> None:
    """`hpcmoe run CONFIG`."""
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


def add_plan(commands) -> None:
    """`hpcmoe plan CONFIG --ranks N`."""
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


def add_bench(commands) -> None:
    """`hpcmoe bench SCENARIO|dispatch|reduce|control|experts|transformers`."""
    bench = commands.add_parser(
        "bench", help="benchmarks: medians of interleaved repetitions, ratios in one run"
    )
    benches = bench.add_subparsers(dest="benchmark", required=True)
    from hpcmoe.analysis.bench import SCENARIOS

    for name, (what, _goal, _) in SCENARIOS.items():
        scenario = benches.add_parser(name, help=what)
        scenario.add_argument("config")
        scenario.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add_micro_benchmarks(benches)
    for sub in list(benches.choices.values()):
        sub.add_argument("--reps", type=int, default=7, help="interleaved repetitions (median)")
        sub.add_argument(
            "--output", "--out", dest="out", metavar="RESULT.json", help="store the results as JSON here"
        )
        sub.add_argument(
            "--overwrite", action="store_true", help="replace an existing --output (refused otherwise)"
        )


def add_micro_benchmarks(benches) -> None:
    """The benchmarks of one part (an exchange, a sum, the control path, expert GEMMs, one rank)."""
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


def add_report(commands) -> None:
    """`hpcmoe report RUN.h5 ...`."""
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


def add_predict(commands) -> None:
    """`hpcmoe predict train|collect|propose`."""
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
    add_propose(predictions)


def add_propose(predictions) -> None:
    """`hpcmoe predict propose`: by a trained predictor, or by simulating each split."""
    propose = predictions.add_parser("propose", help="propose an attention:MoE split and head shards")
    propose.add_argument("predictor", nargs="?", help="a predictor file (not with --machine)")
    propose.add_argument("config", nargs="?")
    propose.add_argument(
        "--machine", metavar="MACHINE.yaml", help="rank the splits by simulating each on this machine"
    )
    propose.add_argument("--ranks", type=int, required=True)
    propose.add_argument("--threshold", type=float, default=0.05, help="flag rebalancing above this mismatch")
    propose.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def add_calibrate(commands) -> None:
    """`hpcmoe calibrate --output MACHINE.yaml`."""
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


def add_export(commands) -> None:
    """`hpcmoe export RUN.h5 --output OUT.jsonl`."""
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


def add_simulate(commands) -> None:
    """`hpcmoe simulate CONFIG --machine MACHINE.yaml --ranks N`."""
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
    module, function = COMMANDS[args.command]
    return getattr(importlib.import_module(f"hpcmoe.commands.{module}"), function)(args)


if __name__ == "__main__":
    sys.exit(main())
