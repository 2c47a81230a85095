"""The device-generic path on the CPU: staging logic with controllable events, device selection.

The staging code (device-to-host copies on a copy stream after an event on the compute stream, the
send posted only once the copy's event has completed, pinned buffers reused) runs here with fake
streams whose events complete when the test says so, and a fake communicator that records what
was posted: so "a send is never posted before its copy finished" is checked without a GPU.
"""

import os

import numpy as np
import pytest
import torch

from hpcmoe.runtime.comm import Receives, Sender
from hpcmoe.runtime.device import PinnedPool, Staging, device_kind
from hpcmoe.runtime.link import Link
from tests.conftest import run_job


class Completion:
    """A device event (query) or an MPI request (Test) that completes only when the test says so."""

    def __init__(self):
        self.done = False

    def query(self):
        return self.done

    Test = query


class FakeStreams:
    """Copies happen at once (CPU), but their events complete only when the test completes them."""

    gpu = True

    def __init__(self):
        self.recorded, self.copies, self.waited = [], [], []

    def record(self, stream=None):
        self.recorded.append(Completion())
        return self.recorded[-1]

    def copy_after(self, event, destination, source):
        destination.copy_(source)
        self.copies.append((event, Completion()))
        return self.copies[-1][1]

    def compute_waits(self, event):
        self.waited.append(event)


class FakeComm:
    def __init__(self):
        self.sent, self.posted_receives = [], []

    def Get_rank(self):
        return 0

    def Isend(self, spec, dest, tag):
        self.sent.append((bytes(spec[0]), dest, tag, Completion()))
        return self.sent[-1][3]

    def Irecv(self, spec, source, tag):
        self.posted_receives.append((spec[0], source, tag, Completion()))
        return self.posted_receives[-1][3]


def staged_sender():
    streams, comm = FakeStreams(), FakeComm()
    staging = Staging(streams, PinnedPool(pin=False))
    return Sender(comm, Link((0, 0)), staging, streams), comm, streams, staging


def test_a_send_is_posted_only_after_its_copy_to_pinned_memory_completed():
    sender, comm, streams, staging = staged_sender()
    data = torch.arange(12, dtype=torch.float32)
    sender.send(1, data, tag=7)
    ((gate, copied),) = streams.copies
    assert gate is streams.recorded[0]  # the copy waited for the compute stream's event
    assert comm.sent == []  # the copy has not completed: nothing posted
    sender.test()
    assert comm.sent == []
    copied.done = True
    sender.test()
    payload, dest, tag, request = comm.sent[0]
    assert (dest, tag) == (1, 7) and payload == data.numpy().tobytes()
    assert not sender.idle()  # the Isend is in flight
    request.done = True
    assert sender.idle()


def test_pinned_buffers_are_reused_once_their_send_completed():
    sender, comm, streams, staging = staged_sender()
    for round_ in range(5):
        sender.send(1, torch.full((64,), float(round_)), tag=round_)
        streams.copies[-1][1].done = True
        sender.test()
        comm.sent[-1][3].done = True
        sender.test()
        assert comm.sent[-1][0] == np.full(64, float(round_), np.float32).tobytes()
    assert staging.pool.allocated == 1


def test_sends_leave_in_the_order_their_copies_complete():
    sender, comm, streams, _ = staged_sender()
    sender.send(1, torch.ones(4), tag=1)
    sender.send(1, torch.zeros(4), tag=2)
    streams.copies[1][1].done = True
    sender.test()
    assert [tag for _, _, tag, _ in comm.sent] == [2]
    streams.copies[0][1].done = True
    sender.test()
    assert [tag for _, _, tag, _ in comm.sent] == [2, 1]


