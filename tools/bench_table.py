"""Render the JSON results of tools/bench_all.sh (docs/bench/*.json) as markdown tables."""

import glob
import json
import os
import sys

directory = sys.argv[1] if len(sys.argv) > 1 else "docs/bench"
results = [
    json.load(open(path)) | {"file": os.path.basename(path)}
    for path in sorted(glob.glob(f"{directory}/*.json"))
]
# projections etc. have their own docs
by_kind = lambda kind: [r for r in results if r.get("benchmark") == kind]


def header(*columns: str) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


for r in by_kind("control"):
    print(f"### control path ({r['file']}): {r['what']}\n")
    print(
        "| ranks | flat ms | two-stage stage 1 ms | per_layer exchange ms | per_source exchange ms |"
        "\n|---|---|---|---|---|"
    )
    for variant, m in r["median"].items():
        exchanges = " | ".join(
            f"{m[k]:.3f}" if k in m else "-" for k in ("per_layer_exchange_ms", "per_source_exchange_ms")
        )
        print(
            f"| {variant.split('_')[1]} | {m['flat_ms']:.3f} | {m['two_stage_stage1_ms']:.3f} | {exchanges} |"
        )
    print()

print("### dispatch + combine against raw Alltoallv (top-2; ours: per_layer, one collective each way)\n")
print(
    "| tokens per rank | ranks | hidden | dtype | ours ms | per_source ms | raw Alltoallv ms | ratio | "
    "per_source ratio | note |"
)
print("|---|---|---|---|---|---|---|---|---|---|")
for r in by_kind("dispatch"):
    ranks, hidden, dtype = r["file"][:-5].split("_")[-3:]
    tokens = r["what"].split(" tokens")[0].split()[-1]
    ours, raw = r["median"]["ours"]["seconds"], r["median"]["raw_alltoallv"]["seconds"]
    per_source = r["median"].get("ours_per_source", {}).get("seconds")
    print(
        f"| {tokens} | {ranks[1:]} | {hidden[1:]} | {dtype} | {1e3 * ours:.2f} | "
        f"{'-' if per_source is None else f'{1e3 * per_source:.2f}'} | {1e3 * raw:.2f} | {ours / raw:.2f} | "
        f"{'-' if per_source is None else f'{per_source / raw:.2f}'} | "
        f"{'oversubscribed' if r['oversubscribed'] else ''} |"
    )

