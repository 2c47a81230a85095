"""Online expert rebalancing (`parallel.rebalance`): decide from the observed load, move expert weights
in the background while the steps go on, switch at a step boundary every rank agrees on.

Every rank runs the same state machine at every step boundary on the same inputs, so all make the
same decisions without a leader:

1. observe: this step's token slots per expert (what the rank sent), kept for `window_steps` steps;
2. every `every_steps` steps: a non-blocking sum of the window over all ranks (per node), on a
   communicator of its own, read at the next boundary (it completed in the background meanwhile);
3. decide: place again (replicated, or topology-aware, within each rank's slot budget); adopt when
   the predicted rank load max/mean drops by at least `min_gain` of the current one;
4. move: each rank allocates its new expert slots beside the old ones (double-buffered), copies the
   experts it keeps, receives the ones it gains and sends the ones others gain from it, in chunks
   of `chunk_kib` with at most `chunks_in_flight` in flight, progressed whenever it tests or waits,
   while the steps still run on the old placement;
5. switch: at every boundary while moving, a non-blocking vote "my moves are done", read at the
   next boundary; when everyone was done, every rank switches to the new weights and tables there.
"""

from __future__ import annotations

import hashlib
import sys
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from hpcmoe.parallel.dispatch import compile_placement
from hpcmoe.parallel.placement import Placement
from hpcmoe.parallel.rebalance import Switch, plan_moves, propose, worth_moving
from hpcmoe.runtime import tags
from hpcmoe.runtime.buffers import as_bytes, byte_view
from hpcmoe.runtime.waits import Where, all_done, wait_all, wait_until


class Mover:
    """The chunked weight messages of one rebalance on this rank. Receives are all posted at once (a
    posted receive blocks nothing); sends leave at most `in_flight` at a time, so a step's token
    messages never queue behind a long weight transfer. Weights travel through host memory (device
    weights are copied to the host to send, and from it once received), whatever the MPI."""

    def __init__(
        self,
        comm,
        sends: list[tuple[int, torch.Tensor]],
        receives: list[tuple[int, torch.Tensor]],
        chunk_bytes: int,
        in_flight: int,
    ):
        self.comm, self.in_flight = comm, in_flight
        chunks = lambda t: [as_bytes(c) for c in byte_view(t.cpu()).split(chunk_bytes)]
        self.queue = deque((peer, chunk) for peer, t in sends for chunk in chunks(t))
        # (target, where it is received)
        self.landing = [
            (t, torch.empty(t.numel() * t.element_size(), dtype=torch.uint8) if t.device.type != "cpu" else t)
            for _, t in receives
        ]
        self.receives = [
            comm.Irecv([chunk, MPI.BYTE], source=peer, tag=tags.MOVE)
            for (peer, _), (_, host) in zip(receives, self.landing)
            for chunk in chunks(host)
        ]
        self.sending: list = []

    def progress(self) -> None:
        self.sending = [r for r in self.sending if not r.Test()]
        while self.queue and len(self.sending) < self.in_flight:
            peer, chunk = self.queue.popleft()
            self.sending.append(self.comm.Isend([chunk, MPI.BYTE], dest=peer, tag=tags.MOVE))
        if self.receives and all_done(self.receives):
            self.receives = []
            for target, host in self.landing:
                if host is not target:
                    byte_view(target).copy_(host)

    def done(self) -> bool:
        self.progress()
        return not self.queue and not self.sending and not self.receives


@dataclass
class Moving:
    """A rebalance in flight on this rank."""

    mover: Mover
    layers: list  # the new MoE layers (one per MoE block), filled as the moves land
    switch: Switch  # its /placement_history row
    placement: Placement  # the new placement over expert groups


