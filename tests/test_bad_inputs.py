"""Bad inputs to every command: one line naming the key or flag and what it accepts, exit 2, no
traceback, before anything is measured and before any communicator or output file exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import yaml

from hpcmoe.config import load_config
from tests.conftest import DEBUG_CONFIG, ROOT, mpiexec, run_job

H100 = os.path.join(ROOT, "machines", "h100_sxm.yaml")


def hpcmoe(*args: str, timeout: int = 60, launcher=()) -> subprocess.CompletedProcess:
    """`python -m hpcmoe ARGS` (under `launcher`, e.g. mpiexec -n 2) from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(
        [*launcher, sys.executable, "-m", "hpcmoe", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def assert_refused(result: subprocess.CompletedProcess, message: str, *unwritten) -> None:
    """Exit 2, exactly `hpcmoe: error: MESSAGE` on stderr (one line, no traceback), no file written."""
    assert result.returncode == 2, (
        f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    )
    assert result.stderr.splitlines() == [f"hpcmoe: error: {message}"], result.stderr[-2000:]
    for path in unwritten:
        assert not os.path.exists(path), f"{path} was written"


# ---------------------------------------------------------------- hpcmoe plan's flags


@pytest.mark.parametrize("ranks", ["0", "-4"])
def test_plan_refuses_a_rank_count_below_one(tmp_path, ranks):
    out = tmp_path / "plan.json"
    result = hpcmoe("plan", DEBUG_CONFIG, "--ranks", ranks, "--json", str(out))
    assert_refused(result, f"--ranks: expected an integer >= 1, got {ranks}", out)


@pytest.mark.parametrize("memory, shown", [("-1", "-1.0"), ("0", "0.0"), ("nan", "nan"), ("inf", "inf")])
def test_plan_refuses_device_memory_that_is_not_a_positive_number(tmp_path, memory, shown):
    out = tmp_path / "plan.json"
    result = hpcmoe("plan", DEBUG_CONFIG, "--ranks", "4", "--device-memory", memory, "--json", str(out))
    assert_refused(result, f"--device-memory: expected a finite number of GiB > 0, got {shown}", out)


@pytest.mark.parametrize("per_node", ["0", "-2"])
def test_plan_refuses_ranks_per_node_below_one(tmp_path, per_node):
    out = tmp_path / "plan.json"
    result = hpcmoe("plan", DEBUG_CONFIG, "--ranks", "4", "--ranks-per-node", per_node, "--json", str(out))
    assert_refused(result, f"--ranks-per-node: expected an integer >= 1, got {per_node}", out)


def test_plan_json_into_a_missing_directory(tmp_path):
    out = tmp_path / "missing" / "plan.json"
    result = hpcmoe("plan", DEBUG_CONFIG, "--ranks", "4", "--json", str(out))
    assert_refused(
        result,
        f"--output: {str(out)!r}: the directory {tmp_path / 'missing'} does not exist; create it first",
        out.parent,
    )
    assert result.stdout == ""  # refused before the plan is printed


def test_plan_of_16384_ranks_finishes(tmp_path):
    """Placing experts was quadratic in the ranks (65 s here at 16,384): now a heap and a bisection."""
    out = tmp_path / "plan.json"
    result = hpcmoe(
        "plan", DEBUG_CONFIG, "--ranks", "16384", "--device-memory", "1", "--json", str(out), timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    planned = json.loads(out.read_text())
    # 4 experts, replicated
    assert planned["ranks"] == 16384 and planned["roles"]["ep"]["experts_per_rank"] == 1
    assert planned["fits"] and planned["smallest_ranks_that_fit"] == 1


def test_replicated_placement_at_16384_ranks_is_balanced():
    from hpcmoe.parallel.placement import replicated

    placement = replicated(4, 16384, 1)
    assert placement.slot_rank == tuple(range(16384))
    assert np.bincount(placement.slot_expert).tolist() == [4096] * 4
    assert [len(placement.slots_of_rank(r)) for r in (0, 8191, 16383, 16384)] == [1, 1, 1, 0]


# ---------------------------------------------------------------- machine files


@pytest.mark.parametrize("mfu", [0, 1.5, -0.5])
def test_machine_file_share_outside_zero_to_one(tmp_path, mfu):
    with open(H100) as f:
        raw = yaml.safe_load(f)
    raw["mfu"] = mfu
    machine, out = tmp_path / "machine.yaml", tmp_path / "sim.h5"
    machine.write_text(yaml.safe_dump(raw))
    result = hpcmoe("simulate", DEBUG_CONFIG, "--machine", str(machine), "--ranks", "4", "--output", str(out))
    assert_refused(
        result,
        f"machine file {machine}: figure mfu is {mfu}; expected a share in (0, 1] (share of "
        f"every TFLOP/s figure reached)",
        out,
    )


# ---------------------------------------------------------------- hpcmoe calibrate: checked before measuring


def test_calibrate_out_into_a_missing_directory(tmp_path):
    out = tmp_path / "missing" / "this_box.yaml"
    result = hpcmoe("calibrate", "--out", str(out), timeout=30)
    assert_refused(
        result,
        f"calibrate --out: {str(out)!r}: the directory {tmp_path / 'missing'} does not exist; "
        f"create it first",
        out.parent,
    )
    assert "measured" not in result.stdout


@pytest.mark.parametrize(
    "section, message",
    [
        (
            "parallel: {layout: ma, attention_ranks: 1, moe_ranks: 1}",
            "world size (1) must equal parallel.attention_ranks (1) + parallel.moe_ranks (1)",
        ),
        (
            "model: {preset: debug, dense_layers: 0}",
            "model.dense_layers: expected an integer >= 1 (calibration times a dense layer's MLP), got 0; "
            "use a model such as inputs/debug.yaml",
        ),
        (
            "run: {prompt_ids: [[1, 2, 3]], stop_at_eos: true}",
            "run.stop_at_eos needs an end-of-sequence id: a model.checkpoint with eos_token_id in its "
            "generation_config.json or config.json; model.preset debug (random weights) has none (set "
            "run.stop_at_eos: false)",
        ),
    ],
)
def test_calibrate_refuses_a_config_it_cannot_run(tmp_path, section, message):
    config, out = tmp_path / "config.yaml", tmp_path / "this_box.yaml"
    config.write_text("model: {preset: debug}\n" + section + "\n")
    result = hpcmoe("calibrate", "--out", str(out), "--config", str(config), timeout=30)
    assert_refused(
        result,
        f"calibrate --config {config} (its runs set run.max_new_tokens=12, parallel.threads=1): {message}",
        out,
    )
    assert "measured" not in result.stdout


# ---------------------------------------------------------------- config keys


@pytest.mark.parametrize(
    "settings, message",
    [
        (["run.kill=[{step: 2}]"], "run.kill[0].rank: required; expected an integer"),
        (["run.kill=[{rank: 1}, {layer: 0}]"], "run.kill[1].rank: required; expected an integer"),
        (
            ["model.fp8_block=[0, 0]"],
            "model.fp8_block: expected two integers >= 1 (the scale block's rows and columns), got [0, 0]",
        ),
        (
            ["model.fp8_block=[0, 0]", "parallel.expert_tp=2"],
            "model.fp8_block: expected two integers >= 1 (the scale block's rows and columns), got [0, 0]",
        ),
        (
            ["model.fp8_block=[128]"],
            "model.fp8_block: expected two integers >= 1 (the scale block's rows and columns), got [128]",
        ),
        (
            [
                "model.rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 16, "
                "beta_fast: abc}"
            ],
            "model.rope_scaling.beta_fast: expected a number >= 0, got 'abc'",
        ),
        (
            [
                "model.rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 16, "
                "beta_slow: -1}"
            ],
            "model.rope_scaling.beta_slow: expected a number >= 0, got -1",
        ),
        (
            [
                "model.rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 16, "
                "mscale: .nan}"
            ],
            "model.rope_scaling.mscale: expected a number >= 0, got nan",
        ),
        (
            [
                "model.rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 16, "
                "mscale_all_dim: x}"
            ],
            "model.rope_scaling.mscale_all_dim: expected a number >= 0, got 'x'",
        ),
        (
            [
                "model.rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 16, "
                "attention_factor: 0}"
            ],
            "model.rope_scaling.attention_factor: expected a number > 0, got 0",
        ),
        (
            [
                "model.rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 16, "
                "truncate: 1}"
            ],
            "model.rope_scaling.truncate: expected true or false, got 1",
        ),
        (
            ["run.stop_at_eos=true"],
            "run.stop_at_eos needs an end-of-sequence id: a model.checkpoint with eos_token_id in its "
            "generation_config.json or config.json; model.preset debug (random weights) has none (set "
            "run.stop_at_eos: false)",
        ),
        (
            ["model.max_positions=30"],  # the synthetic workload: prompts up to 24 tokens, 16 new tokens each
            "run.prompt_len: prompt of 24 tokens + 16 new tokens exceeds the model's 30 positions "
            "(model.max_positions)",
        ),
        (
            ["model.max_positions=20", "run.prompt_ids=[[1, 2], [1, 2, 3, 4, 5], [7]]"],
            "run.prompt_ids[1]: prompt of 5 tokens + 16 new tokens exceeds the model's 20 positions "
            "(model.max_positions)",
        ),
        (["model.max_positions=0"], "model.max_positions: expected an integer >= 1, got 0"),
    ],
)
def test_config_key_refused_in_one_line(tmp_path, settings, message):
    out = tmp_path / "plan.json"
    result = hpcmoe(
        "plan", DEBUG_CONFIG, "--ranks", "4", "--json", str(out), *[f"--set={s}" for s in settings]
    )
    assert_refused(result, message, out)


@pytest.mark.parametrize(
    "settings",
    [
        ["model.max_positions=40"],  # 24 + 16: exactly fits
        ["model.max_positions=21", "run.prompt_ids=[[1, 2], [1, 2, 3, 4, 5]]"],
        ["run.stop_at_eos=false"],
        [
            "model.rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 16, "
            "beta_fast: 0, "
            "beta_slow: 1.5, mscale: 0.707, mscale_all_dim: 1, attention_factor: 1.1, truncate: false}"
        ],
        ["model.fp8_block=[16, 32]", "parallel.expert_tp=2"],
        ["run.kill=[{rank: 1}]"],
    ],
)
def test_config_keys_in_range_are_accepted(settings):
    load_config(DEBUG_CONFIG, settings)


def test_checkpoint_config_json_that_is_a_list(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    out = tmp_path / "plan.json"
    result = hpcmoe(
        "plan", DEBUG_CONFIG, "--ranks", "4", "--json", str(out), "--set", f"model={{checkpoint: {tmp_path}}}"
    )
    assert_refused(
        result,
        f"model.checkpoint: {tmp_path / 'config.json'}: expected a JSON object of settings, got a JSON array",
        out,
    )


# ---------------------------------------------------------------- hpcmoe run --resume


def partial_file(path, drop: str | None = None, config: str | None = None) -> str:
    """A partial run file as `hpcmoe run` leaves one (attributes and datasets read_partial reads),
    less `drop` (an attribute or a dataset), its config attribute replaced by `config`."""
    with h5py.File(path, "w") as f:
        f.attrs.update(
            complete=False,
            config=config or load_config(DEBUG_CONFIG).to_yaml(),
            world_size=1,
            prompts_sha256="0",
            checkpoint_sha256="",
        )
        for name in ("index", "finish_reason", "completion_ids"):
            f.create_dataset(f"requests/{name}", data=np.zeros(0, np.int64))
        for name in ("routing", "traffic"):
            f.create_dataset(name, data=np.zeros((0, 2, 1, 4), np.int64))
        if drop is not None and drop in f.attrs:
            del f.attrs[drop]
        elif drop is not None:
            del f[drop]
    return str(path)


@pytest.mark.parametrize(
    "drop, config, message",
    [
        (
            "config",
            None,
            "the file lacks config (written by an older hpcmoe, or not by hpcmoe run): it cannot be resumed",
        ),
        (
            "routing",
            None,
            "the file lacks /routing (written by an older hpcmoe, or not by hpcmoe run): it cannot be "
            "resumed",
        ),
        (
            "requests/index",
            None,
            "the file lacks /requests/index (written by an older hpcmoe, or not by hpcmoe run): it "
            "cannot be resumed",
        ),
        (
            None,
            "just some text",
            "its config attribute is not a YAML mapping of sections (not written by hpcmoe run?): "
            "it cannot be resumed",
        ),
        (
            None,
            "[unclosed",
            "its config attribute is not a YAML mapping of sections (not written by hpcmoe run?): it "
            "cannot be resumed",
        ),
    ],
)
def test_resume_file_without_what_it_needs(tmp_path, drop, config, message):
    resume, out = partial_file(tmp_path / "run.partial.h5", drop, config), tmp_path / "out.h5"
    result = run_job(1, out, args=("--resume", resume), timeout=60)
    assert_refused(result, f"--resume {resume}: {message}", out, f"{out}.tmp")


# ---------------------------------------------------------------- the predictor file


class RunsCode:
    """Unpickling this runs a shell command (that writes a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_predictor_that_would_run_code_is_refused(tmp_path):
    from hpcmoe.analysis import predict

    marker, path = tmp_path / "ran", tmp_path / "predictor.pt"
    torch.save(
        {"state_dict": predict.Predictor().state_dict(), "machine": RunsCode(marker), "trained_on": []}, path
    )
    result = hpcmoe("predict", "propose", str(path), DEBUG_CONFIG, "--ranks", "4")
    assert_refused(
        result,
        f"parallel.predictor: {path}: refused: it holds more than plain tensors and numbers "
        f"(Trying to load unsupported GLOBAL posix.system whose module posix is blocked), and "
        f"loading that could run code; make it again with `hpcmoe predict train`",
        marker,
    )


def test_predictor_of_predict_train_still_loads(tmp_path):
    from hpcmoe.analysis import predict

    path, machine = (
        str(tmp_path / "predictor.pt"),
        {"memory_bandwidth": 10.0, "peak_gflops": 50.0, "cores": 2},
    )
    model = predict.Predictor()
    predict.save(model, machine, ["a.h5"], path)
    loaded, loaded_machine = predict.load(path)
    assert loaded_machine == machine
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


# ---------------------------------------------------------------- hpcmoe bench dispatch


def test_bench_dispatch_documented_command_runs(tmp_path):
    """docs/PERFORMANCE.md's `mpiexec -n R hpcmoe bench dispatch --tokens T --hidden H --dtype D`, tiny."""
    out = tmp_path / "dispatch.json"
    result = hpcmoe(
        "bench",
        "dispatch",
        "--tokens",
        "16",
        "--hidden",
        "32",
        "--dtype",
        "float32",
        "--reps",
        "1",
        "--out",
        str(out),
        timeout=120,
        launcher=("timeout", "90", mpiexec(), "-n", "2"),
    )
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    stored = json.loads(out.read_text())
    assert stored["benchmark"] == "dispatch" and stored["ranks"] == 2
    assert stored["median"]["ours"]["seconds"] > 0 and stored["median"]["raw_alltoallv"]["seconds"] > 0


@pytest.mark.parametrize("flag", ["--tokens", "--hidden", "--top-k", "--reps"])
def test_bench_dispatch_counts_below_one(tmp_path, flag):
    out = tmp_path / "dispatch.json"
    result = hpcmoe("bench", "dispatch", flag, "0", "--out", str(out))
    assert_refused(result, f"bench dispatch {flag}: expected an integer >= 1, got 0", out)


class FakeWorld:
    """What agree() asks of a communicator: every rank's problem, as allgather returns them."""

    def __init__(self, problems, rank=0):
        self.problems, self.rank = problems, rank

    def allgather(self, mine):
        assert mine == self.problems[self.rank]
        return self.problems

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return len(self.problems)


def test_one_line_per_job_and_a_line_for_each_rank_that_differs(capsys):
    """256 ranks failing alike: rank 0 prints one line, with no rank list; ranks 7 and 9-11 failing
    differently: their line names them; the other ranks print nothing; every rank exits 2."""
    from hpcmoe.commands.errors import agree

    problems = ["run.batch: expected an integer >= 1, got -1"] * 256
    for rank, printed in ((0, 1), (5, 0)):
        with pytest.raises(SystemExit) as stop:
            agree(FakeWorld(problems, rank), problems[rank])
        assert stop.value.code == 2
        assert capsys.readouterr().err.count("hpcmoe: error:") == printed
    problems = [None] * 16
    problems[7] = problems[9] = problems[10] = problems[11] = "/data/prompts.jsonl: no such file"
    with pytest.raises(SystemExit):
        agree(FakeWorld(problems), None)
    assert (
        capsys.readouterr().err
        == "hpcmoe: error: /data/prompts.jsonl: no such file (on ranks 7,9-11 of 16)\n"
    )
    agree(FakeWorld([None] * 4), None)  # nothing failed: no exit, no line
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- results are never replaced silently


def existing(path) -> bytes:
    path.write_bytes(b"an earlier result")
    return path.read_bytes()


@pytest.mark.parametrize(
    "command",
    [
        lambda out: ("plan", DEBUG_CONFIG, "--ranks", "4", "--output", out),
        lambda out: ("plan", DEBUG_CONFIG, "--ranks", "4", "--json", out),  # the older spelling
        lambda out: (
            "bench",
            "control",
            "--ranks",
            "4",
            "--experts",
            "8",
            "--tokens",
            "4",
            "--reps",
            "1",
            "--out",
            out,
        ),
        lambda out: ("simulate", DEBUG_CONFIG, "--machine", H100, "--ranks", "2", "--output", out),
        lambda out: ("calibrate", "--output", out),
        lambda out: ("run", DEBUG_CONFIG, "--output", out),
        lambda out: ("predict", "train", DEBUG_CONFIG, "--output", out),
    ],
)
def test_an_existing_result_is_refused_without_overwrite(tmp_path, command):
    out = tmp_path / "result"
    before = existing(out)
    result = hpcmoe(*command(str(out)))
    key = "output.path" if command(str(out))[0] == "run" else "--output"
    assert_refused(result, f"{key}: {out} exists; pass --overwrite to replace it, or choose another name")
    assert out.read_bytes() == before


def test_overwrite_replaces_and_a_killed_runs_tmp_file_is_kept(tmp_path):
    out = tmp_path / "plan.json"
    existing(out)
    assert hpcmoe("plan", DEBUG_CONFIG, "--ranks", "4", "--output", str(out), "--overwrite").returncode == 0
    assert json.loads(out.read_text())["ranks"] == 4
    run = tmp_path / "run.h5"
    before = existing(tmp_path / "run.h5.tmp")
    result = hpcmoe("run", DEBUG_CONFIG, "--output", str(run))
    assert_refused(
        result,
        f"output.path: {run}.tmp is left by a killed run (--resume reads it); pass --overwrite "
        f"to replace it, or choose another name",
        run,
    )
    assert (tmp_path / "run.h5.tmp").read_bytes() == before


def test_export_refuses_an_existing_file(tmp_path):
    out = tmp_path / "out.jsonl"
    before = existing(out)
    result = hpcmoe("export", str(tmp_path / "any.h5"), "--output", str(out))
    assert_refused(result, f"--output: {out} exists; pass --overwrite to replace it, or choose another name")
    assert out.read_bytes() == before


def test_flags_named_as_their_config_keys_and_the_old_spellings_alike():
    from hpcmoe.cli import parse_args

    for flag in ("--bandwidth-gbps", "--link-gbps"):
        assert parse_args(["bench", "reduce", flag, "2.5"]).link_gbps == 2.5
    for flag in ("--max-new-tokens", "--steps"):
        assert parse_args(["bench", "transformers", "--checkpoint", "c", flag, "3"]).steps == 3
        assert parse_args(["predict", "collect", flag, "3"]).steps == 3
    for flag in ("--output", "--out"):
        assert parse_args(["bench", "dispatch", flag, "x.json"]).out == "x.json"
        assert parse_args(["calibrate", flag, "m.yaml"]).out == "m.yaml"
        assert parse_args(["predict", "train", "a.h5", flag, "p.pt"]).out == "p.pt"
    assert parse_args(["export", "r.h5", "--jsonl", "o.jsonl"]).jsonl == "o.jsonl"


def test_progress_is_silent_for_short_work_then_tells_the_time_left(monkeypatch, capsys):
    from hpcmoe import progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    line = progress.Progress("hpcmoe simulate", 40, "steps simulated", quiet_s=5, every_s=10)
    clock[0] = 104.0
    assert line.update(30) is None  # within the first 5 s: nothing
    clock[0] = 110.0
    assert line.update(10) == "hpcmoe simulate: 10/40 steps simulated in 10 s, about 30 s left"
    clock[0] = 115.0
    assert line.update(20) is None  # the next line is due 10 s later
    clock[0] = 120.0
    assert line.update(20) == "hpcmoe simulate: 20/40 steps simulated in 20 s, about 20 s left"
    assert capsys.readouterr().err.count("\n") == 2


def test_predict_train_refuses_missing_or_foreign_files_before_training(tmp_path):
    """A glob that matched nothing (the shell passes the pattern) or a file that is no run file:
    one line at once, not a traceback after the training."""
    out = tmp_path / "p.pt"
    result = hpcmoe("predict", "train", str(tmp_path / "runs" / "*.h5"), "--output", str(out))
    assert_refused(result, f"predict train: {tmp_path / 'runs' / '*.h5'}: no such file", out)
    result = hpcmoe("predict", "train", DEBUG_CONFIG, "--output", str(out))
    assert_refused(result, f"predict train: {DEBUG_CONFIG}: not an HDF5 file", out)
