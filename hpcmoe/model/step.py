"""One forward step of a batch of requests: its inputs (tokens, positions, padding, the masks and
rotations that every layer shares) and the cache that keeps a tensor per position. Apart from
attention because the engine builds, slices and advances these without touching any weights.

Shapes: b = requests, t = new tokens this step, s = visible cached positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hpcmoe.model.rope import Rope


def host_tensor(values: list[int], device) -> torch.Tensor:
    """A small int64 tensor from host values on `device`, without a device synchronisation (a copy
    from pageable memory would wait for the stream; from pinned memory it is queued)."""
    tensor = torch.tensor(values, dtype=torch.int64)
    if torch.device(device).type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class StepInputs:
    """One forward step of a batch of requests, right-padded to t tokens."""

    tokens: torch.Tensor  # [b, t] int64, pads are 0
    positions: torch.Tensor  # [b, t] int64, each request's own positions (start at 0)
    valid: torch.Tensor  # [b, t] bool, False on padding
    dense: bool = False  # every position valid (decode, equal prompts): no masking of rows needed
    lengths: torch.Tensor = None  # [b] new tokens per request (host), to advance the cache positions
    # [valid positions] flat index of each valid position (no per-layer mask)
    valid_index: torch.Tensor = None
    cached: torch.Tensor = None  # [b] positions already in the cache (host)
    rotations: dict = field(default_factory=dict, compare=False)  # (Rope, dtype) -> (cos, sin), once per step

    def cos_sin(self, rope: Rope, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation of this step's positions in `dtype`, computed once and shared by every layer."""
        key = (rope, dtype)
        if key not in self.rotations:
            self.rotations[key] = tuple(t.to(dtype) for t in rope.cos_sin(self.positions))
        return self.rotations[key]

    @property
    def request_index(self) -> torch.Tensor:
        """[b, t] the request row of every position (for cache writes), once per step."""
        if "rows" not in self.rotations:
            rows = torch.arange(len(self.positions), device=self.positions.device)
            self.rotations["rows"] = rows[:, None].expand_as(self.positions)
        return self.rotations["rows"]

    @property
    def attend(self) -> torch.Tensor:
        """[b, 1, t, s] bool: key position visible to query (s: the longest row's cached + new), once."""
        if "attend" not in self.rotations:
            ends = self.cached + self.lengths
            keys = torch.arange(int(ends.max()) if len(ends) else 1, device=self.positions.device)
            ends = ends.to(self.positions.device, non_blocking=True)
            self.rotations["attend"] = ((keys <= self.positions[..., None]) & (keys < ends[:, None, None]))[
                :, None
            ]
        return self.rotations["attend"]

    def windowed(self, window: int) -> torch.Tensor:
        """`attend` where a query sees only the last `window` positions (itself included), once per window."""
        key = ("attend", window)
        if key not in self.rotations:
            keys = torch.arange(self.attend.shape[-1], device=self.positions.device)
            self.rotations[key] = self.attend & (keys > self.positions[..., None] - window)[:, None]
        return self.rotations[key]

    @classmethod
    def build(cls, tokens: list[list[int]], cached: torch.Tensor, device=None) -> "StepInputs":
        """tokens: b lists of new tokens; cached: [b] positions already in the cache (host)
        -> the step's inputs on `device` (built on the host, moved in one go)."""
        b, t = len(tokens), max((len(x) for x in tokens), default=1)
        lengths = torch.tensor([len(x) for x in tokens], dtype=torch.int64)
        valid = torch.arange(t) < lengths[:, None]
        padded = torch.zeros(b, t, dtype=torch.int64)
        padded[valid] = torch.tensor([token for row in tokens for token in row], dtype=torch.int64)
        positions = cached[:, None] + torch.arange(t)
        move = lambda x: x.to(device, non_blocking=True) if device is not None else x
        return cls(
            move(padded),
            move(positions),
            move(valid),
            dense=bool(lengths.eq(t).all()),
            lengths=lengths,
            valid_index=move(valid.reshape(-1).nonzero().flatten()),
            cached=cached.clone(),
        )

    def rows(self, start: int, stop: int) -> "StepInputs":
        """The requests [start, stop) of this step (views), padded only to their own longest."""
        lengths = self.lengths[start:stop]
        t = max(int(lengths.max()), 1) if len(lengths) else 1
        valid = torch.arange(t) < lengths[:, None]
        return StepInputs(
            self.tokens[start:stop, :t],
            self.positions[start:stop, :t],
            self.valid[start:stop, :t],
            bool(lengths.eq(t).all()),
            lengths,
            valid.reshape(-1).nonzero().flatten().to(self.tokens.device, non_blocking=True),
            self.cached[start:stop],
        )

    def parts(self) -> list[tuple[int, int]]:
        """Row ranges whose attention runs apart: the leading rows that decode (one token each) and
        the rest (rows that prefill a chunk, which continuous batching puts last), so that a decode
        row is never padded to a prompt chunk's length."""
        b, ones = len(self.lengths), int(self.lengths.eq(1).cumprod(0).sum())
        return [(0, ones), (ones, b)] if 0 < ones < b else [(0, b)]

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """x: [b, t, H] -> [valid positions, H] (a view when every position is valid)."""
        flat = x.view(-1, x.shape[-1])
        return flat if self.dense else flat.index_select(0, self.valid_index)

    def add_flat(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        """x[valid positions] += rows, in place (each position once: deterministic on any device)."""
        flat = x.view(-1, x.shape[-1])
        if self.dense:
            flat.add_(rows)
        else:
            flat.index_add_(0, self.valid_index, rows)


class PositionCache:
    """A cached tensor per position: [b, max_len, *features]; each row fills at its own positions."""

    def __init__(self, batch: int, max_len: int, features: tuple[int, ...], dtype, device=None):
        self.data = torch.zeros((batch, max_len, *features), dtype=dtype, device=device)

    def rows(self, start: int, stop: int) -> "PositionCache":
        """The cache of requests [start, stop): a view, so updates land in this cache."""
        view = PositionCache.__new__(PositionCache)
        view.data = self.data[start:stop]
        return view

    def update(self, x: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """x: [b, t, *features] -> every visible position [b, s, *features], x included."""
        if inputs.dense:
            self.data[inputs.request_index, inputs.positions] = x
        else:  # only the valid positions: a padded one may lie past the end of its row's cache
            flat = lambda t: t.reshape(-1, *t.shape[2:]).index_select(0, inputs.valid_index)
            self.data[flat(inputs.request_index), flat(inputs.positions)] = flat(x)
        return self.data[:, : inputs.attend.shape[-1]]
