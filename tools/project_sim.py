"""Projections of the seeds' clusters with `hpcmoe simulate`, beside the published figures.

(a) DeepSeek-V3 (full published shape) on H100 SXM, bfloat16 and FP8 experts (model.fp8_block, as
    an FP8 checkpoint runs: dequantized per call), EP 16 to 256 with 32 requests per GPU; one expert
    per GPU against packed (8 per GPU) at EP 256; scaling efficiency 16 -> 256 in tokens/s per GPU.
(b) The MA paper's model on 16 A100 (4 nodes x 4): 12 attention : 4 MoE ranks against co-located
    (ep, one expert per rank), and every A:M split; the paper: TPOT 1.82 vs 2.76 ms, 13,289 vs 8,696 tokens/s.
(c) DeepSeek's decode deployment: EP 144 on 18 H800 nodes, 2 expert slots per GPU (256 experts +
    32 redundant), FP8 experts; published: about 14.8k output tokens/s per node.
Every point is steady decode (`simulate(..., context=C)`: no prefill, every request over C cached
positions), one rank per GPU waiting by spinning (parallel.wait=spin), and is simulated three
ways, each the engine's own schedule on a machine file, to say which cost explains a gap: the
engine as it is (parallel.expert_schedule auto: in decode each rank runs its experts once per
layer on every source's rows, [1/7]); the engine with every host cost (machine fixed_us) at zero;
the engine's other schedule (parallel.expert_schedule=per_source: experts once per source as its
rows arrive, the schedule before [1/7]).

    python tools/project_sim.py [--out docs/bench/projections.json] [--only a b c]
    python tools/project_sim.py --only a --ep 16 256 --dtype bfloat16 --ways engine per_source --no-packed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hpcmoe.config import load_config  # noqa: E402
from hpcmoe.sim.machine import PHASES, machine_from  # noqa: E402
from hpcmoe.sim.simulate import simulate  # noqa: E402

ON_GPUS = [
    "parallel.wait=spin",
    "run.prompt_len=1",
    "run.prompt_len_min=1",
    "run.max_new_tokens=3",
    "output.save_logits=false",
]
V3 = ["model={preset: deepseek-v3}"] + ON_GPUS
CODE = "3"  # bump when the simulator changes: stored points of another version are not reused
FP8 = ["model.fp8_block=[128, 128]"]


def machine(name: str, **changes):
    """A shipped machine file, with figures changed (dotted names) -> Machine."""
    with open(os.path.join(ROOT, "machines", f"{name}.yaml")) as f:
        raw = yaml.safe_load(f)
    for dotted, value in changes.items():
        node, parts = raw, dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return machine_from(raw, name)


def without_host_costs(name: str, **changes):
    return machine(name, **changes, **{f"fixed_us.{phase}": 0.0 for phase in PHASES})


# way -> settings
WAYS = {
    "engine": [],
    "no_host_costs": [],
    "per_source": ["parallel.expert_schedule=per_source"],
}
# (a)
SWEEP = {
    "ep": (16, 32, 64, 128, 256),
    "dtype": ("bfloat16", "fp8"),
    "ways": tuple(WAYS),
    "packed": True,
}


DONE: dict = {}  # points already simulated (this file's "points"): a rerun goes on where it stopped


def point(
    settings: list[str], ranks: int, machine_name: str, context: int, ways=tuple(WAYS), **changes
) -> dict:
    """One configuration, each of `ways` -> its numbers (simulations are deterministic: a point
    done with the same code, machine file and settings is taken from DONE)."""
    with open(os.path.join(ROOT, "machines", f"{machine_name}.yaml"), "rb") as f:
        key = json.dumps(
            [
                settings,
                ranks,
                machine_name,
                context,
                changes,
                list(ways),
                hashlib.sha256(f.read()).hexdigest(),
                CODE,
            ]
        )
    if key in DONE:
        return DONE[key]
    row = {
        "settings": settings,
        "ranks": ranks,
        "machine": machine_name,
        "context": context,
        "changes": changes,
    }
    started = time.perf_counter()
    for way in ways:
        config = load_config(os.path.join(ROOT, "inputs", "debug.yaml"), settings + WAYS[way])
        chosen = (without_host_costs if way == "no_host_costs" else machine)(machine_name, **changes)
        metrics = simulate(config, chosen, ranks, context=context)
        row[way] = {
            "tpot_ms": float(metrics["tpot_ms"]),
            "decode_tokens_per_s": float(metrics["decode_tokens_per_s"]),
            "tokens_per_s_per_gpu": float(metrics["decode_tokens_per_s"]) / ranks,
            "busy_fraction": float(metrics["busy_fraction"]),
            "idle_fraction": float(metrics["idle_fraction"]),
        }
        row["fits_memory"] = bool(metrics["fits_machine_memory"])
        row["planned_gib_per_rank"] = metrics["planned_max_rank_bytes"] / 2**30
    row["simulation_s"] = time.perf_counter() - started
    e = row[ways[0]]
    print(
        f"  {ranks:4d} ranks {' '.join(s for s in settings if s not in V3)[:70]:<70} TPOT "
        f"{e['tpot_ms']:9.2f} ms, {e['tokens_per_s_per_gpu']:8.1f} tok/s/GPU ("
        + ", ".join(f"{way} {row[way]['tpot_ms']:.2f}" for way in ways[1:])
        + f" ms) [{row['simulation_s']:.0f} s]",
        flush=True,
    )
    DONE[key] = row
    save()
    return row


OUT = os.path.join(ROOT, "docs", "bench", "projections.json")


def save(section: str = None, value=None) -> None:
    """Update this run's points (and a finished section) in OUT, keeping what other runs wrote there."""
    result = {}
    if os.path.exists(OUT):
        with open(OUT) as f:
            result = json.load(f)
    result.setdefault("points", {}).update(DONE)
    if section is not None:
        result[section] = value
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(OUT + ".tmp", OUT)


