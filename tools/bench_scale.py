"""Large EP on one box: whole runs at several rank counts, interleaved, medians -> JSON.

    python tools/bench_scale.py --ranks 16,32,64 --reps 3 --out docs/bench/scale.json

Each rep runs every rank count in turn (16 32 64 16 32 64 ...) with the debug model, one expert per
rank (model.num_experts = ranks), nodes of 8 ranks, the same tokens per rank (2 requests of up to
24 tokens each, 12 new tokens), and reads TTFT, TPOT, idle fraction and peak RSS per rank from the
run file. The first rep of each count is also checked token for token against the 1-rank run of
the same model and workload. Runs with more ranks than cores share them: compare ratios.
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


def launch(ranks: int, experts: int, output: str, tokens: int, extra: list[str]) -> dict:
    settings = [
        f"model.num_experts={experts}",
        f"run.batch={2 * experts}",
        f"run.max_new_tokens={tokens}",
        "parallel.ranks_per_node=8",
        "output.save_logits=false",
        *extra,
    ]
    # the benchmark reuses its own files
    command = [
        "timeout",
        "1800",
        os.path.join(os.path.dirname(sys.executable), "mpiexec"),
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "hpcmoe",
        "run",
        os.path.join(ROOT, "inputs", "debug.yaml"),
        "--output",
        output,
        "--overwrite",
    ]
    for setting in settings:
        command += ["--set", setting]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if result.returncode:
        raise SystemExit(f"{ranks} ranks failed:\n{result.stderr[-2000:]}")
    with h5py.File(output) as f:
        m = f["metrics"]
        return {
            "ttft_ms": float(m.attrs["ttft_ms"]),
            "tpot_ms": float(m.attrs["tpot_ms"]),
            "idle_fraction": float(m.attrs["idle_fraction"]),
            "peak_rss_gib_max": float(m["peak_rss_bytes"][:].max()) / 2**30,
            "peak_rss_gib_mean": float(m["peak_rss_bytes"][:].mean()) / 2**30,
            "generated": f["generated"][:],
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="16,32,64")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    counts = [int(r) for r in args.ranks.split(",")]
    directory = tempfile.mkdtemp(prefix="hpcmoe-scale-")
    samples = {n: [] for n in counts}
    exact = {}
    for rep in range(args.reps):
        for n in counts:
            run = launch(n, n, os.path.join(directory, f"n{n}.h5"), args.tokens, args.set)
            if rep == 0:
                alone = launch(1, n, os.path.join(directory, f"n{n}_alone.h5"), args.tokens, args.set)
                exact[n] = bool(np.array_equal(run["generated"], alone["generated"]))
            samples[n].append({k: v for k, v in run.items() if k != "generated"})
            print(
                f"rep {rep} ranks {n}: " + ", ".join(f"{k} {v:.3f}" for k, v in samples[n][-1].items()),
                flush=True,
            )
    median = {n: {k: float(np.median([s[k] for s in samples[n]])) for k in samples[n][0]} for n in counts}
    what = "debug model, one expert per rank (experts = ranks), nodes of 8, 2 requests per rank"
    result = {
        "benchmark": "scale",
        "what": what,
        "settings": args.set,
        "reps": args.reps,
        "tokens": args.tokens,
        "median": {f"ranks_{n}": median[n] for n in counts},
        "equal_to_one_rank": {f"ranks_{n}": exact[n] for n in counts},
        "tpot_ratio": {
            f"{b}/{a}": median[b]["tpot_ms"] / median[a]["tpot_ms"] for a, b in zip(counts, counts[1:])
        },
    }
    print(json.dumps({k: result[k] for k in ("median", "equal_to_one_rank", "tpot_ratio")}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
