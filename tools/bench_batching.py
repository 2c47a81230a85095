"""Batch jobs of real size: continuous against static batching, memory against the start-up estimate,
what a kill -9 leaves, and resume after a stop signal. Prints and stores the numbers ([2/7]).

    python tools/bench_batching.py --prompts 20000 --ranks 4 --max-batch 64 --out docs/bench/batching.json

The workload: the tiny Mixtral checkpoint with its tokenizer (tools/make_tiny_checkpoint.py, 512
positions), `--prompts` requests of token ids with lengths uniform in [8, 256] and max_new_tokens
uniform in [4, 64] (seeded), greedy, requests end at their token limit (run.stop_at_eos=false).
1. continuous and static at the same run.max_batch: generated tokens/s = tokens made / the run's
   time from the common start to its last token; peak RSS per rank against the start-up estimate.
2. kill -9 of one rank (no fault tolerance) at the step by which half of the requests had ended
   in the continuous run: the requests in the file left on disk, each compared with that run's.
3. a checkpoint run with text prompts stopped by a signal and resumed, greedy and sampled, against
   the uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
sys.path.insert(0, os.path.join(ROOT, "tools"))


def setup(directory: str, prompts: int, seed: int = 0) -> tuple[str, str]:
    """The checkpoint (with a tokenizer) and the prompt file; made once per directory."""
    from make_tiny_checkpoint import make, train_tokenizer

    checkpoint, jsonl = (
        os.path.join(directory, "mixtral"),
        os.path.join(directory, f"prompts_{prompts}.jsonl"),
    )
    if not os.path.exists(os.path.join(checkpoint, "tokenizer.json")):
        make("mixtral", checkpoint, vocab_size=320, max_position_embeddings=512)
        train_tokenizer(checkpoint, os.path.join(ROOT, "tests", "data", "tiny_corpus.txt"), 320)
    if not os.path.exists(jsonl):
        rng = np.random.default_rng(seed)
        with open(jsonl + ".part", "w") as f:
            for i in range(prompts):
                ids = rng.integers(3, 320, int(rng.integers(8, 257))).tolist()
                f.write(
                    json.dumps({"id": f"r{i}", "prompt_ids": ids, "max_new_tokens": int(rng.integers(4, 65))})
                    + "\n"
                )
        os.replace(jsonl + ".part", jsonl)
    return checkpoint, jsonl


def run(ranks: int, settings: list[str], output: str, timeout: int, resume: str | None = None) -> dict:
    """`mpiexec -n RANKS hpcmoe run` -> its exit code, wall seconds and stderr."""
    config = os.path.join(os.path.dirname(output), "empty.yaml")
    with open(config, "w") as f:
        f.write("{}\n")  # everything comes from --set
    command = [os.path.join(BIN, "mpiexec"), "-n", str(ranks), os.path.join(BIN, "hpcmoe"), "run", config]
    for item in settings:
        command += ["--set", item]
    command += ["--output", output, "--overwrite"] + (["--resume", resume] if resume else [])
    start = time.perf_counter()
    done = subprocess.run(
        ["timeout", str(timeout)] + command,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return {"rc": done.returncode, "wall_s": time.perf_counter() - start, "stderr": done.stderr[-2000:]}


def throughput(path: str) -> dict:
    with h5py.File(path, "r") as f:
        metrics = dict(f["metrics"].attrs)
        made = int(f["generated_lengths"][:].sum())
        peak = f["metrics/peak_rss_bytes"][:]
        return {
            "generated_tokens": made,
            "total_s": float(metrics["total_s"]),
            "generated_tokens_per_s": made / float(metrics["total_s"]),
            "steps": int(f["routing"].shape[0]),
            "peak_rss_bytes_max": int(peak.max()),
            "ttft_ms": float(metrics["ttft_ms"]),
            # the start-up estimate, stored beside the peak: each rank's, the worst ratio
            "estimate_bytes": int(metrics["memory_estimate_bytes"]),
            "peak_over_estimate": float(metrics["peak_over_estimate"]),
        }


def completions(path: str) -> dict[int, list[int]]:
    with h5py.File(path, "r", locking=False) as f:
        rows = f["requests"]
        return {int(i): c.tolist() for i, c in zip(rows["index"][:], rows["completion_ids"][:])}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=20000)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=None)
    parser.add_argument("--dir", default=os.path.join(ROOT, "runs", "bench_batching"))
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--resume-prompts", type=int, default=400, help="text prompts of the resume case")
    parser.add_argument("--skip", action="append", default=[], choices=["static", "kill", "resume"])
    parser.add_argument("--out", help="store the results as JSON here")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    checkpoint, jsonl = setup(args.dir, args.prompts)
    common = [
        f"model.checkpoint={checkpoint}",
        f"run.prompts={jsonl}",
        "run.stop_at_eos=false",
        f"run.max_batch={args.max_batch}",
    ] + ([f"run.prefill_chunk={args.prefill_chunk}"] if args.prefill_chunk else [])
    results = {
        "benchmark": "batching",
        "command": " ".join(sys.argv),
        "prompts": args.prompts,
        "ranks": args.ranks,
        "max_batch": args.max_batch,
    }
    runs = {}
    for kind in ("continuous", "static"):
        if kind in args.skip:
            continue
        output = os.path.join(args.dir, f"{kind}.h5")
        outcome = run(args.ranks, common + [f"run.batching={kind}"], output, args.timeout)
        if outcome["rc"] != 0:
            print(outcome["stderr"], file=sys.stderr)
            return 1
        runs[kind] = {**throughput(output), "wall_s": outcome["wall_s"]}
        print(f"{kind}: {json.dumps(runs[kind])}", flush=True)
    results["runs"] = runs
    if "continuous" in runs and "static" in runs:
        results["continuous_over_static_tokens_per_s"] = (
            runs["continuous"]["generated_tokens_per_s"] / runs["static"]["generated_tokens_per_s"]
        )
        print(f"continuous / static generated tok/s: {results['continuous_over_static_tokens_per_s']:.2f}")
    if "kill" not in args.skip and "continuous" in runs:
        results["kill"] = kill_case(args, common)
        print(f"kill -9: {json.dumps(results['kill'])}", flush=True)
    if "resume" not in args.skip:
        results["resume"] = resume_case(args, checkpoint)
        print(f"resume: {json.dumps(results['resume'])}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def kill_case(args, common: list[str]) -> dict:
    """kill -9 of the last rank at the step by which half of the requests had ended."""
    reference = os.path.join(args.dir, "continuous.h5")
    with h5py.File(reference, "r") as f:
        step = int(np.median(f["requests/finished_step"][:]))
    output = os.path.join(args.dir, "killed.h5")
    for stale in (output, output + ".tmp"):
        if os.path.exists(stale):
            os.remove(stale)
    outcome = run(
        args.ranks,
        common
        + [
            "run.batching=continuous",
            f"run.kill=[{{rank: {args.ranks - 1}, step: {step}, phase: between_steps}}]",
        ],
        output,
        args.timeout,
    )
    left = output + ".tmp"
    expected = completions(reference)
    kept = completions(left) if os.path.exists(left) else {}
    equal = sum(expected[i] == tokens for i, tokens in kept.items())
    return {
        "killed_at_step": step,
        "rc": outcome["rc"],
        "file_left": os.path.basename(left) if kept else None,
        "requests_kept": len(kept),
        "requests": len(expected),
        "kept_fraction": len(kept) / len(expected),
        "kept_equal_to_uninterrupted": equal,
    }


def text_prompts(directory: str, count: int) -> str:
    """count requests of the tiny corpus's lines, of 4 to 43 new tokens each, as a JSONL file in
    directory -> its path."""
    texts = [
        line.strip() for line in open(os.path.join(ROOT, "tests", "data", "tiny_corpus.txt")) if line.strip()
    ]
    jsonl = os.path.join(directory, "texts.jsonl")
    with open(jsonl, "w") as f:
        for i in range(count):
            f.write(
                json.dumps(
                    {"id": f"t{i}", "prompt": texts[i % len(texts)], "max_new_tokens": 4 + (i * 7) % 40}
                )
                + "\n"
            )
    return jsonl


def stopped_run(ranks: int, settings: list[str], stopped: str, directory: str, timeout: int) -> int:
    """`mpiexec -n RANKS hpcmoe run` stopped by SIGTERM to mpiexec a second after its file appears ->
    mpiexec's exit code."""
    command = [
        os.path.join(BIN, "mpiexec"),
        "-n",
        str(ranks),
        os.path.join(BIN, "hpcmoe"),
        "run",
        os.path.join(directory, "empty.yaml"),
        "--output",
        stopped,
        "--overwrite",
    ]
    for item in settings:
        command += ["--set", item]
    job = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    while not os.path.exists(stopped + ".tmp") and job.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)
    job.send_signal(15)  # SIGTERM, as scancel or a time limit sends it
    job.communicate(timeout=timeout)
    return job.returncode


