"""The collectives of one micro-batch slot's exchanges (`CountsGroup`): the counts in one
non-blocking Ialltoall, and with parallel.expert_schedule per_layer the rows themselves in one
Ialltoallv. No blocking collective is used inside the generate loop: a blocking call can neither
time out nor say whom it waits for. Non-blocking collectives are tested like receives, and a
`CountsGroup` lets a rank stuck in one name the members that have not joined it yet.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch
from mpi4py import MPI

from hpcmoe.runtime.buffers import as_bytes, byte_view
from hpcmoe.runtime.device import DONE
from hpcmoe.runtime.link import Link
from hpcmoe.runtime.waits import Pending, WaitPolicy, Where, all_done


def tested(requests: list, tests: int = 64) -> bool:
    """Whether every request is complete, testing up to `tests` times in a row: MPICH moves a
    non-blocking collective's payload a few KiB per test (518 tests for 4 MiB between 2 ranks), and a
    test costs about a microsecond where a turn of the scheduler costs ten."""
    for _ in range(tests):
        if all_done(requests):
            return True
    return False


class CountsGroup:
    """The collectives of one micro-batch slot's exchanges among fixed ranks, without R^2 messages:
    the counts, and with parallel.expert_schedule per_layer the rows themselves (`rows`).

    One non-blocking `Ialltoall` of counts per exchange, on a communicator this slot owns, so that every
    member issues its collectives on it in the same order (layer after layer) and the wait helper
    can test them. A collective hides who is late, so each member also counts the collectives it
    has posted in an RMA window that others read without its help (passive target): a member
    stuck in one names the members whose count is behind. Created collectively by `ranks`. (Not
    under run.fault_tolerance: Open MPI's shared-memory RMA is not made to outlive a dead rank, so
    the watchdog then names no one inside a collective.)"""

    def __init__(self, comm, ranks: tuple[int, ...], policy: WaitPolicy, track: Callable = lambda comm: comm):
        """comm: a communicator of exactly `ranks` (world ranks, in comm rank order); duplicated here,
        and the duplicate given to track (the run's FaultState.track). policy: fault_tolerant keeps no
        RMA window."""
        self.comm, self.ranks = track(comm.Dup()), tuple(ranks)
        self.comm_rank_world = self.ranks[self.comm.Get_rank()]
        self.row_types: dict[int, object] = {}  # row width in bytes -> a committed contiguous datatype
        self.far = None
        self.step, self.finished = -1, 0  # per_layer: exchanges of this step done here (see turn)
        self.window, self.posted = None, np.zeros(1, np.int64)
        if not policy.fault_tolerant:
            self.window = MPI.Win.Allocate(8, 8, comm=self.comm)
            self.posted = np.frombuffer(self.window.tomemory(), np.int64)
            self.posted[0] = 0
            self.window.Lock_all()
        self.comm.Barrier()  # every count is zero before anyone reads one

    def post(self, send: np.ndarray, where: Where, phase: str = "counts_wait"):
        """send: [G, S] int64, row i for member i -> (received [G, S], row i from member i; Pending)."""
        number = self.count_posted()
        received = np.empty_like(send)
        request = self.comm.Ialltoall(send, received)
        keep = (send, received)  # alive until the request completes
        return received, Pending(
            lambda: True if request.Test() and keep else None,
            lambda: where.waiting_for(phase, self.behind(number)),
        )

    def rows(
        self,
        send: torch.Tensor,
        send_counts: np.ndarray,
        send_starts: np.ndarray,
        recv: torch.Tensor,
        recv_counts: np.ndarray,
        recv_starts: np.ndarray,
        link: Link,
        where: Where,
        phase: str,
        staging=None,
        streams=None,
    ):
        """Generator: one non-blocking Ialltoallv of rows. send, recv: [*, W] contiguous tensors of one
        row width; counts and starts [G] in rows, entry i for member i (in member order; this rank's
        own share included). Whatever the number of members, the host makes one or two MPI calls.

        On an emulated link the delivery time of each inter-node share travels in an Ialltoall posted
        just before (the link queues the shares in member order), and the rows count as in once the
        latest of them is due. On a GPU the rows are sent once the kernels that wrote them are done,
        through pinned host memory when the MPI cannot read the device (one copy each way)."""
        width = send.shape[1] * send.element_size()
        row = self.row_type(width)
        requests, stamps = self.post_stamps(link, send_counts, width)
        send_buffer, recv_buffer = send, recv
        if send.device.type != "cpu":
            ready = streams.record()
            if staging is not None:  # one copy to pinned host memory for the whole exchange
                send_buffer = staging.pool.take(send.numel() * send.element_size())
                recv_buffer = staging.pool.take(recv.numel() * recv.element_size())
                ready = streams.copy_after(ready, send_buffer, byte_view(send))
            yield Pending(lambda: True if ready.query() else None, lambda: where.waiting_for("send_wait", ()))
        number = self.count_posted()
        # no int overflow
        requests.append(
            self.comm.Ialltoallv(
                [as_bytes(send_buffer), (send_counts, send_starts), row],  # counts in rows:
                [as_bytes(recv_buffer), (recv_counts, recv_starts), row],
            )
        )
        keep = (send_buffer, recv_buffer, stamps)  # alive until the requests complete
        due = lambda: 0.0 if stamps is None else stamps[1][self.far & (recv_counts > 0)].max(initial=0.0)
        arrived = []  # [True] once every request is complete (then only an emulated delivery time is awaited)
        landed = lambda: bool(arrived) or (tested(requests) and keep and not arrived.append(True))
        in_and_due = lambda: landed() and time.monotonic() >= due()
        yield Pending(
            lambda: True if in_and_due() else None,
            lambda: where.waiting_for(phase, self.behind(number)),
            polled=lambda: not arrived,
        )
        if staging is not None:
            copied = streams.copy_after(DONE, byte_view(recv).view(-1), recv_buffer)
            streams.compute_waits(copied)
            staging.pool.give(recv_buffer, after=copied)
            staging.pool.give(send_buffer)

    def row_type(self, width: int):
        """A committed contiguous datatype of `width` bytes, one row (made once per width)."""
        row = self.row_types.get(width)
        if row is None:
            row = self.row_types[width] = MPI.BYTE.Create_contiguous(width).Commit()
        return row

    def post_stamps(self, link: Link, send_counts: np.ndarray, width: int) -> tuple[list, Optional[tuple]]:
        """On an emulated link, the delivery time of each inter-node share of rows [G] in an Ialltoall
        posted before them (the link queues the shares in member order) -> ([its request], (stamps
        sent [G], stamps received [G]), both alive until it completes); else ([], None)."""
        if link.bandwidth_gbps is None:
            return [], None
        far = self.far_from(link)
        stamps_out, stamps_in = np.zeros(len(self.ranks)), np.zeros(len(self.ranks))
        going = far & (send_counts > 0)
        stamps_out[going] = link.delivery_times(send_counts[going] * width)
        self.count_posted()
        return [self.comm.Ialltoall(stamps_out, stamps_in)], (stamps_out, stamps_in)

    def turn(self, at: Where, index: int) -> Optional[Pending]:
        """Collectives must be posted in the same order on every member. An exchange that posts
        several here (per_layer) must not interleave with another: the one of the step's `index`-th
        MoE layer goes once those before it are done (a MoE rank of ma starts every layer at once).
        -> None when it may go now, else what to wait for; `done_turn` when it has posted its last."""
        if at.step != self.step:
            self.step, self.finished = at.step, 0
        if self.finished == index:
            return None
        return Pending(
            lambda: True if self.finished == index else None, lambda: at.waiting_for("dispatch_wait", ())
        )

    def done_turn(self) -> None:
        self.finished += 1

    def far_from(self, link: Link) -> np.ndarray:
        """[G] bool: the members on another (possibly emulated) node than this rank (made once)."""
        if self.far is None:
            nodes = np.asarray(link.node_of_rank)
            self.far = nodes[list(self.ranks)] != nodes[self.comm_rank_world]
        return self.far

    def count_posted(self) -> int:
        """One more collective posted here (what `behind` reads); -> how many so far."""
        self.posted[0] += 1
        if self.window is not None:
            self.window.Sync()
        return int(self.posted[0])

    def behind(self, number: int, patience_s: float = 0.5) -> list[int]:
        """World ranks that have posted fewer than `number` collectives here (read without their help)."""
        if self.window is None:
            return []
        late = []
        for member, rank in enumerate(self.ranks):
            value = np.zeros(1, np.int64)
            request, start = (
                self.window.Rget([value, MPI.INT64_T], member, target=(0, 1, MPI.INT64_T)),
                time.monotonic(),
            )
            while not request.Test() and time.monotonic() - start < patience_s:
                time.sleep(1e-4)
            if value[0] < number:
                late.append(rank)
        return late

    def close(self) -> None:
        if self.window is not None:
            self.window.Unlock_all()
            self.window.Free()
        for row in self.row_types.values():
            row.Free()
        self.comm.Free()
