"""The simulator against real runs of this box: predicted TTFT and TPOT beside measured medians.

Each configuration runs `--reps` times under mpiexec (one thread per rank, as the simulator assumes)
and is simulated once on the machine file; the JSON holds every measured run, the medians, the
prediction and the relative error of each. --reuse keeps the measured runs of an earlier JSON and
only simulates again (to check a changed model or machine file against the same measurements).

This box is shared and its speed drifts within minutes. So before every run of a configuration the
reference run (the debug model at -n 1, as `hpcmoe calibrate` runs it) runs too, and a second error
is given with the prediction scaled by how much slower the reference ran than its own simulation
(`drift`: the median over the reps of measured over simulated reference TPOT): the error the model
would have had if the machine had kept the speed it had while being calibrated.

The `text_*` rows run a tiny DeepSeek-V3 checkpoint with FP8 experts (tools/make_tiny_checkpoint.py,
built afresh: it is seeded) on prompts of real text through its tokenizer (tests/data/tiny_corpus.txt);
they are simulated twice: with the routing recorded from real text (a -n 1 run of the same prompts:
`hpcmoe simulate --routing`) and with the simulator's synthetic routing.

    python tools/validate_sim.py [--machine machines/this_box.yaml]
        [--out docs/bench/simulation.json] [--reps 3]
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
from hpcmoe.config import load_config  # noqa: E402
from hpcmoe.runfile.loads import read_routing  # noqa: E402
from hpcmoe.sim.calibrate import CALIBRATION_RUNS, mpi_command, same_configuration  # noqa: E402
from hpcmoe.sim.machine import load_machine  # noqa: E402
from hpcmoe.sim.simulate import simulate  # noqa: E402

DEBUG, WIDE = "inputs/debug.yaml", "inputs/bench_ep.yaml"  # the debug model; hidden 256, experts 1024 wide
ONE_THREAD = ["parallel.threads=1"]
NODES_OF_2 = ["parallel.ranks_per_node=2"]
NODES_OF_1 = ["parallel.ranks_per_node=1"]
LINK_FAST = ["parallel.link={bandwidth_gbps: 1, latency_us: 50}"]
LINK_SLOW = ["parallel.link={bandwidth_gbps: 0.1, latency_us: 200}"]
BATCH_12 = ["run.batch=12", "run.prompt_len=32"]
MA_3_1 = ["parallel.layout=ma", "parallel.attention_ranks=3", "parallel.moe_ranks=1"]
REFERENCE = (DEBUG, 1, ["run.max_new_tokens=12"])  # hpcmoe calibrate's -n 1 run
CHECKPOINT = "inputs/checkpoint.yaml"  # with {checkpoint} and {prompts} filled in by text_workload
TEXT = [
    "model.checkpoint={checkpoint}",
    "run.prompts={prompts}",
    "run.stop_at_eos=false",
    "run.sampling={{temperature: 0}}",
    "run.max_new_tokens=12",
]
CONFIGS = {  # name: (config, ranks, settings); none of them a calibration run (check_disjoint)
    "debug_n1_batch12": (DEBUG, 1, BATCH_12),
    "debug_n3": (DEBUG, 3, []),
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
    "wide_n3": (WIDE, 3, []),
    "wide_n4": (WIDE, 4, []),
    "wide_ma_3_1": (WIDE, 4, MA_3_1),
    "debug_n4_expert_tp2_members": (DEBUG, 4, ["parallel.expert_tp=2"]),
    "debug_n4_expert_tp2_leader": (DEBUG, 4, ["parallel.expert_tp=2", "parallel.expert_tp_dispatch=leader"]),
    "text_fp8_n2": (CHECKPOINT, 2, TEXT),
    "text_fp8_n4": (CHECKPOINT, 4, TEXT),
}
RECORDING = 1  # ranks of the run whose /routing the text rows are simulated with (none of theirs)


def text_workload(folder: str) -> dict:
    """The tiny FP8 checkpoint with its tokenizer and a prompt file of real text, made in `folder`
    -> the values of TEXT's placeholders."""
    checkpoint, prompts = os.path.join(folder, "checkpoint"), os.path.join(folder, "prompts.jsonl")
    corpus = os.path.join(ROOT, "tests", "data", "tiny_corpus.txt")
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "make_tiny_checkpoint.py"),
            "deepseek_v3",
            checkpoint,
            "--tokenizer",
            corpus,
            "--fp8",
            "16",
            "16",
        ],
        check=True,
        capture_output=True,
    )
    with open(corpus) as f, open(prompts, "w") as out:
        for i, line in enumerate(line.strip() for line in f if line.strip()):
            out.write(json.dumps({"id": f"line{i}", "prompt": line}) + "\n")
    return {"checkpoint": checkpoint, "prompts": prompts}


