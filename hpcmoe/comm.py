"""Point-to-point primitives shared by dispatch and the engine.

Every wait in a run goes through `wait_until`: it tests, yields the core while nothing has
arrived (ranks may outnumber cores), and knows where it is (step, layer, micro-batch, phase,
peers), so that a watchdog can name a stuck rank. No blocking collective is used inside the
generate loop: a blocking call can neither time out nor say whom it waits for.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from mpi4py import MPI


@dataclass(frozen=True)
class Where:
    """Where a rank is waiting: printed by diagnostics."""
    step: int = -1
    layer: int = -1
    micro_batch: int = 0
    phase: str = ""
    peers: tuple[int, ...] = ()

    def __str__(self):
        return (f"step {self.step} layer {self.layer} micro_batch {self.micro_batch} "
                f"phase {self.phase} for rank {','.join(map(str, self.peers)) or '-'}")


def wait_until(done: Callable[[], bool], where: Where) -> None:
    """Poll `done()` until it is true, sleeping a little longer each time (at most 1 ms)."""
    pause = 20e-6
    while not done():
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)


def wait_all(requests: list[MPI.Request], where: Where) -> None:
    if requests:
        wait_until(lambda: MPI.Request.Testall(requests), where)


def as_buffer(t: torch.Tensor) -> list:
    """A contiguous tensor as a raw-byte MPI buffer (bf16 has no MPI type; bytes need none)."""
    return [t.view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8), MPI.BYTE]


@dataclass
class Exchange:
    """Messages in flight between this rank and its peers; `received[peer]` fills on completion."""
    received: dict[int, torch.Tensor]
    requests: list[MPI.Request]
    sent: list[torch.Tensor] = field(default_factory=list)  # keep send buffers alive until done

    def wait(self, where: Where) -> dict[int, torch.Tensor]:
        wait_all(self.requests, where)
        return self.received


def post_exchange(comm: MPI.Comm, send: dict[int, torch.Tensor], recv: dict[int, torch.Tensor],
                  tag: int) -> Exchange:
    """Post one Irecv per entry of `recv` (preallocated) and one Isend per entry of `send`.

    The entry for this rank itself is copied, not sent. Empty messages are skipped: both sides
    know the sizes from an earlier counts exchange.
    """
    me = comm.Get_rank()
    requests, kept = [], []
    for peer, buffer in recv.items():
        if peer != me and buffer.numel():
            requests.append(comm.Irecv(as_buffer(buffer), source=peer, tag=tag))
    for peer, data in send.items():
        data = data.contiguous()
        if peer == me:
            recv[me].copy_(data)
        elif data.numel():
            kept.append(data)
            requests.append(comm.Isend(as_buffer(data), dest=peer, tag=tag))
    return Exchange(recv, requests, kept)


def tag_for(kind: int, layer: int, micro_batch: int, micro_batches: int) -> int:
    """Distinct tags per (layer, micro-batch, message kind) so exchanges in flight never cross."""
    return (kind + 4 * (micro_batch + micro_batches * max(layer, 0))) % 32000 + 100
