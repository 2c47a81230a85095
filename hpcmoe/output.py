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

FAILURE_DTYPE = np.dtype([("rank", "i4"), ("step", "i4"), ("layer", "i4"), ("phase", "S24"), ("detected_at", "f8"),
                          ("recovered_at", "f8"), ("action", "S96")])
TIMING_DTYPE = np.dtype([("rank", "i4"), ("layer", "i4"), ("micro_batch", "i4"), ("step", "i4"),
                         ("phase", "S16"), ("start", "f8"), ("end", "f8")])


class Timer:
    """Collects (rank, layer, micro_batch, step, phase, start, end) rows, seconds since `t0`.

    On a GPU (`streams`), compute phases are timed by events on the compute stream (kernels run
    asynchronously, so host clocks would time their launch), resolved when the step's rows are
    taken; waits and communication in flight stay on the host clock. Both count from the common
    start: the reference event is recorded on an idle stream right after it."""

    def __init__(self, rank: int, t0: float, streams=None):
        self.rank, self.t0, self.rows = rank, t0, []
        self.streams = streams if streams is not None and streams.gpu else None
        self.timed: list = []      # (row index, start event, end event) to resolve
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

    @contextmanager
    def phase(self, name: str, step: int, layer: int = -1, micro_batch: int = 0):
        on_device = self.streams is not None and self.reference is not None and not name.endswith(("_wait", "_comm"))
        start = time.perf_counter()
        begin = self.event() if on_device else None
        try:
            yield
        finally:
            if on_device:
                self.timed.append((len(self.rows), begin, self.event()))
            self.rows.append((self.rank, layer, micro_batch, step, name.encode(),
                              start - self.t0, time.perf_counter() - self.t0))

    def add(self, name: str, step: int, layer: int, micro_batch: int, start: float) -> None:
        """A row from `start` (a perf_counter value) until now: for spans that no `with` encloses."""
        self.rows.append((self.rank, layer, micro_batch, step, name.encode(), start - self.t0,
                          time.perf_counter() - self.t0))

    def take(self) -> np.ndarray:
        """The rows collected since the last call (device-timed rows resolved: this waits for them)."""
        for index, begin, end in self.timed:
            end.synchronize()
            row = self.rows[index]
            self.rows[index] = row[:5] + (self.reference.elapsed_time(begin) / 1e3,
                                          self.reference.elapsed_time(end) / 1e3)
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


def busy_and_idle(timings: np.ndarray, ranks: int) -> dict[str, np.ndarray]:
    """Per rank, as shares of its loop (from the common start to its last row):
    busy = |compute|, idle = |waiting with nothing runnable| (the `*_wait` phases)."""
    busy, idle = np.zeros(ranks), np.zeros(ranks)
    for rank in range(ranks):
        rows = timings[timings["rank"] == rank]
        if not len(rows):
            continue
        loop = max(float(rows["end"].max()), 1e-12)
        busy[rank] = length(union([(r["start"], r["end"]) for r in rows if is_compute(r["phase"])])) / loop
        idle[rank] = length(union([(r["start"], r["end"]) for r in rows if is_wait(r["phase"])])) / loop
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
        raise ValueError(f"parallel.placement_from: {path} routed to {routing.shape[-1]} experts, "
                         f"model.num_experts is {num_experts}")
    return routing


def rank_load_imbalance(traffic: np.ndarray) -> float:
    """max / mean over ranks of the payload each rank's experts received (traffic [.., src, dst])."""
    received = traffic.sum(axis=tuple(range(traffic.ndim - 1)))
    return float(received.max() / received.mean()) if received.mean() > 0 else float("nan")


def step_imbalance(traffic: np.ndarray) -> float:
    """Mean over steps of each step's rank load max / mean (traffic [steps, layers, src, dst]): the
    whole-run figure hides a load that moves from rank to rank during the run; this one does not."""
    received = traffic.sum(axis=(1, 2)).astype(float)        # [steps, dst]
    busy = received.mean(axis=1) > 0
    return float((received[busy].max(1) / received[busy].mean(1)).mean()) if busy.any() else float("nan")


def previous_imbalance(path: str) -> float:
    """The rank load max/mean of an earlier run file."""
    import h5py
    with h5py.File(path, "r") as f:
        return rank_load_imbalance(f["traffic"][:])


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def run_attrs(config, node_of_rank, ranks_per_node: int, device: str, device_name: str) -> dict:
    """The run file's root attributes (a real run's and a simulated one's)."""
    return {"config": config.to_yaml(), "hpcmoe_version": __version__, "world_size": len(node_of_rank),
            "ranks_per_node": ranks_per_node, "num_nodes": max(node_of_rank) + 1,
            "node_of_rank": np.array(node_of_rank, np.int64), "layout": config.parallel.layout, "device": device,
            "device_name": device_name}