def filled(settings: list[str], workload: dict) -> list[str]:
    return [setting.format(**workload) for setting in settings]


def check_disjoint(configs: dict = CONFIGS) -> None:
    """No validation configuration is one that `hpcmoe calibrate` fits on (same model, batch, prompts,
    layout and rank count): those would score the model on its own fit."""
    calibration = [
        (load_config(os.path.join(ROOT, DEBUG), settings), ranks)
        for ranks, settings in CALIBRATION_RUNS.values()
    ]
    for name, (config_path, ranks, settings) in configs.items():
        if config_path == CHECKPOINT:  # another model than the debug model that calibrate runs
            continue
        config = load_config(os.path.join(ROOT, config_path), ONE_THREAD + settings)
        for fitted, fitted_ranks in calibration:
            if same_configuration(config, ranks, fitted, fitted_ranks):
                raise ValueError(
                    f"validation configuration {name} is one of hpcmoe calibrate's runs "
                    f"({fitted_ranks} ranks): choose one the fit has not seen"
                )


def one_run(config: str, ranks: int, settings: list[str], path: str) -> dict:
    """A real run -> {ttft_ms, tpot_ms} from its run file."""
    command = mpi_command(ranks, "hpcmoe", "run", os.path.join(ROOT, config), "--output", path, "--overwrite")
    for setting in ONE_THREAD + settings:
        command += ["--set", setting]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{config} -n {ranks} {settings}: exit {result.returncode}: {result.stderr[-400:]}"
        )
    with h5py.File(path, "r") as f:
        return {k: float(f["metrics"].attrs[k]) for k in ("ttft_ms", "tpot_ms")}


