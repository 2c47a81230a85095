"""Shared helpers: launching whole jobs under mpiexec, reading their run files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG_CONFIG = os.path.join(ROOT, "inputs", "debug.yaml")
LOGIT_TOLERANCE = 1e-4  # float32: reductions in a different order differ in the last bits


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA GPU (tools/gpu_check.sh runs them; they skip without one)"
    )


def pytest_runtest_logreport(report):
    """A failure is named the moment it happens (with its last error line), not only in the summary at the
    end: a suite cut off by a time limit still says what failed."""
    if report.failed:
        lines = str(report.longrepr).strip().splitlines()
        sys.stderr.write(f"\nFAILED {report.nodeid} ({report.when}): {lines[-1] if lines else ''}\n")
        sys.stderr.flush()


def mpiexec() -> str:
    found = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if not found:
        pytest.skip("no mpiexec on PATH")
    return found


def run_job(ranks: int, output, *settings: str, config: str = DEBUG_CONFIG, timeout: int = 120, args=()):
    """`timeout T mpiexec -n ranks python -m hpcmoe run config --set ... --output output [args]`."""
    command = [
        "timeout",
        str(timeout),
        mpiexec(),
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "hpcmoe",
        "run",
        config,
        "--output",
        str(output),
    ]
    for setting in settings:
        command += ["--set", setting]
    command += list(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout + 30)


_runs = {}


def finished_run(tmp_path_factory, ranks, workload, *extra):
    """Run (once per session) and return the path of a completed run file."""
    key = (ranks, workload, extra)
    if key not in _runs:
        path = tmp_path_factory.mktemp("runs") / f"n{ranks}_{workload}.h5"
        result = run_job(ranks, path, *WORKLOADS[workload], *extra, timeout=300 if ranks > 8 else 150)
        assert result.returncode == 0, result.stderr
        assert os.path.exists(path) and not os.path.exists(f"{path}.tmp")
        _runs[key] = path
    return _runs[key]


def read_run(path) -> dict:
    """Tokens and logits of a finished run file."""
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"], f"{path} is not complete"
        return {"generated": f["generated"][:], "logits": f["logits"][:] if "logits" in f else None}


def assert_same_run(run, reference):
    np.testing.assert_array_equal(run["generated"], reference["generated"])
    np.testing.assert_allclose(run["logits"], reference["logits"], atol=LOGIT_TOLERANCE, rtol=0)


# The workloads the whole-job tests run; test_model checks that equality on them never rests on luck.
WORKLOADS = {
    "debug": [],  # batch 6, prompts of 8..24 tokens
    "small_batch": ["run.batch=3", "run.seed=2"],  # fewer requests than 4 ranks
    "eight_experts": ["model.num_experts=8", "run.seed=2"],
    "sixteen_experts": ["model.num_experts=16", "run.seed=2", "run.batch=16", "run.max_new_tokens=8"],
    "skewed": ["model.router_skew=15"],  # every token picks experts 0 and 1
}
