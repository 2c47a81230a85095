"""FP8 routed experts (DeepSeek-V3 block scales) against float32 and bfloat16 on the same shapes, one process.

    python tools/bench_fp8.py [--threads 1] [--reps 5] [--bf16] [--model] [--out docs/bench/fp8_decode.json]
    python tools/bench_fp8.py --shapes h1024_i4096 --rows 1 32 --chunks 65536 524288 2097152  # the chunk

One expert (hpcmoe.model.mlp.MLP) per shape, its weights block-quantized once ([128, 128] as
DeepSeek-V3 ships; [16, 16] as tests/test_fp8.py for the debug shape), the float32 twin holds exactly
those weights dequantized (bfloat16: the twin rounded). Calls
of 1..32 rows (decode) and 512 rows (prefill) of each variant run interleaved, the order rotating
each repetition; a repetition runs every expert of a pool whose weights exceed the caches several
times over (--cold-mib per variant), so weights come from memory as in a whole model; medians.
Variants: float32 and bfloat16 (the fused gate/up path), fp8 (hpcmoe/model/fp8.py, float32 compute),
fp8_before (the previous code: each projection dequantized whole into a fresh float32 tensor) and
with --bf16 fp8_bf16 (hpcmoe/model/fp8.py in bfloat16 compute, against bfloat16). Each fp8 variant's
output is checked against its twin's (bitwise, or the largest difference).

--model also runs whole 1-rank jobs (`mpiexec -n 1 python -m hpcmoe run`, batch 4, prompt 32,
parallel.threads = --threads) on
docs/PERFORMANCE.md's DeepSeek-V3-shaped FP8 checkpoint (tools/make_tiny_checkpoint.py, blocks of
128 x 128; --model-set to change it) and on its dequantized twin (float32), interleaved, and
reports the median TPOT of each and whether the generated tokens are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from make_tiny_checkpoint import block_quantize  # noqa: E402

from hpcmoe.model import fp8  # noqa: E402
from hpcmoe.model.fp8 import dequantize  # noqa: E402
from hpcmoe.model.mlp import MLP  # noqa: E402

SHAPES = {  # name -> (hidden, expert_hidden, FP8 block)
    "debug": (64, 128, [16, 16]),  # inputs/debug.yaml (preset debug), the tests' block
    "h1024_i4096": (1024, 4096, [128, 128]),
    "deepseek_v3_small": (7168, 2048, [128, 128]),  # inputs/deepseek_v3_small.yaml (DeepSeek-V3's expert)
}
BLOCK = [128, 128]  # the whole-model checkpoint's
MAX_EXPERTS = 64


def fp8_before(mlp: MLP, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """MLP.forward's FP8 branch before hpcmoe/model/fp8.py: three whole dequantized copies per call."""
    act = F.silu(F.linear(x, mlp.dequantized(mlp.gate_proj, x.dtype))) * F.linear(
        x, mlp.dequantized(mlp.up_proj, x.dtype)
    )
    return torch.mm(act, mlp.dequantized(mlp.down_proj, x.dtype).t(), out=out)


