"""The run file: HDF5 schema, per-phase timings, metrics, crash-safe writing.

Rank 0 writes into `<path>.tmp` beside the target, appends as steps finish (memory stays
bounded), sets the root attribute `complete` last and renames with os.replace: a crash leaves
at most a `.tmp` file whose `complete` is false, never a file that looks finished.
"""

from __future__ import annotations

import datetime
import os
import time
from contextlib import contextmanager

import numpy as np

from hpcmoe import __version__

FAILURE_DTYPE = np.dtype(
    [
        ("rank", "i4"),
        ("step", "i4"),
        ("layer", "i4"),
        ("phase", "S24"),
        ("detected_at", "f8"),
        ("recovered_at", "f8"),
        ("action", "S96"),
    ]
)
TIMING_DTYPE = np.dtype(
    [
        ("rank", "i4"),
        ("layer", "i4"),
        ("micro_batch", "i4"),
        ("step", "i4"),
        ("phase", "S16"),
        ("start", "f8"),
        ("end", "f8"),
    ]
)


class Timer:
    """Collects (rank, layer, micro_batch, step, phase, start, end) rows, seconds since `t0`.

    On a GPU (`streams`), compute phases are timed by events on the compute stream (kernels run
    asynchronously, so host clocks would time their launch), resolved when the step's rows are
    taken; waits and communication in flight stay on the host clock. Both count from the common
    start: the reference event is recorded on an idle stream right after it."""

    def __init__(self, rank: int, t0: float, streams=None):
        self.rank, self.t0, self.rows = rank, t0, []
        self.streams = streams if streams is not None and streams.gpu else None
        self.timed: list = []  # (row index, start event, end event) to resolve
        self.reference = None

    def restart(self, t0: float) -> None:
        """Count from `t0` (the common start barrier) from now on."""
        self.t0 = t0
        if self.streams is not None:
            self.reference = self.event()

    def now(self) -> float:
        """Seconds since t0."""
        return time.perf_counter() - self.t0

    def event(self):
        import torch

        event = torch.Event(device=self.streams.device, enable_timing=True)
        event.record(self.streams.compute())
        return event

    def mark(self) -> float:
        """A point in time for `add` (a perf_counter value)."""
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str, step: int, layer: int = -1, micro_batch: int = 0, **work):
        """A row for the work inside. work: what the phase computes, in the shapes hpcmoe.sim.costs prices
        (rows=, tokens=, row_bytes=), for the simulator's clock (sim.net.SimTimer); unused here. The
        body may add to it (`as work`) what it learns inside."""
        on_device = (
            self.streams is not None and self.reference is not None and not name.endswith(("_wait", "_comm"))
        )
        start = time.perf_counter()
        begin = self.event() if on_device else None
        try:
            yield work
        finally:
            if on_device:
                self.timed.append((len(self.rows), begin, self.event()))
            self.rows.append(
                (
                    self.rank,
                    layer,
                    micro_batch,
                    step,
                    name.encode(),
                    start - self.t0,
                    time.perf_counter() - self.t0,
                )
            )

    def add(self, name: str, step: int, layer: int, micro_batch: int, start: float) -> None:
        """A row from `start` (a perf_counter value) until now: for spans that no `with` encloses."""
        self.rows.append(
            (
                self.rank,
                layer,
                micro_batch,
                step,
                name.encode(),
                start - self.t0,
                time.perf_counter() - self.t0,
            )
        )

    def take(self) -> np.ndarray:
        """The rows collected since the last call (device-timed rows resolved: this waits for them)."""
        for index, begin, end in self.timed:
            end.synchronize()
            row = self.rows[index]
            self.rows[index] = row[:5] + (
                self.reference.elapsed_time(begin) / 1e3,
                self.reference.elapsed_time(end) / 1e3,
            )
        self.timed = []
        rows, self.rows = self.rows, []
        return np.array(rows, dtype=TIMING_DTYPE)


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


