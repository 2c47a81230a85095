"""Surviving a dead rank (run.fault_tolerance): Open MPI with ULFM from pip (`make ft`, .venv-ft).

A rank kills itself with SIGKILL at a seeded point (run.kill: step, MoE layer, phase); the job must
complete, its /generated must equal the failure-free run's, /metrics/failures must name the rank
and the step it died in (or the next, when it died after its step's exchanges), and no process may
be left behind: ep with replicas of every expert (flat and two_stage) and ma with standbys (2+2+1,
where a standby takes its dead primary's head shard). When rank 0 dies its deputy (rank 1) writes
the file and the run goes on; when both die, or no survivor has room for an expert that lost every
replica, or the only MoE rank dies, the run stops with the documented message (a partial file that
resumes, or none). HPCMOE_FT_POINTS sets how many seeded points run (default 8: every phase of a
step, prefill and decode, and a second death during the recovery); `make test-all` runs 40.
"""

import os
import random
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from hpcmoe.runtime.fault import killed_at
from tests.conftest import DEBUG_CONFIG, ROOT, assert_same_run, read_run, run_job
from tests.test_report import report

FT = os.path.join(ROOT, ".venv-ft", "bin")
WORKLOAD = ["model.num_experts=3", "run.max_new_tokens=8"]  # 6 ranks: 3 experts x 2 replicas
# 2+2 attention (primary + standby) + 1 MoE rank
MA = [
    "parallel.layout=ma",
    "parallel.attention_ranks=4",
    "parallel.moe_ranks=1",
    "parallel.attention_replicas=2",
    "parallel.attention_standby=true",
]
ROOT_ENV = {
    k: "1"
    for k in (
        "OMPI_ALLOW_RUN_AS_ROOT",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
        "PRTE_ALLOW_RUN_AS_ROOT",
        "PRTE_ALLOW_RUN_AS_ROOT_CONFIRM",
    )
}


