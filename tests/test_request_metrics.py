"""The figures serving users compare (vLLM's and SGLang's benchmarks): per request TTFT, mean
inter-token latency and end-to-end latency at p50 / p90 / p99, output and prompt tokens per second,
requests per second, and wall time with and without the start-up and model load."""

import time

import h5py
import numpy as np
import pytest

from tests.conftest import run_job


def test_request_figures_by_hand():
    """Three requests: TTFT 0.1, 0.1, 1.0 s; end to end 1.1, 0.3, 1.0 s; 11, 3 and 1 tokens. ITL is
    (1.1 - 0.1) / 10 = 0.1 s and (0.3 - 0.1) / 2 = 0.1 s (the one-token request has none); p99 sits
    near the slow request, p50 does not; 15 tokens and 3 requests over a 2 s run."""
    from hpcmoe.runfile.metrics import request_metrics

    m = request_metrics(np.array([0.1, 0.1, 1.0]), np.array([1.1, 0.3, 1.0]), np.array([11, 3, 1]), 2.0)
    assert m["output_tokens_per_s"] == m["generated_tokens_per_s"] == 7.5 and m["requests_per_s"] == 1.5
    assert m["request_ttft_ms_p50"] == pytest.approx(100) and m["request_ttft_ms_p99"] == pytest.approx(982)
    assert m["request_itl_ms_p50"] == m["request_itl_ms_p99"] == pytest.approx(100)
    assert m["request_latency_s_p50"] == pytest.approx(1.0) and m["request_latency_s_p99"] == pytest.approx(
        1.098
    )


def test_wall_time_with_and_without_load(tmp_path):
    """The run's wall time counts from the common start; with the load, from the process's start: the
    two differ by load_s, and neither exceeds what the launcher saw from outside."""
    started = time.time()
    assert run_job(1, tmp_path / "run.h5").returncode == 0
    outside = time.time() - started
    with h5py.File(tmp_path / "run.h5") as f:
        m = dict(f["metrics"].attrs)
        prompt_tokens = int(f["prompt_lengths"][:].sum())
    assert m["wall_with_load_s"] == pytest.approx(m["wall_s"] + m["load_s"]) and m["load_s"] > 0
    assert m["wall_s"] < m["wall_with_load_s"] < outside
    assert m["prompt_tokens_per_s"] * m["wall_s"] == pytest.approx(prompt_tokens)
    assert m["output_tokens_per_s"] < m["tps"]  # tps mixes the prompt tokens in
