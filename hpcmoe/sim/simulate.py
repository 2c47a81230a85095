"""`hpcmoe simulate CONFIG --machine M.yaml --ranks N`: the engine's own schedule on a machine file,
as a discrete-event simulation, written as a run file that `hpcmoe report` reads like a real one.

What is the engine's, imported and called (not written again here): the layout and placement
(ParallelLayout.from_config(...).placement), the compiled placement tables, slot choice, capacity
and the dispatch plan (hpcmoe.parallel.dispatch), the two_stage gateways and node groups, the
requests of each rank and micro-batch (request_range, MALayout's groups), ma's head split and
reduction plan, and the router functions that turn scores into experts. What is modelled: each
phase's cost (hpcmoe.sim.costs on a hpcmoe.sim.machine file), ranks as compute resources
(sim/cores.py: time-sliced like an OS does when a node has more ranks than cores or GPUs; a rank
that spins while it waits keeps its core), each rank's outgoing links as queues and collectives that
move on only when their members call into MPI (sim/links.py: latency + bytes / bandwidth, one
message after another, as link.Link), and the engine's waits (waits.wait_until: sleeps of 20 us
doubling to 1 ms, each a little longer than asked).

The scheduler's loop (scheduler.passes) and every MoE layer's exchange (moe_layer.flat / two_stage
and all they call: slot choice, capacity, plans, counts, serving, expert_schedule) are the engine's
own code, run on the simulated clock against stand-ins for MPI and the model (sim/net.py). Around
them, sim/schedule.py follows the engine's step (steps.StepLoop, ep.EPEngine, ma's roles and
hierarchical sum); sim/routing.py draws the routing; sim/results.py makes the metrics and the run
file; sim/events.py holds what ranks yield and wait on; sim/checks.py what the simulator refuses.
This file holds the Simulation's state and set-up, its event loop, and the command.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Optional

import numpy as np

from hpcmoe.config import Config
from hpcmoe.parallel import dispatch
from hpcmoe.parallel.layout import MALayout, ParallelLayout
from hpcmoe.sim.checks import check_one_batch, check_simulable
from hpcmoe.sim.cores import Cores
from hpcmoe.sim.costs import Costs
from hpcmoe.sim.events import PROGRESS, Cond, Driver, Latest, Work, poll_time
from hpcmoe.sim.links import Links
from hpcmoe.sim.machine import Machine


def node_of_ranks(config: Config, machine: Machine, ranks: int) -> tuple[int, ...]:
    """Nodes as topology.build_topology makes them: blocks of parallel.ranks_per_node ranks; unset,
    one node on a one-box machine, else nodes as large as the machine's."""
    size = config.parallel.ranks_per_node or (ranks if machine.one_box else machine.units_per_node)
    return tuple(r // size for r in range(ranks))


def weights_per_cache(config: Config, machine: Machine, layout, tables: list, host_of_rank: list) -> float:
    """Bytes of weights the ranks sharing the busiest cache read each step: all a rank holds (ep:
    every weight but the routed experts, and its expert slots; ma: its attention shard, or its
    slots). A cpu's ranks share their host's last-level cache; a GPU's, its own."""
    from hpcmoe.model.attention import split_heads
    from hpcmoe.model.sizes import attention_shard_bytes, parameter_bytes
    from hpcmoe.parallel.layout import request_range

    m = config.model
    base = parameter_bytes(m, 0)[1]
    per_slot = (parameter_bytes(m, 1)[1] - base) / config.parallel.expert_tp  # a member's share of each
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


class Simulation(Cores, Links):
    """The event loop, the ranks, their cores (sim.cores), links and collectives (sim.links);
    `run()` -> the rank-0 token times."""

    def __init__(
        self,
        config: Config,
        machine: Machine,
        ranks: int,
        routing: Optional[np.ndarray] = None,
        context: Optional[int] = None,
        one_batch: bool = True,
    ):
        check_simulable(config)
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
        # WaitPolicy.poll_by_yielding: with a core (or GPU) per rank a collective's waits test again at once
        self.poll_by_yielding = (
            max(self.node_of_rank.count(n) for n in set(self.node_of_rank)) <= machine.units_per_node
        )
        self.hosts, self.nodes = np.array(self.host_of_rank), np.array(self.node_of_rank)
        self.is_ma = isinstance(self.layout, MALayout)
        self.place_experts()
        self.now, self.events, self.order = 0.0, [], itertools.count()
        self.drivers = [Driver(r, self.host_of_rank[r]) for r in range(ranks)]
        self.step_of = [0] * ranks  # each rank's current step (for its wait rows)
        self.set_up_cores()
        self.set_up_links()
        self.set_up_records()

    def place_experts(self) -> None:
        """The engine's placement (from parallel.placement_from's routing when set), its compiled
        tables, and the costs of each phase with the weights the ranks sharing a cache read."""
        config, p, ranks = self.config, self.config.parallel, self.ranks
        placed_by = None
        if p.placement_from:
            from hpcmoe.runfile.loads import read_routing

            placed_by = read_routing(p.placement_from, config.model.num_experts)
        self.placement = self.layout.placement(self.node_of_rank, placed_by)
        self.tables = [dispatch.compile_placement(self.placement, r, self.node_of_rank) for r in range(ranks)]
        self.costs = Costs(
            config.model,
            self.machine,
            weights_per_cache(config, self.machine, self.layout, self.tables, self.host_of_rank),
            p.expert_tp,
        )

    def set_up_records(self) -> None:
        """What the run file is made from (sim.results): timing rows, routing, traffic, drops, the
        token times; and the routes drawn so far (sim.routing)."""
        m, steps, ranks = self.config.model, self.config.steps, self.ranks
        self.rows: list = []
        self.routes: dict = {}  # sim.routing's experts, drawn once per key
        self.routing_counts = np.zeros((steps, m.moe_layers, ranks, m.num_experts), np.int64)
        self.traffic = np.zeros((steps, m.moe_layers, ranks, ranks), np.int64)
        self.dropped = 0  # token slots over capacity, summed over ranks, steps and layers
        self.token_times: list[float] = []
        # synthetic routing without drift: the same law in every layer and step (drawn once per rank and n)
        self.same_law = self.recorded is None and not (m.router_skew and self.config.run.skew_drift)

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
    def passed(self, on) -> bool:
        """Whether a condition's time (Cond, AllFrom, AnyFrom, Latest) is known and not later than now."""
        return on.time is not None and on.time <= self.now


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
    nodes, layout = max(node_of_ranks(config, machine, ranks)) + 1, config.parallel.layout
    print(
        f"hpcmoe simulate: {ranks} ranks on {nodes} node(s) of {machine.name}, layout {layout}, "
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
