"""run.fault_tolerance on Open MPI with ULFM (.venv-ft, `make ft`): its cost without a failure and
the recovery time after one.

    python tools/bench_ft.py [--ranks 6] [--reps 5] [--out docs/bench/ft_n6.json]
    python tools/bench_ft.py --layout ma --ranks 5 [--out docs/bench/ft_ma.json]   # 2+2+1 with standbys

Failure-free runs with fault tolerance off and on, interleaved, under the same `mpirun --with-ft
ulfm` (medians of tokens/s and TPOT); then runs where one rank SIGKILLs itself at seeded points:
recovery from the kill = /metrics/failures recovered_at - the time the victim printed as it died
(its kill line, on the run's clock), split into detection (detected_at - that time) and recovery
from detection (recovered_at - detected_at: to the end of the step done again), and whether
/generated equals the failure-free run's. Rank 0 (the writer, whose
deputy takes over) is among the ranks killed; in ma (2 groups of primary + standby, 1 MoE rank) the
attention ranks are (the only MoE rank's death cannot be survived).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hpcmoe.runtime.fault import killed_at  # noqa: E402

LAYOUT = ["ep"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FT = os.path.join(ROOT, ".venv-ft", "bin")
WORKLOAD = ["model.num_experts=3", "run.max_new_tokens=32", "run.batch=12"]
MA = [
    "parallel.layout=ma",
    "parallel.attention_ranks=4",
    "parallel.moe_ranks=1",
    "parallel.attention_replicas=2",
    "parallel.attention_standby=true",
]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": ROOT,
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_ALLOW_RUN_AS_ROOT": "1",
    "PRTE_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
}


def job(ranks: int, output: str, settings: list[str]) -> subprocess.CompletedProcess:
    settings = (MA if LAYOUT[0] == "ma" else []) + settings
    # the benchmark reuses its own files
    command = [
        "timeout",
        "300",
        f"{FT}/mpirun",
        "--with-ft",
        "ulfm",
        "--oversubscribe",
        "-n",
        str(ranks),
        f"{FT}/python",
        "-m",
        "hpcmoe",
        "run",
        os.path.join(ROOT, "inputs", "debug.yaml"),
        "--output",
        output,
        "--overwrite",
    ]
    for setting in WORKLOAD + settings:
        command += ["--set", setting]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-2000:]}")
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=6)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--layout", default="ep", choices=["ep", "ma"])
    parser.add_argument("--out")
    args = parser.parse_args()
    LAYOUT[0] = args.layout
    if args.layout == "ma" and args.ranks != 5:
        sys.exit("--layout ma runs 2+2+1: --ranks 5")
    if not os.path.exists(f"{FT}/mpirun"):
        sys.exit("no .venv-ft: run `make ft` first")
    return args


def failure_free(args, work: str):
    """Runs with fault tolerance off and on, interleaved -> (medians of tps, tpot_ms and ttft_ms by
    variant, the tokens the run without it generated)."""
    samples = {"off": [], "on": []}
    for rep in range(args.reps + 1):  # the first round warms up
        for variant in samples:
            path = os.path.join(work, f"{variant}.h5")
            job(args.ranks, path, [f"run.fault_tolerance={str(variant == 'on').lower()}"])
            with h5py.File(path) as f:
                if rep:
                    samples[variant].append(
                        {k: float(f["metrics"].attrs[k]) for k in ("tps", "tpot_ms", "ttft_ms")}
                    )
                if variant == "off":
                    reference = f["generated"][:]
    median = {v: {k: float(np.median([s[k] for s in rows])) for k in rows[0]} for v, rows in samples.items()}
    return median, reference


def kill_point(i: int, layout: str, ranks: int, rng: random.Random) -> tuple[int, int, str]:
    """The i-th kill's (rank, step, phase): phases in turn, the victim and step seeded."""
    phase = ["dispatch", "combine", "record", "between_steps", "route", "experts", "stop_vote"][i % 7]
    layered = phase in ("route", "dispatch", "experts", "combine")
    victims = range(ranks) if layout == "ep" else [0, 2] if layered else range(4)
    phase = "dispatch" if layout == "ma" and phase == "experts" else phase  # ma's experts: its one MoE rank
    rank, step = rng.choice(list(victims)), rng.randint(2, 20)
    return rank, step, phase


def recoveries_after_kills(args, work: str, reference: np.ndarray) -> list[dict]:
    """Runs where one rank kills itself at a seeded point: each recovery's times and whether the run
    generated the failure-free tokens."""
    rng, recoveries = random.Random(3), []
    for i in range(args.kills):
        rank, step, phase = kill_point(i, args.layout, args.ranks, rng)
        path = os.path.join(work, f"kill{i}.h5")
        result = job(
            args.ranks,
            path,
            ["run.fault_tolerance=true", f"run.kill=[{{rank: {rank}, step: {step}, phase: {phase}}}]"],
        )
        [killed] = killed_at(result.stderr)
        with h5py.File(path) as f:
            row = f["metrics/failures"][0]
            recoveries.append(
                {
                    "rank": rank,
                    "step": step,
                    "phase": phase,
                    "recovery_ms": 1e3 * float(row["recovered_at"] - row["detected_at"]),
                    "recovery_from_kill_ms": 1e3 * float(row["recovered_at"] - killed),
                    "detection_ms": 1e3 * float(row["detected_at"] - killed),
                    "same_tokens": bool(np.array_equal(f["generated"][:], reference)),
                }
            )
    return recoveries


def main() -> None:
    args = parse_args()
    work = tempfile.mkdtemp(prefix="hpcmoe-bench-ft-")
    median, reference = failure_free(args, work)
    recoveries = recoveries_after_kills(args, work, reference)
    result = {
        "benchmark": "fault_tolerance",
        "layout": args.layout,
        "ranks": args.ranks,
        "reps": args.reps,
        "workload": WORKLOAD,
        "median": median,
        "tps_on_over_off": median["on"]["tps"] / median["off"]["tps"],
        "recoveries": recoveries,
        **{
            f"{key}_{name}": float(reduce([r[key] for r in recoveries]))
            for key in ("recovery_ms", "recovery_from_kill_ms", "detection_ms")
            for name, reduce in (("median", np.median), ("max", np.max))
        },
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
