"""The engine's MoE exchange on the simulated clock: hpcmoe.runtime.moe_layer's own generators
(flat, two_stage, dispatch_and_serve, serve; per_layer.exchange_per_layer; with their
ExchangeContext), run by the simulation against stand-ins for what they touch of MPI and of the
model.

- SimSender, SimReceives, SimCounts: comm.py's sends, receives and collectives as messages and
  collectives of the simulation (delivered over its links; a collective completes as
  Simulation.collective says). They carry the engine's tensors, so what a rank reads (the counts,
  a gateway's slots) is what its peers sent.
- CostedMoE: the model's part of an exchange (route, shared experts, experts), charged from the
  machine file by its shapes, with the simulation's routing (sim.routing).
- SimTimer (sim.ledger): the engine's timer; what a rank computes between two yields is charged to
  its Ledger, which the stand-ins charge too.

Rows are 8 bytes wide, so they cost nothing to move here; their bytes on the wire are the
model's (`row_bytes`: hidden x item; two_stage's packed rows hold their k slots and weights too).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import torch

from hpcmoe.parallel.dispatch import packed_row_bytes
from hpcmoe.parallel.layout import ExpertSchedule
from hpcmoe.runtime.buffers import BufferPool
from hpcmoe.runtime.comm import send_to_self
from hpcmoe.runtime.exchange_context import ExchangeContext, ExchangeGroup
from hpcmoe.runtime.link import Link
from hpcmoe.runtime.waits import Pending, WaitPolicy, Where
from hpcmoe.sim import routing as sim_routing
from hpcmoe.sim.events import AllFrom, AnyFrom, Cond, Latest, Wait
from hpcmoe.sim.ledger import Ledger, SimTimer

ALREADY = Cond()  # a wait on something this rank already holds
ALREADY.time = -np.inf


@dataclass
class SimPending(Pending):
    """A Pending the simulation can wait for: `wait` names the condition and its phase."""

    wait: Any = None


def pending(poll, where: Where, phase: str, on) -> SimPending:
    return SimPending(
        poll, lambda: where.waiting_for(phase, ()), wait=Wait(on, phase, where.layer, where.micro_batch)
    )


class CostedMoE:
    """A MoE layer's model calls as the exchange makes them, charged by their shapes; the experts
    each token goes to are sim.routing's."""

    def __init__(self, net: "SimNet", rank: int, layer: int):
        self.sim, self.rank, self.layer, self.ledger = net.sim, rank, layer, net.ledgers[rank]
        self.seconds = net.expert_seconds  # run_experts' cost by its counts, shared by the ranks

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.ledger.charge(self.sim.costs.route(len(h)))
        ids = sim_routing.experts(self.sim, self.rank, self.sim.step_of[self.rank], self.layer, len(h))
        return ids, torch.full(ids.shape, 1.0 / max(ids.shape[1], 1))

    def shared(self, h: torch.Tensor) -> None:
        self.ledger.charge(self.sim.costs.shared_experts(len(h)))
        return None

    def run_experts(
        self, rows: torch.Tensor, counts: list[int], out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        key = tuple(counts)
        if key not in self.seconds:
            self.seconds[key] = float(self.sim.costs.experts(np.array([counts]))[0])
        self.ledger.charge(self.seconds[key])
        return torch.zeros_like(rows) if out is None else out


class SimReceives:
    """comm.Receives: a message has arrived once the simulation has delivered it by now."""

    def __init__(self, net: "SimNet", rank: int, buffers: dict, tag: int):
        self.net, self.me, self.received, self.done = net, rank, buffers, set()
        self.key = ("message", net.sim.step_of[rank], tag)
        self.mail = net.sim.mail(self.key)
        self.expected = [peer for peer, buffer in buffers.items() if buffer.numel() and peer != rank]
        self.missing = np.array(self.expected, np.int64)  # expected peers not yet in
        self.done.update(peer for peer, buffer in buffers.items() if not buffer.numel())
        for _ in self.expected:
            net.ledgers[rank].charge(net.sim.costs.fixed["message"])

    def arrived(self) -> set[int]:
        if len(self.missing):
            landed = self.mail.times[self.missing, self.me] <= self.net.sim.now
            for peer in self.missing[landed].tolist():
                self.received[peer].copy_(self.net.payloads.pop((self.key, peer, self.me)))
                self.done.add(peer)
            self.missing = self.missing[~landed]
        return self.done

    def keep_own(self, data: torch.Tensor) -> None:
        self.received[self.me] = data
        self.done.add(self.me)

    def all_in(self, where: Where, phase: str) -> SimPending:
        return pending(
            lambda: True if len(self.arrived()) == len(self.received) else None,
            where,
            phase,
            AllFrom(self.mail, self.me, len(self.expected)),
        )

    def any_in(self, peers: set, where: Where, phase: str) -> SimPending:
        held = self.done & peers
        on = ALREADY if held else AnyFrom(self.mail, self.me, sorted(peers - {self.me}))
        return pending(lambda: (self.arrived() & peers) or None, where, phase, on)


class SimSender:
    """comm.Sender: each send costs a message on the rank and leaves at the end of that part."""

    staging = streams = None

    def __init__(self, net: "SimNet", rank: int):
        self.net, self.rank, self.ledger, self.policy = net, rank, net.ledgers[rank], net.policy

    def receives(self, buffers: dict, tag: int) -> SimReceives:
        return SimReceives(self.net, self.rank, buffers, tag)

    def send(self, peer: int, data: torch.Tensor, tag: int, own: Optional[SimReceives] = None) -> None:
        if peer == self.rank:
            send_to_self(own, peer, data)
            return
        if data.numel() == 0:
            return
        key = ("message", self.net.sim.step_of[self.rank], tag)
        self.ledger.charge(self.net.sim.costs.fixed["message"])
        self.net.payloads[key, self.rank, peer] = data.clone()
        self.ledger.send(key, [peer], [self.net.wire_bytes(data)])

    def settle(self, *args, **kwargs) -> None:
        """Sends complete in the simulation once delivered; a buffer is never written under one."""

    def test(self) -> None:
        pass


class SimCounts:
    """comm.CountsGroup: one micro-batch slot's collectives among fixed ranks (the counts, and with
    expert_schedule per_layer the rows), as collectives of the simulation named by `name`."""

    def __init__(self, net: "SimNet", rank: int, ranks: tuple, name: tuple):
        self.net, self.sim, self.rank, self.ranks, self.name = net, net.sim, rank, tuple(ranks), name
        self.index, self.ledger = self.ranks.index(rank), net.ledgers[rank]
        self.posted, self.step, self.finished, self.turns = 0, -1, 0, {}

    def join(self, what: str, where: Where, polled: bool = False):
        """This rank posts the next collective of the slot (at the end of the part charged last) ->
        the simulation's entry for it (shared by its members)."""
        self.ledger.charge(self.sim.costs.fixed["counts"])
        self.posted += 1
        key = (what, where.step, self.name, self.posted)
        entry = self.sim.joining(key, self.ranks)
        self.ledger.then(lambda time: self.sim.collective(key, self.ranks, self.rank, polled), joins=True)
        return key, entry

    def post(self, send: np.ndarray, where: Where, phase: str = "counts_wait"):
        """send: [G, S] -> (received [G, S], filled once complete; SimPending)."""
        _, entry = self.join("counts", where)
        table = entry.data.setdefault("sent", np.zeros((len(self.ranks), *send.shape), send.dtype))
        table[self.index] = send  # [G, G, S]: row i what member i sent
        received, cond = np.empty_like(send), entry.conds[self.rank]

        def poll():
            if not self.sim.passed(cond):
                return None
            received[:] = table[:, self.index]
            return True

        return received, pending(poll, where, phase, cond)

    def rows(
        self,
        send: torch.Tensor,
        send_counts: np.ndarray,
        send_starts: np.ndarray,
        recv: torch.Tensor,
        recv_counts: np.ndarray,
        recv_starts: np.ndarray,
        link,
        where: Where,
        phase: str,
        staging=None,
        streams=None,
    ):
        """Generator: one Ialltoallv of rows: a message to each member it sends to, complete once they
        are in and, as a collective, once every member has posted it and made progress. The rows'
        values are not moved: nothing the schedule does depends on them (the counts and two_stage's
        slots travel in messages that carry theirs)."""
        key, entry = self.join("rows", where, polled=True)
        to = np.flatnonzero(send_counts)
        to = to[to != self.index]
        self.ledger.send(key, np.asarray(self.ranks)[to], send_counts[to] * self.net.row_bytes(send))
        rows_in = AllFrom(
            self.sim.mail(key), self.rank, int(np.count_nonzero(recv_counts)) - bool(recv_counts[self.index])
        )
        done = Latest(rows_in, entry.conds[self.rank])  # the rows are in and the collective complete here
        yield pending(lambda: True if self.sim.passed(done) else None, where, phase, done)

    def turn(self, at: Where, index: int) -> Optional[SimPending]:
        """comm.CountsGroup.turn: the step's index-th MoE layer posts once those before it are done."""
        if at.step != self.step:
            self.step, self.finished, self.turns = at.step, 0, {}
        if self.finished == index:
            return None
        cond = self.turns.setdefault(index, Cond())
        return pending(lambda: True if self.finished >= index else None, at, "dispatch_wait", cond)

    def done_turn(self) -> None:
        self.finished += 1
        cond = self.turns.setdefault(self.finished, Cond())

        def release(time: float) -> None:
            cond.time = time
            self.sim.notify(cond.watchers)

        self.ledger.then(release)

    def close(self) -> None:
        pass


class SimNet:
    """The stand-ins of every rank of one simulation."""

    def __init__(self, sim):
        m = sim.config.model
        self.sim, self.dtype = sim, getattr(torch, m.dtype_name)
        self.policy = WaitPolicy.for_run(sim.config, sim.poll_by_yielding)  # what comm.Sender carries
        self.ledgers = [Ledger(sim, rank) for rank in range(sim.ranks)]
        self.payloads: dict = {}  # (mail key, source, destination) -> the message's tensor
        plain, packed = m.hidden * sim.costs.item, packed_row_bytes(m.hidden, self.dtype, m.top_k)
        self.row_bytes = lambda rows: packed if rows.dtype == torch.uint8 else plain
        self.senders = [SimSender(self, rank) for rank in range(sim.ranks)]
        self.timers = [SimTimer(self, rank) for rank in range(sim.ranks)]
        self.contexts: dict = {}
        self.moes: dict = {}
        self.expert_seconds: dict = {}

    def wire_bytes(self, data: torch.Tensor) -> int:
        """Bytes of a message: a tensor of the engine's shape holding no data (device meta) is what it
        says; a narrow [rows, W] one has the model's rows."""
        return data.numel() * data.element_size() if data.is_meta else len(data) * self.row_bytes(data)

    def role(self, rank: int) -> SimpleNamespace:
        """What ma's sums and gathers use of an AttentionEngine (`ctx`)."""
        return SimpleNamespace(
            rank=rank,
            topo=SimpleNamespace(node_of_rank=self.sim.node_of_rank),
            sender=self.senders[rank],
            timer=self.timers[rank],
        )

    def context(self, rank: int, members: tuple) -> ExchangeContext:
        """The rank's ExchangeContext among `members`, as ep.build_exchange makes it."""
        if rank not in self.contexts:
            sim, p = self.sim, self.sim.config.parallel
            micro_batches = sim.config.run.micro_batches

            def group(ranks, name) -> ExchangeGroup:
                member = np.zeros(sim.ranks, bool)
                member[list(ranks)] = True
                counts = tuple(SimCounts(self, rank, ranks, (name, mb)) for mb in range(micro_batches))
                return ExchangeGroup(tuple(ranks), counts, member)

            node = sim.node_of_rank[rank]
            node_group = (
                group(tuple(r for r in members if sim.node_of_rank[r] == node), f"node {node}")
                if p.dispatch == "two_stage"
                else None
            )
            self.contexts[rank] = ExchangeContext(
                rank=rank,
                world=None,
                sender=self.senders[rank],
                link=Link(sim.node_of_rank),
                tables=sim.tables[rank],
                group=group(members, "exchange"),
                node_group=node_group,
                timer=self.timers[rank],
                micro_batches=micro_batches,
                first_moe_layer=sim.config.model.dense_layers,
                capacity_factor=p.capacity_factor,
                pool=BufferPool(),
                tp_forward=p.expert_tp_dispatch == "leader",
                schedule=ExpertSchedule(p.expert_schedule),
                row_bytes=self.row_bytes,
            )
        return self.contexts[rank]

    def moe(self, rank: int, layer: int) -> CostedMoE:
        if (rank, layer) not in self.moes:
            self.moes[rank, layer] = CostedMoE(self, rank, layer)
        return self.moes[rank, layer]

    def tokens(self, n: int) -> torch.Tensor:
        """n tokens' hidden states, 8 bytes wide (so that two_stage's packed slots stay aligned)."""
        return torch.zeros(n, 8 // self.dtype.itemsize, dtype=self.dtype)


def charged(net: SimNet, rank: int, generator):
    """A simulation generator running an engine generator: the compute it charged before each yield
    as one Work, then its SimPending as a Wait; -> its return value."""
    ledger, value = net.ledgers[rank], None
    while True:
        try:
            waiting = generator.send(value)
        except StopIteration as finished:
            yield from ledger.works()
            return finished.value
        yield from ledger.works()
        yield waiting.wait
        value = waiting.poll()
        assert value is not None, f"rank {rank} resumed before {waiting.where()}"
