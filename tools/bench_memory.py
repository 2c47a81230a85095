"""The start-up memory estimate against the measured peak, on every input in inputs/ and on a
DeepSeek-V3-shaped FP8 checkpoint: each run at the rank count it is meant for, estimate and peak
read back from its run file (/metrics/memory_estimate_bytes and /metrics/peak_rss_bytes, per rank).

    python tools/bench_memory.py --output docs/bench/memory.json            # every input (about 5 min)
    python tools/bench_memory.py --only debug bench_ep --output /tmp/m.json # some of them

Goal ([5/7]): every rank's peak within 15% above its estimate (peak / estimate <= 1.15), or below it.
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
GOAL = 1.15
# input -> (ranks, --set overrides that shorten it without changing its shapes)
RUNS = {
    "debug": (4, []),
    "deepseek_v3_small": (4, []),
    "bench_ep": (4, []),
    "bench_ma": (4, []),
    "bench_overlap": (2, []),
    "bench_predict": (4, []),
    "bench_rebalance": (4, ["run.max_new_tokens=24", "run.skew_drift=12"]),
    "bench_schedule": (4, []),
    "checkpoint": (2, []),  # with the DeepSeek-V3-shaped checkpoint below, as float32 (its config's default)
    "checkpoint:bfloat16": (2, ["model.dtype=bfloat16"]),
}
# DeepSeek-V3's shapes where they set a rank's memory (hidden 7168, MLA ranks, 2048-wide experts,
# 128x128 FP8 blocks); fewer heads, experts and vocabulary, a narrower dense layer, so that
# transformers can make it here (about 0.8 B parameters)
DEEPSEEK_SHAPED = [
    "hidden_size=7168",
    "intermediate_size=4096",
    "moe_intermediate_size=2048",
    "num_hidden_layers=3",
    "num_attention_heads=16",
    "num_key_value_heads=16",
    "kv_lora_rank=512",
    "q_lora_rank=1536",
    "qk_rope_head_dim=64",
    "v_head_dim=128",
    "qk_nope_head_dim=128",
    "n_routed_experts=4",
    "num_experts_per_tok=2",
    "vocab_size=8192",
]


def deepseek_checkpoint(directory: str) -> None:
    subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "tools/make_tiny_checkpoint.py"),
            "deepseek_v3",
            directory,
            "--fp8",
            "128",
            "128",
            *[a for s in DEEPSEEK_SHAPED for a in ("--set", s)],
        ],
        check=True,
    )


def measure(name: str, ranks: int, sets: list[str], workdir: str) -> dict:
    output = os.path.join(workdir, f"{name.replace(':', '_')}.h5")
    mpiexec = shutil.which(
        "mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    )
    command = [
        "timeout",
        "900",
        mpiexec,
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "hpcmoe",
        "run",
        os.path.join(HERE, "inputs", f"{name.split(':')[0]}.yaml"),
        "--output",
        output,
        "--overwrite",
        *[a for s in sets for a in ("--set", s)],
    ]
    print("+", " ".join(command), flush=True)
    subprocess.run(
        command,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=workdir,
        stdout=subprocess.DEVNULL,
    )
    with h5py.File(output) as f:
        peak, estimate = f["metrics/peak_rss_bytes"][:], f["metrics/memory_estimate_bytes"][:]
    ratio = peak / estimate
    return {
        "ranks": ranks,
        "sets": sets,
        "peak_mib": (peak / 2**20).round(1).tolist(),
        "estimate_mib": (estimate / 2**20).round(1).tolist(),
        "peak_over_estimate_max": float(ratio.max()),
        "peak_over_estimate_min": float(ratio.min()),
        "within_goal": bool(ratio.max() <= GOAL),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), help="these inputs only")
    parser.add_argument("--output", "--out", help="write the results here (JSON)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output (refused otherwise)"
    )
    args = parser.parse_args()
    if args.output and os.path.exists(args.output) and not args.overwrite:
        parser.error(f"--output {args.output} exists: pass --overwrite to replace it")
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.only or RUNS:
            ranks, sets = RUNS[name]
            if name.startswith("checkpoint"):
                checkpoint = os.path.join(workdir, "deepseek_shaped")
                if not os.path.isdir(checkpoint):
                    deepseek_checkpoint(checkpoint)
                with open(os.path.join(workdir, "prompts.jsonl"), "w") as f:
                    f.write(
                        "".join(
                            json.dumps({"id": f"q{i}", "prompt_ids": list(range(1 + i, 40 + i))}) + "\n"
                            for i in range(4)
                        )
                    )
                sets = sets + [
                    f"model.checkpoint={checkpoint}",
                    "run.prompts=prompts.jsonl",
                    "run.max_new_tokens=4",
                ]
            results[name] = measure(name, ranks, sets, workdir)
            r = results[name]
            print(
                f"{name:18s} -n {ranks}: peak {max(r['peak_mib']):8.1f} MiB, "
                f"estimate {max(r['estimate_mib']):8.1f} MiB, "
                f"peak/estimate {r['peak_over_estimate_min']:.2f}..{r['peak_over_estimate_max']:.2f} "
                f"({'within' if r['within_goal'] else 'OVER'} {GOAL})",
                flush=True,
            )
    worst = max(r["peak_over_estimate_max"] for r in results.values())
    print(f"worst peak/estimate {worst:.3f} (goal <= {GOAL})")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(
                {
                    "benchmark": "memory",
                    "what": "peak RSS per rank against the start-up estimate, every input in "
                    "inputs/ and a DeepSeek-V3-shaped FP8 checkpoint",
                    "goal_peak_over_estimate": GOAL,
                    "runs": results,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
