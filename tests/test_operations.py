"""Operations: the hang watchdog, a clean stop on SIGUSR1, crash-safe output, fuzzed bad configs."""
import copy
import os
import random
import re
import signal
import subprocess
import sys
import time

import h5py
import pytest
import yaml

from hpcmoe.config import load_config
from tests.conftest import DEBUG_CONFIG, ROOT, mpiexec, run_job


def test_watchdog_names_the_stalled_rank_and_ends_the_job(tmp_path):
    started = time.monotonic()
    result = run_job(4, tmp_path / "out.h5", "run.stall_rank=2", "run.timeout_s=10", timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode not in (0, 124)
    assert elapsed < 2 * 10, f"the job took {elapsed:.1f} s"
    lines = [l for l in result.stderr.splitlines() if "watchdog" in l]
    assert lines and re.fullmatch(r"rank [013]: watchdog: waited 10\.\d s in step 0 layer 1 micro_batch 0 "
                                  r"phase \w+ for rank 2", lines[0]), result.stderr
    assert not os.path.exists(tmp_path / "out.h5")


def launch(tmp_path, steps: int, ranks: int = 4):
    """A long run in its own session, so that the test can signal or kill all of it."""
    output = tmp_path / "run.h5"
    command = ["timeout", "120", mpiexec(), "-n", str(ranks), sys.executable, "-m", "hpcmoe", "run", DEBUG_CONFIG,
               "--output", str(output), "--set", f"run.max_new_tokens={steps}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    return process, output


def rank_pids(output) -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"hpcmoe run .*{output}"], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


def wait_for_steps(process, output, seconds: float = 60) -> None:
    """Until the run's temporary file exists (the ranks are in the generate loop)."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(f"{output}.tmp") and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)


@pytest.mark.parametrize("signum, target", [(signal.SIGUSR1, "rank"), (signal.SIGTERM, "rank"),
                                            (signal.SIGTERM, "launcher")], ids=["usr1-rank", "term-rank", "term-launcher"])
def test_a_stop_signal_stops_every_rank_at_the_same_step_with_a_partial_file(tmp_path, signum, target):
    """SIGUSR1 (Slurm's warning) or SIGTERM (scancel, a time limit) to one rank or to mpiexec."""
    process, output = launch(tmp_path, steps=2000)
    wait_for_steps(process, output)
    pids = rank_pids(output)
    assert pids, "no rank found to signal"
    if target == "rank":
        os.kill(pids[-1], signum)  # one rank only: the ranks must agree on the stop step
    else:
        launcher = subprocess.run(["pgrep", "-f", f"mpiexec -n 4 .*{output}"], capture_output=True, text=True).stdout
        os.kill(int(launcher.split()[0]), signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    partial = tmp_path / "run.partial.h5"
    assert f"hpcmoe: stopped by signal at step" in stdout and str(partial) in stdout
    assert not os.path.exists(output) and not os.path.exists(f"{output}.tmp")
    with h5py.File(partial) as f:
        done = int(f.attrs["stopped_at_step"])
        generated = f["generated"][:]
        assert not f.attrs["complete"] and 1 <= done < 2000
        assert (generated[:, :done] >= 0).all() and (generated[:, done:] == -1).all()
        assert f["metrics/step_seconds"].shape == (done,)


@pytest.mark.parametrize("delay", [0.5, 3.0, 6.0, 9.0])
def test_sigkill_at_any_point_leaves_no_file_that_claims_to_be_complete(tmp_path, delay):
    process, output = launch(tmp_path, steps=120)
    time.sleep(delay)
    for pid in rank_pids(output):
        os.kill(pid, signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    for path in tmp_path.iterdir():
        try:
            with h5py.File(path, "r", locking=False) as f:
                complete = bool(f.attrs.get("complete", False))
        except OSError:
            continue  # killed mid-write: unreadable, which claims nothing
        assert complete == (path == output), f"{path.name} complete={complete}"


# ---------------------------------------------------------------- config fuzz

def valid_raw() -> dict:
    with open(DEBUG_CONFIG) as f:
        return yaml.safe_load(f)


FIELDS = {  # section -> {key: kind}, the keys the fuzzer breaks
    "model": {"vocab": "positive", "hidden": "positive", "num_layers": "positive", "heads": "positive",
              "num_experts": "positive", "top_k": "positive", "expert_hidden": "positive", "norm_eps": "float",
              "norm_topk_prob": "bool", "dtype": "choice", "rope_theta": "float", "attention": "choice"},
    "parallel": {"placement": "choice", "dispatch": "choice", "experts_per_rank": "positive_optional",
                 "ranks_per_node": "positive_optional", "wait": "choice", "link": "mapping"},
    "run": {"batch": "positive", "prompt_len": "positive", "max_new_tokens": "positive", "micro_batches": "positive",
            "timeout_s": "positive_float", "prompt_ids": "prompts"},
    "output": {"path": "string", "save_logits": "bool"},
}
WRONG = {  # kind -> values that are never valid for it
    "positive": ["many", [3], {"a": 1}, 2.5, True, 0, -4],
    "positive_optional": ["many", [3], 2.5, True, 0, -1],
    "float": ["fast", [1.0], {"x": 1}, True],
    "positive_float": ["long", [1], True, 0, -2.5],
    "bool": [1, 0, "yes", [True], None],
    "choice": ["nonsense", 3, [1], None],
    "mapping": [3, "fast", [1, 2], {"bandwidth": 1}, {"bandwidth_gbps": "x"}, {"bandwidth_gbps": -1}],
    "string": [5, [1], {"a": 1}],
    "prompts": ["1 2 3", [1, 2], [[1, "a"]], [[1, 999999]], [[]], []],
}


def bad_configs(count: int, seed: int = 0):
    """Seeded random configs, each broken one way: an unknown key or section, a wrong type or range."""
    rng = random.Random(seed)
    for _ in range(count):
        raw = copy.deepcopy(valid_raw())
        kind = rng.choice(["unknown_key", "unknown_section", "wrong"])
        section = rng.choice(sorted(FIELDS))
        if kind == "unknown_key":
            raw.setdefault(section, {})[rng.choice(["hiden", "expert", "ranks", "timeout", "xyz"])] = rng.randint(0, 9)
        elif kind == "unknown_section":
            raw[rng.choice(["models", "paralel", "runs", "io"])] = {"a": 1}
        else:
            key = rng.choice(sorted(FIELDS[section]))
            raw.setdefault(section, {})[key] = copy.deepcopy(rng.choice(WRONG[FIELDS[section][key]]))
        yield raw


def test_two_hundred_fuzzed_configs_fail_with_one_clear_line(tmp_path):
    path = tmp_path / "config.yaml"
    messages = set()
    for raw in bad_configs(200):
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ValueError) as error:
            load_config(str(path))
        message = str(error.value)
        assert message and "\n" not in message
        messages.add(message.split(":")[0])
    assert len(messages) > 20  # the fuzz reached many different keys


def test_fuzzed_configs_fail_the_same_way_on_every_rank(tmp_path):
    for i, raw in enumerate(bad_configs(5, seed=1)):
        path = tmp_path / f"config{i}.yaml"
        path.write_text(yaml.safe_dump(raw))
        result = run_job(4, tmp_path / f"out{i}.h5", config=str(path), timeout=60)
        assert result.returncode == 2, result.stderr
        lines = [l for l in result.stderr.splitlines() if l.startswith("hpcmoe: error:")]
        assert len(lines) == 1, result.stderr
        assert not os.path.exists(tmp_path / f"out{i}.h5")
