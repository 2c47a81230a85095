"""What every benchmark's result is: the table it prints, its medians and ratios to the baseline,
the JSON it stores, and whether its ranks outnumber the cores (oversubscribed). Separate so that
each benchmark's module only measures.
"""

from __future__ import annotations

import json
import os

import numpy as np


def oversubscribed(world) -> bool:
    from hpcmoe.runtime.topology import available_cores

    return world.Get_size() > available_cores()


def report(
    name: str, rows: dict, baseline: str, goal: str, meta: dict, out: str | None, spread: tuple[str, ...] = ()
) -> dict:
    """Print medians and ratios against the baseline; store them as JSON. spread: keys whose
    [min, max] over the repetitions is stored too (result["spread"][variant][key])."""
    keys = sorted({k for r in rows.values() for k in r})
    result = {"benchmark": name, "goal": goal, **meta, "median": {}, "ratio_to_" + baseline: {}}
    if spread:
        result["spread"] = {
            v: {k: [float(np.min(s[k])), float(np.max(s[k]))] for k in spread if k in s}
            for v, s in rows.items()
        }
    print(
        f"hpcmoe bench {name}: {meta.get('what', '')}"
        + ("  [oversubscribed]" if meta.get("oversubscribed") else "")
    )
    width = {k: max(len(k) + 2, 12) for k in keys}
    print(f"  {'variant':<18}" + "".join(f"{k:>{width[k]}}" for k in keys))
    for variant, samples in rows.items():
        medians = {k: float(np.median(samples[k])) for k in keys if k in samples}
        result["median"][variant] = medians
        result["ratio_to_" + baseline][variant] = {
            k: medians[k] / rows_median(rows[baseline], k) for k in medians if rows_median(rows[baseline], k)
        }
        print(f"  {variant:<18}" + "".join(f"{medians.get(k, float('nan')):>{width[k]}.4g}" for k in keys))
    for variant, ranges in result.get("spread", {}).items():
        print(
            f"  {variant:<18}"
            + ", ".join(f"{k} from {lo:.4g} to {hi:.4g} over the reps" for k, (lo, hi) in ranges.items())
        )
    print(f"  goal: {goal}")
    return store(result, out)


def store(result: dict, out: str | None) -> dict:
    """Write a benchmark's result as JSON to `out` (when given) and return it."""
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"  wrote {out}")
    return result


def rows_median(samples: dict, key: str) -> float:
    return float(np.median(samples[key])) if key in samples else float("nan")