for r in by_kind("scale"):
    print(f"\n### scale ({r['file']}): {r['what']}, {r['tokens']} new tokens, median of {r['reps']}\n")
    print("| ranks | TTFT ms | TPOT ms | idle fraction | peak RSS GiB (max / mean) | tokens equal 1 rank |")
    print("|---|---|---|---|---|---|")
    for variant, m in r["median"].items():
        print(
            f"| {variant.split('_')[1]} | {m['ttft_ms']:.1f} | {m['tpot_ms']:.1f} | {m['idle_fraction']:.3f} "
            f"| {m['peak_rss_gib_max']:.3f} / {m['peak_rss_gib_mean']:.3f} "
            f"| {r['equal_to_one_rank'][variant]} |"
        )
    print("\nTPOT ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in r["tpot_ratio"].items()))

for r in by_kind("batching"):
    print(f"\n### batching ({r['file']}): `{r['command']}`\n")
    print(
        "| batching | generated tok/s | run s | steps | TTFT ms | peak RSS MiB | estimate MiB "
        "| peak / estimate |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind, m in r["runs"].items():
        print(
            f"| {kind} | {m['generated_tokens_per_s']:.0f} | {m['total_s']:.1f} | {m['steps']} | "
            f"{m['ttft_ms']:.0f} | {m['peak_rss_bytes_max'] / 2**20:.0f} | "
            f"{m['estimate_bytes'] / 2**20:.0f} | {m['peak_over_estimate']:.2f} |"
        )
    if "continuous_over_static_tokens_per_s" in r:
        print(f"\ncontinuous / static generated tokens/s: {r['continuous_over_static_tokens_per_s']:.2f}")
    if "kill" in r:
        k = r["kill"]
        print(
            f"kill -9 at step {k['killed_at_step']}: {k['requests_kept']} of {k['requests']} requests kept "
            f"({k['kept_fraction']:.0%}), {k['kept_equal_to_uninterrupted']} equal to the uninterrupted run"
        )
    for name, v in r.get("resume", {}).items():
        print(
            f"resume after SIGTERM, {name}: resumed at step {v['resumed_at_step']} of {v['steps']}, "
            f"equal to the uninterrupted run: {v['equal_to_uninterrupted']}"
        )

for r in by_kind("reduce"):
    print(f"\n### reduce ({r['file']}): {r['what']}\n")
    print("| variant | ms | inter-node bytes per rank | ms / leader_sum |\n|---|---|---|---|")
    for variant, m in r["median"].items():
        nbytes = m.get("internode_bytes_per_rank")
        print(
            f"| {variant} | {1e3 * m['seconds']:.2f} | "
            f"{'n/a (real MPI)' if nbytes is None else f'{nbytes:.3g}'} | "
            f"{r['ratio_to_leader_sum'][variant]['seconds']:.2f} |"
        )

for r in by_kind("predict"):
    print(
        f"\n### predict ({r['file']}): `{r['command']}`; trained on {r['train_runs']} runs, scored on "
        f"{r['unseen_runs']} unseen runs (other batch and prompt length, and 8 ranks)\n"
    )
    print("| target | predictor error | roofline error |\n|---|---|---|")
    for i, target in enumerate(r["targets"]):
        e = r["error_on_unseen_runs"]
        print(f"| {target} | {e['predictor'][i]:.3f} | {e['roofline'][i]:.3f} |")
    print(
        "\n| ranks | proposed | its TPOT ms | best measured | its TPOT ms | proposed / best "
        "| every split's TPOT ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for ranks, p in r["proposals"].items():
        t = p["measured_tpot_ms"]
        print(
            f"| {ranks} | {p['proposed']} | {t[p['proposed']]:.1f} | {p['best']} | {t[p['best']]:.1f} | "
            f"{p['proposed_over_best']:.2f} | "
            + ", ".join(f"{k} {v:.0f}" for k, v in sorted(t.items()))
            + " |"
        )

for r in by_kind("fault_tolerance"):
    layout = r.get("layout", "ep")
    print(
        f"\n### fault tolerance ({r['file']}): "
        f"`python tools/bench_ft.py --layout {layout} --ranks {r['ranks']}`, median of {r['reps']}\n"
    )
    print("| run.fault_tolerance | tokens/s | TPOT ms | TTFT ms |\n|---|---|---|---|")
    for variant, m in r["median"].items():
        print(f"| {variant} | {m['tps']:.0f} | {m['tpot_ms']:.1f} | {m['ttft_ms']:.1f} |")
    print(
        f"\ntokens/s on / off: {r['tps_on_over_off']:.3f}; recovery (detection to its step done again) "
        f"after a SIGKILL at {len(r['recoveries'])} seeded points: "
        f"median {r['recovery_ms_median']:.0f} ms, max {r['recovery_ms_max']:.0f} ms; "
        f"same tokens in {sum(x['same_tokens'] for x in r['recoveries'])} of {len(r['recoveries'])}"
    )
    if "recovery_from_kill_ms_median" in r:  # measured from the kill since [4/7]
        print(
            f"recovery from the kill (the victim's last line) to its step done again: median "
            f"{r['recovery_from_kill_ms_median']:.0f} ms, max {r['recovery_from_kill_ms_max']:.0f} ms; "
            f"of it, detection: median {r['detection_ms_median']:.0f} ms, max {r['detection_ms_max']:.0f} ms "
            f"(phases {', '.join(sorted({x['phase'] for x in r['recoveries']}))})"
        )

keys = [
    "ttft_ms",
    "tpot_ms",
    "tps",
    "wire_hidden",
    "wire_hidden_raw",
    "ttft_nolink_ms",
    "best_nolink_ms",
    "wire_ms",
    "idle_fraction",
    "busy_fraction",
    "rank_load_max_over_mean",
    "rank_load_max_over_mean_per_step",
    "switches",
    "moved_mib",
    "moving_tps_ratio",
    "internode_bytes",
    "attention_compute_ms",
    "expert_compute_ms",
    "busy_fraction_attention",
    "busy_fraction_moe",
    "experts_ms_per_layer",
    "weight_read_ms_per_layer",
]
for r in results:
    if r.get("benchmark") in (
        None,
        "dispatch",
        "transformers",
        "reduce",
        "control",
        "scale",
        "predict",
        "fault_tolerance",
        "experts",
        "batching",
        "memory",
        "split",
    ):
        continue
    shown = [k for k in keys if any(k in m for m in r["median"].values())]
    print(f"\n### {r['benchmark']} ({r['file']}): {r['what']}\n")
    print(
        f"{r['ranks']} ranks{' (oversubscribed)' if r['oversubscribed'] else ''}, config `{r['config']}` "
        f"{' '.join('--set ' + s for s in r['settings'])}, median of {r['reps']}; goal: {r['goal']}\n"
    )
    print("| variant | " + " | ".join(shown) + " |")
    print("|---|" + "---|" * len(shown))
    for variant, medians in r["median"].items():
        spread = r.get("spread", {}).get(variant, {})  # [min, max] over the reps (newer files, some keys)
        print(
            f"| {variant} | "
            + " | ".join(
                f"{medians.get(k, float('nan')):.4g}"
                + (f" ({spread[k][0]:.3g} to {spread[k][1]:.3g})" if k in spread else "")
                for k in shown
            )
            + " |"
        )
    if "wire_hidden" in shown and "best_nolink_ms" not in shown:
        print("\n(an older file: wire_hidden against each variant's own no-link run, unclamped)")
    ratios = next(v for k, v in r.items() if k.startswith("ratio_to_"))
    last = list(ratios)[-1]
    print(
        f"\nratio {last} / {list(ratios)[0]}: "
        + ", ".join(f"{k} {ratios[last][k]:.3f}" for k in shown if k in ratios[last])
    )

for r in by_kind("transformers"):
    print(f"\n### transformers ({r['file']}): {r['what']}\n")
    print("| variant | prefill tokens/s | decode tokens/s |\n|---|---|---|")
    for variant, m in r["median"].items():
        print(f"| {variant} | {m['prefill_tokens_per_s']:.0f} | {m['decode_tokens_per_s']:.0f} |")
    ratio = r["ratio_to_transformers"]["hpcmoe"]
    print(
        f"\nratio hpcmoe / transformers: prefill {ratio['prefill_tokens_per_s']:.2f}, "
        f"decode {ratio['decode_tokens_per_s']:.2f}"
    )

for r in by_kind("experts"):  # tools/gpu_check.sh: docs/bench/gpu/experts.json
    print(f"\n### experts ({r['file']}) on {r['device']}: {r['what']}, median of {r['reps']}\n")
    print("| figure | value |\n|---|---|")
    for key, value in r["derived"].items():
        print(f"| {key} | {value:.3f} |")
    print(f"\ngoal: {r['goal']}")

for r in by_kind("memory"):
    print(f"\n### memory ({r['file']}): {r['what']}: `python tools/bench_memory.py`\n")
    header(
        "input",
        "ranks",
        "peak MiB (largest rank)",
        "estimate MiB (largest rank)",
        "peak / estimate, min to max",
    )
    for name, m in r["runs"].items():
        print(
            f"| {name} | {m['ranks']} | {max(m['peak_mib']):.0f} | {max(m['estimate_mib']):.0f} | "
            f"{m['peak_over_estimate_min']:.2f} to {m['peak_over_estimate_max']:.2f} |"
        )
    worst = max(m["peak_over_estimate_max"] for m in r["runs"].values())
    print(f"\nworst peak / estimate {worst:.3f} (goal <= {r['goal_peak_over_estimate']})")

for r in by_kind("split"):
    print(
        f"\n### split ({r['file']}): {r['what']}: `python tools/bench_split.py`, faster of {r['reps']} runs\n"
    )
    choosers = [name for name in ("simulator", "predictor") if name in next(iter(r["ranks"].values()))]
    header("ranks", "measured TPOT ms per split", "best", *(f"{c} chose (x best)" for c in choosers))
    for ranks, row in r["ranks"].items():
        measured = ", ".join(f"{split} {ms:.1f}" for split, ms in row["measured_tpot_ms"].items())
        chose = " | ".join(f"{row[c]['chosen']} ({row[c]['chosen_over_best']:.3f})" for c in choosers)
        print(f"| {ranks} | {measured} | {row['best']} | {chose} |")
    print(
        "\nworst chosen / best: "
        + ", ".join(f"{k} {v:.3f}" for k, v in r["worst"].items())
        + f" (goal <= {r['goal_chosen_over_best']})"
    )
