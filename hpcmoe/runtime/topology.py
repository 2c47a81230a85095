"""MPI lifecycle and communicators that mirror the machine (node, node leaders).

One function owns the MPI lifecycle (PyFR's mpiutil): an uncaught exception on any rank
prints that rank and its traceback, then aborts the whole job non-zero, so no peer is left
blocked. Everything hierarchical reads the communicators built here.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from mpi4py import MPI

STOP_REQUESTED = [False]  # set by SIGUSR1 or SIGTERM at any time; the ranks agree on it at step boundaries


def request_stop(signum, frame):
    STOP_REQUESTED[0] = True


def listen_for_stop() -> None:
    """SIGUSR1 (Slurm's --signal=USR1@N) and SIGTERM (what scancel and a time limit send first) ask
    for a clean stop: the ranks agree on a step, write the partial file and exit 0."""
    signal.signal(signal.SIGUSR1, request_stop)
    signal.signal(signal.SIGTERM, request_stop)


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of giving it back to the kernel. A step's
    tensors are freed and allocated again every layer; memory given back must be faulted in again
    page by page, which made a 32 MiB copy take 4x longer here (36 ms against 9.5 ms; glibc's own
    threshold hands blocks of 32 MiB and more back at once). Called once the model is built: kept
    from the start, the build's float32 temporaries (a whole tensor before its bfloat16 copy) stayed
    in the heap, fragmented, and raised the peak by 0.8 GiB on DeepSeek-V3 shapes (5.41 against
    4.61 GiB). No-op where glibc is absent."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameters
    libc.mallopt(m_mmap_max, 0)  # large blocks from the heap too, not from mmap (unmapped on free)
    libc.mallopt(m_trim_threshold, 2**62)  # never trim the heap's top


def init_mpi():
    """Initialize MPI, listen for SIGUSR1 and install the abort-on-exception hook; returns COMM_WORLD."""
    from mpi4py import MPI  # importing initializes MPI

    world = MPI.COMM_WORLD
    listen_for_stop()  # first thing: a signal during start-up must not be lost

    def abort_on_exception(kind, value, tb):
        text = "".join(traceback.format_exception(kind, value, tb))
        sys.stderr.write(
            f"hpcmoe: rank {world.Get_rank()}: unhandled {kind.__name__}, aborting the job\n{text}"
        )
        sys.stderr.flush()
        sys.stdout.flush()
        # the launcher forwards our pipes asynchronously and stops reading once the abort reaches it:
        # under load the traceback above was lost; give it a moment to be read
        time.sleep(0.5)
        world.Abort(1)

    sys.excepthook = abort_on_exception
    return world


@dataclass
class Topology:
    """This rank's place in the machine: world, node and node-leader communicators."""

    world: "MPI.Comm"
    node: "MPI.Comm"  # ranks of my (possibly emulated) node
    leaders: Optional["MPI.Comm"]  # rank 0 of every node; None on the other ranks
    node_index: int
    num_nodes: int
    node_sizes: tuple[int, ...]
    host_size: int  # ranks sharing this rank's real machine (they share its cores and GPUs)
    host_rank: int  # this rank's position among them (picks its GPU)
    node_of_rank: tuple[int, ...]  # [world ranks] node index of every rank

    @property
    def rank(self) -> int:
        return self.world.Get_rank()

    @property
    def size(self) -> int:
        return self.world.Get_size()

    @property
    def ranks_per_node(self) -> int:
        return max(self.node_sizes)


def build_topology(world, ranks_per_node: Optional[int]) -> Topology:
    """Node comm from shared memory, or blocks of `ranks_per_node` consecutive ranks when given."""
    from mpi4py import MPI

    rank = world.Get_rank()
    host = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    node = world.Split(color=rank // ranks_per_node, key=rank) if ranks_per_node else host
    is_leader = node.Get_rank() == 0
    leaders = world.Split(color=0 if is_leader else MPI.UNDEFINED, key=rank)
    leaders = None if leaders == MPI.COMM_NULL else leaders
    # nodes are numbered by their leader's world rank
    leader_rank = node.bcast(rank if is_leader else None, root=0)
    sizes = dict(world.allgather((leader_rank, node.Get_size())))
    leader_ranks = sorted(sizes)
    node_of_rank = tuple(leader_ranks.index(r) for r in world.allgather(leader_rank))
    return Topology(
        world,
        node,
        leaders,
        leader_ranks.index(leader_rank),
        len(leader_ranks),
        tuple(sizes[r] for r in leader_ranks),
        host.Get_size(),
        host.Get_rank(),
        node_of_rank,
    )


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads(node_size: int) -> int:
    """Cores per rank on this node (at least one)."""
    return max(1, available_cores() // node_size)


def ranks_on_this_host() -> int:
    """Ranks sharing this machine, from the launcher's environment (before any communicator exists)."""
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "PMI_SIZE"):
        value = os.environ.get(name, "").split("(")[0]
        if value.isdigit():
            return max(1, int(value))
    return 1


def available_memory() -> int:
    """MemAvailable of this machine in bytes (unknown: a huge number, so that nothing is refused)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 2**62


def available_memory_per_rank() -> int:
    """MemAvailable of this machine (bytes) shared among the ranks on it."""
    return available_memory() // ranks_on_this_host()