def read_routing(path: str, num_experts: int) -> np.ndarray:
    """An earlier complete run's /routing [steps, moe_layers, sources, experts], for placement_from."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                raise ValueError(f"parallel.placement_from: {path} is not a complete run file")
            routing = f["routing"][:]
    except (OSError, KeyError) as e:
        raise ValueError(f"parallel.placement_from: cannot read /routing from {path}: {e}") from None
    if routing.shape[-1] != num_experts:
        raise ValueError(
            f"parallel.placement_from: {path} routed to {routing.shape[-1]} experts, "
            f"model.num_experts is {num_experts}"
        )
    return routing


def rank_loads(routing: np.ndarray, in_force: list, node_of_rank: list[int], tp: int = 1) -> np.ndarray:
    """[steps, moe_layers, places] token slots the experts of each place (a rank, or a group of tp
    ranks) compute, from /routing [steps, moe_layers, sources, experts] and the placement in force
    at each step (in_force: [(first step, table [experts, replicas] of ranks, -1 padded)], ascending),
    split over replicas as the dispatcher splits them. A place that hosts no expert in the table in
    force (an attention rank of ma, a spare) is NaN: it is not a rank that could be loaded. The
    receiver of the payload, not the wire: two_stage's gateways forward, they do not compute."""
    from hpcmoe.parallel.placement import placement_of, rank_load_shares

    steps, layers, _, experts = routing.shape
    places, nodes = len(node_of_rank) // tp, list(node_of_rank)[::tp]
    by_node = np.einsum(
        "tlse,sn->tlne", routing.astype(float), np.eye(max(node_of_rank) + 1)[list(node_of_rank)]
    )
    out = np.full((steps, layers, places), np.nan)
    for i, (first, table) in enumerate(in_force):  # every step at once, per placement in force
        last = in_force[i + 1][0] if i + 1 < len(in_force) else steps
        if first >= min(last, steps):
            continue
        placement = placement_of(table, places, tp)
        shares = rank_load_shares(placement, nodes)
        orphans = shares.sum(axis=2) == 0  # [nodes, experts] with no replica
        if (by_node[first:last][..., orphans] > 0).any():
            expert = int(np.flatnonzero(orphans.any(0) & (by_node[first:last].sum((0, 1, 2)) > 0))[0])
            raise ValueError(f"token slots sent to expert {expert}, which has no replica")
        hosting = sorted(set(placement.slot_rank))
        out[first:last][..., hosting] = np.einsum("tlne,ner->tlr", by_node[first:last], shares)[..., hosting]
    return out


def max_over_mean(load: np.ndarray) -> float:
    """max / mean over the places that host experts (NaN entries left out); NaN without load."""
    hosting = load[~np.isnan(load)]
    return float(hosting.max() / hosting.mean()) if len(hosting) and hosting.mean() > 0 else float("nan")


def rank_load_imbalance(loads: np.ndarray) -> float:
    """Whole run: per MoE layer, max / mean over expert-hosting places of the slots each computed
    over all steps, then the mean over layers (loads: rank_loads' [steps, moe_layers, places])."""
    per_layer = [
        max_over_mean(np.where(np.isnan(loads[:, layer]).all(0), np.nan, np.nansum(loads[:, layer], 0)))
        for layer in range(loads.shape[1])
    ]
    return float(np.nanmean(per_layer)) if not np.isnan(per_layer).all() else float("nan")


def step_imbalance(loads: np.ndarray) -> float:
    """Mean over steps and MoE layers of each one's max / mean over expert-hosting places: the
    whole-run figure hides a load that moves from rank to rank, or from layer to layer; this one
    does not (layer 0 all on rank 0 and layer 1 all on rank 1 reads 2 at 2 ranks, not 1)."""
    each = [max_over_mean(loads[s, i]) for s in range(loads.shape[0]) for i in range(loads.shape[1])]
    return float(np.nanmean(each)) if len(each) and not np.isnan(each).all() else float("nan")