def deepseek_on_h100() -> dict:
    """(a): bf16 and FP8 experts, EP 16..256, 32 requests per GPU at context 2048; packed 8 per GPU at 256."""
    rows = []
    for dtype, extra, ways in (("bfloat16", [], tuple(WAYS)), ("fp8", FP8, ("engine", "no_host_costs"))):
        if dtype not in SWEEP["dtype"]:
            continue
        ways = tuple(way for way in ways if way in SWEEP["ways"])
        for ep in SWEEP["ep"]:
            rows.append(
                {
                    "dtype": dtype,
                    "ep": ep,
                    "placement": "auto (E/EP per GPU)",
                    **point(
                        V3 + extra + [f"run.batch={32 * ep}", "parallel.ranks_per_node=8"],
                        ep,
                        "h100_sxm",
                        2048,
                        ways,
                    ),
                }
            )
        # a placement against another: the engine's schedule only (per_source here takes 20 min)
        if SWEEP["packed"]:
            rows.append(
                {
                    "dtype": dtype,
                    "ep": 256,
                    "placement": "packed 8 per GPU",
                    **point(
                        V3
                        + extra
                        + [
                            f"run.batch={32 * 256}",
                            "parallel.ranks_per_node=8",
                            "parallel.placement=packed",
                            "parallel.experts_per_rank=8",
                        ],
                        256,
                        "h100_sxm",
                        2048,
                        tuple(way for way in ways if way != "per_source"),
                    ),
                }
            )
    efficiency = {}
    for dtype in SWEEP["dtype"]:
        per_gpu = {
            r["ep"]: r["engine"]["tokens_per_s_per_gpu"]
            for r in rows
            if r["dtype"] == dtype and r["placement"].startswith("auto")
        }
        efficiency[dtype] = per_gpu[256] / per_gpu[16]
    return {"rows": rows, "scaling_efficiency_16_to_256": efficiency}


