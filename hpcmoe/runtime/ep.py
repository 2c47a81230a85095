"""One rank of the ep layout: attention and dense layers for its own block of requests, its
experts of every MoE layer, and the micro-batch schedule that runs them.

A step splits the rank's requests into `run.micro_batches` micro-batches (in decode only as many as
keep `run.decode_micro_batch_min` requests each); each is a generator
that computes and yields what it waits for, and the scheduler resumes whichever can go on.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from hpcmoe.config import Config
from hpcmoe.model.build import build_model
from hpcmoe.model.step import StepInputs
from hpcmoe.model.transformer import Transformer
from hpcmoe.parallel.dispatch import compile_placement
from hpcmoe.parallel.layout import ExpertSchedule, request_range, requests_per_rank, step_micro_batches
from hpcmoe.parallel.placement import Placement
from hpcmoe.runtime import moe_layer
from hpcmoe.runtime.buffers import BufferPool
from hpcmoe.runtime.comm import Sender
from hpcmoe.runtime.device import Streams, mpi_reads_device_memory, staging_for
from hpcmoe.runtime.exchange_context import ExchangeContext, ExchangeGroup, StepStats
from hpcmoe.runtime.fault import FaultState
from hpcmoe.runtime.link import Link
from hpcmoe.runtime.scheduler import run_concurrently
from hpcmoe.runtime.topology import Topology
from hpcmoe.runtime.waits import Where, wait_policy


def messaging(config: Config, topo: Topology, device=torch.device("cpu")) -> Sender:
    """This rank's sender over its (possibly emulated) link, waiting by the run's wait policy, staging
    through pinned host memory when the MPI cannot read the device."""
    p, policy = config.parallel, wait_policy(config, topo)
    link = Link(
        topo.node_of_rank, p.link.bandwidth_gbps if p.link else None, p.link.latency_us if p.link else 0.0
    )
    if device.type == "cpu":
        return Sender(topo.world, link, policy=policy)
    cuda_aware = mpi_reads_device_memory(p.cuda_aware_mpi, device)
    return Sender(topo.world, link, staging_for(device, cuda_aware), Streams(device), policy)


def build_exchange(
    config: Config,
    topo: Topology,
    placement: Placement,
    timer,
    members: list[int],
    sender: Sender,
    stall=lambda step: None,
    device=torch.device("cpu"),
    fault: FaultState | None = None,
) -> ExchangeContext | None:
    """The exchange context of this rank among `members` (world ranks); collective over the world
    (every rank calls it, members or not). None on a rank that exchanges nothing. fault: the run's
    kill points and tracked communicators (default: none)."""
    from mpi4py import MPI

    p, rank = config.parallel, topo.rank
    micro_batches = config.run.micro_batches
    comm = (
        topo.world
        if len(members) == topo.size
        else topo.world.Split(0 if rank in members else MPI.UNDEFINED, key=rank)
    )
    if rank not in members:
        return None
    fault = fault if fault is not None else FaultState()
    group = ExchangeGroup.build(comm, members, micro_batches, topo.size, sender.policy, fault.track)
    if comm != topo.world:
        comm.Free()  # the groups hold duplicates
    node_group = None
    if p.dispatch == "two_stage":
        node_ranks = [r for r in members if topo.node_of_rank[r] == topo.node_index]
        node_group = ExchangeGroup.build(
            topo.node, node_ranks, micro_batches, topo.size, sender.policy, fault.track
        )
    return ExchangeContext(
        rank=rank,
        world=topo.world,
        sender=sender,
        link=sender.link,
        tables=compile_placement(placement, rank, topo.node_of_rank, device),
        group=group,
        node_group=node_group,
        timer=timer,
        micro_batches=micro_batches,
        first_moe_layer=config.model.dense_layers,
        capacity_factor=p.capacity_factor,
        pool=BufferPool(device),
        before_dispatch=stall,
        tp_forward=p.expert_tp_dispatch == "leader",
        schedule=ExpertSchedule(p.expert_schedule),
        fault=fault,
    )


@dataclass
class Stall:
    """run.stall_rank: this rank sleeps (far past the watchdog) before its first dispatch of step
    run.stall_at_step."""

    seconds: float  # 0: never
    step: int = 0
    slept: bool = False

    def __call__(self, step: int) -> None:
        if self.seconds and step == self.step and not self.slept:
            self.slept = True
            time.sleep(self.seconds)


class Messaging:
    """What every rank engine uses to exchange tokens (composed into the ep and ma engines): its
    sender, the exchange context among `members` and the micro-batch schedule that drives a step."""

    def __init__(
        self,
        config: Config,
        topo: Topology,
        placement: Placement,
        timer,
        members: list[int],
        device,
        data_parallel: int,
        fault: FaultState | None = None,
    ):
        """data_parallel: how many ranks (or attention groups) split the requests; fault: the run's."""
        self.timer, self.micro_batches = timer, config.run.micro_batches
        self.decode_min = config.run.decode_micro_batch_min
        self.requests_per_rank = min(
            requests_per_rank(len(config.requests), data_parallel),
            config.run.max_batch or len(config.requests),
        )
        self.sender = messaging(config, topo, device)
        stall = Stall(
            4 * config.run.timeout_s if config.run.stall_rank == topo.rank else 0.0, config.run.stall_at_step
        )
        self.ctx = build_exchange(config, topo, placement, timer, members, self.sender, stall, device, fault)
        self.exchange = moe_layer.exchange_for(config.parallel.dispatch)

    def step_micro_batches(self, prefill: bool) -> int:
        """How many micro-batches this step runs (every rank of the run agrees)."""
        return step_micro_batches(self.micro_batches, self.decode_min, self.requests_per_rank, prefill)

    def step_coroutines(self, inputs: StepInputs, cache, prefill: bool, body, stats: StepStats) -> list:
        """The step's coroutines: body(micro-batch, its inputs, its cache rows, stats) for each block of
        the rank's requests."""
        count = self.step_micro_batches(prefill)
        blocks = [request_range(inputs.tokens.shape[0], count, i) for i in range(count)]
        return [
            body(
                i,
                inputs.rows(r.start, r.stop),
                [[c.rows(r.start, r.stop) for c in layer] for layer in cache],
                stats,
            )
            for i, r in enumerate(blocks)
        ]

    def run_step(self, generators: list, step: int, prefill: bool) -> list:
        """Drive this step's generators (a prefill or a decode step), then wait for this rank's sends."""
        if self.ctx is not None:
            self.ctx.schedule.prefill = prefill
        results = run_concurrently(generators, self.timer, step, self.sender)
        with self.timer.phase("send_wait", step):
            self.sender.wait(Where(step, -1, 0, "send_wait"))
        return results

    def close(self) -> None:
        """Free the communicators and windows of the exchange (collective)."""
        if self.ctx is not None:
            self.ctx.close()


