"""The run file's writer (rank 0's): crash-safe, bounded in memory.

Rank 0 writes into `<path>.tmp` beside the target, appends as steps finish (memory stays
bounded), sets the root attribute `complete` last and renames with os.replace: a crash leaves
at most a `.tmp` file whose `complete` is false, never a file that looks finished.
"""

from __future__ import annotations

import os
import time

import numpy as np

from hpcmoe.runfile.requests import RequestRows
from hpcmoe.runfile.schema import FAILURE_DTYPE, array, now, open_logits, open_step_datasets


class RunWriter(RequestRows):
    """Rank 0's handle on the run file; every array carries its axis names in attribute `axes`.

    Per step: /routing, /traffic and /timings rows, buffered and written in blocks. Per request,
    as it ends: one row of the /requests group (flushed to disk, so a crash or kill -9 keeps every
    request that had finished). At the end: the per-request arrays in file order (/generated ...)."""

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
        """requests: the run's requests (hpcmoe.workload: len, [i], prompt_lengths); width: the most
        tokens a request may make."""
        import h5py

        self.path, self.tmp, self.requests, self.checkpoint = path, path + ".tmp", requests, checkpoint
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = h5py.File(self.tmp, "w")
        self.file.attrs.update({**attrs, "started": now(), "complete": False})
        self.width = width
        if save_logits:
            open_logits(self.file, len(requests), width, vocab)
        open_step_datasets(self.file, moe_layers, num_ranks, num_experts)
        self.open_requests()
        self.pending, self.timing_rows, self.held, self.written_at = [], [], 0, time.monotonic()
        self.steps = 0

    def write_placement(
        self, expert_ranks: list[list[int]], moe_layers: int, mode: str, source: str, expert_tp: int = 1
    ):
        """expert_ranks: [experts][replicas] -> /placement [moe_layer, expert, replica] (-1 pads). With
        expert_tp > 1 an entry is the first rank of the group of expert_tp ranks that holds the replica."""
        width = max(len(r) for r in expert_ranks)
        table = np.full((moe_layers, len(expert_ranks), width), -1, dtype=np.int64)
        for e, ranks in enumerate(expert_ranks):
            table[:, e, : len(ranks)] = ranks
        dataset = array(
            self.file, "placement", data=table, axes=["moe_layer", "expert", "replica"], padding=-1
        )
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
        from hpcmoe.parallel.rebalance import imbalance
        from hpcmoe.parallel.traffic import load_from_routing

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
        dataset = array(self.file, "placement_history", data=rows, axes=["switch"], padding=-1)
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
