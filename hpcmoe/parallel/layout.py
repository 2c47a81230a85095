"""The parallel layout: rank count and placement, validated before any communicator exists.

Like torchtitan's ParallelDims: a frozen dataclass whose errors name every factor, buildable and
testable without MPI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hpcmoe.config import Config
from hpcmoe.parallel import placement as placements
from hpcmoe.parallel import traffic

PLACEMENTS = ("auto", "packed", "one_per_rank", "replicated", "topology_aware")


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    num_experts: int
    placement_mode: str  # as configured: one of PLACEMENTS
    # packed: k per rank on the first ceil(E/k) ranks; replicated: slots per rank
    experts_per_rank: Optional[int]
    expert_tp: int = 1  # ranks per expert group: experts are placed on world_size / expert_tp groups

    def __post_init__(self):
        if self.world_size % self.expert_tp:
            raise ValueError(
                f"world size ({self.world_size}) must be a multiple of parallel.expert_tp "
                f"({self.expert_tp}): each expert group has {self.expert_tp} ranks"
            )
        e, k, mode = self.num_experts, self.experts_per_rank, self.mode
        w, ranks = self.groups, self.groups_name
        if mode == "one_per_rank" and e != w:
            raise ValueError(f"parallel.placement=one_per_rank needs model.num_experts ({e}) == {ranks}")
        if mode == "topology_aware" and e > w:
            raise ValueError(
                f"parallel.placement=topology_aware puts at most one expert on a rank: it needs "
                f"model.num_experts ({e}) <= {ranks}"
            )
        if mode == "packed" and w > e and k is None:
            raise ValueError(
                f"parallel.placement=packed with {ranks} > model.num_experts ({e}) leaves "
                f"ranks without experts; use parallel.placement=replicated (or auto)"
            )
        if k is not None and mode in ("one_per_rank", "topology_aware"):
            raise ValueError(
                f"parallel.experts_per_rank applies to packed and replicated placement, "
                f"not parallel.placement={mode}"
            )
        if mode in ("packed", "replicated"):
            # raises with the numbers when k x ranks cannot hold the experts
            self.placement((0,) * self.world_size)

    @property
    def groups(self) -> int:
        """What experts are placed on: ranks, or groups of expert_tp ranks."""
        return self.world_size // self.expert_tp

    @property
    def groups_name(self) -> str:
        if self.expert_tp == 1:
            return f"world size ({self.world_size})"
        return (
            f"expert groups (world size {self.world_size} / parallel.expert_tp {self.expert_tp} = "
            f"{self.groups})"
        )

    @classmethod
    def from_config(cls, config: Config, world_size: int):
        p, r = config.parallel, config.run
        for name in ("fail_rank", "stall_rank"):
            value = getattr(r, name)
            if value is not None and not 0 <= value < world_size:
                raise ValueError(
                    f"run.{name}: {value} must be between 0 and world size - 1 ({world_size - 1})"
                )
        for i, kill in enumerate(r.kill or []):
            if not 0 <= kill.rank < world_size:
                raise ValueError(
                    f"run.kill[{i}].rank: {kill.rank} must be between 0 and world size - 1 ({world_size - 1})"
                )
        if p.layout == "ma":
            if p.attention_ranks + p.moe_ranks != world_size:
                raise ValueError(
                    f"world size ({world_size}) must equal parallel.attention_ranks "
                    f"({p.attention_ranks}) + parallel.moe_ranks ({p.moe_ranks})"
                )
            return MALayout(
                world_size,
                config.model.num_experts,
                p.attention_ranks,
                p.moe_ranks,
                p.attention_replicas,
                p.attention_standby,
            )
        if p.expert_tp > 1 and p.ranks_per_node is not None and p.ranks_per_node % p.expert_tp:
            raise ValueError(
                f"parallel.ranks_per_node ({p.ranks_per_node}) must be a multiple of parallel.expert_tp "
                f"({p.expert_tp}): an expert group's ranks share a node"
            )
        layout = cls(
            world_size=world_size,
            num_experts=config.model.num_experts,
            placement_mode=p.placement,
            experts_per_rank=p.experts_per_rank,
            expert_tp=p.expert_tp,
        )
        if p.rebalance is not None:
            if p.rebalance.window_steps > config.steps:
                raise ValueError(
                    f"parallel.rebalance.window_steps ({p.rebalance.window_steps}) must be <= the run's "
                    f"steps ({config.steps}, the largest max_new_tokens)"
                )
            layout.check_spare_slots()
        return layout

    def check_spare_slots(self) -> None:
        """Online rebalancing puts replicas where the load is: it needs more slots than experts, in a
        placement that replicates (topology-aware keeps one expert per rank: replicas are not its way)."""
        placement, e, places = self.place((0,) * self.groups, None), self.num_experts, self.groups
        slots = len(placement.slot_expert)
        if slots > e and placement.mode != "topology_aware":
            return
        per = max(len(placement.slots_of_rank(p)) for p in range(places))
        raise ValueError(
            f"parallel.rebalance needs spare expert slots, but placement {placement.mode} has {per} "
            f"slot(s) per {'rank' if self.expert_tp == 1 else 'expert group'} x {places} = {slots} for "
            f"model.num_experts ({e}); use parallel.placement=replicated with parallel.experts_per_rank "
            f"k, k x {places} > {e}"
        )

    @property
    def mode(self) -> str:
        """The placement `auto` stands for: one per rank, packed, or replicated by the rank count."""
        if self.placement_mode != "auto":
            return self.placement_mode
        e, w = self.num_experts, self.groups
        if e == w and self.experts_per_rank is None:
            return "one_per_rank"
        return "packed" if e >= w else "replicated"

    def placement(self, node_of_rank: tuple[int, ...], routing=None) -> placements.Placement:
        """routing: a run's /routing [steps, moe_layers, sources, experts] to place by, else uniform load.
        With expert_tp the experts are placed on the groups, each group's ranks on one node."""
        t = self.expert_tp
        if t == 1:
            return self.place(tuple(node_of_rank), routing)
        for first in range(0, self.world_size, t):
            nodes = sorted(set(node_of_rank[first : first + t]))
            if len(nodes) > 1:
                raise ValueError(
                    f"parallel.expert_tp ({t}): expert group {first // t} (ranks {first}..{first + t - 1}) "
                    f"spans nodes {nodes}; ranks per node must be a multiple of {t}"
                )
        return self.place(tuple(node_of_rank[::t]), routing).on_groups(t)

    def place(self, node_of_rank: tuple[int, ...], routing) -> placements.Placement:
        """The placement over `groups` places (ranks, or expert groups), node_of_rank: [groups]."""
        e, w, mode = self.num_experts, self.groups, self.mode
        nodes = max(node_of_rank) + 1
        tokens_from_node, load = (
            traffic.load_from_routing(routing, list(node_of_rank))
            if routing is not None
            else ([[1.0] * e for _ in range(nodes)], None)
        )
        if mode == "one_per_rank":
            return placements.one_per_rank(e, w)
        if mode == "packed":
            return placements.packed(e, w, self.experts_per_rank)
        if mode == "replicated":
            return placements.replicated(e, w, self.experts_per_rank or -(-e // w), load)
        return traffic.topology_aware(tokens_from_node, list(node_of_rank))


@dataclass(frozen=True)
class MALayout:
    """Attention/MoE separation: world ranks 0..A-1 attend (R groups of A/R), the M others hold experts.
    shards: per group, per head shard (its primary rank, its standby or -1); built from the counts
    (the second half of each group mirrors the first with standbys), or given by `survivors`."""

    world_size: int
    num_experts: int
    attention_ranks: int
    moe_ranks: int
    replicas: int
    standby: bool = False
    shards: tuple = ()
    mode = "packed"

    def __post_init__(self):
        if not self.shards:
            size = self.attention_ranks // self.replicas
            half = size // 2 if self.standby else size
            shards = tuple(
                tuple((first + i, first + i + half if self.standby else -1) for i in range(half))
                for first in range(0, self.attention_ranks, size)
            )
            object.__setattr__(self, "shards", shards)

    def group_of(self, rank: int) -> int:
        return next(g for g, shards in enumerate(self.shards) if any(rank in pair for pair in shards))

    def is_attention(self, rank: int) -> bool:
        return rank < self.attention_ranks

    def group_ranks(self, rank: int) -> list[int]:
        """The attention ranks of `rank`'s group: its primaries, then their standbys."""
        shards = self.shards[self.group_of(rank)]
        return [p for p, _ in shards] + [s for _, s in shards if s >= 0]

    def primaries(self, rank: int) -> list[int]:
        """The ranks of `rank`'s group that own a head shard (all of it without standbys)."""
        return [p for p, _ in self.shards[self.group_of(rank)]]

    def twin(self, rank: int) -> int | None:
        """The standby of a primary, the primary of a standby, or None."""
        for p, s in self.shards[self.group_of(rank)]:
            if s >= 0 and rank in (p, s):
                return s if rank == p else p
        return None

    def all_primaries(self) -> list[int]:
        return [p for shards in self.shards for p, _ in shards]

    def group_requests(self, batch: int, rank: int) -> range:
        """The requests of rank's attention group: every replicas-th of the file, from its group on."""
        return range(self.group_of(rank), batch, self.replicas)

    def placement(self, node_of_rank=None, routing=None) -> placements.Placement:
        """Experts packed over the MoE ranks (E/M each, uneven when they do not divide)."""
        moe = placements.packed(self.num_experts, self.moe_ranks)
        return placements.Placement(
            moe.slot_expert, tuple(r + self.attention_ranks for r in moe.slot_rank), self.world_size, "packed"
        )

    def survivors(self, kept: list[int]) -> "MALayout":
        """The layout of the ranks `kept` (ascending, this layout's ranks), numbered 0.. in that order: a
        standby takes its dead primary's shard; a shard that lost both ranks is dropped (its group
        splits the heads over the shards left). Raises when a group, or every MoE rank, is gone."""
        new = {r: i for i, r in enumerate(kept)}
        shards = []
        for g, group in enumerate(self.shards):
            left = [
                (new[p], new.get(s, -1)) if p in new else (new[s], -1)
                for p, s in group
                if p in new or s in new
            ]
            if not left:
                raise ValueError(
                    f"attention group {g} (ranks {', '.join(map(str, self.group_ranks(group[0][0])))}) "
                    f"has no surviving rank"
                )
            shards.append(tuple(left))
        attention = sum(r < self.attention_ranks for r in kept)
        if attention == len(kept):
            raise ValueError(
                f"every MoE rank ({self.attention_ranks}..{self.world_size - 1}) is dead: experts "
                f"{', '.join(map(str, range(self.num_experts)))} have nowhere to go"
            )
        return MALayout(
            len(kept),
            self.num_experts,
            attention,
            len(kept) - attention,
            self.replicas,
            self.standby,
            tuple(shards),
        )


@dataclass
class ExpertSchedule:
    """parallel.expert_schedule, for the step being run (every rank of an exchange agrees: all prefill
    in the same step). per_layer: the rows leave in one collective each way and each local expert
    runs once on every source's rows; per_source: point-to-point messages, experts run on each
    source's rows as they arrive (the seeds' layer pipelining with partial batches); auto: per_source
    in a prefill, per_layer in decode."""

    setting: str = "per_source"
    prefill: bool = True

    @property
    def per_layer(self) -> bool:
        return self.setting == "per_layer" or (self.setting == "auto" and not self.prefill)


def requests_per_rank(batch: int, data_parallel: int) -> int:
    """The most requests one of `data_parallel` ranks (or attention groups) holds: the same on all."""
    return -(-batch // data_parallel)


def step_micro_batches(micro_batches: int, decode_min: int, requests_per_rank: int, prefill: bool) -> int:
    """run.micro_batches in a prefill; in decode only as many as keep `decode_min` requests each (at
    least one): below that a micro-batch's fixed compute costs more than the wire it can hide
    (docs/PERFORMANCE.md). requests_per_rank: the same number on every rank, so all agree."""
    if prefill:
        return micro_batches
    return max(1, min(micro_batches, requests_per_rank // decode_min))


def request_range(batch: int, num_ranks: int, rank: int) -> range:
    """Contiguous block of requests owned by `rank`; sizes differ by at most one (may be empty)."""
    return range(rank * batch // num_ranks, (rank + 1) * batch // num_ranks)
