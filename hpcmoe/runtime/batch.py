"""A rank's live requests as they generate: continuous (or static) batching over the KV cache rows.

Separate from the step loop because it is the one piece of the loop's state that is per request:
which requests are admitted, how much of each prompt a step feeds, when a request ends and its
cache rows are freed. It reads only this rank's requests and tokens (no MPI).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from hpcmoe.config import Config
from hpcmoe.model.step import StepInputs


def batch_of(config: Config, engine, max_batch: int, earlier) -> "Batch":
    """This rank's Batch: the requests its engine serves (every attention group's in turn, in file
    order), the checkpoint's end-of-sequence tokens when requests stop at them; its cache rows as long
    as the longest request."""
    from hpcmoe.workload import eos_ids

    r, requests = config.run, config.requests
    longest = int((requests.prompt_lengths + requests.max_new_tokens).max())
    new_rows = lambda n: engine.new_cache(n, longest)
    stop_at_eos = r.stop_at_eos if r.stop_at_eos is not None else bool(config.model.checkpoint)
    return Batch(
        requests,
        engine.requests(len(requests)),
        eos_ids(config.model.checkpoint) if stop_at_eos else (),
        new_rows,
        new_rows(0),
        r.batching,
        max_batch,
        r.prefill_chunk,
        earlier,
    )


class Row:
    """A live request: its cache row holds `cached` positions; `todo` are the tokens it feeds before it
    chooses its next token (the rest of its prompt, or its last token); `take` of them this step."""

    def __init__(self, index: int, request_id: str, todo: list[int], made: int, limit: int):
        self.index, self.id, self.todo, self.made, self.limit, self.take = (
            index,
            request_id,
            todo,
            made,
            limit,
            0,
        )


@dataclass
class Events:
    """What a rank's requests did in one step: the tokens made (request index, token, and the
    finish reason, "" while it goes on) and the requests admitted."""

    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    token: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    reason: list = field(default_factory=list)
    admitted: list = field(default_factory=list)


class Batch:
    """A rank's requests as they generate (continuous batching). Requests join in file order while
    the batch has fewer than max_batch: with run.batching=continuous as soon as a slot frees, their
    prompts prefilled in chunks inside the decode steps (at most run.prefill_chunk prompt tokens a
    step, a row already in prefill first, at least one token each); with static, a whole batch at
    once when the last one has ended, each prompt in one pass. A request leaves when it reaches its
    max_new_tokens or, with run.stop_at_eos, makes an end-of-sequence token (kept as its last);
    its KV cache rows are freed. Every decision reads only this rank's own requests and tokens, so
    the ranks of an attention group (ma), which see the same tokens, decide the same."""

    def __init__(
        self,
        source,
        mine,
        eos: tuple[int, ...],
        new_rows,
        cache,
        batching: str,
        max_batch: int,
        prefill_chunk: int,
        earlier=None,
    ):
        """source: the run's requests (len, [i]); mine: the indices this rank serves, in file order;
        new_rows(n): n empty KV cache rows, one list per layer; earlier: the Done (workload) of a stopped
        run or of the steps before a recovery (finished requests skipped, the others continued)."""
        self.source, self.eos, self.new_rows, self.cache = source, set(eos), new_rows, cache
        self.static, self.max_batch, self.chunk = batching == "static", max_batch, prefill_chunk
        self.earlier = earlier
        self.waiting = (i for i in mine if earlier is None or not earlier.finished[i])
        self.next = next(self.waiting, None)
        self.rows: list[Row] = []
        self.cached = torch.zeros(0, dtype=torch.int64)  # positions in the cache, per row
        self.digests: dict[int, bytes] = {}  # sha256 of the KV cache rows of each request that left

    @property
    def busy(self) -> bool:
        """Requests live or still to come on this rank."""
        return bool(self.rows) or self.next is not None

    @property
    def busy_after_next(self) -> bool:
        """Requests live or to come after the next step (False when every live request surely ends
        in it by its token limit), so that the ranks' lagged stop vote ends the run without an
        empty step."""
        return self.next is not None or any(
            len(row.todo) > 1 or row.made + 1 < row.limit for row in self.rows
        )

    def inputs(self, device) -> tuple[StepInputs, list[int]]:
        """Admit what fits, then share out this step's tokens -> (the step's inputs, admitted indices)."""
        budget = float("inf") if self.static else self.chunk
        for row in self.rows:
            row.take = 1 if len(row.todo) == 1 else max(1, min(len(row.todo), budget))
            budget -= row.take if len(row.todo) > 1 else 0
        joining = []
        room = self.max_batch - len(self.rows) if not self.static or not self.rows else 0
        while len(joining) < room and self.next is not None and budget > 0:
            request = self.source[self.next]
            made = self.earlier.partial.get(self.next, []) if self.earlier is not None else []
            row = Row(
                self.next,
                request.id,
                list(request.prompt_ids) + list(made),
                len(made),
                request.max_new_tokens,
            )
            row.take = min(len(row.todo), budget)
            budget -= row.take
            joining.append(row)
            self.next = next(self.waiting, None)
        if joining:
            for layer, new in zip(self.cache, self.new_rows(len(joining))):
                for part, rows in zip(layer, new):
                    part.data = torch.cat([part.data, rows.data])
            self.rows += joining
            self.cached = torch.cat([self.cached, torch.zeros(len(joining), dtype=torch.int64)])
        return StepInputs.build([row.todo[: row.take] for row in self.rows], self.cached, device), [
            row.index for row in joining
        ]

    def positions(self) -> list[int]:
        """The index, within its request, of the token each row chooses this step (seeds sampling)."""
        return [row.made for row in self.rows]

    def advance(self, chosen: np.ndarray) -> tuple[Events, list[int]]:
        """chosen: [rows] this step's tokens (read for the rows whose prompt is all in) -> (the step's
        events, the rows that made a token); the requests that ended leave the batch."""
        self.cached += torch.tensor([row.take for row in self.rows], dtype=torch.int64)
        events, made, keep = Events(), [], []
        index, tokens = [], []
        for r, row in enumerate(self.rows):
            del row.todo[: row.take]
            if row.todo:  # its prompt goes on in the next step
                keep.append(r)
                continue
            token = int(chosen[r])
            row.made += 1
            made.append(r)
            index.append(row.index)
            tokens.append(token)
            reason = "eos" if token in self.eos else "length" if row.made >= row.limit else ""
            events.reason.append(reason)
            if reason:
                self.digests[row.index] = row_digest(self.cache, r)
            else:
                row.todo = [token]
                keep.append(r)
        events.index, events.token = np.array(index, np.int64), np.array(tokens, np.int64)
        if len(keep) < len(self.rows):
            self.rows = [self.rows[r] for r in keep]
            self.cached = self.cached[keep]
            keep_cache_rows(self.cache, keep)
        return events, made

    def cache_digest(self) -> str:
        """sha256 over every request's KV cache rows in request order (those of requests that left
        the batch taken as they left): replicas that must agree bit for bit can be compared."""
        import hashlib

        digest = hashlib.sha256()
        live = {row.index: r for r, row in enumerate(self.rows)}
        for i in sorted(set(self.digests) | set(live)):
            digest.update(self.digests[i] if i in self.digests else row_digest(self.cache, live[i]))
        return digest.hexdigest()


def row_digest(cache, row: int) -> bytes:
    import hashlib

    digest = hashlib.sha256()
    for layer in cache:
        for part in layer:
            digest.update(part.data[row].contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.digest()


def keep_cache_rows(cache, rows: list[int]) -> None:
    """Keep only these rows of every layer's KV cache (in this order); the others' memory is freed."""
    index = torch.tensor(rows, dtype=torch.int64)
    for layer in cache:
        for part in layer:
            part.data = part.data.index_select(0, index.to(part.data.device))
