"""Render the JSON results of tools/bench_all.sh (docs/bench/*.json) as markdown tables."""
import glob
import json
import os
import sys

directory = sys.argv[1] if len(sys.argv) > 1 else "docs/bench"
results = [json.load(open(path)) | {"file": os.path.basename(path)} for path in sorted(glob.glob(f"{directory}/*.json"))]

print("### dispatch + combine against raw Alltoallv (1024 tokens per rank, top-2)\n")
print("| ranks | hidden | dtype | ours ms | raw Alltoallv ms | ratio | note |")
print("|---|---|---|---|---|---|---|")
for r in results:
    if r["benchmark"] == "dispatch":
        _, ranks, hidden, dtype = r["file"][:-5].split("_")
        ours, raw = r["median"]["ours"]["seconds"], r["median"]["raw_alltoallv"]["seconds"]
        print(f"| {ranks[1:]} | {hidden[1:]} | {dtype} | {1e3 * ours:.2f} | {1e3 * raw:.2f} | {ours / raw:.2f} | "
              f"{'oversubscribed' if r['oversubscribed'] else ''} |")

keys = ["ttft_ms", "tpot_ms", "tps", "wire_hidden", "ttft_nolink_ms", "wire_ms", "idle_fraction", "busy_fraction",
        "rank_load_max_over_mean", "internode_bytes", "attention_compute_ms", "expert_compute_ms",
        "busy_fraction_attention", "busy_fraction_moe"]
for r in results:
    if r["benchmark"] == "reduce":
        flat, hierarchical = (r["median"][v]["seconds"] for v in ("flat_allreduce", "hierarchical"))
        print(f"\n### reduce: {r['what']}\n")
        print(f"flat Allreduce {1e3 * flat:.2f} ms, hierarchical point-to-point sum {1e3 * hierarchical:.2f} ms "
              f"(ratio {hierarchical / flat:.2f}{', oversubscribed' if r['oversubscribed'] else ''})")

for r in results:
    if r["benchmark"] in ("dispatch", "transformers", "reduce"):
        continue
    print(f"\n### {r['benchmark']} ({r['file']}): {r['what']}\n")
    print(f"{r['ranks']} ranks{' (oversubscribed)' if r['oversubscribed'] else ''}, config `{r['config']}` "
          f"{' '.join('--set ' + s for s in r['settings'])}, median of {r['reps']}; goal: {r['goal']}\n")
    print("| variant | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for variant, medians in r["median"].items():
        print(f"| {variant} | " + " | ".join(f"{medians.get(k, float('nan')):.4g}" for k in keys) + " |")
    ratios = next(v for k, v in r.items() if k.startswith("ratio_to_"))
    last = list(ratios)[-1]
    print(f"\nratio {last} / {list(ratios)[0]}: " + ", ".join(f"{k} {ratios[last][k]:.3f}" for k in keys if k in ratios[last]))

for r in results:
    if r["benchmark"] == "transformers":
        print(f"\n### transformers: {r['what']}\n")
        print("| variant | prefill tokens/s | decode tokens/s |\n|---|---|---|")
        for variant, m in r["median"].items():
            print(f"| {variant} | {m['prefill_tokens_per_s']:.0f} | {m['decode_tokens_per_s']:.0f} |")
        ratio = r["ratio_to_transformers"]["hpcmoe"]
        print(f"\nratio hpcmoe / transformers: prefill {ratio['prefill_tokens_per_s']:.2f}, "
              f"decode {ratio['decode_tokens_per_s']:.2f}")
