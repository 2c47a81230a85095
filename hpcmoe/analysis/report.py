"""Offline analysis of run files: `hpcmoe report RUN.h5 [MORE.h5 ...] [--out DIR]`: a text summary
per run (summary.py), and PNG plots `<stem>.timeline.png`, `.expert_load.png`, `.traffic.png`,
`.rank_load.png`, `.failures.png` after a dead rank (+ `compare.png`) (plots.py). Here: the command,
what it reads from each run file, the ranks and step chosen, and the figures written as JSON or CSV."""

from __future__ import annotations

import os

import numpy as np
import yaml

from hpcmoe.analysis.plots import (
    plot_compare,
    plot_expert_load,
    plot_failures,
    plot_rank_load,
    plot_timeline,
    plot_traffic,
    pyplot,
)
from hpcmoe.analysis.summary import METRICS, summary

DATASETS = ("generated", "prompt_lengths", "routing", "traffic", "placement", "timings", "metrics")


def load(path: str) -> dict:
    """Everything the report needs from one run file; ValueError if it is not a complete run."""
    import h5py

    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise ValueError(f"{path}: not an HDF5 file") from None
    with f:
        missing = [name for name in DATASETS if name not in f] + [
            name for name in ("config", "world_size", "node_of_rank") if name not in f.attrs
        ]
        # a run stopped by a signal (NAME.partial.h5) holds its steps so far; a killed one nothing usable
        partial = None if f.attrs.get("complete", False) else f.attrs.get("stopped_at_step")
        if missing or (partial is None and not f.attrs.get("complete", False)):
            why = f"missing {', '.join(missing)}" if missing else "complete is not set"
            raise ValueError(f"{path}: not a complete hpcmoe run file ({why})")
        try:
            parallel = yaml.safe_load(f.attrs["config"])["parallel"]
        except (yaml.YAMLError, KeyError, TypeError):
            raise ValueError(f"{path}: not a complete hpcmoe run file (unreadable config)") from None
        return {
            "path": path,
            "stem": os.path.splitext(os.path.basename(path))[0],
            "parallel": parallel,
            "world_size": int(f.attrs["world_size"]),
            "node_of_rank": np.asarray(f.attrs["node_of_rank"]),
            "partial": None if partial is None else int(partial),
            "steady": "steady_decode_context" in f.attrs,
            "routing": f["routing"][:],
            "traffic": summed_traffic(f["traffic"]),
            "timings": f["timings"][:],
            "placement": f["placement"][:],
            "placement_attrs": dict(f["placement"].attrs),
            "switches": [(int(row["step"]), row["placement"]) for row in f["placement_history"][:]]
            if "placement_history" in f
            else [],
            "failures": f["metrics/failures"][:] if "metrics/failures" in f else [],
            "metrics": {
                k: float(v) for k, v in f["metrics"].attrs.items() if isinstance(v, (int, float, np.number))
            },
            "samples": samples(f, yaml.safe_load(f.attrs["config"])["model"].get("checkpoint")),
        }


def summed_traffic(dataset) -> np.ndarray:
    """[src_rank, dst_rank] bytes over all steps and layers, one step at a time (the whole dataset
    is 1 GB at 1024 ranks)."""
    total = np.zeros(dataset.shape[2:], dtype=np.int64)
    for step in range(dataset.shape[0]):
        total += dataset[step].sum(axis=0)
    return total


SHOWN_REQUESTS, SHOWN_CHARACTERS = 3, 120


def samples(f, checkpoint) -> list[tuple[str, str, str]]:
    """(request id, prompt, completion) of the first requests: text through the checkpoint's
    tokenizer when it has one, else token ids."""
    from hpcmoe.workload import decode

    ids = (
        [x.decode() for x in f["request_ids"][:SHOWN_REQUESTS]]
        if "request_ids" in f
        else [str(i) for i in range(min(SHOWN_REQUESTS, len(f["generated"])))]
    )
    shown = []
    for i, request in enumerate(ids):
        prompt, made = f["prompt_ids"][i], f["generated"][i]
        as_text = lambda tokens: decode(checkpoint, tokens)
        text = (as_text(prompt), as_text(made)) if "generated_text" in f else (None, None)
        prompt_shown = text[0] if text[0] is not None else " ".join(map(str, prompt[prompt >= 0]))
        made_shown = text[1] if text[1] is not None else " ".join(map(str, made[made >= 0]))
        shown.append((request, prompt_shown[:SHOWN_CHARACTERS], made_shown[:SHOWN_CHARACTERS]))
    return shown


