"""The attention:MoE split that `parallel.attention_ranks: auto` chooses, against every split measured.

    python tools/bench_split.py --output docs/bench/split.json          # 4, 6 and 8 ranks (about 10 min)
    python tools/bench_split.py --ranks 4 --reps 1 --output /tmp/s.json   # one rank count

For each rank count every split the model allows (hpcmoe.analysis.ma_split.splits) is run `--reps` times,
interleaved (split A, B, C, then again), on inputs/bench_predict.yaml; a split's TPOT is the faster
of its runs (this box's slow spells only ever add). The simulator's choice (`parallel.predictor` a
machine file: hpcmoe.analysis.ma_split.simulate_splits) and, with `--predictor`, a trained
predictor's are each scored as their split's measured TPOT over the best split's. None of these
runs is a calibration run of the machine file (hpcmoe.sim.calibrate.CALIBRATION_RUNS: the debug
model) nor, for the trained predictor, one it was fitted on unless you trained it on them.
Goal ([6/7]): the chosen split within 10% of the best measured TPOT at 4, 6 and 8 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import h5py

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from hpcmoe.analysis.ma_split import choose_split, splits  # noqa: E402
from hpcmoe.config import load_config  # noqa: E402

CONFIG = os.path.join(HERE, "inputs", "bench_predict.yaml")
GOAL = 1.10
SETTINGS = ["parallel.layout=ma", "parallel.threads=1"]


def measure(ranks: int, attention: int, moe: int, output: str) -> float:
    """One run of the split -> its TPOT in ms."""
    mpiexec = shutil.which(
        "mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    )
    sets = SETTINGS + [f"parallel.attention_ranks={attention}", f"parallel.moe_ranks={moe}"]
    command = [
        "timeout",
        "600",
        mpiexec,
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "hpcmoe",
        "run",
        CONFIG,
        "--output",
        output,
        "--overwrite",
        *[a for s in sets for a in ("--set", s)],
    ]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    with h5py.File(output) as f:
        return float(f["metrics"].attrs["tpot_ms"])


def chosen(ranks: int, predictor: str) -> str:
    """The split `parallel.attention_ranks: auto` takes with this predictor (a machine file or a .pt)."""
    config = load_config(
        CONFIG,
        SETTINGS
        + ["parallel.attention_ranks=auto", "parallel.moe_ranks=auto", f"parallel.predictor={predictor}"],
    )
    config, _ = choose_split(config, ranks)
    return f"{config.parallel.attention_ranks}:{config.parallel.moe_ranks}"


def split_row(ranks: int, reps: int, choosers: dict, work: str) -> dict:
    """Every split of ranks measured (best TPOT of reps runs each), and the split each chooser (the
    simulator on a machine file, or a trained predictor) takes against the best."""
    config = load_config(CONFIG, SETTINGS + ["parallel.attention_ranks=1", "parallel.moe_ranks=1"])
    options = [f"{a}:{e}" for a, e in splits(config, ranks)]
    runs = {split: [] for split in options}
    for rep in range(reps):
        for split in options:
            attention, moe = map(int, split.split(":"))
            runs[split].append(measure(ranks, attention, moe, os.path.join(work, f"{ranks}_{split}.h5")))
            print(f"-n {ranks} {split} rep {rep}: TPOT {runs[split][-1]:.2f} ms", flush=True)
    tpot = {split: min(times) for split, times in runs.items()}
    best = min(tpot, key=tpot.get)
    row = {"measured_tpot_ms": tpot, "runs_tpot_ms": runs, "best": best}
    for name, predictor in choosers.items():
        split = chosen(ranks, predictor)
        row[name] = {"chosen": split, "chosen_over_best": tpot[split] / tpot[best]}
        print(
            f"-n {ranks}: best {best} ({tpot[best]:.2f} ms); {name} chose {split} "
            f"({tpot[split]:.2f} ms, {tpot[split] / tpot[best]:.3f}x)",
            flush=True,
        )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="4,6,8")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--machine", default=os.path.join(HERE, "machines", "this_box.yaml"))
    parser.add_argument("--predictor", help="also score a trained predictor (hpcmoe predict train)")
    parser.add_argument("--output", "--out")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output (refused otherwise)"
    )
    args = parser.parse_args()
    if args.output and os.path.exists(args.output) and not args.overwrite:
        parser.error(f"--output {args.output} exists: pass --overwrite to replace it")
    choosers = {"simulator": args.machine, **({"predictor": args.predictor} if args.predictor else {})}
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for ranks in map(int, args.ranks.split(",")):
            results[str(ranks)] = split_row(ranks, args.reps, choosers, work)
    worst = {name: max(r[name]["chosen_over_best"] for r in results.values()) for name in choosers}
    print(
        "worst chosen / best: "
        + ", ".join(f"{name} {value:.3f}" for name, value in worst.items())
        + f" (goal <= {GOAL})"
    )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(
                {
                    "benchmark": "split",
                    "what": "the split attention_ranks: auto chooses against every split "
                    f"measured on {os.path.relpath(CONFIG, HERE)}",
                    "goal_chosen_over_best": GOAL,
                    "reps": args.reps,
                    "machine": os.path.relpath(args.machine, HERE),
                    "ranks": results,
                    "worst": worst,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
