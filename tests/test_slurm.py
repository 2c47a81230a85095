"""jobs/*.sbatch under a real one-node Slurm (tools/slurm-local.sh up), shrunk to 4 ranks: each job
must end COMPLETED with a complete run file of the requested world size, and a config that needs
another world size must end FAILED with hpcmoe's own error. Needs root (apt-get, daemons)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from tests.conftest import ROOT, run_job

SLURM_LOCAL = os.path.join(ROOT, "tools", "slurm-local.sh")
VENV_BIN = os.path.dirname(sys.executable)  # the venv running the tests has hpcmoe and mpiexec
NTASKS = 4
# 4 ranks as 2 nodes of 2
SMALL = [
    "run.max_new_tokens=2",
    "model.num_experts=4",
    "parallel.ranks_per_node=2",
]
MA_SMALL = SMALL + ["parallel.attention_ranks=3", "parallel.moe_ranks=1", "model.heads=8"]


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("tools/slurm-local.sh needs root (apt-get, munged, slurmctld, slurmd)")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("no Slurm installed and no apt-get to install it")
    was_up = (
        shutil.which("sinfo") is not None
        and subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
    )
    result = subprocess.run([SLURM_LOCAL, "up"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"tools/slurm-local.sh up failed:\n{result.stdout}{result.stderr}"
    yield
    if not was_up:  # leave a cluster that was already running as it was
        subprocess.run([SLURM_LOCAL, "down"], capture_output=True, timeout=60)


class Job:
    def __init__(self, job_id: str, name: str, directory):
        self.id, self.name, self.directory = job_id, name, directory

    def output(self, task=None) -> str:
        name = f"{self.name}-{self.id}.out" if task is None else f"{self.name}-{self.id}_{task}.out"
        path = self.directory / name
        return path.read_text() if path.exists() else f"(no {path})"

    def run_file(self, task=None):
        tag = self.id if task is None else f"{self.id}_{task}"
        return self.directory / "runs" / f"{self.name}-{tag}" / "run.h5"


def submit(
    directory, script: str, name: str, settings=(), *sbatch_args: str, array: bool = False, env=None
) -> Job:
    """sbatch from the repository root on one node with NTASKS tasks; HPCMOE_SET from `settings`;
    run directories and logs under `directory`."""
    environment = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "HPCMOE_BIN": VENV_BIN,
        "HPCMOE_RUNS_DIR": str(directory / "runs"),
        "HPCMOE_SET": " ".join(f"--set '{s}'" for s in settings),
        **(env or {}),
    }
    log = directory / ("%x-%A_%a.out" if array else "%x-%j.out")
    command = [
        "sbatch",
        "--parsable",
        "--nodes=1",
        f"--ntasks={NTASKS}",
        "--overcommit",
        f"--output={log}",
        "--export=ALL",
        *sbatch_args,
    ]
    # Slurm (22.05) refuses --ntasks-per-node above a node's CPUs even with --overcommit, and a
    # command line can override that header but not remove it: the script goes in on stdin without it.
    with open(os.path.join(ROOT, "jobs", script)) as f:
        text = re.sub(r"(?m)^#SBATCH --ntasks-per-node=.*\n", "", f.read())
    result = subprocess.run(
        command, input=text, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{' '.join(command)} < jobs/{script}: {result.stderr}"
    return Job(result.stdout.strip().split(";")[0], name, directory)


def wait(job: Job, timeout: float = 240) -> dict:
    """Poll squeue once a second until the job (every array task) is gone; return
    {array task or None: (JobState, ExitCode)} from scontrol (finished jobs stay there MinJobAge s)."""
    start = time.monotonic()
    while subprocess.run(
        ["squeue", "-h", "-j", job.id], capture_output=True, text=True, timeout=30
    ).stdout.strip():
        if time.monotonic() - start > timeout:
            subprocess.run(["scancel", job.id], timeout=30)
            pytest.fail(f"job {job.id} still queued or running after {timeout} s: cancelled\n{job.output()}")
        time.sleep(1)
    shown = subprocess.run(
        ["scontrol", "-o", "show", "job", job.id], capture_output=True, text=True, timeout=30
    )
    states = {}
    for line in shown.stdout.splitlines():
        task = re.search(r"\bArrayTaskId=(\d+)", line)
        states[int(task.group(1)) if task else None] = (
            re.search(r"\bJobState=(\S+)", line).group(1),
            re.search(r"\bExitCode=(\S+)", line).group(1),
        )
    assert states, f"scontrol knows no job {job.id}: {shown.stderr}"
    return states


def check_run_file(path, world_size: int) -> h5py.File:
    assert path.exists(), f"no run file {path}"
    f = h5py.File(path, "r")
    assert f.attrs["complete"] and f.attrs["world_size"] == world_size
    assert f["generated"].size > 0 and (f["generated"][:] != -1).all()
    return f


@pytest.mark.parametrize("launcher", ["auto", "mpiexec"])
def test_debug_job_completes(slurm, tmp_path, launcher):
    job = submit(
        tmp_path, "debug.sbatch", "hpcmoe-debug", ["run.max_new_tokens=2"], env={"HPCMOE_LAUNCHER": launcher}
    )
    assert wait(job) == {None: ("COMPLETED", "0:0")}, job.output()
    output = job.output()
    assert f"launcher {'srun' if launcher == 'auto' else 'mpiexec'}" in output, output  # pmi2 exists here
    assert "jobs: no partial file written" in output, output
    with check_run_file(job.run_file(), NTASKS) as f:
        assert f.attrs["layout"] == "ep"


def test_ep_large_job_shrunk_to_four_ranks_on_two_emulated_nodes(slurm, tmp_path):
    job = submit(tmp_path, "ep_large.sbatch", "hpcmoe-ep-large", SMALL)
    assert wait(job) == {None: ("COMPLETED", "0:0")}, job.output()
    with check_run_file(job.run_file(), NTASKS) as f:
        assert f.attrs["num_nodes"] == 2 and f["placement"].attrs["mode"] == "one_per_rank"
        assert f["generated"].shape == (32, 2)  # the job's run.batch=32


def test_ma_job_shrunk_to_three_plus_one(slurm, tmp_path):
    job = submit(tmp_path, "ma_12_4.sbatch", "hpcmoe-ma-12-4", MA_SMALL)
    assert wait(job) == {None: ("COMPLETED", "0:0")}, job.output()
    with check_run_file(job.run_file(), NTASKS) as f:
        assert f.attrs["layout"] == "ma"
        assert set(f["placement"][0, :, 0]) == {3}  # every expert on the one MoE rank


def test_sweep_array_runs_one_row_per_task(slurm, tmp_path):
    job = submit(tmp_path, "sweep.sbatch", "hpcmoe-sweep", SMALL, "--array=0-1", array=True)
    states = wait(job)
    assert states == {0: ("COMPLETED", "0:0"), 1: ("COMPLETED", "0:0")}, job.output(0) + job.output(1)
    for task, micro_batches in ((0, 1), (1, 4)):  # rows 0 and 1: 4 ranks, packed, 1 and 4 micro-batches
        assert f"sweep row {task}: 4 ranks, {micro_batches} micro-batches, placement packed" in job.output(
            task
        )
        with check_run_file(job.run_file(task), NTASKS) as f:
            assert f["placement"].attrs["mode"] == "packed"
            assert f"micro_batches: {micro_batches}" in f.attrs["config"]


@pytest.mark.parametrize("launcher", ["auto", "mpiexec"])
def test_world_size_mismatch_fails_with_hpcmoe_error(slurm, tmp_path, launcher):
    job = submit(
        tmp_path,
        "ma_12_4.sbatch",
        "hpcmoe-ma-12-4",
        SMALL + ["parallel.attention_ranks=3", "parallel.moe_ranks=2", "model.heads=8"],
        env={"HPCMOE_LAUNCHER": launcher},
    )
    ((state, _),) = wait(job).values()
    output = job.output()
    assert state == "FAILED", output
    assert "jobs: warning: the config needs 5 ranks but 4 will start" in output, output
    assert (
        "hpcmoe: error: world size (4) must equal parallel.attention_ranks (3) + parallel.moe_ranks (2)"
        in output
    )
    assert not (tmp_path / "runs" / f"hpcmoe-ma-12-4-{job.id}" / "run.h5").exists()


@pytest.mark.parametrize("launcher", ["auto", "mpiexec"])
def test_usr1_stops_the_job_cleanly_with_a_partial_file(slurm, tmp_path, launcher):
    """What --signal=B:USR1@N does before the time limit, sent by hand: the batch shell forwards it,
    the ranks agree on a stop step, the job ends COMPLETED with run.partial.h5 (complete false)."""
    job = submit(
        tmp_path,
        "debug.sbatch",
        "hpcmoe-debug",
        ["run.max_new_tokens=5000"],
        env={"HPCMOE_LAUNCHER": launcher},
    )
    temporary, deadline = job.run_file().parent / "run.h5.tmp", time.monotonic() + 120
    while not temporary.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # some steps in
    subprocess.run(["scancel", "-b", "-s", "USR1", job.id], check=True, timeout=30)
    assert wait(job) == {None: ("COMPLETED", "0:0")}, job.output()
    partial = job.run_file().parent / "run.partial.h5"
    assert "jobs: partial file written" in job.output(), job.output()
    with h5py.File(partial) as f:
        done = int(f.attrs["stopped_at_step"])
        assert not f.attrs["complete"] and 1 <= done < 5000
        assert (f["generated"][:, :done] >= 0).all() and (f["generated"][:, done:] == -1).all()


def test_a_requeued_job_resumes_from_its_partial_file(slurm, tmp_path):
    """USR1 stops the job with run.partial.h5; `scontrol requeue` starts it again in the same run
    directory, where jobs/common.sh continues with --resume: the run file equals an uninterrupted run."""
    stop_requeue_and_compare(tmp_path, ["run.max_new_tokens=600"])


def test_a_requeued_checkpoint_job_resumes_with_text_prompts(slurm, tmp_path):
    """The same for a run of a checkpoint with a prompt file of text (its resolved model fields must
    not be fed back as user settings), with continuous batching: equal to an uninterrupted run."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from make_tiny_checkpoint import make, train_tokenizer

    checkpoint = str(tmp_path / "mixtral")
    make("mixtral", checkpoint, vocab_size=320, max_position_embeddings=4096)
    train_tokenizer(checkpoint, os.path.join(ROOT, "tests", "data", "tiny_corpus.txt"), 320)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"id": "t{i}", "prompt": "request {i} of the batch"}}\n' for i in range(6)))
    stop_requeue_and_compare(
        tmp_path,
        [
            "model.preset=null",
            f"model.checkpoint={checkpoint}",
            f"run.prompts={prompts}",
            "run.max_new_tokens=1500",
            "run.stop_at_eos=false",
            "run.max_batch=2",
        ],
    )


