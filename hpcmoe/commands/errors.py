"""A bad input fails with one line and exit 2: on one process at once (`fail`), under MPI once all
ranks have checked (`agree`), so that a job prints one line, not one per rank.
"""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_BAD_INPUT = 2


def fail(message: str) -> NoReturn:
    sys.stderr.write(f"hpcmoe: error: {message}\n")
    sys.stderr.flush()
    sys.exit(EXIT_BAD_INPUT)


def agree(world, problem: str | None) -> None:
    """Every rank's check, gathered (each rank calls this once per check, failed or not, so no rank
    is left waiting): when any failed, rank 0 prints each distinct message once, naming the ranks
    when not all share it, and every rank exits 2. One line per job, not one per rank at EP 256."""
    problems = world.allgather(problem)
    if not any(problems):
        return
    if world.Get_rank() == 0:
        ranks_of: dict[str, list[int]] = {}
        for rank, message in enumerate(problems):
            if message:
                ranks_of.setdefault(message, []).append(rank)
        for message, ranks in ranks_of.items():
            where = (
                "" if len(ranks) == world.Get_size() else f" (on {rank_list(ranks)} of {world.Get_size()})"
            )
            sys.stderr.write(f"hpcmoe: error: {message}{where}\n")
    sys.stderr.flush()
    sys.exit(EXIT_BAD_INPUT)


def rank_list(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> 'ranks 0-2,5'."""
    spans, start = [], ranks[0]
    for previous, rank in zip(ranks, ranks[1:] + [None]):
        if rank != previous + 1:
            spans.append(f"{start}-{previous}" if previous > start else f"{start}")
            start = rank
    return ("ranks " if len(ranks) > 1 else "rank ") + ",".join(spans)