def new_stats(config: Config, ranks: int, device) -> StepStats:
    m = config.model
    return StepStats.zeros(m.moe_layers, m.num_experts, ranks, device)


def maybe_fail(config: Config, rank: int, step: int, layer: int) -> None:
    run = config.run
    if run.fail_rank == rank and run.fail_at_layer == layer and run.fail_at_step == step:
        raise RuntimeError(f"injected failure (run.fail_rank={rank}) at step {step} layer {layer}")


class EPEngine:
    """One rank of the ep layout: the model with this rank's experts, its block of requests."""

    def __init__(
        self,
        config: Config,
        topo: Topology,
        placement: Placement,
        timer,
        load=None,
        device=torch.device("cpu"),
        fault: FaultState | None = None,
    ):
        self.config, self.topo, self.timer, self.device = config, topo, timer, device
        self.fault = fault if fault is not None else FaultState()
        self.rank = topo.rank
        self.model: Transformer = build_model(
            config.model,
            placement.experts_of_rank(self.rank),
            load,
            device,
            expert_shard=(self.rank % placement.tp, placement.tp),
        )
        self.net = Messaging(
            config, topo, placement, timer, list(range(topo.size)), device, topo.size, self.fault
        )
        self.sender, self.ctx, self.exchange = self.net.sender, self.net.ctx, self.net.exchange
        self.reports = True  # whether this rank's tokens go into the run file
        self.step, self.prefill = 0, True  # set by the generate loop before each step
        self.rebalancer = None
        if config.parallel.rebalance is not None:
            from hpcmoe.runtime.rebalance import Rebalancer

            self.rebalancer = Rebalancer(config, topo, self, placement, timer, self.fault)

    def step_hooks(self) -> list:
        """The rebalancer runs after each step (parallel.rebalance)."""
        return [self.rebalancer] if self.rebalancer is not None else []

    def placement_history(self) -> list:
        return self.rebalancer.history if self.rebalancer is not None else []

    def swap_experts(self, layers: list, tables) -> None:
        """The rebalancer's switch: these MoE layers (one per MoE block, in order) and the placement
        tables compiled for them serve from the next step on."""
        for block, layer in zip((b for b in self.model.layers if b.is_moe), layers):
            block.mlp.adopt(layer)
        self.net.ctx = self.ctx = dataclasses.replace(self.ctx, tables=tables)

    def requests(self, batch: int) -> range:
        """The requests this rank computes: every size-th of the file, from its rank on."""
        return range(self.rank, batch, self.topo.size)

    def new_cache(self, batch: int, max_len: int):
        return self.model.new_cache(batch, max_len)

    def new_stats(self) -> StepStats:
        return new_stats(self.config, self.topo.size, self.device)

    @torch.no_grad()
    def forward(self, inputs: StepInputs, cache, stats: StepStats) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for this rank's requests: [b, t] tokens -> (greedy tokens [b], logits [b, vocab]
        float32)."""
        generators = self.net.step_coroutines(inputs, cache, self.prefill, self.forward_micro_batch, stats)
        logits = torch.cat(self.net.run_step(generators, self.step, self.prefill))
        return logits.argmax(dim=-1), logits

    def forward_micro_batch(self, mb: int, inputs: StepInputs, cache, stats: StepStats):
        """Generator: one micro-batch through every layer; yields Pending, returns [b_mb, vocab] logits.
        Its decoding rows and its prefilling rows run attention apart (StepInputs.parts) and share
        every other phase."""
        phase, model, step = self.timer.phase, self.model, self.step
        parts = [
            (inputs.rows(a, b), [[c.rows(a, b) for c in layer] for layer in cache]) for a, b in inputs.parts()
        ]
        with phase("embed", step, micro_batch=mb):
            xs = [model.embed_tokens(part.tokens) for part, _ in parts]
        for layer, block in enumerate(model.layers):
            maybe_fail(self.config, self.rank, step, layer)
            with phase("attention", step, layer, mb):
                xs = [block.attend(x, part_cache[layer], part) for x, (part, part_cache) in zip(xs, parts)]
                hs = [part.flat(block.post_attention_layernorm(x)) for x, (part, _) in zip(xs, parts)]
                h = hs[0] if len(hs) == 1 else torch.cat(hs)
            if block.is_moe:
                out = yield from self.exchange(self.ctx, block.mlp, Where(step, layer, mb), h, stats)
            else:
                with phase("mlp", step, layer, mb):
                    out = block.mlp(h)
            for x, (part, _), piece in zip(xs, parts, out.split([len(h_part) for h_part in hs])):
                part.add_flat(x, piece)
        with phase("lm_head", step, micro_batch=mb):
            return torch.cat([model.logits(x, part) for x, (part, _) in zip(xs, parts)])

    def close(self) -> None:
        if self.rebalancer is not None:
            self.rebalancer.close(self.step)
        self.net.close()