def file_loads(f, steps: int | None = None) -> np.ndarray:
    """rank_loads of an open run file (its first `steps` steps, default all): its /routing on
    /placement, then each switch of /placement_history from its step."""
    placement = f["placement"]
    in_force = (
        [(0, placement[0])] + [(int(row["step"]), row["placement"]) for row in f["placement_history"][:]]
        if "placement_history" in f
        else [(0, placement[0])]
    )
    return rank_loads(
        f["routing"][:steps],
        in_force,
        [int(n) for n in f.attrs["node_of_rank"]],
        int(placement.attrs.get("expert_tp", 1)),
    )


def previous_imbalance(path: str) -> float:
    """The rank load max/mean of an earlier run file."""
    import h5py

    with h5py.File(path, "r") as f:
        return rank_load_imbalance(file_loads(f))


def append(dataset, dtype, start: int, values: list) -> None:
    """Append rows to a 1-d resizable dataset of `dtype` holding `start` rows, through h5py's
    low-level write (the high-level one costs ten times as much per call, and turns variable-length
    rows of equal length into a 2-d array that it then refuses)."""
    from h5py import h5s, h5t

    count = len(values)
    dataset.resize((start + count,))
    column = np.empty(count, dtype=dtype)
    for k, value in enumerate(values):
        column[k] = value
    selection = dataset.id.get_space()
    selection.select_hyperslab((start,), (count,))
    dataset.id.write(h5s.create_simple((count,)), selection, column, mtype=h5t.py_create(dtype))


def check_output_path(
    path: str, key: str = "output.path", example: str = "run.h5", create: bool = True
) -> None:
    """`path` can be written: not a directory, its directory there (or made, with `create`) and
    writable (tried with a probe file), checked before anything is built or measured, so a bad
    location fails at once; ValueError naming `key` otherwise."""
    import tempfile

    if os.path.isdir(path):
        raise ValueError(f"{key}: {path!r} is a directory; expected a file name such as {example}")
    directory = os.path.dirname(os.path.abspath(path))
    if not create and not os.path.isdir(directory):
        raise ValueError(f"{key}: {path!r}: the directory {directory} does not exist; create it first")
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".hpcmoe-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"{key}: {path!r}: cannot write in {directory}: {e.strerror or e}") from None


def check_new_output(path: str | None, overwrite: bool, key: str) -> None:
    """A result is never replaced silently: an existing `path` is refused unless --overwrite.
    A run's `path.tmp` is what a killed job left (resumable): refused alike."""
    if path is None or path == "-" or overwrite:
        return
    for existing, what in ((path, "exists"), (path + ".tmp", "is left by a killed run (--resume reads it)")):
        if key == "output.path" or existing == path:
            if os.path.exists(existing):
                raise ValueError(
                    f"{key}: {existing} {what}; pass --overwrite to replace it, or choose another name"
                )


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def run_attrs(
    config, node_of_rank, ranks_per_node: int, device: str, device_name: str, max_batch: int = 0
) -> dict:
    """The run file's root attributes (a real run's and a simulated one's)."""
    from hpcmoe.workload import run_identity

    return {
        **run_identity(config),
        "requests": len(config.requests),
        "max_batch": max_batch,
        "config": config.to_yaml(),
        "hpcmoe_version": __version__,
        "world_size": len(node_of_rank),
        "ranks_per_node": ranks_per_node,
        "num_nodes": max(node_of_rank) + 1,
        "node_of_rank": np.array(node_of_rank, np.int64),
        "layout": config.parallel.layout,
        "device": device,
        "device_name": device_name,
    }