def measure(config: str, ranks: int, settings: list[str], reps: int) -> list[dict]:
    """`reps` real runs, each right after a reference run -> [{ttft_ms, tpot_ms, reference_tpot_ms}]."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="hpcmoe-validate-") as work:
        for rep in range(reps):
            reference = one_run(*REFERENCE, os.path.join(work, "reference.h5"))
            runs.append(
                {
                    **one_run(config, ranks, settings, os.path.join(work, f"run{rep}.h5")),
                    "reference_tpot_ms": reference["tpot_ms"],
                }
            )
    return runs


def error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured


def validate(
    name: str,
    config_path: str,
    ranks: int,
    settings: list[str],
    earlier: dict,
    machine,
    reference: dict,
    reps: int,
    workload: dict,
    recorded,
) -> dict:
    """One configuration measured (or its earlier runs kept) and simulated -> its row. A text row is
    simulated with the routing recorded from real text, and again with synthetic routing."""
    text = config_path == CHECKPOINT
    run_settings = filled(settings, workload) if text else settings
    runs = (
        earlier[name]["measured_runs"] if name in earlier else measure(config_path, ranks, run_settings, reps)
    )
    config = load_config(os.path.join(ROOT, config_path), ONE_THREAD + run_settings)
    predicted = simulate(config, machine, ranks, routing=recorded if text else None)
    synthetic = simulate(config, machine, ranks) if text else None
    drift = float(np.median([run.get("reference_tpot_ms", np.nan) for run in runs])) / reference["tpot_ms"]
    row = {
        "name": name,
        "config": config_path,
        "ranks": ranks,
        "settings": settings,
        "measured_runs": runs,
        "drift": drift,
    }
    for metric in ("ttft_ms", "tpot_ms"):
        measured = float(np.median([run[metric] for run in runs]))
        row[metric] = {
            "measured_median": measured,
            "predicted": float(predicted[metric]),
            "error": error(float(predicted[metric]), measured),
            "error_at_calibration_speed": error(drift * float(predicted[metric]), measured),
        }
        if text:
            row[metric]["predicted_synthetic_routing"] = float(synthetic[metric])
            row[metric]["error_synthetic_routing"] = error(float(synthetic[metric]), measured)
    print(
        f"{name:<34} TTFT {row['ttft_ms']['measured_median']:8.2f} -> {row['ttft_ms']['predicted']:8.2f} ms "
        f"({100 * row['ttft_ms']['error']:+6.1f}%)   TPOT {row['tpot_ms']['measured_median']:7.2f} -> "
        f"{row['tpot_ms']['predicted']:7.2f} ms ({100 * row['tpot_ms']['error']:+6.1f}%)   "
        f"drift {drift:.2f}: {100 * row['ttft_ms']['error_at_calibration_speed']:+6.1f}% "
        f"{100 * row['tpot_ms']['error_at_calibration_speed']:+6.1f}%"
        + (
            f"   synthetic routing: TPOT {100 * row['tpot_ms']['error_synthetic_routing']:+6.1f}%"
            if text
            else ""
        ),
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default=os.path.join(ROOT, "machines", "this_box.yaml"))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench", "simulation.json"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--reuse", action="store_true", help="keep the measured runs of --out; simulate again"
    )
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)")
    args = parser.parse_args()
    check_disjoint()
    earlier = {}
    if args.reuse and os.path.exists(args.out):
        with open(args.out) as f:
            earlier = {row["name"]: row for row in json.load(f)["configurations"]}
    machine = load_machine(args.machine)
    reference = simulate(load_config(os.path.join(ROOT, REFERENCE[0]), ONE_THREAD + REFERENCE[2]), machine, 1)
    chosen = {name: row for name, row in CONFIGS.items() if not args.only or name in args.only}
    with tempfile.TemporaryDirectory(prefix="hpcmoe-validate-text-") as folder:
        workload = recorded = None
        if any(config_path == CHECKPOINT for config_path, _, _ in chosen.values()):
            workload = text_workload(folder)
            recording = os.path.join(folder, "recording.h5")
            one_run(CHECKPOINT, RECORDING, filled(TEXT, workload), recording)
            experts = load_config(os.path.join(ROOT, CHECKPOINT), filled(TEXT, workload)).model.num_experts
            recorded = read_routing(recording, experts)
        rows = [
            validate(name, *row, earlier, machine, reference, args.reps, workload, recorded)
            for name, row in chosen.items()
        ]
    summary = {}
    for kind in ("error", "error_at_calibration_speed"):
        errors = np.abs([row[m][kind] for row in rows for m in ("ttft_ms", "tpot_ms")])
        summary[kind] = {
            "median_abs": float(np.nanmedian(errors)),
            "max_abs": float(np.nanmax(errors)),
            "ttft_median_abs": float(np.nanmedian([abs(r["ttft_ms"][kind]) for r in rows])),
            "tpot_median_abs": float(np.nanmedian([abs(r["tpot_ms"][kind]) for r in rows])),
        }
        print(
            f"{kind}: median |error| {100 * summary[kind]['median_abs']:.1f}%, "
            f"max {100 * summary[kind]['max_abs']:.1f}% "
            f"(TTFT median {100 * summary[kind]['ttft_median_abs']:.1f}%, "
            f"TPOT median {100 * summary[kind]['tpot_median_abs']:.1f}%)"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "machine": os.path.relpath(args.machine, ROOT),
                "reps": args.reps,
                "summary": summary,
                "reference_simulated_tpot_ms": reference["tpot_ms"],
                "configurations": rows,
            },
            f,
            indent=1,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
