"""Buffers as MPI is handed them: a tensor's raw bytes (bf16 has no MPI type; bytes need none) and
the pool of large exchange buffers reused across layers and steps. Shared by the messages, the
collectives of rows and the weight moves.
"""

from __future__ import annotations

import torch


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's raw bytes as a flat uint8 tensor (bf16 has no MPI type; bytes need none)."""
    # reshape(-1) first: a contiguous tensor with a size-1 dim may keep a stride that view() refuses
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def as_bytes(t: torch.Tensor):
    """What MPI is handed: a numpy view of host memory, or a uint8 device tensor (which a CUDA-aware
    MPI reads through __cuda_array_interface__)."""
    flat = byte_view(t)
    return flat.numpy() if flat.device.type == "cpu" else flat


class BufferPool:
    """Large exchange buffers reused across layers and steps instead of allocated per layer.

    get(key, rows, cols, dtype) returns a [rows, cols] view of a buffer kept for `key`, grown when
    too small. The caller picks keys so that a buffer is never handed out while still in use
    (e.g. one key per micro-batch slot, purpose and layer parity)."""

    def __init__(self, device=None):
        self.buffers: dict = {}
        self.device = device

    def get(self, key, rows: int, cols: int, dtype) -> torch.Tensor:
        need = rows * cols * torch.empty(0, dtype=dtype).element_size()
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < need:
            buffer = self.buffers[key] = torch.empty(max(need, 64), dtype=torch.uint8, device=self.device)
        return buffer[:need].view(dtype).view(rows, cols)
