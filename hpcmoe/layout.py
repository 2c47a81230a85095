"""The parallel layout: rank count and placement, validated before any communicator exists.

Like torchtitan's ParallelDims: a frozen dataclass whose errors name every factor, buildable and
testable without MPI.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hpcmoe.config import Config
from hpcmoe import placement as placements


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    num_experts: int
    placement_mode: str                 # auto | packed | one_per_rank as configured
    experts_per_rank: Optional[int]

    def __post_init__(self):
        w, e = self.world_size, self.num_experts
        if self.placement_mode == "one_per_rank" and e != w:
            raise ValueError(f"parallel.placement=one_per_rank needs model.num_experts ({e}) == "
                             f"world size ({w})")
        if w > e:
            raise ValueError(f"world size ({w}) > model.num_experts ({e}): more ranks than experts needs "
                             f"expert replicas, which are not available yet; run with at most {e} ranks")
        if self.experts_per_rank is not None:
            if self.placement_mode == "one_per_rank":
                raise ValueError("parallel.experts_per_rank applies to packed placement, "
                                 "not parallel.placement=one_per_rank")
            self.placement()  # raises with the numbers when k * ranks < experts

    @classmethod
    def from_config(cls, config: Config, world_size: int):
        p = config.parallel
        layout = cls(world_size=world_size, num_experts=config.model.num_experts, placement_mode=p.placement,
                     experts_per_rank=p.experts_per_rank)
        if config.run.fail_rank is not None and not 0 <= config.run.fail_rank < world_size:
            raise ValueError(f"run.fail_rank: {config.run.fail_rank} must be between 0 and "
                             f"world size - 1 ({world_size - 1})")
        return layout

    def placement(self) -> placements.Placement:
        e, w = self.num_experts, self.world_size
        if self.placement_mode == "one_per_rank" or (self.placement_mode == "auto" and e == w
                                                     and self.experts_per_rank is None):
            return placements.one_per_rank(e, w)
        return placements.packed(e, w, self.experts_per_rank)


def request_range(batch: int, num_ranks: int, rank: int) -> range:
    """Contiguous block of requests owned by `rank`; sizes differ by at most one (may be empty)."""
    return range(rank * batch // num_ranks, (rank + 1) * batch // num_ranks)