def ma_paper_on_a100() -> dict:
    """(b): 16 A100 in 4 nodes of 4, 24 requests (the paper's TPS x TPOT), context 2048: every A:M
    split and co-located ep; also with one 200 Gbit/s NIC per node shared by its 4 GPUs, and with two
    micro-batches (attention of one overlapping the experts of the other)."""
    base = ["model={preset: ma-paper}", "run.batch=24", "parallel.ranks_per_node=4"] + ON_GPUS
    rows = []
    for nic, changes in (
        ("HDR 200 Gbit/s per GPU", {}),
        ("HDR 200 Gbit/s per node", {"inter_node.gb_per_s": 6.25}),
    ):
        rows.append(
            {"layout": "ep (co-located)", "nic": nic, **point(base, 16, "a100_80gb", 2048, **changes)}
        )
        for attention in range(4, 16, 2) if not changes else (12,):
            rows.append(
                {
                    "layout": f"ma {attention}:{16 - attention}",
                    "nic": nic,
                    **point(
                        base
                        + [
                            "parallel.layout=ma",
                            f"parallel.attention_ranks={attention}",
                            f"parallel.moe_ranks={16 - attention}",
                        ],
                        16,
                        "a100_80gb",
                        2048,
                        **changes,
                    ),
                }
            )
    for layout, extra in (
        ("ep (co-located), 2 micro-batches", []),
        (
            "ma 12:4, 2 micro-batches",
            ["parallel.layout=ma", "parallel.attention_ranks=12", "parallel.moe_ranks=4"],
        ),
    ):
        rows.append(
            {
                "layout": layout,
                "nic": "HDR 200 Gbit/s per GPU",
                **point(base + extra + ["run.micro_batches=2"], 16, "a100_80gb", 2048),
            }
        )
    return {
        "rows": rows,
        "paper": {
            "tpot_ms": {"ma 12:4": 1.82, "co-located": 2.76},
            "tps": {"ma 12:4": 13289, "co-located": 8696},
        },
    }


def deepseek_on_h800() -> dict:
    """(c): EP 144 on 18 H800 nodes, 2 slots per GPU (replicated), FP8 experts, 96 requests per GPU
    (about 14.8k tokens/s per node at DeepSeek's 20-22 tokens/s per user), context 4096."""
    settings = (
        V3
        + FP8
        + [
            "run.batch=13824",
            "parallel.ranks_per_node=8",
            "parallel.placement=replicated",
            "parallel.experts_per_rank=2",
        ]
    )
    row = point(settings, 144, "h800", 4096)
    for way in WAYS:
        # (a stored point: already set)
        row[way]["tokens_per_s_per_node"] = row[way]["decode_tokens_per_s"] / 18
    return {"rows": [row], "published": {"tokens_per_s_per_node": 14800, "tokens_per_s_per_user": "20-22"}}


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--only", nargs="*", default=["a", "b", "c"])
    parser.add_argument(
        "--ep",
        nargs="*",
        type=int,
        default=list(SWEEP["ep"]),
        help="(a): the EP sizes (16 and 256 give the scaling efficiency)",
    )
    parser.add_argument(
        "--dtype", nargs="*", default=list(SWEEP["dtype"]), choices=["bfloat16", "fp8"], help="(a)"
    )
    parser.add_argument(
        "--ways", nargs="*", default=list(WAYS), choices=list(WAYS), help="(a): which ways to simulate"
    )
    parser.add_argument("--no-packed", action="store_true", help="(a): without the packed 8 per GPU point")
    args = parser.parse_args()
    SWEEP.update(ep=tuple(args.ep), dtype=tuple(args.dtype), ways=tuple(args.ways), packed=not args.no_packed)
    OUT = args.out
    if os.path.exists(OUT):
        with open(OUT) as f:
            DONE.update(json.load(f).get("points", {}))
    for key, (title, function) in {
        "a": ("DeepSeek-V3 on H100", deepseek_on_h100),
        "b": ("MA paper on 16 A100", ma_paper_on_a100),
        "c": ("DeepSeek EP144 on 18 H800 nodes", deepseek_on_h800),
    }.items():
        if key in args.only:
            print(f"({key}) {title}", flush=True)
            save(key, function())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
