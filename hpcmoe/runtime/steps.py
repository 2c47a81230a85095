"""The step loop: one step of this rank's engine, then the hooks after it, until the ranks agree to
stop; and what the loop needs of a rank engine (RankEngine), which ep and ma's two roles provide.

Separate from engine.py, which builds the engine, the batch and the hooks (and builds them again
among the survivors after a dead rank); here is only what every step does.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
import torch

from hpcmoe.config import Config
from hpcmoe.model.moe import rotate_skew
from hpcmoe.model.step import StepInputs
from hpcmoe.runtime.batch import Batch, Events
from hpcmoe.runtime.exchange_context import StepStats
from hpcmoe.runtime.fault import RankFailed, is_failure
from hpcmoe.runtime.topology import Topology


class RankEngine(Protocol):
    """One rank's share of a step (ep.EPEngine; ma.AttentionEngine and ma.MoEEngine)."""

    topo: Topology
    device: torch.device
    model: torch.nn.Module
    step: int  # set by the loop before each step
    prefill: bool  # ... True in the first step, which feeds every live request's prompt (again)
    reports: bool  # whether this rank's tokens go into the run file

    def requests(self, batch: int) -> range:
        """The request indices this rank serves, of `batch`."""

    def new_cache(self, batch: int, max_len: int) -> list:
        """KV cache rows for `batch` requests, one list per layer."""

    def new_stats(self) -> StepStats: ...

    def forward(self, inputs: StepInputs, cache, stats: StepStats) -> tuple:
        """One step -> (greedy tokens [b], logits [b, vocab] or None)."""

    def step_hooks(self) -> list:
        """Work of the engine's own after each step (hooks, run after the output, before the vote)."""

    def placement_history(self) -> list:
        """The placement switches of online rebalancing so far (parallel.rebalance.Switch)."""

    def close(self) -> None:
        """Free the engine's communicators (collective)."""


@dataclass
class StepDone:
    """A finished step as the hooks after it see it; hooks fill in what later ones read."""

    step: int
    first: bool  # the first step of this run (or since a recovery)
    started_at: float  # on the run's clock
    events: Events  # what this rank's requests did
    logits: Optional[np.ndarray]  # [rows, vocab] on the host (output.save_logits), else None
    rows: list  # the rows that made a token
    stats: StepStats
    batch: Batch
    record: object = None  # records.StepRecord, this rank's (hooks.Records)
    written: object = None  # records.WrittenStep: rank 0, once it wrote the step (hooks.Records)
    stop: bool = False  # the ranks agreed to stop after this step (hooks.StopSignal)


class StepLoop:
    """Step until every request of every rank has ended, or until the ranks agree to stop; resumed
    (or after a recovery), from the step the run stopped at."""

    def __init__(self, config: Config, engine: RankEngine, timer, batch: Batch, first: int, hooks: list):
        """first: the step to begin at; hooks: called in order after each step (after_step(StepDone))."""
        self.config, self.engine, self.timer, self.batch = config, engine, timer, batch
        self.first, self.hooks = first, hooks
        sampling = config.run.sampling
        self.sampling = sampling if sampling is not None and sampling.temperature > 0 else None

    def run(self) -> int:
        """-> the steps done; a failure under run.fault_tolerance is raised as RankFailed."""
        step = self.first
        try:
            while True:
                done = self.step(step)
                for hook in self.hooks:
                    hook.after_step(done)
                step += 1
                if done.stop:
                    return step
        except Exception as error:  # a dead rank, under run.fault_tolerance: the survivors go on
            if self.config.run.fault_tolerance and is_failure(error):
                raise RankFailed(self.engine.step, getattr(error, "where", None), self.timer.now()) from error
            raise

    def step(self, step: int) -> StepDone:
        """The engine's step on the batch's inputs, its tokens chosen and the batch advanced."""
        engine, batch, r = self.engine, self.batch, self.config.run
        # every live request's prompt (again) in the first step
        engine.step, engine.prefill = step, step == self.first
        if r.skew_drift:
            rotate_skew(engine.model, step // r.skew_drift)
        if r.signal_at_step == step and engine.topo.rank == engine.topo.size - 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # testing: a stop signal to one rank, as Slurm would send
        stats = engine.new_stats()
        started_at = self.timer.now()
        with self.timer.phase("step", step):
            inputs, admitted = batch.inputs(engine.device)
            chosen, logits = engine.forward(inputs, batch.cache, stats)
        # every logit: drawn on the host, the same on every rank that holds them
        if self.sampling is not None:
            from hpcmoe.workload import choose

            logits = logits.cpu()
            chosen = choose(logits.numpy(), [row.id for row in batch.rows], batch.positions(), self.sampling)
        else:
            chosen = chosen.cpu().numpy()  # the step's one wait
        logits = logits.cpu().numpy() if self.config.output.save_logits and logits is not None else None
        events, rows = batch.advance(chosen)
        events.admitted = admitted
        return StepDone(step, step == self.first, started_at, events, logits, rows, stats, batch)
