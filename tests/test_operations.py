"""Operations: the hang watchdog, a clean stop on SIGUSR1, crash-safe output, fuzzed bad configs."""

import copy
import dataclasses
import functools
import os
import random
import re
import signal
import subprocess
import sys
import time
import typing

import h5py
import pytest
import yaml

from hpcmoe.config import Config, build_config
from hpcmoe.parallel.layout import ParallelLayout
from tests.conftest import DEBUG_CONFIG, ROOT, mpiexec, run_job


def test_watchdog_names_the_stalled_rank_and_ends_the_job(tmp_path):
    started = time.monotonic()
    result = run_job(4, tmp_path / "out.h5", "run.stall_rank=2", "run.timeout_s=10", timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode not in (0, 124)
    assert elapsed < 2 * 10, f"the job took {elapsed:.1f} s"
    lines = [line for line in result.stderr.splitlines() if "watchdog" in line]
    assert lines and re.fullmatch(
        r"rank [013]: watchdog: waited 10\.\d s in step 0 layer 1 micro_batch 0 "
        r"phase \w+ for rank 2",
        lines[0],
    ), result.stderr
    assert not os.path.exists(tmp_path / "out.h5")


def launch(tmp_path, steps: int, ranks: int = 4):
    """A long run in its own session, so that the test can signal or kill all of it."""
    output = tmp_path / "run.h5"
    command = [
        "timeout",
        "120",
        mpiexec(),
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "hpcmoe",
        "run",
        DEBUG_CONFIG,
        "--output",
        str(output),
        "--set",
        f"run.max_new_tokens={steps}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
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


@pytest.mark.parametrize(
    "signum, target",
    [(signal.SIGUSR1, "rank"), (signal.SIGTERM, "rank"), (signal.SIGTERM, "launcher")],
    ids=["usr1-rank", "term-rank", "term-launcher"],
)
def test_a_stop_signal_stops_every_rank_at_the_same_step_with_a_partial_file(tmp_path, signum, target):
    """SIGUSR1 (Slurm's warning) or SIGTERM (scancel, a time limit) to one rank or to mpiexec."""
    process, output = launch(tmp_path, steps=2000)
    wait_for_steps(process, output)
    pids = rank_pids(output)
    assert pids, "no rank found to signal"
    if target == "rank":
        os.kill(pids[-1], signum)  # one rank only: the ranks must agree on the stop step
    else:
        launcher = subprocess.run(
            ["pgrep", "-f", f"mpiexec -n 4 .*{output}"], capture_output=True, text=True
        ).stdout
        os.kill(int(launcher.split()[0]), signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    partial = tmp_path / "run.partial.h5"
    assert "hpcmoe: stopped by signal at step" in stdout and str(partial) in stdout
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


# ---------------------------------------------------------------- config fuzz, generated from the schema


def valid_raw() -> dict:
    with open(DEBUG_CONFIG) as f:
        return yaml.safe_load(f)


RANKS = 6  # the layout is checked at this rank count: 4 experts on 6 ranks leave spare slots for rebalance
CONTEXTS = {  # valid configs a bad value is tried in: some keys are read only by one attention or layout
    "debug": {},
    "mla": {"model": {"preset": "deepseek-v3"}},
    "ma": {"parallel": {"layout": "ma", "attention_ranks": 3, "moe_ranks": 3}},
}
# the smallest valid ones
SECTION_BASE = {
    "parallel.link": {"bandwidth_gbps": 1.0},
    "run.kill": [{"rank": 1}],
}
ANY_VALUE = {  # keys where the out-of-range candidates below are valid, and why
    "model.seed": "any integer seeds the weights",
    "run.seed": "any integer seeds the workload",
    "run.sampling.seed": "any integer seeds the sampler",
    "model.router_skew": "negative makes the last experts hot",
    "output.path": "any file name",
    "parallel.placement_from": "a run file, read once MPI has started",
    "parallel.predictor": "read only with an auto split, which needs a trained predictor file",
}
CANDIDATES = ["nonsense", -7, 2.5, True, None, [-7], ["nonsense"], {"nonsense": 1}]
# bad wherever their type fits, unless ANY_VALUE
OUT_OF_RANGE = (
    "nonsense",
    -7,
    [-7],
    ["nonsense"],
    {"nonsense": 1},
)


def schema_keys(cls=Config, prefix=""):
    """(path, type hint) of every key of the config dataclasses, nested sections and run.kill[0] included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, hint = prefix + f.name, hints[f.name]
        yield path, hint
        for inner in typing.get_args(hint) or (hint,):
            if dataclasses.is_dataclass(inner):
                yield from schema_keys(inner, path + ".")
            elif typing.get_origin(inner) is list and dataclasses.is_dataclass(typing.get_args(inner)[0]):
                yield from schema_keys(typing.get_args(inner)[0], path + "[0].")


def fits(value, hint) -> bool:
    """Whether `value` has the type `hint` declares (written here, not taken from hpcmoe.config)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(fits(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(fits(v, args[0]) for v in value)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    kinds = {type(None): type(None), bool: bool, str: str}
    return isinstance(value, kinds.get(hint, dict))  # dict, or a section


def in_context(context: dict) -> dict:
    raw = valid_raw()
    for section, values in context.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def with_value(context: dict, path: str, value) -> dict:
    """The debug config in `context`, with `path` set to `value` (its enclosing sections at their base)."""
    raw = in_context(context)
    parts = path.replace("[0]", "").split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, copy.deepcopy(SECTION_BASE.get(".".join(parts[: depth + 1]), {})))
        node = node[0] if isinstance(node, list) else node
    current = node.get(parts[-1]) or SECTION_BASE.get(path)
    if value == {"nonsense": 1} and isinstance(current, dict):  # a section: an unknown key beside valid ones
        value = {**current, "nonsense": 1}
    node[parts[-1]] = copy.deepcopy(value)
    return raw


def fuzz_cases() -> list[tuple[str, object]]:
    """(path, bad value): every candidate of the wrong type for its key, and the out-of-range ones."""
    cases = []
    for path, hint in schema_keys():
        for value in CANDIDATES:
            if path in ("model", "parallel", "run", "output") and value is None:
                continue  # an empty section: every key at its default
            if not fits(value, hint) or (value in OUT_OF_RANGE and path not in ANY_VALUE):
                cases.append((path, value))
    return cases


def check(raw: dict) -> None:
    """What `hpcmoe run` checks before any work: the config, its prompts, the layout at RANKS ranks."""
    config = build_config(raw)
    _ = config.requests  # reads and checks run.prompts
    ParallelLayout.from_config(config, RANKS)


def loads(raw: dict) -> bool:
    try:
        check(raw)
    except ValueError:
        return False
    return True


def failure(path: str, value):
    """(context, message) of the first context where the key's enclosing section at its base loads and
    the bad value fails naming the key; None when none does. Anything but a ValueError propagates."""
    enclosing = path.replace("[0]", "").rsplit(".", 1)[0]
    for name, context in CONTEXTS.items():
        try:
            check(with_value(context, path, value))
        except ValueError as error:
            base = (
                with_value(context, enclosing, SECTION_BASE.get(enclosing, {}))
                if "." in enclosing
                else in_context(context)
            )
            if path in str(error) and loads(base):
                return name, str(error)
    return None


@functools.cache
def fuzz_failures() -> list:
    """[(path, bad value, failure(path, value))] of every case, worked out once for the tests below."""
    return [(path, value, failure(path, value)) for path, value in fuzz_cases()]


REQUIRED_COVERAGE = (
    "run.kill",
    "parallel.rebalance",
    "run.sampling",
    "model.rope_scaling",
    "model.fp8_block",
    "parallel.cuda_aware_mpi",
    "parallel.predictor",
    "parallel.expert_tp",
)


def test_every_schema_key_rejects_bad_values_naming_the_key():
    """Generated from the config dataclasses: a key added to hpcmoe/config/schema.py is fuzzed here at once,
    and fails this test until it rejects a value of the wrong type, one out of range (or is listed in
    ANY_VALUE with the reason) and an unknown key beside it (sections), each in one line naming it."""
    cases = fuzz_cases()
    keys = {path for path, _ in cases}
    for key in REQUIRED_COVERAGE:
        assert key in keys and any(
            p.startswith(key + ".") or p.startswith(key + "[") or p == key for p in keys
        )
    assert {"run.kill[0].phase", "parallel.rebalance.min_gain", "run.sampling.top_p"} <= keys
    accepted = []
    for path, value, found in fuzz_failures():
        if found is None:
            accepted.append((path, value))
        else:
            assert "\n" not in found[1], (path, value, found)
    assert not accepted, (
        f"{len(accepted)} bad values accepted or failing without naming their key: {accepted}"
    )
    assert len(cases) > 400
    with pytest.raises(ValueError, match="unknown config section 'paralel'"):
        check({**valid_raw(), "paralel": {"layout": "ep"}})


def test_a_sample_of_fuzzed_configs_fails_on_the_command_line_in_one_line(tmp_path):
    """20 of the generated cases that fail before MPI starts: one `hpcmoe: error:` line naming the key,
    exit 2, no traceback, no output file."""
    cases = [(path, value) for path, value, found in fuzz_failures() if found and found[0] == "debug"]
    sample = random.Random(0).sample(cases, 20)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    for i, (path, value) in enumerate(sample):
        config, output = tmp_path / f"bad{i}.yaml", tmp_path / f"out{i}.h5"
        config.write_text(yaml.safe_dump(with_value({}, path, value)))
        result = subprocess.run(
            [sys.executable, "-m", "hpcmoe", "run", str(config), "--output", str(output)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 2, (path, value, result.stderr)
        assert result.stderr.startswith("hpcmoe: error:") and result.stderr.count("\n") == 1, result.stderr
        assert path in result.stderr and not output.exists(), (path, value, result.stderr)


def test_fuzzed_configs_fail_the_same_way_on_every_rank(tmp_path):
    cases = [(path, value) for path, value, found in fuzz_failures() if found and found[0] == "debug"]
    for i, (path, value) in enumerate(random.Random(1).sample(cases, 3)):
        config = tmp_path / f"config{i}.yaml"
        config.write_text(yaml.safe_dump(with_value({}, path, value)))
        result = run_job(4, tmp_path / f"out{i}.h5", config=str(config), timeout=60)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("hpcmoe: error:")]
        assert len(lines) == 1, result.stderr
        assert not os.path.exists(tmp_path / f"out{i}.h5")
