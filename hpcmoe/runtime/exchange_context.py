"""What a MoE layer's exchange runs with: the ranks and counts collectives of one kind of exchange
(`ExchangeGroup`), everything it needs from its rank (`ExchangeContext`, where the engine and the
exchange meet) and what a step's exchanges saw (`StepStats`). Apart from the exchanges themselves,
so that the engines and the simulator build these without reading the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from hpcmoe.parallel.dispatch import DispatchPlan, PlacementTables
from hpcmoe.parallel.layout import ExpertSchedule
from hpcmoe.runtime.buffers import BufferPool
from hpcmoe.runtime.collectives import CountsGroup
from hpcmoe.runtime.comm import Receives, Sender
from hpcmoe.runtime.fault import FaultState
from hpcmoe.runtime.link import Link
from hpcmoe.runtime.waits import WaitPolicy


@dataclass
class StepStats:
    """What one step's exchanges saw on this rank."""

    routing: torch.Tensor  # [moe_layers, experts] token slots this rank sent to each expert
    traffic: np.ndarray  # [moe_layers, ranks] payload bytes this rank sent to each rank
    dropped: torch.Tensor  # [] token slots over capacity (parallel.capacity_factor)

    @classmethod
    def zeros(cls, moe_layers: int, experts: int, ranks: int, device=None) -> "StepStats":
        return cls(
            torch.zeros(moe_layers, experts, dtype=torch.int64, device=device),
            np.zeros((moe_layers, ranks), np.int64),
            torch.zeros((), dtype=torch.int64, device=device),
        )


@dataclass(frozen=True)
class ExchangeGroup:
    """The ranks one kind of exchange runs among, and its counts collective per micro-batch slot."""

    ranks: tuple[int, ...]  # world ranks, ascending
    counts: tuple[CountsGroup, ...]  # [micro_batches]
    member_host: np.ndarray  # [R] bool, True for the group's ranks

    @classmethod
    def build(
        cls,
        comm,
        ranks,
        micro_batches: int,
        world_size: int,
        policy: WaitPolicy,
        track: Callable = lambda c: c,
    ) -> "ExchangeGroup":
        """Collective over `comm`, whose members are exactly `ranks` in order; track: the run's
        FaultState.track, given each communicator made."""
        member = np.zeros(world_size, bool)
        member[list(ranks)] = True
        counts = tuple(CountsGroup(comm, ranks, policy, track) for _ in range(micro_batches))
        return cls(tuple(ranks), counts, member)

    def host_counts(self, plan: DispatchPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The plan's counts in one device-to-host copy -> (counts per slot of each rank [R, S], rows
        to each rank [R], first row of each in plan order [R])."""
        host = torch.cat([plan.send_counts.reshape(-1), plan.rank_counts]).cpu().numpy()
        ranks = len(self.member_host)
        send, rank_counts = host[:-ranks].reshape(ranks, -1), host[-ranks:]
        return send, rank_counts, np.cumsum(rank_counts) - rank_counts

    def destinations(self, plan: DispatchPlan, tp: int = 1, fan_out: bool = True):
        """The host's part of the control path: one device-to-host copy of the counts, then Python
        work only per active peer -> (counts to send [G, S], destination ranks, first row of each
        in plan order, rows for each). With expert groups (tp > 1) every member is sent the counts
        of its group's slots (it computes a share of each); the rows go to every member (fan_out)
        or to the group's leader only, which forwards them."""
        send, rank_counts, starts = self.host_counts(plan)
        ranks = len(self.member_host)
        if tp > 1:
            leader = np.arange(ranks) // tp * tp
            send = send[leader]
            if fan_out:
                rank_counts, starts = rank_counts[leader], starts[leader]
        if len(self.ranks) < ranks:
            send = send[list(self.ranks)]
        active = [r for r in np.flatnonzero(rank_counts) if self.member_host[r]]
        return send, active, starts[active].tolist(), rank_counts[active].tolist()

    def shares(self, plan: DispatchPlan, tp: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As `destinations`, for one collective, with no Python work per peer -> (counts to send
        [G, S], rows to each member [G], first row of each in plan order [G]); with expert groups
        every member gets its group's rows."""
        send, rank_counts, starts = self.host_counts(plan)
        members = np.asarray(self.ranks)
        group_of = members - members % tp
        return send[group_of], rank_counts[group_of], starts[group_of]

    def close(self) -> None:
        for group in self.counts:
            group.close()


@dataclass(frozen=True)
class ExchangeContext:
    """What a MoE layer's exchange needs from its rank, and nothing else."""

    rank: int  # world rank
    world: object  # the communicator of every point-to-point message
    sender: Sender
    link: Link
    tables: PlacementTables  # the placement compiled for this rank
    group: ExchangeGroup  # the ranks tokens travel among (stage 1 of two_stage)
    node_group: Optional[ExchangeGroup]  # two_stage: this node's ranks (stage 2)
    timer: object
    micro_batches: int
    first_moe_layer: int  # layer index of MoE layer 0 (model.dense_layers)
    capacity_factor: Optional[float]
    pool: BufferPool
    before_dispatch: Callable[[int], None] = lambda step: None  # run.stall_rank
    tp_forward: bool = False  # expert groups: rows go to the leader, which forwards (else to every member)
    schedule: ExpertSchedule = field(default_factory=ExpertSchedule)  # set per step by the engine
    # bytes of one row of a [rows, W] tensor on the wire (the simulator's rows are narrower than the model's)
    row_bytes: Callable[[torch.Tensor], int] = lambda rows: rows.shape[1] * rows.element_size()
    fault: FaultState = field(default_factory=FaultState)  # the run's kill points (run.kill)

    def receives(self, buffers: dict, tag: int) -> Receives:
        """Receives of this rank's messages (staged through pinned memory where the MPI needs it)."""
        return self.sender.receives(buffers, tag)

    def close(self) -> None:
        self.group.close()
        if self.node_group is not None:
            self.node_group.close()
