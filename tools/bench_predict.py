"""The time predictor on real runs of this machine, and the split it proposes.

1. Training runs: `hpcmoe predict collect` over every attention:MoE split at 4 and 6 ranks x batch
   {4, 16} x prompt length {16, 64}.
2. Unseen runs (other batch and prompt length, and 8 ranks, which no training run had): every split at
   4, 6 and 8 ranks. The predictor is trained on (1) and scored on (2), split by run, beside the roofline.
3. `predict propose` for (2)'s workload at 4, 6 and 8 ranks, against the measured TPOT of every split:
   goal, the proposed split's TPOT within 10% of the best measured split's.

    python tools/bench_predict.py [--out docs/bench/predict.json] [--work runs/predict]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hpcmoe.analysis import collect, ma_split, predict, run_samples  # noqa: E402
from hpcmoe.config import load_config  # noqa: E402

CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "inputs", "bench_predict.yaml"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/bench/predict.json")
    parser.add_argument("--work", default="runs/predict")
    parser.add_argument("--epochs", type=int, default=3000)
    parser.add_argument("--reuse", action="store_true", help="keep run files already in --work")
    return parser.parse_args()


def measured_splits(runs: list[str], ranks: int) -> dict[str, float]:
    """'attention:moe' -> the measured TPOT (ms) of each run file on that many ranks."""
    measured = {}
    for path in runs:
        with h5py.File(path, "r") as f:
            if f.attrs["world_size"] == ranks:
                name = os.path.basename(path).split("_")
                measured[f"{name[2][1:]}:{name[3][1:]}"] = float(f["metrics"].attrs["tpot_ms"])
    return measured


def proposals_against_measured(model, config, unseen: list[str], machine) -> dict:
    """At 4, 6 and 8 ranks: the split the predictor proposes against the best measured one; printed."""
    proposals = {}
    for ranks in (4, 6, 8):
        measured = measured_splits(unseen, ranks)
        proposal = ma_split.propose(model, config, ranks, machine)
        chosen = f"{proposal['attention_ranks']}:{proposal['moe_ranks']}"
        best = min(measured, key=measured.get)
        proposals[ranks] = {
            "measured_tpot_ms": measured,
            "proposed": chosen,
            "best": best,
            "proposed_over_best": measured[chosen] / measured[best],
            "predicted_total_ms": proposal["options"],
        }
        print(
            f"  {ranks} ranks: proposed {chosen} TPOT {measured[chosen]:.1f} ms, "
            f"best {best} {measured[best]:.1f} ms "
            f"-> {measured[chosen] / measured[best]:.2f}x  (all: "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(measured.items()))
            + ")"
        )
    return proposals


def main() -> None:
    args = parse_args()
    train_runs = collect.collect(
        CONFIG, [], os.path.join(args.work, "train"), [4, 6], [4, 16], [16, 64], 8, reuse=args.reuse
    )
    target = {"batch": 8, "prompt_len": 32}
    unseen = collect.collect(
        CONFIG,
        [],
        os.path.join(args.work, "unseen"),
        [4, 6, 8],
        [target["batch"]],
        [target["prompt_len"]],
        8,
        reuse=args.reuse,
    )
    machine = run_samples.machine_profile()
    x, y, _ = map(np.concatenate, zip(*(run_samples.samples_from_run(r, machine) for r in train_runs)))
    model = predict.train(x, y, args.epochs)
    tx, ty, roofline = map(np.concatenate, zip(*(run_samples.samples_from_run(r, machine) for r in unseen)))
    errors = {
        "predictor": predict.relative_error(model.predict_ms(tx), ty),
        "roofline": predict.relative_error(roofline, ty),
    }
    print(
        f"error on {len(unseen)} unseen runs ({len(tx)} samples; "
        f"trained on {len(train_runs)} runs, {len(x)} samples):"
    )
    for i, name in enumerate(run_samples.TARGETS):
        print(f"  {name:<13} predictor {errors['predictor'][i]:.3f}   roofline {errors['roofline'][i]:.3f}")
    config = load_config(
        CONFIG,
        [
            f"run.batch={target['batch']}",
            f"run.prompt_len={target['prompt_len']}",
            f"run.prompt_len_min={target['prompt_len']}",
            "run.max_new_tokens=8",
        ],
    )
    proposals = proposals_against_measured(model, config, unseen, machine)
    result = {
        "benchmark": "predict",
        "goal": "proposed split's TPOT within 10% of the best measured split",
        "command": "python tools/bench_predict.py",
        "train_runs": len(train_runs),
        "unseen_runs": len(unseen),
        "train_samples": len(x),
        "unseen_samples": len(tx),
        "error_on_unseen_runs": errors,
        "targets": list(run_samples.TARGETS),
        "proposals": proposals,
        "machine": machine,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