class RunWriter:
    """Rank 0's handle on the run file; every array carries its axis names in attribute `axes`."""

    def __init__(self, path: str, attrs: dict, prompts: list[list[int]], steps: int, vocab: int,
                 moe_layers: int, num_ranks: int, num_experts: int, save_logits: bool):
        import h5py
        self.path, self.tmp = path, path + ".tmp"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = h5py.File(self.tmp, "w")
        self.file.attrs.update({**attrs, "started": now(), "complete": False})
        batch, longest = len(prompts), max(len(p) for p in prompts)
        padded = np.full((batch, longest), -1, dtype=np.int64)
        for i, p in enumerate(prompts):
            padded[i, :len(p)] = p
        self.array("prompt_ids", data=padded, axes=["request", "position"], padding=-1)
        self.array("prompt_lengths", data=np.array([len(p) for p in prompts], np.int64), axes=["request"])
        self.array("generated", shape=(batch, steps), dtype=np.int64, fillvalue=-1,
                   axes=["request", "new_token"])
        if save_logits:
            self.array("logits", shape=(batch, steps, vocab), dtype=np.float32, chunks=(batch, 1, vocab),
                       axes=["request", "new_token", "vocab"])
        self.array("routing", shape=(steps, moe_layers, num_ranks, num_experts), dtype=np.int64,
                   axes=["step", "moe_layer", "source_rank", "expert"], units="token slots")
        self.array("traffic", shape=(steps, moe_layers, num_ranks, num_ranks), dtype=np.int64,
                   axes=["step", "moe_layer", "src_rank", "dst_rank"], units="bytes (dispatch payload)")
        self.array("timings", shape=(0,), maxshape=(None,), dtype=TIMING_DTYPE, chunks=(4096,),
                   axes=["row"], units="seconds since the common start barrier")
        self.pending, self.timing_rows, self.held, self.written_at = [], [], 0, time.monotonic()

    def array(self, name: str, axes: list[str], **attrs_and_args):
        attrs = {k: attrs_and_args.pop(k) for k in ("units", "padding") if k in attrs_and_args}
        dataset = self.file.create_dataset(name, **attrs_and_args)
        dataset.attrs.update({"axes": axes, **attrs})
        return dataset

    def write_placement(self, expert_ranks: list[list[int]], moe_layers: int, mode: str, source: str,
                        expert_tp: int = 1):
        """expert_ranks: [experts][replicas] -> /placement [moe_layer, expert, replica] (-1 pads). With
        expert_tp > 1 an entry is the first rank of the group of expert_tp ranks that holds the replica."""
        width = max(len(r) for r in expert_ranks)
        table = np.full((moe_layers, len(expert_ranks), width), -1, dtype=np.int64)
        for e, ranks in enumerate(expert_ranks):
            table[:, e, :len(ranks)] = ranks
        dataset = self.array("placement", data=table, axes=["moe_layer", "expert", "replica"], padding=-1)
        dataset.attrs.update({"mode": mode, "source": source, "expert_tp": expert_tp,
                              "ranks": f"each replica on ranks r .. r + {expert_tp - 1} (tensor parallel)"
                              if expert_tp > 1 else "each replica on rank r"})

    def write_placement_history(self, history, digests: list[list[str]], done: int):
        """/placement_history: one row per switch of online rebalancing (not the initial placement).
        digests: [ranks][switches] sha256 of each rank's expert weights after each switch ("" when
        parallel.rebalance.checksums is off). The observed rank load max/mean is measured from
        /routing over the steps the placement ran, split over its replicas as the dispatcher splits
        them (NaN when it ran none)."""
        from hpcmoe.rebalance import imbalance
        from hpcmoe.placement import load_from_routing
        experts, ranks = self.file["routing"].shape[-1], self.file["traffic"].shape[-1]
        dtype = np.dtype([("step", np.int64), ("decided_at_step", np.int64), ("placement", np.int64, (experts, ranks)),
                          ("bytes_moved", np.int64), ("predicted_rank_load_max_over_mean_before", np.float64),
                          ("predicted_rank_load_max_over_mean", np.float64),
                          ("observed_rank_load_max_over_mean", np.float64), ("weights_sha256", "S64", (ranks,))])
        rows = np.zeros(len(history), dtype)
        routing, node_of_rank = self.file["routing"], [int(n) for n in self.file.attrs["node_of_rank"]]
        for i, switch in enumerate(history):
            end = history[i + 1].step if i + 1 < len(history) else done
            table = np.full((experts, ranks), -1, np.int64)
            for e, holders in enumerate(switch.placement.expert_ranks()):
                table[e, :len(holders)] = holders
            observed = float("nan")
            if end > switch.step:
                places, tp = switch.placement.grouped(), switch.placement.tp
                tokens, _ = load_from_routing(routing[switch.step:end], node_of_rank)
                observed = imbalance(places, np.array(tokens), node_of_rank[::tp])
            rows[i] = (switch.step, switch.decided_at_step, table, switch.bytes_moved, switch.predicted_before,
                       switch.predicted, observed, [d[i].encode() for d in digests])
        dataset = self.array("placement_history", data=rows, axes=["switch"], padding=-1)
        dataset.attrs["placement"] = "[expert, replica] rank (with expert_tp: the group's first rank), -1 padded"

    # Steps are buffered and written in blocks (every WRITE_EVERY_S seconds or WRITE_BYTES bytes, and at
    # the end): one HDF5 call per dataset and block instead of per step; memory stays bounded.
    WRITE_EVERY_S, WRITE_BYTES = 2.0, 64 * 2 ** 20

    def append_step(self, step: int, tokens: np.ndarray, logits, routing: np.ndarray, traffic: np.ndarray):
        """tokens: [batch]; logits: [batch, vocab] or None; routing: [moe_layers, ranks, experts]."""
        self.pending.append((step, tokens, logits, routing, traffic))
        self.maybe_write(sum(a.nbytes for a in (tokens, logits, routing, traffic) if a is not None))

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
            steps = list(zip(*self.pending))
            self.file["generated"][:, first:last] = np.stack(steps[1], axis=1)
            if steps[2][0] is not None and "logits" in self.file:
                self.file["logits"][:, first:last] = np.stack(steps[2], axis=1)
            self.file["routing"][first:last] = np.stack(steps[3])
            self.file["traffic"][first:last] = np.stack(steps[4])
            self.pending = []
        if self.timing_rows:
            rows, table = np.concatenate(self.timing_rows), self.file["timings"]
            table.resize((table.shape[0] + len(rows),))
            table[-len(rows):] = rows
            self.timing_rows = []
        self.held, self.written_at = 0, time.monotonic()

    def write_finished_steps(self, resume) -> None:
        """A resumed run's file starts with the steps the stopped run finished, as it wrote them."""
        k = resume.step
        self.file["generated"][:, :k] = resume.generated
        self.file["routing"][:k] = resume.routing
        self.file["traffic"][:k] = resume.traffic
        if resume.logits is not None and "logits" in self.file:
            self.file["logits"][:, :k] = resume.logits

    def write_requests(self, config) -> None:
        """/request_ids, /generated_lengths (each request's tokens, its eos token included) and, with a
        tokenizer, /generated_text (UTF-8)."""
        import h5py
        from hpcmoe.workload import decode
        self.write()
        generated = self.file["generated"][:]
        lengths = (generated >= 0).sum(axis=1).astype(np.int64)
        strings = h5py.string_dtype("utf-8")
        self.array("request_ids", data=np.array([r.id for r in config.requests], dtype=object), dtype=strings,
                   axes=["request"])
        self.array("generated_lengths", data=lengths, axes=["request"], units="tokens")
        texts = [decode(config.model.checkpoint, row) for row in generated]
        if texts and texts[0] is not None:
            self.array("generated_text", data=np.array(texts, dtype=object), dtype=strings, axes=["request"])

    def finish(self, metrics: dict, step_seconds: np.ndarray, per_rank: dict[str, np.ndarray],
               complete: bool = True, failures=()) -> str:
        """Close the file under its name, or, stopped early, under NAME.partial.h5 with complete false.
        failures: (rank, step, layer, phase, detected_at, recovered_at, action) rows, run.fault_tolerance."""
        self.write()
        group = self.file.create_group("metrics")
        group.attrs.update(metrics)
        group.create_dataset("step_seconds", data=step_seconds).attrs["axes"] = ["step"]
        for name, values in per_rank.items():
            axes = ["step"] if name == "token_time_s" else ["rank", "layer"][:values.ndim]
            group.create_dataset(name, data=values).attrs["axes"] = axes
        if failures:
            rows = np.array([(r, s, layer, phase.encode(), t0, t1, action.encode())
                             for r, s, layer, phase, t0, t1, action in failures], dtype=FAILURE_DTYPE)
            group.create_dataset("failures", data=rows).attrs.update(
                {"axes": ["failure"], "units": "detected_at, recovered_at: seconds on the run's clock"})
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