class RunWriter:
    """Rank 0's handle on the run file; every array carries its axis names in attribute `axes`.

    Per step: /routing, /traffic and /timings rows, buffered and written in blocks. Per request,
    as it ends: one row of the /requests group (flushed to disk, so a crash or kill -9 keeps every
    request that had finished). At the end: the per-request arrays in file order (/generated ...)."""

    REQUEST_FIELDS = {  # /requests/NAME: (dtype, meaning); one row per finished request, in the order they ended
        "index": (np.int64, "the request's place in the prompt file (0-based)"),
        "id": (None, "the request's id"),
        "finish_reason": ("S6", "eos | length | stop (the run was stopped first: --resume continues it)"),
        "prompt_ids": ("vlen_int64", "the prompt's token ids"),
        "prompt_text": ("vlen_uint8", "the prompt as given, UTF-8 bytes (empty for token-id prompts)"),
        "completion_ids": ("vlen_int64", "the tokens made, an end-of-sequence token included"),
        "text": (
            "vlen_uint8",
            "the completion decoded by the checkpoint's tokenizer, UTF-8 bytes (any byte, NUL too)",
        ),
        "admitted_at": (np.float64, "seconds since the common start when it joined the batch"),
        "first_token_at": (np.float64, "seconds since the common start when its first token was held"),
        "finished_at": (np.float64, "seconds since the common start when its last token was held"),
        "ttft_s": (np.float64, "first_token_at - admitted_at"),
        "tokens_per_s": (np.float64, "tokens made / (finished_at - admitted_at)"),
        "admitted_step": (np.int64, "the step it joined the batch in"),
        "finished_step": (np.int64, "the step of its last token"),
    }

    def __init__(
        self,
        path: str,
        attrs: dict,
        requests,
        width: int,
        vocab: int,
        moe_layers: int,
        num_ranks: int,
        num_experts: int,
        save_logits: bool,
        checkpoint: str | None = None,
    ):
        """requests: the run's requests (hpcmoe.runtime.workload: len, [i], prompt_lengths); width: the most
        tokens a request may make."""
        import h5py

        self.path, self.tmp, self.requests, self.checkpoint = path, path + ".tmp", requests, checkpoint
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = h5py.File(self.tmp, "w")
        self.file.attrs.update({**attrs, "started": now(), "complete": False})
        self.width = width
        if save_logits:
            self.array(
                "logits",
                shape=(len(requests), width, vocab),
                dtype=np.float32,
                chunks=(1, 1, vocab),
                fillvalue=np.nan,
                axes=["request", "new_token", "vocab"],
            )
        self.array(
            "routing",
            shape=(0, moe_layers, num_ranks, num_experts),
            maxshape=(None, moe_layers, num_ranks, num_experts),
            dtype=np.int64,
            axes=["step", "moe_layer", "source_rank", "expert"],
            units="token slots",
        )
        self.array(
            "traffic",
            shape=(0, moe_layers, num_ranks, num_ranks),
            maxshape=(None, moe_layers, num_ranks, num_ranks),
            dtype=np.int64,
            axes=["step", "moe_layer", "src_rank", "dst_rank"],
            units="bytes (dispatch payload)",
        )
        self.array(
            "timings",
            shape=(0,),
            maxshape=(None,),
            dtype=TIMING_DTYPE,
            chunks=(4096,),
            axes=["row"],
            units="seconds since the common start barrier",
        )
        group = self.file.create_group("requests")
        group.attrs["rows"] = (
            "one per request, written as it ends (in that order); index: its place in the file"
        )
        for name, (dtype, meaning) in self.REQUEST_FIELDS.items():
            dtype = (
                h5py.string_dtype("utf-8")
                if dtype is None
                else h5py.vlen_dtype(np.dtype(dtype[5:]))
                if str(dtype).startswith("vlen_")
                else dtype
            )
            group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,)).attrs.update(
                {"axes": ["finished_request"], "meaning": meaning}
            )
        self.columns = {
            name: (group[name], group[name].dtype) for name in self.REQUEST_FIELDS
        }  # (h5py lookups are slow)
        self.ended = 0
        self.finished = np.zeros(len(requests), bool)
        self.live: dict[int, dict] = {}  # request index -> its tokens (and logits) and times so far
        self.saves_logits = "logits" in self.file
        self.resumed: dict[int, list[int]] = {}  # a resumed run: the tokens its stopped requests had made
        self.pending, self.timing_rows, self.held, self.written_at = [], [], 0, time.monotonic()
        self.steps = 0

    def array(self, name: str, axes: list[str], **attrs_and_args):
        attrs = {k: attrs_and_args.pop(k) for k in ("units", "padding") if k in attrs_and_args}
        dataset = self.file.create_dataset(name, **attrs_and_args)
        dataset.attrs.update({"axes": axes, **attrs})
        return dataset

    def write_placement(
        self, expert_ranks: list[list[int]], moe_layers: int, mode: str, source: str, expert_tp: int = 1
    ):
        """expert_ranks: [experts][replicas] -> /placement [moe_layer, expert, replica] (-1 pads). With
        expert_tp > 1 an entry is the first rank of the group of expert_tp ranks that holds the replica."""
        width = max(len(r) for r in expert_ranks)
        table = np.full((moe_layers, len(expert_ranks), width), -1, dtype=np.int64)
        for e, ranks in enumerate(expert_ranks):
            table[:, e, : len(ranks)] = ranks
        dataset = self.array("placement", data=table, axes=["moe_layer", "expert", "replica"], padding=-1)
        dataset.attrs.update(
            {
                "mode": mode,
                "source": source,
                "expert_tp": expert_tp,
                "ranks": f"each replica on ranks r .. r + {expert_tp - 1} (tensor parallel)"
                if expert_tp > 1
                else "each replica on rank r",
            }
        )

    def write_placement_history(self, history, digests: list[list[str]], done: int):
        """/placement_history: one row per switch of online rebalancing (not the initial placement).
        digests: [ranks][switches] sha256 of each rank's expert weights after each switch ("" when
        parallel.rebalance.checksums is off). The observed rank load max/mean is measured from
        /routing over the steps the placement ran, split over its replicas as the dispatcher splits
        them (NaN when it ran none)."""
        from hpcmoe.parallel.placement import load_from_routing
        from hpcmoe.runtime.rebalance import imbalance

        experts, ranks = self.file["routing"].shape[-1], self.file["traffic"].shape[-1]
        dtype = np.dtype(
            [
                ("step", np.int64),
                ("decided_at_step", np.int64),
                ("placement", np.int64, (experts, ranks)),
                ("bytes_moved", np.int64),
                ("predicted_rank_load_max_over_mean_before", np.float64),
                ("predicted_rank_load_max_over_mean", np.float64),
                ("observed_rank_load_max_over_mean", np.float64),
                ("weights_sha256", "S64", (ranks,)),
            ]
        )
        rows = np.zeros(len(history), dtype)
        routing, node_of_rank = self.file["routing"], [int(n) for n in self.file.attrs["node_of_rank"]]
        for i, switch in enumerate(history):
            end = history[i + 1].step if i + 1 < len(history) else done
            table = np.full((experts, ranks), -1, np.int64)
            for e, holders in enumerate(switch.placement.expert_ranks()):
                table[e, : len(holders)] = holders
            observed = float("nan")
            if end > switch.step:
                places, tp = switch.placement.grouped(), switch.placement.tp
                tokens, _ = load_from_routing(routing[switch.step : end], node_of_rank)
                observed = imbalance(places, np.array(tokens), node_of_rank[::tp])
            rows[i] = (
                switch.step,
                switch.decided_at_step,
                table,
                switch.bytes_moved,
                switch.predicted_before,
                switch.predicted,
                observed,
                [d[i].encode() for d in digests],
            )
        dataset = self.array("placement_history", data=rows, axes=["switch"], padding=-1)
        dataset.attrs["placement"] = (
            "[expert, replica] rank (with expert_tp: the group's first rank), -1 padded"
        )

    # Steps are buffered and written in blocks (every WRITE_EVERY_S seconds or WRITE_BYTES bytes, and at
    # the end): one HDF5 call per dataset and block instead of per step; memory stays bounded.
    WRITE_EVERY_S, WRITE_BYTES = 2.0, 64 * 2**20

    def append_step(self, step: int, routing: np.ndarray, traffic: np.ndarray):
        """routing: [moe_layers, ranks, experts]; traffic: [moe_layers, ranks, ranks] of step `step`."""
        self.pending.append((step, routing, traffic))
        self.maybe_write(routing.nbytes + traffic.nbytes)

    def append_timings(self, rows: np.ndarray):
        self.timing_rows.append(rows)
        self.maybe_write(rows.nbytes)

    def maybe_write(self, nbytes: int):
        self.held += nbytes
        if self.held > self.WRITE_BYTES or time.monotonic() - self.written_at > self.WRITE_EVERY_S:
            self.write()

    def write(self):
        """Write the buffered steps (consecutive) and timing rows."""
        if self.pending:
            first, last = self.pending[0][0], self.pending[-1][0] + 1
            for name, column in (("routing", 1), ("traffic", 2)):
                dataset = self.file[name]
                if dataset.shape[0] < last:
                    dataset.resize(last, axis=0)
                dataset[first:last] = np.stack([entry[column] for entry in self.pending])
            self.steps = max(self.steps, last)
            self.pending = []
        if self.timing_rows:
            rows, table = np.concatenate(self.timing_rows), self.file["timings"]
            table.resize((table.shape[0] + len(rows),))
            table[-len(rows) :] = rows
            self.timing_rows = []
        self.held, self.written_at = 0, time.monotonic()

    def take_tokens(self, step: int, events: list, logits: list, started_at: float, held_at: float) -> None:
        """The step's events of every rank (hpcmoe.runtime.engine.Events) and, with output.save_logits, the
        logits of each token made ([tokens, vocab] per rank): rank 0 follows every live request and
        writes the ones that ended (flushed: on disk even if the job is killed next)."""
        ended = []
        for rank_events, rank_logits in zip(events, logits):
            for index in rank_events.admitted:
                if index not in self.live:  # (after a recovery a live request joins again: kept as it was)
                    tokens = list(self.resumed.get(index, []))
                    self.live[index] = {
                        "tokens": tokens,
                        "admitted_at": started_at,
                        "admitted_step": step,
                        "first_token_at": float("nan"),
                        "logits": [],
                        "logits_from": len(tokens),
                    }
            for k, (index, token, reason) in enumerate(
                zip(rank_events.index.tolist(), rank_events.token.tolist(), rank_events.reason)
            ):
                live = self.live[index]
                if rank_logits is not None and self.saves_logits:  # written with the request, in one block
                    live["logits"].append(rank_logits[k])
                live["tokens"].append(token)
                if live["first_token_at"] != live["first_token_at"]:  # NaN: this is its first new token
                    live["first_token_at"] = held_at
                if reason:
                    ended.append((index, reason))
        if ended:
            self.write_ended(
                [(index, reason, self.live.pop(index)) for index, reason in ended], step, held_at
            )

    def write_ended(self, ended: list, step: int, held_at: float) -> None:
        """Append rows to /requests: (request index, finish reason, its live record) each."""
        from hpcmoe.workload import decode

        columns = {name: [] for name in self.REQUEST_FIELDS}
        for index, reason, live in ended:
            request = self.requests[index]
            if live["logits"]:  # one write per request: a write per token cost 0.1 ms each (h5py)
                first = live["logits_from"]
                self.file["logits"][index, first : first + len(live["logits"])] = np.stack(live["logits"])
            admitted = live["admitted_at"]
            text = decode(self.checkpoint, live["tokens"])
            row = {
                "index": index,
                "id": request.id,
                "finish_reason": reason.encode(),
                "prompt_ids": np.array(request.prompt_ids, np.int64),
                "prompt_text": np.frombuffer((request.prompt or "").encode(), np.uint8),
                "completion_ids": np.array(live["tokens"], np.int64),
                "text": np.frombuffer((text or "").encode(), np.uint8),
                "admitted_at": admitted,
                "first_token_at": live["first_token_at"],
                "finished_at": held_at,
                "ttft_s": live["first_token_at"] - admitted,
                "tokens_per_s": len(live["tokens"]) / max(held_at - admitted, 1e-9),
                "admitted_step": live["admitted_step"],
                "finished_step": step,
            }
            for name, value in row.items():
                columns[name].append(value)
            self.finished[index] = reason != "stop"
        for name, values in columns.items():
            append(*self.columns[name], self.ended, values)
        self.ended += len(ended)
        self.file.flush()

    def stop_live(self, step: int, held_at: float) -> None:
        """A stopped run: every live request is written with finish reason `stop` (to continue)."""
        if self.live:
            self.write_ended(
                [(index, "stop", self.live.pop(index)) for index in sorted(self.live)], step, held_at
            )

    def done(self):
        """What this run has done so far (hpcmoe.runtime.workload.Done): to share after a recovery."""
        from hpcmoe.workload import Done

        return Done(self.finished.copy(), {index: list(live["tokens"]) for index, live in self.live.items()})

    def write_finished_steps(self, resume) -> None:
        """A resumed run's file starts with what the stopped run wrote: its steps' statistics, its
        finished requests (and their logits); its stopped requests go on from their tokens."""
        import h5py

        k = resume.step
        for name, values in (("routing", resume.routing), ("traffic", resume.traffic)):
            self.file[name].resize(k, axis=0)
            self.file[name][:k] = values
        self.steps = k
        self.resumed = resume.done.partial
        with h5py.File(resume.path, "r", locking=False) as old:
            rows = old["requests"]
            keep = np.flatnonzero(rows["finish_reason"][:] != b"stop")
            for name in self.REQUEST_FIELDS:
                append(*self.columns[name], 0, list(rows[name][:][keep]))
            self.ended = len(keep)
            if "logits" in old and "logits" in self.file:
                for index in sorted(set(rows["index"][:].tolist())):
                    self.file["logits"][index] = old["logits"][index]
        self.finished[:] = resume.done.finished

    def write_requests(self, config) -> None:
        """The per-request arrays in file order, from /requests (requests that never started: -1
        tokens, no text): /request_ids, /prompt_ids, /prompt_lengths, /generated [request, new_token]
        (-1 padded), /generated_lengths and, with a tokenizer, /generated_text (UTF-8; a NUL
        character appears as U+2400, the exact bytes are in /requests/text)."""
        import h5py

        self.write()
        rows = self.file["requests"]
        order = np.argsort(rows["index"][:], kind="stable")
        where = dict(zip(rows["index"][:][order].tolist(), order.tolist()))
        n, longest = len(self.requests), int(self.requests.prompt_lengths.max())
        strings = h5py.string_dtype("utf-8")
        ids = self.array("request_ids", shape=(n,), dtype=strings, axes=["request"])
        prompts = self.array(
            "prompt_ids",
            shape=(n, longest),
            dtype=np.int64,
            fillvalue=-1,
            padding=-1,
            chunks=(min(n, 1024), longest),
            axes=["request", "position"],
            compression="gzip",
        )
        self.array("prompt_lengths", data=self.requests.prompt_lengths, axes=["request"])
        generated = self.array(
            "generated",
            shape=(n, self.width),
            dtype=np.int64,
            fillvalue=-1,
            padding=-1,
            chunks=(min(n, 1024), self.width),
            axes=["request", "new_token"],
            compression="gzip",
        )
        lengths = self.array(
            "generated_lengths", shape=(n,), dtype=np.int64, axes=["request"], units="tokens"
        )
        from hpcmoe.workload import tokenizer_path

        has_text = tokenizer_path(self.checkpoint) is not None
        texts = (
            self.array("generated_text", shape=(n,), dtype=strings, axes=["request"]) if has_text else None
        )
        completions, encoded, replaced = rows["completion_ids"][:], rows["text"][:], 0
        for start in range(0, n, 4096):  # in blocks: a million requests stay within memory
            block = range(start, min(n, start + 4096))
            made = np.full((len(block), self.width), -1, np.int64)
            prompt = np.full((len(block), longest), -1, np.int64)
            names, words = [], []
            for j, i in enumerate(block):
                request = self.requests[i]
                names.append(request.id)
                prompt[j, : len(request.prompt_ids)] = request.prompt_ids
                text = ""
                if i in where:
                    tokens = completions[where[i]]
                    made[j, : len(tokens)] = tokens
                    text = bytes(encoded[where[i]]).decode("utf-8", "replace")
                replaced += text.count("\0")
                words.append(text.replace("\0", "\u2400"))
            ids[block.start : block.stop] = names
            prompts[block.start : block.stop] = prompt
            generated[block.start : block.stop] = made
            lengths[block.start : block.stop] = (made >= 0).sum(1)
            if texts is not None:
                texts[block.start : block.stop] = words
        if texts is not None:
            texts.attrs.update(
                {"nul_shown_as": "U+2400", "nul_characters": replaced, "exact": "/requests/text"}
            )

    def finish(
        self,
        metrics: dict,
        step_seconds: np.ndarray,
        per_rank: dict[str, np.ndarray],
        complete: bool = True,
        failures=(),
    ) -> str:
        """Close the file under its name, or, stopped early, under NAME.partial.h5 with complete false.
        failures: (rank, step, layer, phase, detected_at, recovered_at, action) rows, run.fault_tolerance."""
        self.write()
        group = self.file.create_group("metrics")
        group.attrs.update(metrics)
        group.create_dataset("step_seconds", data=step_seconds).attrs["axes"] = ["step"]
        for name, values in per_rank.items():
            axes = ["step"] if name == "token_time_s" else ["rank", "layer"][: values.ndim]
            group.create_dataset(name, data=values).attrs["axes"] = axes
        if failures:
            rows = np.array(
                [
                    (r, s, layer, phase.encode(), t0, t1, action.encode())
                    for r, s, layer, phase, t0, t1, action in failures
                ],
                dtype=FAILURE_DTYPE,
            )
            group.create_dataset("failures", data=rows).attrs.update(
                {"axes": ["failure"], "units": "detected_at, recovered_at: seconds on the run's clock"}
            )
        self.file.attrs["finished"] = now()
        path = self.path if complete else os.path.splitext(self.path)[0] + ".partial.h5"
        if not complete:
            self.file.attrs["stopped_at_step"] = metrics["stopped_at_step"]
        self.file.attrs["complete"] = complete  # last: only now may the file claim to be whole
        self.file.close()
        os.replace(self.tmp, path)
        return path

    def discard(self):
        """After an error: close and delete the temporary file, so nothing half-written remains."""
        try:
            self.file.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def export_jsonl(path: str, out: str) -> tuple[int, str]:
    """A run file's finished requests, in prompt-file order, one JSON object per line: id, index,
    prompt (text, or null for token ids), prompt_ids, completion (text, or null without a
    tokenizer), tokens, finish_reason, ttft_s, tokens_per_s. -> (requests written, a note when
    the file is not complete)."""
    import json
    import sys

    import h5py

    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it as a run file ({e})") from None
    with f:
        if "requests" not in f:
            raise ValueError(f"{path}: no /requests group (not a run file of hpcmoe run, or an older one)")
        rows = {name: f["requests"][name][:] for name in f["requests"]}
        from hpcmoe.workload import tokenizer_path

        tokenizer = tokenizer_path(_checkpoint_of(f)) is not None
        note = (
            ""
            if f.attrs.get("complete", False)
            else " (the run did not complete: the requests it had finished)"
        )
    stream = sys.stdout if out == "-" else open(out, "w", encoding="utf-8")
    try:
        for i in np.argsort(rows["index"], kind="stable"):
            prompt = bytes(rows["prompt_text"][i]).decode("utf-8")
            stream.write(
                json.dumps(
                    {
                        "id": rows["id"][i].decode(),
                        "index": int(rows["index"][i]),
                        "prompt": prompt or None,
                        "prompt_ids": rows["prompt_ids"][i].tolist(),
                        "completion": bytes(rows["text"][i]).decode("utf-8", "replace")
                        if tokenizer
                        else None,
                        "tokens": rows["completion_ids"][i].tolist(),
                        "finish_reason": rows["finish_reason"][i].decode(),
                        "ttft_s": float(rows["ttft_s"][i]),
                        "tokens_per_s": float(rows["tokens_per_s"][i]),
                    }
                )
                + "\n"
            )
    finally:
        if stream is not sys.stdout:
            stream.close()
    return len(rows["index"]), note


def _checkpoint_of(f) -> str | None:
    import yaml

    return (
        (yaml.safe_load(f.attrs["config"]).get("model") or {}).get("checkpoint")
        if "config" in f.attrs
        else None
    )
