"""The figures a run is judged by, from rank 0's token times and every rank's timing rows: TTFT,
TPOT and token rates; per-request percentiles; each rank's busy and idle shares (phases sorted
into compute, communication in flight and waits, and the interval arithmetic that merges them).
The engine and the simulator compute them alike; the report and the predictor read the phases.
"""

from __future__ import annotations

import numpy as np


def compute_metrics(token_times: np.ndarray, prompt_tokens: int, generated) -> tuple[dict, np.ndarray]:
    """token_times: [steps] when rank 0 held each step's tokens, seconds since the common start;
    generated: tokens made in each of those steps (or the batch, when every request made one each).

    TTFT is the first; TPOT the mean wall time between consecutive decode steps, everything
    included (records, file appends, stop votes). Token rates count only generated tokens, so
    they fall when requests end early. -> (metrics, per-step seconds [steps])."""
    steps = len(token_times)
    spans = np.diff(np.concatenate([[0.0], token_times]))
    per_step = np.broadcast_to(np.asarray(generated), (steps,))
    decode_tokens = int(per_step[1:].sum())
    return {
        "ttft_ms": 1e3 * token_times[0],
        "tpot_ms": 1e3 * spans[1:].mean() if steps > 1 else float("nan"),
        "prefill_tokens_per_s": prompt_tokens / token_times[0],
        "decode_tokens_per_s": decode_tokens / spans[1:].sum() if steps > 1 else float("nan"),
        "tps": (prompt_tokens + decode_tokens) / token_times[-1],
        "total_s": float(token_times[-1]),
    }, spans


def request_metrics(ttft_s: np.ndarray, latency_s: np.ndarray, tokens: np.ndarray, total_s: float) -> dict:
    """Per-request figures over the requests that ended ([requests] each: time to first token from
    joining the batch, joining to last token, tokens made), as vLLM's and SGLang's benchmarks give
    them: p50 / p90 / p99 of TTFT, of each request's mean inter-token latency (ITL, requests of two
    tokens or more) and of end-to-end latency; output tokens and requests per second of the run."""
    if not len(tokens):
        return {}
    out = {"output_tokens_per_s": float(tokens.sum()) / total_s, "requests_per_s": len(tokens) / total_s}
    out["generated_tokens_per_s"] = out["output_tokens_per_s"]  # the earlier name, kept for scripts
    several = tokens > 1
    itl_s = (latency_s - ttft_s)[several] / (tokens[several] - 1)
    for name, values, scale in (
        ("request_ttft_ms", ttft_s, 1e3),
        ("request_itl_ms", itl_s, 1e3),
        ("request_latency_s", latency_s, 1.0),
    ):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = scale * float(np.percentile(values, q)) if len(values) else float("nan")
    return out


NOT_COMPUTE = (b"step", b"output")  # besides *_wait (idle) and *_comm (in flight)


def is_wait(phase: bytes) -> bool:
    return phase.endswith(b"_wait")


def is_comm(phase: bytes) -> bool:
    return phase.endswith(b"_comm")


def is_compute(phase: bytes) -> bool:
    return not (is_wait(phase) or is_comm(phase) or phase in NOT_COMPUTE)


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merge overlapping [start, end) intervals."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [tuple(m) for m in merged]


def length(intervals) -> float:
    return sum(end - start for start, end in intervals)


def minus(
    intervals: list[tuple[float, float]], removed: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """Merged intervals with the merged `removed` cut out of them. One pass over both, sorted: a
    run of 20,000 requests has a million timing rows."""
    out, holes, first = [], union(removed), 0
    for start, end in union(intervals):
        while first < len(holes) and holes[first][1] <= start:  # holes before this interval, and the next
            first += 1
        for hole_start, hole_end in holes[first:]:
            if hole_start >= end:
                break
            if hole_start > start:
                out.append((start, hole_start))
            start = max(start, hole_end)
        if start < end:
            out.append((start, end))
    return out


def busy_and_idle(timings: np.ndarray, ranks: int) -> dict[str, np.ndarray]:
    """Per rank, as shares of its loop (from the common start to its last row):
    idle = |waiting| (every `*_wait` row: with nothing runnable, in a rebalance boundary, for a send
    buffer), busy = |compute| less the waits inside it."""
    busy, idle = np.zeros(ranks), np.zeros(ranks)
    for rank in range(ranks):
        rows = timings[timings["rank"] == rank]
        if not len(rows):
            continue
        loop = max(float(rows["end"].max()), 1e-12)
        phases = np.unique(rows["phase"])
        spans = lambda kind: list(
            zip(
                *(
                    rows[np.isin(rows["phase"], [p for p in phases if kind(p)])][key].tolist()
                    for key in ("start", "end")
                )
            )
        )
        waits = spans(is_wait)
        busy[rank] = length(minus(spans(is_compute), waits)) / loop
        idle[rank] = length(union(waits)) / loop
    return {"busy_fraction_per_rank": busy, "idle_fraction_per_rank": idle}
