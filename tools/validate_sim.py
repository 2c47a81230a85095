"""The simulator against real runs of this box: predicted TTFT and TPOT beside measured medians.

Each configuration runs `--reps` times under mpiexec (one thread per rank, as the simulator assumes)
and is simulated once on the machine file; the JSON holds every measured run, the medians, the
prediction and the relative error of each. --reuse keeps the measured runs of an earlier JSON and
only simulates again (to check a changed model or machine file against the same measurements).

    python tools/validate_sim.py [--machine machines/this_box.yaml] [--out docs/bench/simulation.json] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hpcmoe.calibrate import mpi_command  # noqa: E402
from hpcmoe.config import load_config  # noqa: E402
from hpcmoe.machine import load_machine  # noqa: E402
from hpcmoe.simulate import simulate  # noqa: E402

DEBUG, WIDE = "inputs/debug.yaml", "inputs/bench_ep.yaml"   # the debug model; hidden 256, experts 1024 wide
ONE_THREAD = ["parallel.threads=1"]
NODES_OF_2 = ["parallel.ranks_per_node=2"]
NODES_OF_1 = ["parallel.ranks_per_node=1"]
LINK_FAST = ["parallel.link={bandwidth_gbps: 1, latency_us: 50}"]
LINK_SLOW = ["parallel.link={bandwidth_gbps: 0.1, latency_us: 200}"]
MA_3_1 = ["parallel.layout=ma", "parallel.attention_ranks=3", "parallel.moe_ranks=1"]
CONFIGS = {  # name: (config, ranks, settings)
    "debug_n1": (DEBUG, 1, []),
    "debug_n2_packed": (DEBUG, 2, []),
    "debug_n4_one_per_rank": (DEBUG, 4, []),
    "debug_n4_packed_2_per_rank": (DEBUG, 4, ["parallel.placement=packed", "parallel.experts_per_rank=2"]),
    "debug_n4_nodes2_flat_1gbps": (DEBUG, 4, NODES_OF_2 + LINK_FAST),
    "debug_n4_nodes2_two_stage_1gbps": (DEBUG, 4, NODES_OF_2 + LINK_FAST + ["parallel.dispatch=two_stage"]),
    "debug_n2_nodes1_1gbps_mb1": (DEBUG, 2, NODES_OF_1 + LINK_FAST),
    "debug_n2_nodes1_1gbps_mb4": (DEBUG, 2, NODES_OF_1 + LINK_FAST + ["run.micro_batches=4"]),
    "debug_n2_nodes1_0.1gbps_mb1": (DEBUG, 2, NODES_OF_1 + LINK_SLOW),
    "debug_n2_nodes1_0.1gbps_mb4": (DEBUG, 2, NODES_OF_1 + LINK_SLOW + ["run.micro_batches=4"]),
    "debug_ma_3_1": (DEBUG, 4, MA_3_1),
    "wide_n1": (WIDE, 1, []),
    "wide_n2": (WIDE, 2, []),
    "wide_n4": (WIDE, 4, []),
    "wide_ma_3_1": (WIDE, 4, MA_3_1),
}


def measure(config: str, ranks: int, settings: list[str], reps: int) -> list[dict]:
    """`reps` real runs -> [{ttft_ms, tpot_ms}] read from their run files."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="hpcmoe-validate-") as work:
        for rep in range(reps):
            path = os.path.join(work, f"run{rep}.h5")
            command = mpi_command(ranks, "hpcmoe", "run", os.path.join(ROOT, config), "--output", path)
            for setting in ONE_THREAD + settings:
                command += ["--set", setting]
            result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if result.returncode != 0:
                raise RuntimeError(f"{config} -n {ranks} {settings}: exit {result.returncode}: {result.stderr[-400:]}")
            with h5py.File(path, "r") as f:
                runs.append({k: float(f["metrics"].attrs[k]) for k in ("ttft_ms", "tpot_ms")})
    return runs


def error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default=os.path.join(ROOT, "machines", "this_box.yaml"))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench", "simulation.json"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="keep the measured runs of --out; simulate again")
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)")
    args = parser.parse_args()
    earlier = {}
    if args.reuse and os.path.exists(args.out):
        with open(args.out) as f:
            earlier = {row["name"]: row for row in json.load(f)["configurations"]}
    machine = load_machine(args.machine)
    rows = []
    for name, (config_path, ranks, settings) in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        runs = earlier[name]["measured_runs"] if name in earlier else measure(config_path, ranks, settings, args.reps)
        config = load_config(os.path.join(ROOT, config_path), ONE_THREAD + settings)
        predicted = simulate(config, machine, ranks)
        row = {"name": name, "config": config_path, "ranks": ranks, "settings": settings, "measured_runs": runs}
        for metric in ("ttft_ms", "tpot_ms"):
            measured = float(np.median([run[metric] for run in runs]))
            row[metric] = {"measured_median": measured, "predicted": float(predicted[metric]),
                           "error": error(float(predicted[metric]), measured)}
        rows.append(row)
        print(f"{name:<34} TTFT {row['ttft_ms']['measured_median']:8.2f} -> {row['ttft_ms']['predicted']:8.2f} ms "
              f"({100 * row['ttft_ms']['error']:+6.1f}%)   TPOT {row['tpot_ms']['measured_median']:7.2f} -> "
              f"{row['tpot_ms']['predicted']:7.2f} ms ({100 * row['tpot_ms']['error']:+6.1f}%)", flush=True)
    errors = np.abs([row[m]["error"] for row in rows for m in ("ttft_ms", "tpot_ms")])
    summary = {"median_abs_error": float(np.median(errors)), "max_abs_error": float(errors.max()),
               "ttft_median_abs_error": float(np.median([abs(r["ttft_ms"]["error"]) for r in rows])),
               "tpot_median_abs_error": float(np.median([abs(r["tpot_ms"]["error"]) for r in rows]))}
    print(f"median |error| {100 * summary['median_abs_error']:.1f}%, max {100 * summary['max_abs_error']:.1f}% "
          f"(TTFT median {100 * summary['ttft_median_abs_error']:.1f}%, TPOT median "
          f"{100 * summary['tpot_median_abs_error']:.1f}%)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": os.path.relpath(args.machine, ROOT), "reps": args.reps, "summary": summary,
                   "configurations": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
