"""The rank's device: which GPU, whether the MPI reads device memory, and the device-generic pieces
the exchange needs (a copy stream, events, pinned host buffers for staging).

One code path for CPU and GPU: torch's generic `torch.Stream`, `torch.Event` and `torch.accelerator`
on a GPU; on the CPU an event is complete when it is recorded (CPU work is synchronous) and MPI reads
the tensors' own memory, so nothing is staged and nothing waits.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch


def device_kind(requested: str) -> str:
    """run.device (auto | cpu | cuda) -> cpu or cuda; ValueError when cuda is asked for and absent
    (every rank sees the same, so every rank gives the same error)."""
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise ValueError(
            f"run.device: cuda, but torch sees no GPU (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}); use run.device: cpu or auto"
        )
    return "cuda" if requested != "cpu" and available else "cpu"


def choose_device(kind: str, host_rank: int) -> torch.device:
    """This rank's device: a GPU picked by its rank among the ranks on its machine, round robin over
    the visible GPUs (several ranks may share one; CUDA_VISIBLE_DEVICES is respected)."""
    if kind == "cpu":
        return torch.device("cpu")
    index = host_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def mpi_reads_device_memory(setting, device: torch.device) -> bool:
    """parallel.cuda_aware_mpi: true / false as set; auto asks the MPI library (MPIX_Query_cuda_support,
    which Open MPI and MPICH export when built with CUDA); an MPI that cannot be asked is taken as not."""
    if device.type == "cpu":
        return True  # host memory: nothing to stage
    if setting in (True, False):
        return setting
    query = mpi_symbol("MPIX_Query_cuda_support")
    return bool(query()) if query is not None else False


def mpi_symbol(name: str):
    """A function of the loaded MPI library, or None (found through /proc/self/maps: mpi4py loads
    libmpi privately, so its symbols are not global)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {
                line.split()[-1]
                for line in f
                if "libmpi" in line and line.rstrip().endswith(".so") or "libmpi.so" in line
            }
    except OSError:
        return None
    for path in sorted(p for p in paths if p.startswith("/")):
        try:
            return getattr(ctypes.CDLL(path), name)
        except (OSError, AttributeError):
            continue
    return None


class Done:
    """An event that is complete when recorded: CPU work is synchronous."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


DONE = Done()


@dataclass
class Streams:
    """The compute stream (the current one) and a copy stream of a device, and events on them."""

    device: torch.device
    copy: object = None

    def __post_init__(self):
        if self.gpu:
            self.copy = torch.Stream(device=self.device)

    @property
    def gpu(self) -> bool:
        return self.device.type != "cpu"

    def compute(self):
        return torch.accelerator.current_stream(self.device)

    def record(self, stream=None):
        """An event after the work queued so far on `stream` (default: the compute stream)."""
        if not self.gpu:
            return DONE
        event = torch.Event(device=self.device)
        event.record(stream or self.compute())
        return event

    def copy_after(self, event, destination: torch.Tensor, source: torch.Tensor):
        """On the copy stream, once `event` has completed: destination <- source; -> its event."""
        if not self.gpu:
            destination.copy_(source)
            return DONE
        if event is not DONE:
            self.copy.wait_event(event)
        with self.copy:  # a torch.Stream is a context that makes it current
            destination.copy_(source, non_blocking=True)
        return self.record(self.copy)

    def compute_waits(self, event) -> None:
        """Work queued on the compute stream from now on starts after `event` (the host does not wait)."""
        if self.gpu:
            self.compute().wait_event(event)


@dataclass
class PinnedPool:
    """Page-locked host buffers for staging, reused across layers and steps: take() hands out a free
    buffer of at least n bytes (or a new one); give(buffer, after) takes it back, free again once the
    event `after` (the copy that read it) has completed and the caller's MPI call is done."""

    pin: bool = True
    returned: list = field(default_factory=list)  # (buffer, event it waits for)
    allocated: int = 0  # buffers ever made (reuse keeps this small)

    def take(self, nbytes: int) -> torch.Tensor:
        for i, (buffer, after) in enumerate(self.returned):
            if buffer.numel() >= nbytes and after.query():
                del self.returned[i]
                return buffer[:nbytes]
        self.allocated += 1
        return torch.empty(max(nbytes, 64), dtype=torch.uint8, pin_memory=self.pin)[:nbytes]

    def give(self, buffer: torch.Tensor, after=DONE) -> None:
        self.returned.append((buffer._base if buffer._base is not None else buffer, after))


@dataclass
class Staging:
    """Moves MPI payloads between device memory and pinned host memory when the MPI cannot read the
    device: device-to-host copies on the copy stream after an event on the compute stream, and the
    send posted only when the copy's event has completed; receives land in pinned memory and go to
    the device on the copy stream, the compute stream waiting on that copy's event."""

    streams: Streams
    pool: PinnedPool


def staging_for(device: torch.device, cuda_aware: bool) -> Staging | None:
    """None where MPI reads the tensors directly (the CPU, or a CUDA-aware MPI)."""
    if device.type == "cpu" or cuda_aware:
        return None
    return Staging(Streams(device), PinnedPool())