def make_expert(hidden: int, inner: int, seed: int, block: list[int] = BLOCK) -> tuple[MLP, MLP, MLP]:
    """-> (FP8 expert, float32 twin with its dequantized weights, bfloat16 twin)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        quantized, twin, half = MLP(hidden, inner), MLP(hidden, inner), MLP(hidden, inner)
    quantized.keep_fp8(block)
    quantized.allocate_fp8("cpu")
    twin.allocate(torch.empty(2 * inner, hidden), torch.empty(hidden, inner))
    half.allocate(
        torch.empty(2 * inner, hidden, dtype=torch.bfloat16), torch.empty(hidden, inner, dtype=torch.bfloat16)
    )
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            q, t, h = (getattr(m, name) for m in (quantized, twin, half))
            rows, columns = q.weight.shape
            weight, scale = block_quantize(
                torch.randn(rows, columns, generator=generator) * columns**-0.5, block
            )
            q.weight.copy_(weight)
            q.weight_scale_inv.copy_(scale)
            t.weight.copy_(dequantize(weight, scale, block))
            h.weight.copy_(t.weight)
    return quantized, twin, half


def expert_bytes(hidden: int, inner: int, itemsize: float) -> float:
    return 3 * hidden * inner * itemsize


def variant_calls(x32, x16, out32, out16, args) -> dict:
    """variant -> fn(expert) on these rows [rows, hidden] (float32, bfloat16) into out32 or out16:
    float32, bfloat16, fp8_before, fp8 (fp8_c<chunk> for each --chunks value when several) and with
    --bf16 fp8_bf16. An expert is make_expert's (FP8, float32 twin, bfloat16 twin)."""
    variants = {
        "float32": lambda e: e[1](x32, out=out32),
        "bfloat16": lambda e: e[2](x16, out=out16),
        "fp8_before": lambda e: fp8_before(e[0], x32, out32),
    }
    for chunk in args.chunks:
        variants["fp8" if len(args.chunks) == 1 else f"fp8_c{chunk}"] = (
            lambda c: lambda e: (setattr(fp8, "CHUNK_ELEMENTS", c), e[0](x32, out=out32))
        )(chunk)
    fp8.CHUNK_ELEMENTS = args.chunks[0]
    if args.bf16:
        variants["fp8_bf16"] = lambda e: e[0](x16, out=out16)  # bfloat16 compute: against bfloat16
    return variants


def output_checks(variants: dict, expert, x32, x16, out32, out16) -> dict:
    """Each fp8 variant's output on one expert against its twin's: bitwise equal, largest difference."""
    references = {torch.float32: expert[1](x32), torch.bfloat16: expert[2](x16)}
    checks = {}
    for variant in [v for v in variants if v.startswith("fp8")]:
        out = out16 if variant == "fp8_bf16" else out32
        variants[variant](expert)
        reference = references[out.dtype]
        checks[variant] = dict(
            bitwise_equal=bool(torch.equal(out, reference)),
            max_abs_diff=float((out.float() - reference.float()).abs().max()),
        )
    return checks


def interleaved_ms(variants: dict, pool: list, reps: int) -> dict[str, float]:
    """Median milliseconds per expert call of each variant over the pool, the variants' order rotating
    each repetition (the first warms up)."""
    times = {v: [] for v in variants}
    order = list(variants)
    for rep in range(reps + 1):  # the first round warms up
        for variant in order[rep % len(order) :] + order[: rep % len(order)]:
            start = time.perf_counter()
            for expert in pool:
                variants[variant](expert)
            if rep:
                times[variant].append((time.perf_counter() - start) / len(pool) * 1e3)
    return {v: statistics.median(t) for v, t in times.items()}


def print_row(name: str, rows: int, result: dict) -> None:
    ms, checks = result["ms"], result["checks"]
    ratios = " ".join(f"{v}/fp32={r:.2f}" for v, r in result["ratio_to_float32"].items())
    if "fp8_bf16" in ms:
        ratios += f" fp8_bf16/bf16={result['ratio_fp8_bf16_to_bfloat16']:.2f}"
    print(
        f"{name:18s} rows {rows:4d} | "
        + " ".join(f"{v} {t:8.3f}" for v, t in ms.items())
        + f" ms | {ratios}"
        + " | "
        + " ".join(
            f"{v}: {'bitwise' if c['bitwise_equal'] else c['max_abs_diff']}" for v, c in checks.items()
        ),
        flush=True,
    )