def plot_paths(runs: list[dict], out: str | None) -> list[tuple]:
    """(plot function, argument, path) of every plot; ValueError if two would share a path."""
    plots = []
    for run in runs:
        folder = out or os.path.dirname(os.path.abspath(run["path"]))
        for name, function in (
            ("timeline", plot_timeline),
            ("expert_load", plot_expert_load),
            ("traffic", plot_traffic),
            ("rank_load", plot_rank_load),
        ):
            plots.append((function, run, os.path.join(folder, f"{run['stem']}.{name}.png")))
        if len(run["failures"]):
            plots.append((plot_failures, run, os.path.join(folder, f"{run['stem']}.failures.png")))
    if len(runs) > 1:
        folder = out or os.path.dirname(os.path.abspath(runs[0]["path"]))
        plots.append((plot_compare, runs, os.path.join(folder, "compare.png")))
    paths = [path for _, _, path in plots]
    if len(set(paths)) < len(paths):
        raise ValueError("two runs would write the same plot files: give runs with distinct file names")
    return plots


def parse_range(text: str, flag: str) -> tuple[int, int]:
    """`A-B` or `A` -> (A, B); ValueError naming the flag otherwise."""
    first, _, last = text.partition("-")
    try:
        low, high = int(first), int(last or first)
    except ValueError:
        low, high = 0, -1
    if not 0 <= low <= high:
        raise ValueError(f"{flag} {text}: expected A-B with 0 <= A <= B, e.g. {flag} 0-15")
    return low, high


def choose(run: dict, ranks: str | None, nodes: str | None, step: int | None) -> None:
    """Store the ranks (run["shown"]) and step the figures show; ValueError if the run has no such ones."""
    world, node_of_rank = run["world_size"], run["node_of_rank"]
    shown = set(range(world))
    if ranks is not None:
        low, high = parse_range(ranks, "--ranks")
        if high >= world:
            raise ValueError(f"--ranks {ranks}: {run['path']} has ranks 0-{world - 1}")
        shown &= set(range(low, high + 1))
    if nodes is not None:
        low, high = parse_range(nodes, "--nodes")
        if high > node_of_rank.max():
            raise ValueError(f"--nodes {nodes}: {run['path']} has nodes 0-{node_of_rank.max()}")
        shown &= {r for r in range(world) if low <= node_of_rank[r] <= high}
    if not shown:
        raise ValueError(f"--ranks {ranks} --nodes {nodes}: no rank of {run['path']} is in both")
    run["shown"] = sorted(shown)
    if step is not None:
        steps = np.unique(run["timings"]["step"][run["timings"]["step"] >= 0])
        if step not in steps:
            raise ValueError(
                f"--step {step}: {run['path']} has steps {steps[0]}-{steps[-1]}"
                + (" (a partial file)" if run.get("partial") is not None else "")
            )
    run["step"] = step


def figures(run: dict) -> dict:
    """The figures users compare, of one run (run.metrics attributes, NaN where the run has none)."""
    return {
        "run": run["path"],
        **{key: run["metrics"].get(key, float("nan")) for key in METRICS},
        "rank_load_max_over_mean": run["metrics"].get("rank_load_max_over_mean", float("nan")),
        "rank_load_max_over_mean_per_step": run["metrics"].get(
            "rank_load_max_over_mean_per_step", float("nan")
        ),
    }


def write_figures(loaded: list[dict], json_path: str | None, csv_path: str | None) -> None:
    """--json: a list of objects, one per run; --csv: a header and one row per run; the same keys."""
    import csv
    import json

    rows = [figures(run) for run in loaded]
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def main(
    runs: list[str],
    out: str | None,
    ranks: str | None = None,
    step: int | None = None,
    nodes: str | None = None,
    json_path: str | None = None,
    csv_path: str | None = None,
    overwrite: bool = False,
) -> int:
    """Print the summary of each run, write the figures (--json, --csv) and the plots, print their
    paths. Existing files are refused before any work unless `overwrite`."""
    from hpcmoe.runfile.paths import check_new_output, check_output_path

    for path, flag in ((json_path, "--json"), (csv_path, "--csv")):
        if path:
            check_output_path(path, flag, f"report.{flag[2:]}", create=False)
            check_new_output(path, overwrite, flag)
    loaded = [load(path) for path in runs]
    for run in loaded:
        choose(run, ranks, nodes, step)
    plots = plot_paths(loaded, out)
    for _, _, path in plots:
        check_new_output(path, overwrite, "--output")
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: not a directory")
    pyplot()  # fail before printing anything when matplotlib is missing
    for run in loaded:
        print(summary(run), end="\n\n")
    write_figures(loaded, json_path, csv_path)
    if out:
        os.makedirs(out, exist_ok=True)
    from hpcmoe.progress import Progress

    progress = Progress("hpcmoe report", len(plots), "figures")  # on stderr: the figures' list stays clean
    for done, (function, argument, path) in enumerate(plots):
        progress.update(done)
        function(argument, path)
        print(f"wrote {path}", flush=True)
    return 0
