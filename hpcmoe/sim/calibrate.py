"""`hpcmoe calibrate --out MACHINE.yaml`: measure this machine and write its machine file.

Started as one process (no mpiexec); it launches its own MPI runs, each under `timeout`. About a
minute in all:
1. in this process, one thread (a rank's share of a core when ranks fill the cores): GEMM rates by
   dtype, prefill-shaped (FLOP/s, the median of three shapes) and decode-shaped (4 rows: weight
   bytes per second); attention (masked SDPA, as the engine calls it) against sequence length:
   prefill FLOP/s from the growth between two lengths, decode KV bytes per second likewise; copy
   bandwidth; the decode GEMM's rate against its rows and the weights a step reads (decode_rates:
   in the cache or streamed); the engine's own attention profiled for its passes over the activations
   (elementwise rate); how long time.sleep overshoots; the OS's time slice (one more busy process
   than cores);
2. `mpiexec -n 2 python -m hpcmoe.sim.probe_links OUT`: ping-pong latency and bandwidth between
   two ranks, a two-rank Ialltoall, and the engine's own cost of posting a message
   (comm.Sender.send, comm.Receives);
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

This file runs the steps and writes the file; hpcmoe.sim.measure measures step 1,
hpcmoe.sim.probe_links step 2, and hpcmoe.sim.fit turns it all into the machine file's figures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

CALIBRATION_RUN = ["run.max_new_tokens=12", "parallel.threads=1"]  # on inputs/debug.yaml
# a second size, for the first step's warm-up
WIDE = [
    "model.hidden=256",
    "model.head_dim=32",
    "model.expert_hidden=1024",
    "model.dense_hidden=1024",
    "run.batch=8",
    "run.prompt_len=64",
    "run.prompt_len_min=64",
]
REPEATS = 3
# the engine runs the fit is made on, by kind: (ranks, settings on the calibrated config). Validation
# (tools/validate_sim.py) must use configurations outside these: same_configuration tells.
CALIBRATION_RUNS = {
    "one": (1, CALIBRATION_RUN),
    "two": (2, CALIBRATION_RUN),
    "wide": (2, CALIBRATION_RUN + WIDE),
}


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
    from hpcmoe.sim.checks import check_one_batch

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
    from hpcmoe.sim.machine import write_machine
    from hpcmoe.sim.measure import measure_kernels, repeated

    check_inputs(out, config_path)
    started = time.perf_counter()
    kernels, spread = repeated(measure_kernels, REPEATS)
    widest = max(spread, key=spread.get)
    print(
        f"hpcmoe calibrate: kernels measured {REPEATS} times ({time.perf_counter() - started:.0f} s): "
        f"medians kept; the widest spread {spread[widest]:.0f}% ({widest}; max - min over the median)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="hpcmoe-calibrate-") as work:
        links = measure_links(work)
        print(f"hpcmoe calibrate: links measured ({time.perf_counter() - started:.0f} s)", flush=True)
        runs = engine_runs(config_path, work)
        print(f"hpcmoe calibrate: engine runs done ({time.perf_counter() - started:.0f} s)", flush=True)
        raw = fit_machine(config_path, kernels, links, runs)
    opening = header(config_path, raw["compute_units_per_node"], time.perf_counter() - started)
    raw["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    raw["spread_percent"] = spread
    write_machine(out, raw, opening)
    return raw


def measure_links(work: str) -> dict:
    """hpcmoe.sim.probe_links under `mpiexec -n 2`, writing into the folder `work` -> its figures."""
    path = os.path.join(work, "links.json")
    launch(mpi_command(2, "hpcmoe.sim.probe_links", path, timeout=120))
    with open(path) as f:
        return json.load(f)


def engine_runs(config_path: str, work: str) -> dict:
    """REPEATS x each of CALIBRATION_RUNS (`hpcmoe run` under mpiexec, run files in `work`) -> their
    files by kind."""
    runs = {kind: [] for kind in CALIBRATION_RUNS}
    for rep in range(REPEATS):  # alternated, so that a slow spell of the machine hits all alike
        for kind, (ranks, run_settings) in CALIBRATION_RUNS.items():
            extra = [part for setting in run_settings for part in ("--set", setting)]
            runs[kind].append(os.path.join(work, f"{kind}_{rep}.h5"))
            launch(mpi_command(ranks, "hpcmoe", "run", config_path, *extra, "--output", runs[kind][-1]))
    return runs


def fit_machine(config_path: str, kernels: dict, links: dict, runs: dict) -> dict:
    """The machine file's figures (hpcmoe.sim.fit) from the measurements and the runs' files."""
    from hpcmoe.config import load_config
    from hpcmoe.sim.fit import fit_step_costs, fixed_costs, fixed_scale, machine_raw, phase_means

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
    return raw


def header(config_path: str, cores: int, seconds: float) -> str:
    """The machine file's opening comment: when, where and from what it was measured."""
    return (
        f"This machine, measured by `hpcmoe calibrate` on {time.strftime('%Y-%m-%d %H:%M')} in "
        f"{seconds:.0f} s ({os.uname().nodename}, {cores} cores).\n"
        "Rates of one thread (a rank's share of a core); efficiencies 1.0 because they are measured.\n"
        "Links: MPI between two ranks of this box (shared memory); every rank runs here (one_box), so\n"
        "inter_node is the same: parallel.link emulates slower links on top. fixed_us: the engine's "
        "cost per\n"
        f"call beyond the modelled math, from {REPEATS} x `hpcmoe run {os.path.relpath(config_path)}` "
        f"at -n 1 and -n 2 ({', '.join(CALIBRATION_RUN)}) and a wider model at -n 2; step, resume and "
        "the first step fitted\n"
        "against simulations of those runs; gateway, reduce and gather are not in them and are taken from\n"
        "similar calls. This box is shared: its speed drifts by tens of percent within minutes."
    )