def resume_case(args, checkpoint: str) -> dict:
    """A checkpoint run with text prompts, stopped by SIGTERM to mpiexec a second after its file
    appears, then resumed (greedy, sampled): equal to the uninterrupted run?"""
    jsonl = text_prompts(args.dir, args.resume_prompts)
    out = {}
    for name, extra in (("greedy", []), ("sampled", ["run.sampling={temperature: 0.8, top_k: 50, seed: 3}"])):
        settings = [
            f"model.checkpoint={checkpoint}",
            f"run.prompts={jsonl}",
            "run.max_batch=16",
            "run.prefill_chunk=64",
        ] + extra
        whole = os.path.join(args.dir, f"resume_{name}_whole.h5")
        stopped = os.path.join(args.dir, f"resume_{name}.h5")
        partial = stopped.replace(".h5", ".partial.h5")
        for stale in (stopped, partial, stopped + ".tmp"):
            if os.path.exists(stale):
                os.remove(stale)
        run(args.ranks, settings, whole, args.timeout)
        stopped_rc = stopped_run(args.ranks, settings, stopped, args.dir, args.timeout)
        second = (
            run(args.ranks, settings, stopped, args.timeout, resume=partial)
            if os.path.exists(partial)
            else None
        )
        with h5py.File(whole, "r") as a, h5py.File(stopped, "r") as b:
            same = bool(np.array_equal(a["generated"][:], b["generated"][:]))
            out[name] = {
                "stopped_rc": stopped_rc,
                "resumed_rc": second and second["rc"],
                "equal_to_uninterrupted": same,
                "requests": int(len(a["generated"])),
                "resumed_at_step": int(b.attrs.get("resumed_at_step", -1)),
                "steps": int(a["routing"].shape[0]),
            }
    return out


if __name__ == "__main__":
    sys.exit(main())