def bench_shape(name: str, rows_list: list[int], args) -> list[dict]:
    hidden, inner, block = SHAPES[name]
    count = min(MAX_EXPERTS, max(1, -(-args.cold_mib * 2**20 // int(expert_bytes(hidden, inner, 1)))))
    experts = [make_expert(hidden, inner, seed, block) for seed in range(count)]
    results = []
    for rows in rows_list:
        pool = experts if rows <= 32 else experts[:1]  # prefill is compute-bound: one expert
        generator = torch.Generator().manual_seed(rows)
        x32 = torch.randn(rows, hidden, generator=generator)
        x16 = x32.bfloat16()
        out32, out16 = torch.empty(rows, hidden), torch.empty(rows, hidden, dtype=torch.bfloat16)
        variants = variant_calls(x32, x16, out32, out16, args)
        checks = output_checks(variants, pool[0], x32, x16, out32, out16)
        reps = args.reps if rows <= 32 else max(3, args.reps // 2)
        ms = interleaved_ms(variants, pool, reps)
        result = dict(
            shape=name,
            hidden=hidden,
            expert_hidden=inner,
            fp8_block=block,
            rows=rows,
            experts=len(pool),
            reps=reps,
            ms=ms,
            checks=checks,
            ratio_to_float32={v: ms[v] / ms["float32"] for v in ms if v not in ("float32", "fp8_bf16")},
        )
        if "fp8_bf16" in ms:
            result["ratio_fp8_bf16_to_bfloat16"] = ms["fp8_bf16"] / ms["bfloat16"]
        results.append(result)
        print_row(name, rows, result)
    return results


# ---------------------------------------------------------------- whole 1-rank jobs


def write_dequantized(directory: str, twin: str) -> None:
    """The checkpoint with every FP8 weight times its block scales, in float32, without
    quantization_config."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    block = config.pop("quantization_config")["weight_block_size"]
    weights = {
        name: (
            dequantize(t, tensors[name + "_scale_inv"], block)
            if t.dtype == torch.float8_e4m3fn
            else t.float()
        )
        for name, t in tensors.items()
        if not name.endswith("_scale_inv")
    }
    os.makedirs(twin, exist_ok=True)
    with open(os.path.join(twin, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(weights, os.path.join(twin, "model.safetensors"), metadata={"format": "pt"})


# docs/PERFORMANCE.md's FP8 checkpoint (second wave [5/8]): DeepSeek-V3-shaped, 32 experts 1024 wide
MODEL = dict(
    hidden_size=512,
    moe_intermediate_size=1024,
    intermediate_size=2048,
    n_routed_experts=32,
    num_hidden_layers=4,
    q_lora_rank=128,
    kv_lora_rank=128,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    v_head_dim=32,
    n_group=4,
    topk_group=2,
)


def write_job_config(path: str, checkpoint: str, prompts: list[list[int]], args) -> None:
    """A 1-rank job's config on the checkpoint: the prompts, --model-steps new tokens each (all of
    them) and --threads threads."""
    with open(path, "w") as f:
        json.dump(
            {
                "model": {"checkpoint": checkpoint},
                "parallel": {"threads": args.threads},  # else the rank takes every core
                "run": {
                    "prompt_ids": prompts,
                    "max_new_tokens": args.model_steps,
                    "stop_at_eos": False,
                },
            },
            f,
        )


def job_command(mpiexec: str, config: str, output: str) -> list[str]:
    """`mpiexec -n 1 python -m hpcmoe run CONFIG --output OUTPUT --overwrite`, under a 600 s timeout."""
    run = [sys.executable, "-m", "hpcmoe", "run", config, "--output", output, "--overwrite"]
    return ["timeout", "600", mpiexec, "-n", "1"] + run


def model_summary(args, shape: dict, runs: dict, generated: dict) -> dict:
    """The whole-model comparison from each kind's TPOT samples and last generated tokens; printed."""
    tpot = {k: statistics.median(v) for k, v in runs.items()}
    summary = dict(
        checkpoint=dict(family="deepseek_v3", fp8_block=BLOCK, **shape),
        threads=args.threads,
        batch=args.model_batch,
        prompt_len=32,
        new_tokens=args.model_steps,
        reps=args.model_reps,
        tpot_ms=tpot,
        tpot_samples_ms=runs,
        ratio_fp8_to_float32=tpot["fp8"] / tpot["float32"],
        tokens_equal=bool((generated["fp8"] == generated["float32"]).all()),
    )
    print(
        f"whole model, 1 rank, {args.threads} thread(s) (batch {args.model_batch}, prompt 32, "
        f"{args.model_steps} new tokens): "
        f"TPOT fp8 {tpot['fp8']:.2f} ms, float32 {tpot['float32']:.2f} ms, "
        f"ratio {summary['ratio_fp8_to_float32']:.2f}, tokens equal: {summary['tokens_equal']}",
        flush=True,
    )
    return summary


def whole_model(args) -> dict:
    import h5py
    import yaml
    from make_tiny_checkpoint import make, quantize_fp8

    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if not mpiexec:
        return {"skipped": "no mpiexec"}
    work = tempfile.mkdtemp(prefix="hpcmoe-bench-fp8-")
    try:
        shape = {
            **MODEL,
            **{k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.model_set)},
        }
        quantized, twin = os.path.join(work, "fp8"), os.path.join(work, "float32")
        make("deepseek_v3", quantized, **shape)
        quantize_fp8(quantized, BLOCK)
        write_dequantized(quantized, twin)
        prompts = [[(7 * i + 3 * j) % 250 + 3 for j in range(32)] for i in range(args.model_batch)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ROOT}
        runs = {"fp8": [], "float32": []}
        generated = {}
        for rep in range(args.model_reps):
            for kind in ("fp8", "float32") if rep % 2 == 0 else ("float32", "fp8"):
                config, output = os.path.join(work, f"{kind}.yaml"), os.path.join(work, f"{kind}.h5")
                write_job_config(config, quantized if kind == "fp8" else twin, prompts, args)
                command = job_command(mpiexec, config, output)
                result = subprocess.run(command, capture_output=True, text=True, env=env)
                if result.returncode != 0:
                    return {"failed": " ".join(command), "stderr": result.stderr[-2000:]}
                with h5py.File(output, "r") as f:
                    runs[kind].append(float(f["metrics"].attrs["tpot_ms"]))
                    generated[kind] = f["generated"][:]
        return model_summary(args, shape, runs, generated)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        nargs="*",
        default=list(SHAPES),
        choices=list(SHAPES),
        help="expert shapes (none: only --model)",
    )
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 32, 512])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--cold-mib", type=int, default=96, help="each variant's weights per repetition, at least"
    )
    parser.add_argument(
        "--chunks",
        nargs="+",
        type=int,
        default=[fp8.CHUNK_ELEMENTS],
        help="fp8.CHUNK_ELEMENTS values to compare (one: the variant is called fp8)",
    )
    parser.add_argument("--bf16", action="store_true", help="also FP8 experts in bfloat16 compute (fp8_bf16)")
    parser.add_argument(
        "--model", action="store_true", help="also whole 1-rank jobs: FP8 checkpoint vs its twin"
    )
    parser.add_argument(
        "--model-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the whole-model checkpoint's transformers config",
    )
    parser.add_argument("--model-batch", type=int, default=4)
    parser.add_argument("--model-steps", type=int, default=16)
    parser.add_argument("--model-reps", type=int, default=6)
    parser.add_argument("--out", help="JSON file for the results (e.g. docs/bench/fp8_decode.json)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    default_chunk = fp8.CHUNK_ELEMENTS
    results = []
    for name in args.shapes:
        results += bench_shape(name, args.rows, args)
    fp8.CHUNK_ELEMENTS = default_chunk
    report = dict(
        command=" ".join(
            [os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT) else "python"]
            + sys.argv
        ),
        torch=torch.__version__,
        threads=args.threads,
        cpu=platform.processor() or platform.machine(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        chunk_elements=default_chunk,
        results=results,
    )
    if args.model:
        report["whole_model"] = whole_model(args)
    report["load_average"] = dict(before=load_before, after=os.getloadavg())  # other work on this box
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
