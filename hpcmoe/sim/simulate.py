"""`hpcmoe simulate CONFIG --machine M.yaml --ranks N`: the engine's own schedule on a machine file,
as a discrete-event simulation, written as a run file that `hpcmoe report` reads like a real one.

What is the engine's, imported and called (not written again here): the layout and placement
(ParallelLayout.from_config(...).placement), the compiled placement tables, slot choice, capacity
and the dispatch plan (hpcmoe.parallel.dispatch), the two_stage gateways and node groups, the requests of
each rank and micro-batch (request_range, MALayout's groups), ma's head split and reduction plan,
and the router functions that turn scores into experts. What is modelled: each phase's cost
(hpcmoe.sim.costs on a hpcmoe.sim.machine file), ranks as compute resources (time-sliced like an OS does
when a node has more ranks than cores or GPUs; a rank that spins while it waits keeps its core), each rank's outgoing links as queues (latency +
bytes / bandwidth, one message after another, as comm.Link), collectives that move on only when
their members call into MPI, and the engine's waits (comm.wait_until: sleeps of 20 us doubling to
1 ms, each a little longer than asked).

The scheduler's loop (scheduler.passes) and every MoE layer's exchange (moe_layer.flat / two_stage
and all they call: slot choice, capacity, plans, counts, serving, expert_schedule) are the engine's
own code, run on the simulated clock against stand-ins for MPI and the model (sim/net.py). Around
them, sim/schedule.py follows the engine's step (engine.run_steps, ep.EPEngine, ma's roles and
hierarchical sum); sim/routing.py draws the routing; sim/results.py makes the metrics and the run
file; sim/events.py holds what ranks yield and wait on; this file holds the event loop, the ranks'
compute, their links and the collectives, and the command.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from hpcmoe.config import Config
from hpcmoe.parallel import dispatch
from hpcmoe.parallel.layout import MALayout, ParallelLayout
from hpcmoe.runtime import tags
from hpcmoe.sim.costs import Costs
from hpcmoe.sim.events import (
    PROGRESS,
    Collective,
    Cond,  # noqa: F401
    Latest,
    Mail,
    Work,
    poll_time,
    queue,
)
from hpcmoe.sim.machine import Machine


@dataclass
class Driver:
    """One rank: its top generator, whether it computes (and what), what it waits for."""

    rank: int
    host: int
    gen: object = None
    busy: bool = False
    waiting: Optional[list] = None
    idle_since: float = 0.0
    version: int = 0
    work: Optional[Work] = None
    work_start: float = 0.0
    remaining: float = 0.0
    slice_start: float = 0.0
    spinning: bool = False  # waits while holding its core (parallel.wait=spin, more ranks than cores)
    ready: Optional[float] = None  # a spinning wait: when what it waits for is there (None: not known yet)


def node_of_ranks(config: Config, machine: Machine, ranks: int) -> tuple[int, ...]:
    """Nodes as topology.build_topology makes them: blocks of parallel.ranks_per_node ranks; unset,
    one node on a one-box machine, else nodes as large as the machine's."""
    size = config.parallel.ranks_per_node or (ranks if machine.one_box else machine.units_per_node)
    return tuple(r // size for r in range(ranks))


def check_one_batch(config: Config, layout, ranks: int, memory_per_rank: float) -> None:
    """The simulator starts every request of a rank in the first step, its whole prompt in that step's
    prefill. The engine's Batch does the same only where run.max_batch (unset: what the start-up
    check allows in `memory_per_rank`, plan.default_max_batch) holds all of a rank's requests and,
    batching continuous, run.prefill_chunk all of their prompt tokens: ValueError (one line, naming
    the setting) otherwise, rather than a simulation of another schedule."""
    from hpcmoe.parallel.plan import default_max_batch

    r, requests = config.run, config.requests
    is_ma = isinstance(layout, MALayout)
    held = r.max_batch or default_max_batch(config, ranks, memory_per_rank)
    for rank in range(ranks):
        if is_ma and not layout.is_attention(rank):
            continue
        mine = layout.group_requests(len(requests), rank) if is_ma else range(rank, len(requests), ranks)
        if len(mine) > held:
            limit = (
                f"run.max_batch={held}" if r.max_batch else f"run.max_batch unset: {held}, what memory allows"
            )
            raise ValueError(
                f"hpcmoe simulate starts every request of a rank at once: rank {rank} holds {len(mine)} "
                f"requests and the engine would start {held} ({limit}); continuous batching is not "
                f"simulated (use --steady-decode, or more ranks)"
            )
        prompt = sum(len(requests[i].prompt_ids) for i in mine)
        if r.batching == "continuous" and prompt > r.prefill_chunk:
            raise ValueError(
                f"hpcmoe simulate prefills a rank's prompts in the first step: rank {rank}'s {prompt} "
                f"prompt tokens take more than one step at run.prefill_chunk={r.prefill_chunk}; set "
                f"run.prefill_chunk >= {prompt} or run.batching=static (or use --steady-decode)"
            )


def weights_per_cache(config: Config, machine: Machine, layout, tables: list, host_of_rank: list) -> float:
    """Bytes of weights the ranks sharing the busiest cache read each step: all a rank holds (ep:
    every weight but the routed experts, and its expert slots; ma: its attention shard, or its
    slots). A cpu's ranks share their host's last-level cache; a GPU's, its own."""
    from hpcmoe.model.attention import split_heads
    from hpcmoe.model.transformer import attention_shard_bytes, parameter_bytes
    from hpcmoe.parallel.layout import request_range

    m = config.model
    base = parameter_bytes(m, 0)[1]
    per_slot = (
        parameter_bytes(m, 1)[1] - base
    ) / config.parallel.expert_tp  # a member holds its share of each
    shards: dict = {}

    def rank_bytes(rank: int) -> float:
        slots = per_slot * tables[rank].served_slots(rank)
        if not isinstance(layout, MALayout):
            return base + slots
        if not layout.is_attention(rank):
            return slots
        count = len(layout.primaries(rank))
        if count not in shards:
            shards[count] = attention_shard_bytes(
                m, split_heads(m.heads, count)[0], request_range(m.vocab, count, 0)
            )[0]
        return shards[count]

    per_host: dict = {}
    for rank, host in enumerate(host_of_rank):
        per_host.setdefault(host, []).append(rank_bytes(rank))
    sharers = lambda ranks: ranks if machine.device == "cpu" else -(-ranks // machine.units_per_node)
    return max(sum(values) / len(values) * sharers(len(values)) for values in per_host.values())


class Simulation:
    """The event loop, the ranks, their links and mail; `run()` -> the rank-0 token times."""

    def __init__(
        self,
        config: Config,
        machine: Machine,
        ranks: int,
        routing: Optional[np.ndarray] = None,
        context: Optional[int] = None,
        one_batch: bool = True,
    ):
        p = config.parallel
        unsupported = [
            name
            for name, on in (
                ("parallel.rebalance", p.rebalance is not None),
                ("parallel.attention_standby", p.attention_standby),
            )
            if on
        ]
        if unsupported:
            raise ValueError(f"hpcmoe simulate does not model {unsupported[0]}")
        micro_batches, layers = config.run.micro_batches, config.model.num_layers
        if (
            tags.KINDS * micro_batches * (layers + 1) > tags.LAST_EXCHANGE - tags.FIRST_EXCHANGE
        ):  # tags.tag_for's range
            raise ValueError(
                f"hpcmoe simulate tells messages apart by their tags, which repeat at run.micro_batches="
                f"{micro_batches} over {layers} layers: use fewer micro-batches"
            )
        if p.layout == "ma" and "auto" in (p.attention_ranks, p.moe_ranks):
            raise ValueError(
                "hpcmoe simulate needs parallel.attention_ranks and moe_ranks set "
                "(`hpcmoe predict propose --machine` ranks the splits with the simulator)"
            )
        self.config = config = config.on_device(machine.device)
        self.machine, self.ranks, self.recorded, self.context = machine, ranks, routing, context
        self.layout = ParallelLayout.from_config(config, ranks)
        self.node_of_rank = node_of_ranks(config, machine, ranks)
        self.host_of_rank = [0] * ranks if machine.one_box else list(self.node_of_rank)
        self.ranks_on_host = {h: self.host_of_rank.count(h) for h in set(self.host_of_rank)}
        # a GPU's memory is its rank's; a cpu host's is shared by its ranks
        self.memory_per_rank = machine.memory_bytes / (
            1 if machine.device == "cuda" else max(self.ranks_on_host.values())
        )
        if context is None and one_batch:
            check_one_batch(config, self.layout, ranks, self.memory_per_rank)
        # comm.POLL_BY_YIELDING: with a core (or GPU) per rank a collective's waits test again at once
        self.poll_by_yielding = (
            max(self.node_of_rank.count(n) for n in set(self.node_of_rank)) <= machine.units_per_node
        )
        placed_by = None
        if p.placement_from:
            from hpcmoe.runfile.loads import read_routing

            placed_by = read_routing(p.placement_from, config.model.num_experts)
        self.placement = self.layout.placement(self.node_of_rank, placed_by)
        self.tables = [dispatch.compile_placement(self.placement, r, self.node_of_rank) for r in range(ranks)]
        self.costs = Costs(
            config.model,
            machine,
            weights_per_cache(config, machine, self.layout, self.tables, self.host_of_rank),
            p.expert_tp,
        )
        self.hosts, self.nodes = np.array(self.host_of_rank), np.array(self.node_of_rank)
        self.now, self.events, self.order = 0.0, [], itertools.count()
        self.mails: dict = {}
        self.collectives: dict = {}
        self.awaiting_progress: dict = {}  # rank -> collectives waiting for its next MPI call
        self.holders: dict = {}  # host -> {rank: end of its slice}: the ranks on its cores
        self.lines: dict = {}  # host -> ranks waiting for a core, first in line first
        self.rows: list = []
        self.routes: dict = {}  # sim.routing's experts, drawn once per key
        m, steps = config.model, config.steps
        self.routing_counts = np.zeros((steps, m.moe_layers, ranks, m.num_experts), np.int64)
        self.traffic = np.zeros((steps, m.moe_layers, ranks, ranks), np.int64)
        self.dropped = 0  # token slots over capacity, summed over ranks, steps and layers
        self.token_times: list[float] = []
        self.drivers = [Driver(r, self.host_of_rank[r]) for r in range(ranks)]
        # the queues messages take, out of and into each rank: its own inside a node; across nodes
        # its node's network card, one per rank unless the machine file has inter_node.nics_per_node
        self.ports = {"intra": np.arange(ranks), "inter": np.arange(ranks)}
        if machine.nics_per_node:
            index_on_host = np.zeros(ranks, np.int64)
            for host in set(self.host_of_rank):
                on_host = np.flatnonzero(self.hosts == host)
                index_on_host[on_host] = np.arange(len(on_host))
            self.ports["inter"] = self.hosts * machine.nics_per_node + index_on_host % machine.nics_per_node
        self.free_out = {link: np.zeros(int(ports.max()) + 1) for link, ports in self.ports.items()}
        self.free_in = {link: np.zeros(int(ports.max()) + 1) for link, ports in self.ports.items()}
        self.free_out["emulated"] = np.zeros(
            ranks
        )  # parallel.link: each rank's own, queued at the sender only
        self.step_of = [0] * ranks  # each rank's current step (for its wait rows)
        self.is_ma = isinstance(self.layout, MALayout)
        # synthetic routing without drift: the same law in every layer and step (drawn once per rank and n)
        self.same_law = routing is None and not (config.model.router_skew and config.run.skew_drift)

    # ------------------------------------------------------------ the event loop

    def at(self, time: float, action: Callable, *args) -> None:
        heapq.heappush(self.events, (time, next(self.order), action, args))

    def run(self) -> list[float]:
        from hpcmoe.progress import Progress
        from hpcmoe.sim.net import SimNet
        from hpcmoe.sim.schedule import rank_main

        self.net = SimNet(self)
        for driver in self.drivers:
            driver.gen = rank_main(self, driver.rank)
            self.at(0.0, self.resume, driver)
        progress = Progress("hpcmoe simulate", self.config.steps, "steps simulated")
        while self.events:
            self.now, _, action, args = heapq.heappop(self.events)
            action(*args)
            progress.update(len(self.token_times))
        stuck = [d.rank for d in self.drivers if d.gen is not None]
        if stuck:
            raise RuntimeError(f"simulation deadlock: ranks {stuck} never finished (a bug in sim.schedule)")
        return self.token_times

    def resume(self, driver: Driver) -> None:
        """Run the rank's generator until it computes or waits for something not yet there."""
        while True:
            try:
                command = driver.gen.send(None)
            except StopIteration:
                driver.gen = None
                return self.release(driver)
            if isinstance(command, Work):
                return self.start_work(driver, command)
            self.progressed(driver)
            if command is PROGRESS:
                continue
            waits = command if isinstance(command, list) else [command]
            if any(self.passed(w.on) for w in waits):
                continue
            driver.waiting, driver.idle_since = waits, self.now
            for w in waits:
                self.watch(w.on, driver)
            if self.spins_on_shared_cores(driver):  # it keeps testing: its core stays busy
                driver.spinning, driver.ready = True, None
                self.start_work(driver, Work(float("inf")))
            else:
                self.release(driver)
            return self.plan_wake(driver)

    def watch(self, on, driver: Driver) -> None:
        if isinstance(on, Latest):
            self.watch(on.first, driver)
            self.watch(on.second, driver)
        elif isinstance(on, Cond):
            on.watchers.add(driver.rank)
        else:
            on.mail.watchers.setdefault(on.dst, set()).add(driver.rank)

    def spins_on_shared_cores(self, driver: Driver) -> bool:
        return (
            self.config.parallel.wait == "spin"
            and self.ranks_on_host[driver.host] > self.machine.units_per_node
        )

    def plan_wake(self, driver: Driver) -> None:
        known = [w.on.time for w in driver.waiting if w.on.time is not None]
        if driver.spinning:  # it goes on once it holds its core at or after `ready` (run_slice)
            if known:
                driver.ready = max(min(known), self.now)
                if driver.rank in self.holders.get(driver.host, {}):
                    self.run_slice(driver)
            return
        driver.version += 1
        if known:
            ready = max(min(known), self.now)
            wake = (
                ready
                if self.config.parallel.wait == "spin"
                else poll_time(driver.idle_since, ready, self.machine.sleep_overshoot_s)
            )
            self.at(max(wake, self.now), self.wake, driver, driver.version)

    def notify(self, ranks) -> None:
        for rank in ranks:
            driver = self.drivers[rank]
            if driver.waiting is not None:
                self.plan_wake(driver)

    def wake(self, driver: Driver, version: int) -> None:
        if version != driver.version or driver.waiting is None:
            return
        first = driver.waiting[0]
        self.row(driver.rank, first.phase, first.layer, first.mb, driver.idle_since, self.now)
        driver.waiting = None
        self.resume(driver)

    def row(
        self, rank: int, phase: str, layer: int, mb: int, start: float, end: float, step: int = None
    ) -> None:
        self.rows.append(
            (rank, layer, mb, self.step_of[rank] if step is None else step, phase.encode(), start, end)
        )

    # ------------------------------------------------------------ compute: ranks share their host's units

    def slower(self, rank: int) -> float:
        """The factor on the rank's costed work now (1: as costed): longer in the first step (first
        calls, fresh memory) and on a node shared with other ranks (shared caches)."""
        return (
            1.0
            + (self.machine.first_step_slowdown if self.step_of[rank] == 0 else 0.0)
            + (self.machine.shared_node_slowdown if self.ranks_on_host[self.host_of_rank[rank]] > 1 else 0.0)
        )

    def passed(self, on) -> bool:
        """Whether a condition's time (Cond, AllFrom, AnyFrom, Latest) is known and not later than now."""
        return on.time is not None and on.time <= self.now

    def has_unit(self, rank: int) -> bool:
        """Whether the rank has a core (or GPU) of its own: its work runs the moment it is started."""
        return self.ranks_on_host[self.host_of_rank[rank]] <= self.machine.units_per_node

    def start_work(self, driver: Driver, work: Work) -> None:
        """Run `work` on the rank: at once when its host has a unit per rank; otherwise the host's
        units are time-sliced as an OS scheduler does: a rank keeps its core for a quantum, then goes
        behind the ranks waiting for one; a rank coming back from a wait goes first in that line."""
        parts = np.atleast_1d(np.asarray(work.seconds, float))
        slower = self.slower(driver.rank)
        if slower != 1.0:
            parts = parts * slower
            work.seconds = parts
        driver.busy, driver.work, driver.work_start, driver.remaining = (
            True,
            work,
            self.now,
            float(parts.sum()),
        )
        host = driver.host
        if self.has_unit(driver.rank):
            self.at(self.now + driver.remaining, self.finish_work, driver)
            return
        holders = self.holders.setdefault(host, {})
        if driver.rank not in holders:
            if len(holders) >= self.machine.units_per_node:
                self.lines.setdefault(host, []).insert(0, driver)  # just woke: first in line
                return
            holders[driver.rank] = self.now + self.machine.quantum_s
        self.run_slice(driver)

    def run_slice(self, driver: Driver) -> None:
        """The rank holds a core until its slice ends: run its work until then."""
        driver.version += 1
        driver.slice_start = self.now
        if driver.spinning:  # spins until what it waits for is there
            driver.remaining = float("inf") if driver.ready is None else max(0.0, driver.ready - self.now)
        slice_end = self.holders[driver.host][driver.rank]
        if self.now + driver.remaining <= slice_end:
            self.at(self.now + driver.remaining, self.slice_done, driver, driver.version, True)
        else:
            self.at(slice_end, self.slice_done, driver, driver.version, False)

    def slice_done(self, driver: Driver, version: int, finished: bool) -> None:
        if version != driver.version:
            return
        driver.remaining -= self.now - driver.slice_start
        host, line = driver.host, self.lines.get(driver.host, [])
        if finished:
            return self.finish_work(driver)
        if line:  # the quantum is over and others wait: to the back of the line
            del self.holders[host][driver.rank]
            line.append(driver)
            self.hand_over(host)
        else:
            self.holders[host][driver.rank] = self.now + self.machine.quantum_s
            self.run_slice(driver)

    def release(self, driver: Driver) -> None:
        """The rank waits or is done: its core goes to the first in line."""
        holders = self.holders.get(driver.host, {})
        if holders.pop(driver.rank, None) is not None:
            self.hand_over(driver.host)

    def hand_over(self, host: int) -> None:
        line = self.lines.get(host, [])
        while line and len(self.holders[host]) < self.machine.units_per_node:
            driver = line.pop(0)
            self.holders[host][driver.rank] = self.now + self.machine.quantum_s
            self.run_slice(driver)

    def finish_work(self, driver: Driver) -> None:
        if driver.spinning:  # what it spun for is there: the wait's row, then on
            driver.busy, driver.spinning = False, False
            first = driver.waiting[0]
            self.row(driver.rank, first.phase, first.layer, first.mb, driver.idle_since, self.now)
            driver.waiting = None
            return self.resume(driver)
        work, start = driver.work, driver.work_start
        parts = np.atleast_1d(np.asarray(work.seconds, float))
        total = parts.sum()
        ends = start + (self.now - start) * (np.cumsum(parts) / total if total > 0 else np.ones(len(parts)))
        if work.phase is not None:
            self.row(driver.rank, work.phase, work.layer, work.mb, start, self.now)
        driver.busy = False
        if work.then is not None:
            work.then(ends)
        self.resume(driver)

    # ------------------------------------------------------------ messages and collectives

    def mail(self, key) -> Mail:
        if key not in self.mails:
            self.mails[key] = Mail(self.ranks)
        return self.mails[key]

    def send(self, key, src: int, dsts, nbytes, sent) -> None:
        """Post messages src -> dsts (ascending, as the engine posts them) of nbytes each, left at
        `sent` (scalar or per message): delivered after the physical link (intra or inter node), the
        emulated parallel.link when it separates the two, and staging through host memory on a GPU
        whose MPI cannot read device memory."""
        dsts = np.asarray(dsts, np.int64)
        if not len(dsts):
            return
        nbytes = np.broadcast_to(np.asarray(nbytes, float), dsts.shape)
        sent = np.broadcast_to(np.asarray(sent, float), dsts.shape).astype(float)
        m, p = self.machine, self.config.parallel
        delivered = np.empty(len(dsts))
        same_host = self.hosts[dsts] == self.hosts[src]
        for link, mask in (("intra", same_host), ("inter", ~same_host)):
            if mask.any():
                latency, bandwidth = m.intra if link == "intra" else m.inter
                durations, port = nbytes[mask] / bandwidth, self.ports[link][src]
                ends, self.free_out[link][port] = queue(self.free_out[link][port], sent[mask], durations)
                # the receiving end takes one message at a time too: many senders into one rank (or
                # one shared card) queue there, after the last byte has left its sender
                into, free_in = self.ports[link][dsts[mask]], self.free_in[link]
                if len(np.unique(into)) == len(into):
                    got = np.maximum(ends, free_in[into] + durations)
                    free_in[into] = got
                else:  # ranks of one node behind one card: one after another
                    got = np.empty(len(into))
                    for i, (card, end, duration) in enumerate(zip(into, ends, durations)):
                        free_in[card] = got[i] = max(end, free_in[card] + duration)
                delivered[mask] = got + latency
        if m.device == "cuda" and p.cuda_aware_mpi is False:
            delivered += 2 * nbytes / m.host_link_bytes_per_s
        emulated = (self.nodes[dsts] != self.nodes[src]) & (p.link is not None)
        if emulated.any():  # comm.Link: stamped when posted, queued behind this rank's earlier messages
            ends, self.free_out["emulated"][src] = queue(
                self.free_out["emulated"][src],
                sent[emulated],
                nbytes[emulated] * 8 / (p.link.bandwidth_gbps * 1e9),
            )
            delivered[emulated] = np.maximum(delivered[emulated], ends + p.link.latency_us * 1e-6)
        box = self.mail(key)
        box.times[src, dsts] = delivered
        box.got[dsts] += 1
        if box.watchers:
            self.notify(
                {rank for d in dsts[np.isin(dsts, list(box.watchers))].tolist() for rank in box.watchers[d]}
            )

    def collective(self, key, members, rank: int, polled: bool = False) -> Cond:
        """This rank posts a non-blocking collective among `members` now; -> when it completes here.

        MPI moves a collective on only inside MPI calls: after the last member posts, every other
        member must make progress once (its next test: a pass of its scheduler, or a poll while it
        waits); a member's part completes a latency after all the *others* have, and it sees that at
        its own next test. (Measured here: a member that posts last and computes right away keeps the
        others waiting until it next tests, up to a millisecond and more.)"""
        entry = self.joining(key, members)
        entry.posted.add(rank)
        if len(entry.posted) == len(entry.members):
            entry.progress[rank] = self.now
            for member in entry.members:
                driver = self.drivers[member]
                if member == rank:
                    continue
                if driver.waiting is not None:  # asleep in wait_until: its next poll (at once where it spins,
                    spins = self.config.parallel.wait == "spin" or (
                        polled and self.poll_by_yielding
                    )  # or yields)
                    entry.progress[member] = (
                        self.now
                        if spins
                        else poll_time(driver.idle_since, self.now, self.machine.sleep_overshoot_s)
                    )
                else:
                    self.awaiting_progress.setdefault(member, []).append(entry)
            self.complete(entry)
        return entry.conds[rank]

    def joining(self, key, members) -> Collective:
        """The collective `key` among `members` (made by the first to ask)."""
        if key not in self.collectives:
            self.collectives[key] = Collective(tuple(members), {m: Cond() for m in members})
        return self.collectives[key]

    def progressed(self, driver: Driver) -> None:
        """The rank calls into MPI now (a scheduler pass, or the first test of a wait)."""
        for entry in self.awaiting_progress.pop(driver.rank, []):
            entry.progress[driver.rank] = self.now
            self.complete(entry)

    def complete(self, entry: "Collective") -> None:
        if len(entry.progress) < len(entry.members):
            return
        order = sorted(entry.progress.values())
        latency = self.machine.collective_seconds(len(entry.members))
        for member, cond in entry.conds.items():
            others = (
                order[-1]
                if entry.progress[member] != order[-1]
                else order[-2]
                if len(order) > 1
                else order[-1]
            )
            cond.time = others + latency
            self.notify(cond.watchers)

    def forget(self, step: int) -> None:
        """Mail and collectives of steps long done (no rank is more than a step behind another)."""
        for table in (self.mails, self.collectives):
            for key in [k for k in table if k[1] < step - 2]:
                del table[key]


def simulate(
    config: Config,
    machine: Machine,
    ranks: int,
    routing: Optional[np.ndarray] = None,
    output: Optional[str] = None,
    context: Optional[int] = None,
    one_batch: bool = True,
) -> dict:
    """Simulate the run of `config` on `ranks` ranks of `machine` -> metrics; with `output`, a run
    file in the schema of `hpcmoe run` (root attrs simulated, machine; /generated all -1).
    context: steady decode instead of the run (no prefill; every step a decode step of every request
    over `context` cached positions and more): TPOT at a context without simulating its prefill.
    one_batch=False: simulate every request from the first step even where the engine would batch
    them in turns (check_one_batch refuses that otherwise)."""
    from hpcmoe.sim.results import metrics_and_file

    sim = Simulation(config, machine, ranks, routing, context, one_batch)
    sim.run()
    return metrics_and_file(sim, output)


def command(
    config_path: str,
    settings: list[str],
    machine_path: str,
    ranks: int,
    routing_path: str | None,
    output: str | None,
    context: int | None = None,
) -> dict:
    """`hpcmoe simulate`: load and check everything (ValueError: one line naming what is wrong), simulate,
    print what `hpcmoe run` prints."""
    from hpcmoe.config import load_config
    from hpcmoe.runfile.loads import read_routing
    from hpcmoe.sim.machine import load_machine

    config = load_config(config_path, settings)
    machine = load_machine(machine_path)
    if ranks < 1:
        raise ValueError(f"--ranks: expected an integer >= 1, got {ranks}")
    routing = None
    if routing_path:
        try:
            routing = read_routing(routing_path, config.model.num_experts)
        except ValueError as e:
            raise ValueError(str(e).replace("parallel.placement_from", "--routing")) from None
    if context is not None and context < 0:
        raise ValueError(f"--steady-decode: expected a context length >= 0, got {context}")
    metrics = simulate(config, machine, ranks, routing, output, context)
    nodes = max(node_of_ranks(config, machine, ranks)) + 1
    print(
        f"hpcmoe simulate: {ranks} ranks on {nodes} node(s) of {machine.name}, layout {config.parallel.layout}, "
        f"{len(config.requests)} requests, {sum(len(r.prompt_ids) for r in config.requests)} prompt tokens, "
        f"up to {config.steps} new tokens each; {metrics['planned_max_rank_bytes'] / 2**30:.1f} GiB on the "
        f"fullest rank ({'fits' if metrics['fits_machine_memory'] else 'does NOT fit'} the machine's memory)"
    )
    print(
        f"TTFT {metrics['ttft_ms']:.2f} ms | TPOT {metrics['tpot_ms']:.2f} ms | prefill "
        f"{metrics['prefill_tokens_per_s']:.0f} tok/s | decode {metrics['decode_tokens_per_s']:.0f} tok/s | "
        f"tps {metrics['tps']:.0f} tok/s (simulated)"
    )
    if output:
        print(f"wrote {output}")
    return metrics
