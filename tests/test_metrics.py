"""Metrics that can read badly: each figure gets the case where it must be poor.

- wire_hidden (hpcmoe bench overlap): one micro-batch over a slow emulated link hides almost none
  of the wire time.
- idle_fraction: near zero on one rank, high when ranks wait on a slow link.
- TPOT: wall time between decode steps at rank 0, so a slow run-file writer shows in it.
"""
import json
import os
import subprocess
import sys
import time

import h5py
import pytest

from tests.conftest import DEBUG_CONFIG, ROOT, mpiexec, run_job

SLOW_LINK = "parallel.link={bandwidth_gbps: 0.02, latency_us: 200}"


def test_one_micro_batch_over_a_slow_link_hides_little_of_the_wire(tmp_path):
    out = tmp_path / "overlap.json"
    command = ["timeout", "300", mpiexec(), "-n", "2", sys.executable, "-m", "hpcmoe", "bench", "overlap",
               DEBUG_CONFIG, "--set", "parallel.ranks_per_node=1", "--set", SLOW_LINK,
               "--set", "run.max_new_tokens=2", "--set", "run.batch=8", "--reps", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=330,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr
    median = json.loads(out.read_text())["median"]
    one, four = median["micro_batches_1"], median["micro_batches_4"]
    assert one["wire_ms"] > 20 and one["wire_ms"] == pytest.approx(four["wire_ms"])  # the same bytes either way
    assert one["wire_hidden"] < 0.3, one
    assert "wire_hidden" in four


def test_idle_fraction_is_near_zero_alone_and_high_behind_a_slow_link(tmp_path):
    alone = run_job(1, tmp_path / "alone.h5", "run.max_new_tokens=4")
    assert alone.returncode == 0, alone.stderr
    waiting = run_job(2, tmp_path / "slow.h5", "run.max_new_tokens=4", "parallel.ranks_per_node=1",
                      "parallel.link={bandwidth_gbps: 0.005, latency_us: 500}")
    assert waiting.returncode == 0, waiting.stderr
    with h5py.File(tmp_path / "alone.h5") as f, h5py.File(tmp_path / "slow.h5") as g:
        assert f["metrics"].attrs["idle_fraction"] < 0.05
        assert g["metrics"].attrs["idle_fraction"] > 0.5
        assert (g["metrics/idle_fraction_per_rank"][:] > 0.5).all()


def run_in_process(path, *settings):
    from mpi4py import MPI
    from hpcmoe.config import load_config
    from hpcmoe.engine import run
    from hpcmoe.layout import ParallelLayout
    from hpcmoe.topology import build_topology
    config = load_config(DEBUG_CONFIG, [f"output.path={path}", "run.max_new_tokens=6", *settings])
    return run(config, build_topology(MPI.COMM_SELF, None), ParallelLayout.from_config(config, 1))


def test_a_slow_writer_shows_in_tpot(tmp_path, monkeypatch):
    from hpcmoe.output import RunWriter
    normal = run_in_process(tmp_path / "normal.h5")
    append = RunWriter.append_step

    def slow_append(self, *args):
        time.sleep(0.2)  # large against this box's run-to-run noise
        return append(self, *args)

    monkeypatch.setattr(RunWriter, "append_step", slow_append)
    slow = run_in_process(tmp_path / "slow.h5")
    assert slow["tpot_ms"] >= normal["tpot_ms"] + 180  # each decode interval holds one slow append