class Rebalancer:
    """One ep rank's part of online rebalancing (see the module docstring)."""

    def __init__(self, config, topo, engine, placement: Placement, timer, fault):
        self.settings, self.topo, self.engine, self.timer = config.parallel.rebalance, topo, engine, timer
        self.steps = config.steps
        self.policy = engine.sender.policy  # the engine's waits
        self.tp = placement.tp
        self.placement = placement.grouped()  # over expert groups (ranks without expert_tp)
        self.node_of_place = list(topo.node_of_rank[:: self.tp])
        self.comm = fault.track(topo.world.Dup())
        self.window: deque = deque(maxlen=self.settings.window_steps)
        self.summing = self.voting = None  # (request, buffers) in flight
        self.moving: Moving | None = None
        self.history: list[Switch] = []

    # ------------------------------------------------------------ the boundary after each step

    def after_step(self, done) -> None:
        """done: the step (steps.StepDone), with this rank's record: routing [moe_layers, experts], the
        token slots it sent."""
        step, routing = done.step, done.record.routing
        load = np.zeros((max(self.node_of_place) + 1, routing.shape[1]), np.int64)
        load[self.topo.node_of_rank[self.topo.rank]] = routing.sum(0)
        self.window.append(load)
        with self.timer.phase("rebalance", step):
            if self.moving is not None:
                self.vote(step)
            elif self.summing is not None:
                self.decide(step)
            # the next sum, every every_steps steps while nothing moves; none that could not switch
            # before the end
            if (
                self.moving is None
                and self.summing is None
                and (step + 1) % self.settings.every_steps == 0
                and step + 4 <= self.steps
            ):
                window = np.sum(self.window, axis=0)
                total = np.empty_like(window)
                # buffers kept alive
                self.summing = (
                    self.comm.Iallreduce(window, total, op=MPI.SUM),
                    total,
                    window,
                )

    def decide(self, step: int) -> None:
        request, total, _ = self.summing
        wait_all([request], Where(step, -1, 0, "rebalance_wait"), self.policy, timer=self.timer)
        self.summing = None
        tokens = total.astype(float)
        new = propose(self.placement, tokens, self.node_of_place)
        gain = worth_moving(self.placement, new, tokens, self.node_of_place, self.settings.min_gain)
        if gain is None:
            return
        before, after = gain
        self.start_moves(new, Switch(-1, step, self.on_ranks(new), 0, before, after))
        self.say(
            f"rebalancing after step {step}: moving {self.moving.switch.bytes_moved / 2**20:.1f} MiB of "
            f"expert weights (predicted rank load max/mean {before:.3f} -> {after:.3f})"
        )
        self.vote(step)  # the first vote at once: small moves are done by the next boundary

    def vote(self, step: int) -> None:
        """Read the vote posted one boundary earlier (switch when everyone was done); post this one's."""
        moving = self.moving
        if self.voting is not None:
            request, everyone, _ = self.voting
            wait_all([request], Where(step, -1, 0, "rebalance_wait"), self.policy, timer=self.timer)
            self.voting = None
            if everyone[0]:
                self.switch(step + 1, moving)
                return
        mine = np.array([int(moving.mover.done())], np.int64)
        everyone = np.empty_like(mine)
        self.voting = (self.comm.Iallreduce(mine, everyone, op=MPI.MIN), everyone, mine)  # buffers kept alive

    # ------------------------------------------------------------ moving and switching

    def on_ranks(self, placement: Placement) -> Placement:
        return placement if self.tp == 1 else placement.on_groups(self.tp)

    def start_moves(self, new: Placement, switch: Switch) -> None:
        """New expert slots beside the old ones; copy what stays, post what moves."""
        from hpcmoe.model.build import materialize
        from hpcmoe.model.moe import MoE
        from hpcmoe.model.sizes import parameter_bytes

        engine, rank, tp = self.engine, self.topo.rank, self.tp
        me, member = rank // tp, rank % tp
        cfg = engine.config.model
        old_layers = [block.mlp for block in engine.model.layers if block.is_moe]
        weight = engine.model.embed_tokens.weight
        new_layers = []
        for old in old_layers:
            with torch.device("meta"):
                layer = MoE(cfg, new.experts_of_rank(me), routes=False, shard=(member, tp))
            materialize(layer, weight.device, weight.dtype)
            for expert in set(new.experts_of_rank(me)) & set(self.placement.experts_of_rank(me)):
                for target, source in zip(layer.expert_tensors(expert), old.expert_tensors(expert)):
                    target.data.copy_(source.data)
            new_layers.append(layer)
        sends, receives = [], []
        moves = plan_moves(self.placement, new)
        for expert, source, target in moves:
            for old, layer in zip(old_layers, new_layers):
                if source == me:
                    sends += [(target * tp + member, t.data) for t in old.expert_tensors(expert)]
                if target == me:
                    receives += [(source * tp + member, t.data) for t in layer.expert_tensors(expert)]
        # whole experts
        switch.bytes_moved = len(moves) * (parameter_bytes(cfg, 1)[1] - parameter_bytes(cfg, 0)[1])
        mover = Mover(
            self.comm, sends, receives, 1024 * self.settings.chunk_kib, self.settings.chunks_in_flight
        )
        self.moving = Moving(mover, new_layers, switch, new)
        engine.sender.background = mover
        mover.progress()

    def switch(self, step: int, moving: Moving) -> None:
        """Every rank, at the same boundary: the new weights and tables from `step` on."""
        engine, switch = self.engine, moving.switch
        self.placement = moving.placement
        tables = compile_placement(switch.placement, self.topo.rank, self.topo.node_of_rank, engine.device)
        engine.swap_experts(moving.layers, tables)
        engine.sender.background = None
        switch.step = step
        self.say(f"rebalanced: the new placement serves from step {step}")
        if self.settings.checksums:
            switch.digest = expert_digest(engine.model)
        self.history.append(switch)
        self.moving = None

    def say(self, line: str) -> None:
        if self.topo.rank == 0:
            print(f"hpcmoe: {line}", file=sys.stderr, flush=True)

    def close(self, step: int) -> None:
        """End of the run: finish what is in flight (every rank posted the same collectives), free."""
        for pending in (self.summing, self.voting):
            if pending is not None:
                wait_all([pending[0]], Where(step, -1, 0, "rebalance_wait"), self.policy, timer=self.timer)
        if self.moving is not None:
            wait_until(
                self.moving.mover.done, Where(step, -1, 0, "rebalance_wait"), self.policy, timer=self.timer
            )
            self.engine.sender.background = None
        self.comm.Free()


def expert_digest(model) -> str:
    """sha256 over this rank's routed expert weights, MoE layer by layer, in slot order."""
    digest = hashlib.sha256()
    for block in model.layers:
        if block.is_moe:
            for expert in block.mlp.experts:
                for t in block.mlp.expert_tensors(int(expert)):
                    digest.update(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()