def stop_requeue_and_compare(tmp_path, settings: list[str]) -> None:
    """debug.sbatch with `settings`: USR1 two seconds after its run file appears, requeue, and the
    resumed run file against an uninterrupted run."""
    job = submit(tmp_path, "debug.sbatch", "hpcmoe-debug", settings, env={"HPCMOE_LAUNCHER": "mpiexec"})
    temporary, deadline = job.run_file().parent / "run.h5.tmp", time.monotonic() + 120
    while not temporary.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    subprocess.run(["scancel", "-b", "-s", "USR1", job.id], check=True, timeout=30)
    assert wait(job) == {None: ("COMPLETED", "0:0")}, job.output()
    assert (job.run_file().parent / "run.partial.h5").exists(), job.output()
    subprocess.run(["scontrol", "requeue", job.id], check=True, timeout=30)
    time.sleep(2)
    assert wait(job, timeout=600) == {None: ("COMPLETED", "0:0")}, job.output()
    assert "jobs: requeued: resuming from" in job.output(), job.output()
    with h5py.File(job.run_file()) as f:
        assert f.attrs["complete"] and f.attrs["resumed_at_step"] >= 1
        resumed = f["generated"][:]
    reference = tmp_path / "reference.h5"
    assert run_job(4, reference, *settings, timeout=600).returncode == 0
    np.testing.assert_array_equal(resumed, h5py.File(reference)["generated"][:])
