"""The tables of docs/SIMULATION.md, from docs/bench/simulation.json (tools/validate_sim.py),
docs/bench/projections.json (tools/project_sim.py) and docs/bench/predict.json's measured splits
(simulated here, a few seconds).

    python tools/sim_tables.py
"""

from __future__ import annotations

import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str) -> dict:
    with open(os.path.join(ROOT, "docs", "bench", name)) as f:
        return json.load(f)


def validation() -> str:
    data = load("simulation.json")
    lines = [
        "| configuration | ranks | settings | TTFT measured ms | predicted | error | at calibration speed | "
        "TPOT measured ms | predicted | error | at calibration speed | drift | runs spread (TPOT max/min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["configurations"]:
        cells = []
        for metric in ("ttft_ms", "tpot_ms"):
            m = row[metric]
            cells.append(
                f"{m['measured_median']:.1f} | {m['predicted']:.1f} | {100 * m['error']:+.0f}% | "
                f"{100 * m['error_at_calibration_speed']:+.0f}%"
            )
        spread = max(r["tpot_ms"] for r in row["measured_runs"]) / min(
            r["tpot_ms"] for r in row["measured_runs"]
        )
        settings = " ".join(row["settings"]).replace("parallel.", "").replace("run.", "") or "-"
        lines.append(
            f"| {row['name']} | {row['ranks']} | `{settings}` | {' | '.join(cells)} | {row['drift']:.2f} | "
            f"{spread:.2f} |"
        )
    lines.append("")
    for kind, words in (("error", "as measured"), ("error_at_calibration_speed", "at calibration speed")):
        s = data["summary"][kind]
        lines.append(
            f"Median |error| {words}: {100 * s['median_abs']:.1f}% (TTFT {100 * s['ttft_median_abs']:.1f}%, "
            f"TPOT {100 * s['tpot_median_abs']:.1f}%), max {100 * s['max_abs']:.1f}%."
        )
    lines.append(f"{data['reps']} runs per configuration; machine file {data['machine']}.")
    return "\n".join(lines)


WAYS = ("engine", "no_host_costs", "per_source")  # tools/project_sim.py's ways


def ways(row: dict, key: str = "tpot_ms", digits: int = 1) -> str:
    return " | ".join(f"{row[way][key]:.{digits}f}" if way in row else "-" for way in WAYS)


def projections() -> str:
    data, out = load("projections.json"), []
    if "a" in data:
        out += [
            "### (a) DeepSeek-V3 on H100 SXM, 32 requests per GPU, context 2048",
            "",
            "| dtype | EP | placement | fits 80 GB | TPOT engine | no host costs | per_source | "
            "tok/s per GPU engine | no host costs | per_source |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in data["a"]["rows"]:
            out.append(
                f"| {row['dtype']} | {row['ep']} | {row['placement']} | "
                f"{'yes' if row['fits_memory'] else 'no'} "
                f"({row['planned_gib_per_rank']:.0f} GiB) | {ways(row)} | "
                f"{ways(row, 'tokens_per_s_per_gpu')} |"
            )
        efficiency = data["a"]["scaling_efficiency_16_to_256"]
        out.append(
            "\nScaling efficiency 16 -> 256 (tokens/s per GPU at 256 over at 16, engine as it is): "
            + ", ".join(f"{dtype} {100 * value:.0f}%" for dtype, value in efficiency.items())
            + ".\n"
        )
    if "b" in data:
        out += [
            "### (b) The MA paper's model on 16 A100 (4 nodes x 4), 24 requests, context 2048",
            "",
            "| layout | inter-node | TPOT engine | no host costs | per_source | tokens/s engine | "
            "no host costs | per_source |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in data["b"]["rows"]:
            out.append(
                f"| {row['layout']} | {row['nic']} | {ways(row, digits=2)} | "
                f"{ways(row, 'decode_tokens_per_s', 0)} |"
            )
        paper = data["b"]["paper"]
        out.append(
            f"\nThe paper: TPOT {paper['tpot_ms']['ma 12:4']} ms (12:4) "
            f"vs {paper['tpot_ms']['co-located']} ms (co-located); "
            f"TPS {paper['tps']['ma 12:4']:,} vs {paper['tps']['co-located']:,}.\n"
        )
    if "c" in data:
        row = data["c"]["rows"][0]
        out += [
            "### (c) DeepSeek's decode deployment: EP 144 on 18 H800 nodes, FP8 experts, "
            "96 requests per GPU, context 4096",
            "",
            "| | engine | no host costs | per_source |",
            "|---|---|---|---|",
            f"| TPOT ms | {ways(row, digits=1)} |",
            f"| output tokens/s per node | {ways(row, 'tokens_per_s_per_node', 0)} |",
            f"\nPublished: about {data['c']['published']['tokens_per_s_per_node']:,} output tokens/s "
            f"per node ({data['c']['published']['tokens_per_s_per_user']} tokens/s per user); fits 80 GB: "
            f"{'yes' if row['fits_memory'] else 'no'} ({row['planned_gib_per_rank']:.0f} GiB per rank).\n",
        ]
    return "\n".join(out)


def splits_against_predict_runs() -> str:
    """Every attention:MoE split that tools/bench_predict.py measured (docs/bench/predict.json), simulated
    on machines/this_box.yaml: measured against simulated TPOT, and the split each picks."""
    import dataclasses
    import sys

    sys.path.insert(0, ROOT)
    from hpcmoe.analysis.ma_split import splits
    from hpcmoe.config import load_config
    from hpcmoe.sim.machine import load_machine
    from hpcmoe.sim.simulate import simulate

    measured, machine = (
        load("predict.json")["proposals"],
        load_machine(os.path.join(ROOT, "machines", "this_box.yaml")),
    )
    config = load_config(
        os.path.join(ROOT, "inputs", "bench_predict.yaml"),
        ["run.batch=8", "run.prompt_len=32", "run.prompt_len_min=32", "run.max_new_tokens=8"],
    )
    lines = ["| ranks | split A:M | measured TPOT ms | simulated | error |", "|---|---|---|---|---|"]
    errors, picks = [], []
    for ranks, proposal in measured.items():
        simulated = {}
        for attention, moe in splits(config, int(ranks)):
            split = dataclasses.replace(
                config.parallel, layout="ma", attention_ranks=attention, moe_ranks=moe
            )
            simulated[f"{attention}:{moe}"] = simulate(
                dataclasses.replace(config, parallel=split), machine, int(ranks)
            )
        for name, tpot in proposal["measured_tpot_ms"].items():
            errors.append(simulated[name]["tpot_ms"] / tpot - 1)
            lines.append(
                f"| {ranks} | {name} | {tpot:.1f} | {simulated[name]['tpot_ms']:.1f} | "
                f"{100 * errors[-1]:+.0f}% |"
            )
        best = min(simulated, key=lambda name: simulated[name]["total_s"])
        picks.append(
            f"{ranks} ranks: measured best {proposal['best']}, the predictor proposed {proposal['proposed']} "
            f"({proposal['proposed_over_best']:.2f}x the best TPOT), the simulator proposes {best} "
            f"({proposal['measured_tpot_ms'][best] / proposal['measured_tpot_ms'][proposal['best']]:.2f}x)"
        )
    errors = np.abs(errors)
    lines.append(
        f"\nMedian |error| {100 * np.median(errors):.1f}%, max {100 * errors.max():.1f}%. "
        + "; ".join(picks)
        + "."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(validation())
    print()
    print(projections())
    print()
    print(splits_against_predict_runs())