def test_a_staged_receive_lands_on_the_device_after_its_copy_and_frees_its_buffer_after_that():
    streams, comm = FakeStreams(), FakeComm()
    staging = Staging(streams, PinnedPool(pin=False))
    target = torch.zeros(6)
    receives = Receives(comm, {1: target}, tag=3, link=Link((0, 0)), staging=staging)
    host, source, tag, request = comm.posted_receives[0]
    assert (source, tag) == (1, 3) and not np.shares_memory(host, target.numpy())  # into pinned memory
    assert receives.arrived() == set()
    host[:] = np.arange(6, dtype=np.float32).view(np.uint8)  # what MPI delivers
    request.done = True
    assert receives.arrived() == {1}
    assert torch.equal(target, torch.arange(6, dtype=torch.float32))
    ((_, copied),) = streams.copies
    assert streams.waited == [copied]  # the compute stream waits for the copy to the device
    assert staging.pool.allocated == 1
    staging.pool.take(24)  # the copy has not completed: its buffer is not free yet
    assert staging.pool.allocated == 2
    copied.done = True
    staging.pool.take(24)
    assert staging.pool.allocated == 2


@pytest.mark.parametrize(
    "requested, gpu, expected",
    [
        ("auto", True, "cuda"),
        ("auto", False, "cpu"),
        ("cpu", True, "cpu"),
        ("cpu", False, "cpu"),
        ("cuda", True, "cuda"),
    ],
)
def test_device_kind_resolves_run_device_by_whether_torch_sees_a_gpu(monkeypatch, requested, gpu, expected):
    """Both answers of torch.cuda.is_available on any machine: auto follows it, cpu ignores it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert device_kind(requested) == expected


def test_cuda_without_a_gpu_is_a_value_error_naming_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="run.device: cuda, but torch sees no GPU"):
        device_kind("cuda")


def test_the_resolved_device_sets_the_default_dtype_and_run_device():
    """model.dtype unset: bfloat16 on a GPU, float32 on a CPU; a dtype the user set is kept on either."""
    from hpcmoe.config import load_config
    from tests.conftest import DEBUG_CONFIG

    unset = load_config(DEBUG_CONFIG, ["model.dtype=null"])
    assert (unset.on_device("cuda").model.dtype, unset.on_device("cuda").run.device) == ("bfloat16", "cuda")
    assert (unset.on_device("cpu").model.dtype, unset.on_device("cpu").run.device) == ("float32", "cpu")
    assert load_config(DEBUG_CONFIG, ["model.dtype=float32"]).on_device("cuda").model.dtype == "float32"


def test_staging_only_where_mpi_cannot_read_the_tensors(monkeypatch):
    """CPU tensors and a CUDA-aware MPI: none; a GPU with an MPI that cannot read it: staged. auto
    asks the MPI library (MPIX_Query_cuda_support) and takes an MPI that cannot be asked as not aware."""
    from hpcmoe.runtime import device

    gpu = torch.device("cuda", 0)
    assert device.mpi_reads_device_memory(False, torch.device("cpu"))  # host memory: always readable
    assert device.mpi_reads_device_memory(True, gpu) and not device.mpi_reads_device_memory(False, gpu)
    for answer, expected in ((lambda: 1, True), (lambda: 0, False), (None, False)):
        monkeypatch.setattr(device, "mpi_symbol", lambda name, answer=answer: answer)
        assert device.mpi_reads_device_memory("auto", gpu) is expected
    assert device.staging_for(torch.device("cpu"), False) is None
    assert device.staging_for(gpu, True) is None
    monkeypatch.setattr(device, "Streams", lambda where: ("streams of", where))  # no GPU needed to build one
    staged = device.staging_for(gpu, False)
    assert staged.streams == ("streams of", gpu) and staged.pool.pin


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_fails_on_every_rank_before_any_file(tmp_path):
    result = run_job(4, tmp_path / "out.h5", "run.device=cuda")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("hpcmoe: error:")]
    assert len(lines) == 1
    assert "run.device: cuda, but torch sees no GPU" in lines[0]
    assert os.listdir(tmp_path) == []