@pytest.fixture(scope="session")
def ft_venv():
    """`make ft` once: the Open MPI wheel, mpi4py and this package in .venv-ft."""
    made = subprocess.run(["make", "ft"], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    if made.returncode != 0:
        tail = made.stderr.strip().splitlines()[-3:]
        if any(
            word in made.stderr for word in ("Could not find a version", "Failed to establish", "No matching")
        ):
            pytest.skip(f"pip cannot install the Open MPI wheel here: {' '.join(tail)}")
        pytest.fail(f"make ft failed: {made.stderr[-2000:]}")
    return FT


def ft_job(ranks: int, output, *settings: str, timeout: int = 150):
    """`timeout T .venv-ft/bin/mpirun --with-ft ulfm -n ranks hpcmoe run ...` with run.fault_tolerance on."""
    command = [
        "timeout",
        str(timeout),
        f"{FT}/mpirun",
        "--with-ft",
        "ulfm",
        "--oversubscribe",
        "-n",
        str(ranks),
        f"{FT}/python",
        "-m",
        "hpcmoe",
        "run",
        DEBUG_CONFIG,
        "--output",
        str(output),
        "--set",
        "run.fault_tolerance=true",
    ]
    for setting in settings:
        command += ["--set", setting]
    env = {**os.environ, **ROOT_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout + 30)
    deadline = time.monotonic() + 10  # a rank of a stopped run may still be exiting as mpirun returns
    while (
        left := subprocess.run(["pgrep", "-f", str(output)], capture_output=True, text=True).stdout.split()
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind 10 s after mpirun returned: {left}"
    return result


_references = {}


def reference(tmp_path_factory, *settings):
    """The failure-free run (one rank, the default MPI)."""
    if settings not in _references:
        path = tmp_path_factory.mktemp("ft_ref") / "run.h5"
        result = run_job(1, path, *settings)
        assert result.returncode == 0, result.stderr
        _references[settings] = read_run(path)
    return _references[settings]


def failures(path) -> np.ndarray:
    with h5py.File(path) as f:
        assert f.attrs["complete"]
        return f["metrics/failures"][:]


# every phase of a step at which a rank can die, and the recovery from an earlier death itself; the
# prefill's combine is the last point of any run (once an ERR_IN_STATUS not taken for a failure)
PHASES = ["route", "recovery", "dispatch", "experts", "record", "stop_vote", "between_steps", "combine"]
ROUTED = ("route", "dispatch", "experts", "combine")


def seeded_points(count: int) -> list:
    """(layout, kills) over ep flat, ep two_stage and ma in turn, every phase in turn, prefill (step
    0) and decode steps alike; kills: [(rank, step, layer, phase)]. In ma (2+2+1) only the primary of
    group 1 (rank 2) routes and dispatches, standbys 1 and 3 die while recording, voting or between
    steps, and the one MoE rank cannot be lost (its experts: test_ma_without_a_moe_rank...).
    `recovery`: a rank dies in a MoE layer's dispatch, a second one while the others recover."""
    rng = random.Random(7)
    points = []
    for i in range(count - 1):
        layout, phase = ("flat", "two_stage", "ma")[i % 3], PHASES[i % len(PHASES)]
        step = 0 if (i + i // 7) % 2 == 0 else rng.randint(1, 5)
        if layout == "ma" and phase == "experts":
            phase = "route"
        first = "dispatch" if phase == "recovery" else phase
        ranks = [2] if layout == "ma" and first in ROUTED else [1, 3] if layout == "ma" else range(1, 6)
        rank = rng.choice(list(ranks))
        kills = [(rank, step, rng.randint(1, 2), first)]
        if phase == "recovery":
            second = [1] if layout == "ma" else [r for r in range(1, 6) if r != rank]
            kills.append((rng.choice(second), step, -1, "recovery"))
        points.append((layout, kills))
    return points + [("flat", [(3, 0, 2, "combine")])]


def kill_setting(kills) -> str:
    entries = [
        f"{{rank: {rank}, step: {step}, layer: {max(layer, 0)}, phase: {phase}}}"
        for rank, step, layer, phase in kills
    ]
    return f"run.kill=[{', '.join(entries)}]"


def test_fault_tolerance_needs_an_mpi_with_ulfm(tmp_path):
    """The default MPI (MPICH) is fail-stop: one clear error for the job (printed once), exit 2 on every
    rank, no file."""
    result = run_job(2, tmp_path / "out.h5", "run.fault_tolerance=true")
    lines = [line for line in result.stderr.splitlines() if line.startswith("hpcmoe: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "run.fault_tolerance needs an MPI with ULFM" in lines[0] and "make ft" in lines[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "layout, kills",
    seeded_points(int(os.environ.get("HPCMOE_FT_POINTS", "8"))),
    ids=lambda p: p if isinstance(p, str) else "+".join(f"r{k[0]}s{k[1]}{k[3]}" for k in p),
)
def test_a_killed_rank_is_survived_with_the_same_tokens(ft_venv, tmp_path_factory, layout, kills):
    output = tmp_path_factory.mktemp("ft") / "run.h5"
    ranks, extra = (5, MA) if layout == "ma" else (6, [f"parallel.dispatch={layout}"])
    if layout == "two_stage":
        extra += ["parallel.ranks_per_node=3"]
    result = ft_job(ranks, output, *WORKLOAD, *extra, kill_setting(kills))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(read_run(output), reference(tmp_path_factory, *WORKLOAD))  # tokens, and logits
    rows = failures(output)
    killed = killed_at(result.stderr)
    assert len(killed) == len(kills) and sorted(rows["rank"]) == sorted(k[0] for k in kills), (
        rows,
        result.stderr,
    )
    rank, step, _, phase = kills[0]
    # seen in the step it died in, or (after its step's exchanges: record, vote, between steps) the next
    latest = step + (phase in ("record", "stop_vote", "between_steps"))
    assert all(step <= row["step"] <= latest for row in rows), rows
    for row in rows:
        # no death is seen before it happens
        assert row["recovered_at"] > row["detected_at"] >= killed[0] - 0.05
        assert row["action"].decode().startswith(f"continued on {ranks - len(kills)} ranks")


def test_two_failures_and_an_expert_that_lost_every_replica(ft_venv, tmp_path_factory):
    """Ranks 1 and 4 die in step 2 (expert 1's two replicas: rebuilt), then rank 3 in step 5."""
    from hpcmoe.config import load_config
    from hpcmoe.parallel.layout import ParallelLayout

    holders = (
        ParallelLayout.from_config(load_config(DEBUG_CONFIG, WORKLOAD), 6).placement((0,) * 6).expert_ranks()
    )
    expert, (a, b) = next((e, ranks) for e, ranks in enumerate(holders) if 0 not in ranks)
    third = next(r for r in range(1, 6) if r not in (a, b))
    output = tmp_path_factory.mktemp("ft") / "run.h5"
    kill = (
        f"run.kill=[{{rank: {a}, step: 2, phase: record}}, {{rank: {b}, step: 2, phase: record}}, "
        f"{{rank: {third}, step: 5, phase: combine}}]"
    )
    result = ft_job(6, output, *WORKLOAD, kill)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(read_run(output), reference(tmp_path_factory, *WORKLOAD))  # tokens, and logits
    rows = failures(output)
    assert sorted(rows["rank"]) == sorted([a, b, third])
    first = [row["action"].decode() for row in rows if row["rank"] in (a, b)]
    assert all(action == f"continued on 4 ranks; rebuilt expert {expert}" for action in first), first
    assert [row["action"].decode()[:20] for row in rows if row["rank"] == third] == ["continued on 3 ranks"]
    shown = report(output, "--out", output.parent)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("failure: rank") == 3 and " ms; continued on " in shown.stdout
    assert (output.parent / "run.failures.png").stat().st_size > 10_000  # the run's steps, failures marked


def test_rank_0_killed_its_deputy_writes_and_the_run_goes_on(ft_venv, tmp_path_factory):
    output = tmp_path_factory.mktemp("ft") / "run.h5"
    result = ft_job(6, output, *WORKLOAD, "run.kill=[{rank: 0, step: 3, phase: dispatch}]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 writes" in result.stderr
    assert_same_run(read_run(output), reference(tmp_path_factory, *WORKLOAD))  # tokens, and logits
    rows = failures(output)
    assert list(rows["rank"]) == [0] and rows[0]["action"].decode().endswith("rank 1 writes"), rows
    with h5py.File(output) as f:
        assert f.attrs["writer_moved"].startswith("rank 0 died")
        steps = set(f["timings"]["step"][f["timings"]["rank"] == 2])
        assert steps >= set(range(8)), steps  # rank 2's records of every step: those rank 0 had mirrored too


def test_rank_0_and_its_deputy_killed_stop_without_a_complete_file(ft_venv, tmp_path):
    output = tmp_path / "run.h5"
    result = ft_job(
        6,
        output,
        *WORKLOAD,
        "run.kill=[{rank: 0, step: 3, phase: dispatch}, {rank: 1, step: 3, phase: dispatch}]",
    )
    assert result.returncode == 4, result.stderr[-3000:]
    assert "rank 0 (the writer) and its deputy among them: the run stops without a file" in result.stderr
    assert not output.exists() and not (tmp_path / "run.partial.h5").exists()
    for leftover in tmp_path.iterdir():
        assert leftover.name == "run.h5.tmp"
        try:
            with h5py.File(leftover, "r", locking=False) as f:
                assert not f.attrs.get("complete", False)
        except OSError:
            pass  # never closed: unreadable, which claims nothing either


def test_an_expert_without_room_stops_with_its_name(ft_venv, tmp_path):
    """run.rebuild_slots 0: no survivor may take an expert that lost its last replica."""
    from hpcmoe.config import load_config
    from hpcmoe.parallel.layout import ParallelLayout

    holders = (
        ParallelLayout.from_config(load_config(DEBUG_CONFIG, WORKLOAD), 6).placement((0,) * 6).expert_ranks()
    )
    expert, (a, b) = next((e, ranks) for e, ranks in enumerate(holders) if 0 not in ranks and 1 not in ranks)
    result = ft_job(
        6,
        tmp_path / "run.h5",
        *WORKLOAD,
        "run.rebuild_slots=0",
        f"run.kill=[{{rank: {a}, step: 2, phase: record}}, {{rank: {b}, step: 2, phase: record}}]",
    )
    assert result.returncode == 4, result.stderr[-3000:]
    assert (
        f"expert {expert} lost every replica (rank(s) {min(a, b)}, {max(a, b)}) and no survivor has room"
        in result.stderr
    )
    with h5py.File(tmp_path / "run.partial.h5") as f:
        assert not f.attrs["complete"] and sorted(f["metrics/failures"]["rank"]) == sorted([a, b])


def test_ma_without_a_moe_rank_stops_with_a_partial_file_that_resumes(ft_venv, tmp_path_factory):
    """2+2+1 loses its only MoE rank: the experts have nowhere to go; the survivors write a partial
    file (exit 4) naming them, and `--resume` on 5 ranks (the default MPI) finishes the run with the
    failure-free tokens."""
    folder = tmp_path_factory.mktemp("ft_ma")
    result = ft_job(5, folder / "run.h5", *WORKLOAD, *MA, "run.kill=[{rank: 4, step: 3, phase: combine}]")
    assert result.returncode == 4, result.stderr[-3000:]
    assert (
        "the survivors cannot go on (every MoE rank (4..4) is dead: experts 0, 1, 2 have nowhere"
        in result.stderr
    )
    partial = folder / "run.partial.h5"
    with h5py.File(partial) as f:
        assert not f.attrs["complete"] and f["metrics/failures"][0]["rank"] == 4
    resumed = run_job(5, folder / "resumed.h5", *WORKLOAD, *MA, args=["--resume", str(partial)])
    assert resumed.returncode == 0, resumed.stderr
    np.testing.assert_array_equal(
        read_run(folder / "resumed.h5")["generated"], reference(tmp_path_factory, *WORKLOAD)["generated"]
    )


def test_sigterm_to_a_fault_tolerant_job_stops_it_with_a_partial_file(ft_venv, tmp_path):
    """jobs/debug.sbatch run by bash with Slurm's environment set by hand, on Open MPI's mpirun with
    ULFM (HPCMOE_LAUNCHER_ARGS): SIGTERM to the batch shell (scancel, a time limit) reaches the ranks
    as SIGUSR1 (that mpirun does not forward SIGTERM), and they stop at one step with run.partial.h5."""
    env = {
        **os.environ,
        **ROOT_ENV,
        "OMP_NUM_THREADS": "1",
        "SLURM_SUBMIT_DIR": ROOT,
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NAME": "ft",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NUM_NODES": "1",
        "HPCMOE_RUNS_DIR": str(tmp_path),
        "HPCMOE_BIN": FT,
        "HPCMOE_LAUNCHER": "mpiexec",
        "HPCMOE_LAUNCHER_ARGS": "--with-ft ulfm --oversubscribe",
        "HPCMOE_SET": "--set run.fault_tolerance=true --set run.max_new_tokens=3000",
    }
    job = subprocess.Popen(
        ["bash", os.path.join(ROOT, "jobs", "debug.sbatch")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run_dir, deadline = tmp_path / "ft-7", time.monotonic() + 120
    while not (run_dir / "run.h5.tmp").exists() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
    time.sleep(2)  # some steps in
    job.send_signal(signal.SIGTERM)
    output = job.communicate(timeout=150)[0]
    assert job.returncode == 0, output[-3000:]
    assert (
        "SIGTERM: forwarding to the mpiexec ranks as SIGUSR1" in output
        and "hpcmoe: stopped by signal at step" in output
    )
    assert "jobs: partial file written" in output, output[-3000:]
    with h5py.File(run_dir / "run.partial.h5") as f:
        assert not f.attrs["complete"] and 1 <= int(f.attrs["stopped_at_step"]) < 3000
