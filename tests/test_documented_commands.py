"""Every command shown in README.md, docs/PERFORMANCE.md and docs/SIMULATION.md runs in the tests at a
tiny size: COMMANDS maps each (as written, whitespace and comments dropped) to the test that runs it.

A command added to the docs fails test_every_documented_command_has_a_smoke_test until it is mapped;
a mapped test that is renamed or removed fails test_every_mapped_test_exists. Where no other test
runs a command, SMOKE here runs it as written with small flags or --set overrides. A command that
cannot run here as written says why, and its entry names what checks the part that can.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import pytest
import yaml

from tests.conftest import ROOT, mpiexec

DOCS = ("README.md", "docs/REFERENCE.md", "docs/PERFORMANCE.md", "docs/SIMULATION.md")
COMMAND_WORDS = ("hpcmoe", "mpiexec", "mpirun", "timeout", "python", "make", "sbatch", "srun", "bash")
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")  # ```yaml and ```python blocks hold no commands
TIMEOUT = 120
BENCH = "tests/test_bench_smoke.py::test_bench_runs_and_stores_the_documented_keys"
FT = "tests/test_fault.py::test_a_killed_rank_is_survived_with_the_same_tokens[flat-r3s0combine]"

# command as documented -> (the test that runs it, None or why it cannot run here as written).
# "here::NAME" is SMOKE[NAME] below.
COMMANDS = {
    "make run": (
        "here::make_targets",
        "sets up .venv first; make -n shows the command, which "
        "tests/test_jobs.py::test_n_ranks_equal_one_rank[4-debug] runs",
    ),
    "make test": ("here::make_targets", "it is the whole suite (~27 min); make -n shows what it runs"),
    "make ft": (FT, None),  # its ft_venv fixture runs `make ft`
    "mpiexec -n 4 hpcmoe run inputs/debug.yaml": (
        "tests/test_jobs.py::test_n_ranks_equal_one_rank[4-debug]",
        None,
    ),
    "mpiexec -n 2 hpcmoe run inputs/debug.yaml --set model.num_experts=8 --output runs/packed.h5": (
        "tests/test_jobs.py::test_packed_placement_equals_one_expert_per_rank[2-extra0]",
        None,
    ),
    "mpiexec -n 4 hpcmoe run inputs/debug.yaml --set 'model={preset: debug, hidden: 128}'": (
        "here::run_model_mapping",
        None,
    ),
    "mpiexec -n 4 hpcmoe run inputs/debug.yaml --set parallel.layout=ma --set parallel.attention_ranks=3 "
    "--set parallel.moe_ranks=1": (
        "tests/test_jobs.py::test_attention_moe_separation_equals_one_rank[n4-parallel.attention_ranks=3-"
        "parallel.moe_ranks=1]",
        None,
    ),
    "hpcmoe predict collect inputs/bench_predict.yaml --ranks 4,6 --batch 4,16 --prompt-len 16,64 --output "
    "runs/predict": (
        "here::predict_collect_train_propose",
        None,
    ),
    "hpcmoe predict collect inputs/bench_predict.yaml --ranks 4 --batch 8 --prompt-len 32 --output "
    "runs/other": (
        "here::predict_collect_train_propose",
        None,
    ),
    "hpcmoe predict train runs/predict/*.h5 --test runs/other/*.h5 --output predictor.pt": (
        "here::predict_collect_train_propose",
        None,
    ),
    "hpcmoe predict propose predictor.pt inputs/debug.yaml --ranks 8": (
        "here::predict_collect_train_propose",
        None,
    ),
    "mpiexec -n 8 hpcmoe run inputs/debug.yaml --set parallel.layout=ma --set parallel.attention_ranks=auto "
    "--set parallel.moe_ranks=auto --set parallel.predictor=predictor.pt": (
        "tests/test_predict.py::test_auto_split_asks_the_predictor_and_says_why",
        None,
    ),
    "mpiexec -n 6 hpcmoe run inputs/bench_predict.yaml --set parallel.attention_ranks=auto "
    "--set parallel.moe_ranks=auto --set parallel.predictor=machines/this_box.yaml": (
        "tests/test_predict.py::test_auto_split_by_the_simulator_says_so_and_takes_its_fastest_split",
        None,
    ),
    "mpiexec -n 6 hpcmoe run inputs/debug.yaml --set model.router_skew=4 --set run.skew_drift=6 "
    "--set 'parallel.rebalance={every_steps: 2, window_steps: 2}'": (
        "tests/test_rebalance.py::test_rebalancing_under_drift_equals_one_rank_and_moves_weights_bit_for_bit"
        "[n6_flat_mb4]",
        None,
    ),
    ".venv-ft/bin/mpirun --with-ft ulfm -n 6 .venv-ft/bin/hpcmoe run inputs/debug.yaml "
    "--set run.fault_tolerance=true --set model.num_experts=3": (FT, None),
    "hpcmoe plan inputs/debug.yaml --set model.preset=deepseek-v3 --set run.batch=64 --set "
    "run.prompt_len=1024 "
    "--ranks 256 --device-memory 64 --json plan.json": (
        "tests/test_plan.py::test_the_deepseek_v3_preset_plans_in_seconds_without_memory",
        None,
    ),
    "hpcmoe calibrate --output machines/this_box.yaml --overwrite": (
        "here::calibrate_inputs",
        "a fixed ~1 minute of measurement with no size flag (beyond this file's budget); "
        "its inputs are checked, and tests/test_simulate.py reads the file it wrote",
    ),
    "hpcmoe simulate inputs/debug.yaml --set 'model={preset: deepseek-v3}' --set run.batch=8192 "
    "--set parallel.ranks_per_node=8 --set parallel.wait=spin --machine machines/h100_sxm.yaml --ranks 256 "
    "--steady-decode 2048 --output runs/v3_ep256.h5": ("here::simulate_steady_decode", None),
    "mpiexec -n 4 hpcmoe run my.yaml --set model.checkpoint=DIR --set run.prompts=prompts.jsonl "
    "--set 'run.sampling={temperature: 0.7, top_p: 0.9, seed: 1}'":  # my.yaml, DIR: a tiny checkpoint's
    ("tests/test_batching.py::test_sampling_draws_do_not_depend_on_batching[n2-continuous]", None),
    "hpcmoe bench control --ranks 64,256,1024": (f"{BENCH}[control]", None),
    "mpiexec -n R hpcmoe bench dispatch --tokens 1024 --hidden H --dtype D": (f"{BENCH}[dispatch]", None),
    "mpiexec -n 2 hpcmoe bench overlap inputs/bench_overlap.yaml": (f"{BENCH}[overlap]", None),
    "python tools/bench_scale.py --ranks 16,32,64 --reps 3": ("here::bench_scale", None),
    "python tools/bench_batching.py --prompts 20000 --ranks 4 --max-batch 64": (
        "tests/test_bench_smoke.py::test_bench_batching_tool_at_tiny_size",
        None,
    ),
    "python tools/bench_batching.py --prompts 20000 --ranks 4 --max-batch 64 --out "
    "docs/bench/batching.json": (
        "tests/test_bench_smoke.py::test_bench_batching_tool_at_tiny_size",
        None,
    ),
    "hpcmoe bench transformers --checkpoint DIR --batch 8 --prompt-len 32 --steps 16": (
        "tests/test_bench_smoke.py::test_bench_transformers_on_a_tiny_checkpoint[mixtral]",
        None,
    ),
    "mpiexec -n 4 hpcmoe bench placement inputs/bench_ep.yaml": (f"{BENCH}[placement]", None),
    "mpiexec -n 4 hpcmoe bench skew inputs/bench_ep.yaml --set model.router_skew=4": (f"{BENCH}[skew]", None),
    "mpiexec -n 4 hpcmoe bench wait inputs/bench_ep.yaml": (f"{BENCH}[wait]", None),
    "mpiexec -n 4 hpcmoe bench ma inputs/bench_ma.yaml": (f"{BENCH}[ma]", None),
    "mpiexec -n 4 hpcmoe bench reduce --tokens 256 --hidden 4096 --ranks-per-node 2 --link-gbps 10 "
    "--latency-us 20": (
        f"{BENCH}[reduce]",
        None,
    ),
    "mpiexec -n 16 hpcmoe bench reduce --tokens 256 --hidden 4096 --ranks-per-node 4 --link-gbps 10 "
    "--latency-us 20 "
    "--reps 5": (f"{BENCH}[reduce]", None),
    "python tools/bench_predict.py": (
        "here::predict_collect_train_propose",
        "its grid of runs is fixed, no size flag (~10 min); its steps, "
        "collect, train and propose, run here at a tiny size",
    ),
    "mpiexec -n 4 hpcmoe bench dispatch_mode inputs/bench_ep.yaml --set parallel.ranks_per_node=2 "
    "--set 'parallel.link={bandwidth_gbps: 1, latency_us: 100}'": (f"{BENCH}[dispatch_mode]", None),
    "hpcmoe bench experts --device cuda": (
        f"{BENCH}[experts]",
        "needs a CUDA GPU (tools/gpu_check.sh runs it there); the same benchmark runs on the CPU here",
    ),
    "mpiexec -n 4 hpcmoe bench schedule inputs/bench_schedule.yaml": (f"{BENCH}[schedule]", None),
    "mpiexec -n 4 hpcmoe bench dispatch --tokens 32 --hidden 4096 --dtype bfloat16": (
        f"{BENCH}[dispatch_bf16_spin]",
        None,
    ),
    "python tools/bench_memory.py": ("here::bench_memory", None),
    "python tools/bench_split.py": ("here::bench_split", None),
    "python tools/project_sim.py --only c": ("here::project_sim", None),
    "python tools/project_sim.py": ("here::project_sim", None),
    "python tools/validate_sim.py": ("here::validate_sim", None),
    "python tools/sim_tables.py": ("here::sim_tables", None),
    "hpcmoe predict propose --machine machines/this_box.yaml inputs/bench_predict.yaml --ranks 6": (
        "here::predict_propose_machine",
        None,
    ),
    # README's next steps
    ".venv/bin/hpcmoe report runs/debug.h5 --output runs/debug_report": ("here::report_and_export", None),
    ".venv/bin/hpcmoe export runs/debug.h5 --output runs/debug.jsonl": ("here::report_and_export", None),
    "mpiexec -n 4 .venv/bin/hpcmoe run inputs/checkpoint.yaml --set model.checkpoint=/path/to/checkpoint "
    "--set run.prompts=prompts.jsonl": ("here::checkpoint_config", None),
    ".venv/bin/hpcmoe plan inputs/checkpoint.yaml --set model.checkpoint=/path/to/checkpoint --ranks 16": (
        "here::checkpoint_config",
        None,
    ),
    "sbatch jobs/debug.sbatch": (
        "tests/test_slurm.py::test_debug_job_completes[auto]",
        "needs Slurm: submitted to the one-node Slurm of tools/slurm-local.sh when it is up",
    ),
}


def documented_commands() -> dict[str, str]:
    """command -> where it is documented (file:line), from the shell code blocks of DOCS: lines that
    start with a command word, backslash continuations joined, comments and runs of spaces dropped.
    Output shown in a block ('hpcmoe: ...', 'hpcmoe plan: ...') and file tables are not commands."""
    found = {}
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            lines = f.read().splitlines()
        fence, pending = None, ""
        for number, line in enumerate(lines, 1):
            if line.lstrip().startswith("```"):
                fence = line.strip()[3:].strip() if fence is None else None
                continue
            if fence not in SHELL_BLOCKS:
                continue
            text = pending + line.strip()
            if text.endswith("\\"):
                pending = text[:-1].rstrip() + " "
                continue
            pending = ""
            command = re.sub(r"\s+#.*$", "", text).removeprefix("$ ").strip()
            words = command.split()
            if not words or "  " in command:  # a table row: a name, then its description
                continue
            if (words[0] in COMMAND_WORDS or words[0].startswith(("tools/", ".venv"))) and not (
                len(words) > 1 and words[1].endswith(":")
            ):
                found.setdefault(" ".join(words), f"{doc}:{number}")
    return found


def test_the_extraction_finds_commands_and_skips_output():
    """It can fail: a continued command is one line; the README's sample output is not a command."""
    found = documented_commands()
    assert (
        ".venv-ft/bin/mpirun --with-ft ulfm -n 6 .venv-ft/bin/hpcmoe run inputs/debug.yaml --set "
        "run.fault_tolerance=true --set model.num_experts=3" in found
    )
    assert not any(c.startswith(("hpcmoe:", "hpcmoe plan:", "tools/run_tests.sh")) for c in found)
    assert len(found) >= 40


def test_every_documented_command_has_a_smoke_test():
    found = documented_commands()
    missing = {command: where for command, where in found.items() if command not in COMMANDS}
    assert not missing, f"documented commands without a smoke test (add them to COMMANDS): {missing}"
    stale = sorted(set(COMMANDS) - set(found))
    assert not stale, f"COMMANDS entries no longer documented: {stale}"


def test_every_mapped_test_exists():
    here = {where.split("::")[1] for where, _ in COMMANDS.values() if where.startswith("here::")}
    assert here <= set(SMOKE), here - set(SMOKE)
    ids = sorted({where for where, _ in COMMANDS.values() if not where.startswith("here::")})
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *ids],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=TIMEOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert listed.returncode == 0, listed.stdout[-3000:] + listed.stderr[-2000:]
    collected = set(listed.stdout.split())
    assert not [i for i in ids if i not in collected], [i for i in ids if i not in collected]


# ---------------------------------------------------------------- the commands no other test runs


def hpcmoe() -> list[str]:
    """The `hpcmoe` console script of this Python (as the docs call it), or python -m hpcmoe."""
    script = os.path.join(os.path.dirname(sys.executable), "hpcmoe")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "hpcmoe"]


def shell(*command, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """The command from the repository root under `timeout`; it must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run(
        ["timeout", str(timeout), *map(str, command)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout + 30,
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )
    return result


def sets(*settings: str) -> list[str]:
    return [part for setting in settings for part in ("--set", setting)]


def make_targets(tmp_path):
    shown = {target: shell("make", "-n", target).stdout for target in ("run", "test", "ft")}
    assert ".venv/bin/mpiexec -n 4 .venv/bin/hpcmoe run inputs/debug.yaml" in shown["run"]
    assert "tools/run_tests.sh" in shown["test"]


def run_model_mapping(tmp_path):
    """A whole model section in one --set: the preset's other fields kept, hidden 128."""
    output = tmp_path / "run.h5"
    shell(
        mpiexec(),
        "-n",
        "4",
        *hpcmoe(),
        "run",
        "inputs/debug.yaml",
        "--set",
        "model={preset: debug, hidden: 128}",
        *sets("run.batch=4", "run.max_new_tokens=2"),
        "--output",
        output,
    )
    with h5py.File(output) as f:
        model = yaml.safe_load(f.attrs["config"])["model"]
        assert f.attrs["complete"] and model["hidden"] == 128 and model["num_experts"] == 4


def predict_collect_train_propose(tmp_path):
    """collect at 2 ranks (the one split 1:1), train on it (and score on it: the mechanics, not the
    error), propose a split of 8 ranks; --steps 2, as short as a run gets."""
    runs = tmp_path / "predict"
    shell(
        *hpcmoe(),
        "predict",
        "collect",
        "inputs/bench_predict.yaml",
        "--ranks",
        "2",
        "--batch",
        "2",
        "--prompt-len",
        "8",
        "--steps",
        "2",
        "--out",
        runs,
    )
    [run] = runs.iterdir()
    predictor = tmp_path / "predictor.pt"
    trained = shell(*hpcmoe(), "predict", "train", run, "--test", run, "--out", predictor, "--epochs", "100")
    assert "roofline" in trained.stdout and predictor.exists()
    proposed = shell(*hpcmoe(), "predict", "propose", predictor, "inputs/debug.yaml", "--ranks", "8")
    assert re.match(r"hpcmoe predict: 8 ranks -> attention \d+ : MoE \d+", proposed.stdout), proposed.stdout


def predict_propose_machine(tmp_path):
    proposed = shell(
        *hpcmoe(),
        "predict",
        "propose",
        "--machine",
        "machines/this_box.yaml",
        "inputs/bench_predict.yaml",
        "--ranks",
        "6",
    )
    assert re.match(
        r"hpcmoe predict: 6 ranks -> attention \d+ : MoE \d+, .*, simulated on this_box: ", proposed.stdout
    )


def calibrate_inputs(tmp_path):
    from hpcmoe.sim.calibrate import check_inputs

    check_inputs(str(tmp_path / "this_box.yaml"), os.path.join(ROOT, "inputs", "debug.yaml"))


def simulate_steady_decode(tmp_path):
    """DeepSeek-V3 on H100s as documented, at 8 ranks, 16 requests and 2 steps instead of 256, 8192."""
    output = tmp_path / "v3.h5"
    shown = shell(
        *hpcmoe(),
        "simulate",
        "inputs/debug.yaml",
        "--set",
        "model={preset: deepseek-v3}",
        *sets("run.batch=16", "run.max_new_tokens=2", "parallel.ranks_per_node=8", "parallel.wait=spin"),
        "--machine",
        "machines/h100_sxm.yaml",
        "--ranks",
        "8",
        "--steady-decode",
        "2048",
        "--output",
        output,
    )
    assert "(simulated)" in shown.stdout
    with h5py.File(output) as f:
        assert f.attrs["simulated"] and f.attrs["world_size"] == 8 and f["metrics"].attrs["tpot_ms"] > 0


def bench_scale(tmp_path):
    out = tmp_path / "scale.json"
    shell(
        sys.executable, "tools/bench_scale.py", "--ranks", "2", "--reps", "1", "--tokens", "2", "--out", out
    )
    assert json.loads(out.read_text())


def bench_memory(tmp_path):
    """The default input at its rank count: its peak within the goal above the estimate, not far below."""
    out = tmp_path / "memory.json"
    shell(sys.executable, "tools/bench_memory.py", "--only", "debug", "--output", out, timeout=180)
    run = json.loads(out.read_text())["runs"]["debug"]
    assert run["within_goal"] and run["peak_over_estimate_min"] > 0.7, run


def bench_split(tmp_path):
    """Every split of 2 ranks (there is one) run once, the simulator's choice scored, the table drawn."""
    out = tmp_path / "split.json"
    shell(sys.executable, "tools/bench_split.py", "--ranks", "2", "--reps", "1", "--output", out, timeout=180)
    row = json.loads(out.read_text())["ranks"]["2"]
    assert row["best"] == "1:1" and row["simulator"] == {"chosen": "1:1", "chosen_over_best": 1.0}
    shown = shell(sys.executable, "tools/bench_table.py", tmp_path).stdout
    assert "### split (split.json)" in shown


def project_sim(tmp_path):
    """On a copy of docs/bench/projections.json: every point is stored (simulations are deterministic,
    keyed by settings, machine file and tools/project_sim.py's CODE), so both documented runs rebuild
    the same sections from them in seconds, which checks the script end to end but the simulation."""
    stored = os.path.join(ROOT, "docs", "bench", "projections.json")
    out = tmp_path / "projections.json"
    shutil.copy(stored, out)
    shell(sys.executable, "tools/project_sim.py", "--only", "c", "--out", out, timeout=60)
    shell(sys.executable, "tools/project_sim.py", "--out", out, timeout=60)
    with open(stored) as f:
        assert json.loads(out.read_text()) == json.load(f)


def validate_sim(tmp_path):
    """One configuration simulated again, its measured runs reused from docs/bench/simulation.json (one
    run of it measured where that file predates it)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from validate_sim import CONFIGS

    stored = os.path.join(ROOT, "docs", "bench", "simulation.json")
    with open(stored) as f:
        names = [row["name"] for row in json.load(f)["configurations"] if row["name"] in CONFIGS]
    name = (names or list(CONFIGS))[0]
    out = tmp_path / "simulation.json"
    shutil.copy(stored, out)
    shell(sys.executable, "tools/validate_sim.py", "--reuse", "--reps", "1", "--only", name, "--out", out)
    [row] = json.loads(out.read_text())["configurations"]
    assert row["name"] == name and row["tpot_ms"]["predicted"] > 0


def report_and_export(tmp_path):
    """The README's first next step on a 2-rank debug run."""
    run = tmp_path / "debug.h5"
    shell(
        mpiexec(),
        "-n",
        "2",
        *hpcmoe(),
        "run",
        "inputs/debug.yaml",
        *sets("run.max_new_tokens=2"),
        "--output",
        run,
    )
    shown = shell(*hpcmoe(), "report", run, "--output", tmp_path / "debug_report")
    assert "ttft_ms" in shown.stdout and (tmp_path / "debug_report" / "debug.timeline.png").exists()
    shell(*hpcmoe(), "export", run, "--output", tmp_path / "debug.jsonl")
    assert len((tmp_path / "debug.jsonl").read_text().splitlines()) == 6


def checkpoint_config(tmp_path):
    """inputs/checkpoint.yaml with a tiny checkpoint (its own tokenizer) and a prompt file of text and
    ids: planned, run on 2 ranks, the completions decoded."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("experts route tokens to a few experts out of many on every rank\n" * 20)
    checkpoint = tmp_path / "mixtral"
    shell(
        sys.executable,
        "tools/make_tiny_checkpoint.py",
        "mixtral",
        checkpoint,
        "--tokenizer",
        corpus,
        "--set",
        "vocab_size=320",
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"id": "q1", "prompt": "experts route tokens"}\n{"id": "q2", "prompt_ids": [1, 5, 9]}\n'
    )
    where = sets(f"model.checkpoint={checkpoint}", f"run.prompts={prompts}", "run.max_new_tokens=3")
    assert "per ep rank" in shell(*hpcmoe(), "plan", "inputs/checkpoint.yaml", *where, "--ranks", "2").stdout
    output = tmp_path / "run.h5"
    shell(mpiexec(), "-n", "2", *hpcmoe(), "run", "inputs/checkpoint.yaml", *where, "--output", output)
    with h5py.File(output) as f:
        assert f.attrs["complete"] and [x.decode() for x in f["request_ids"][:]] == ["q1", "q2"]
        assert "generated_text" in f


def sim_tables(tmp_path):
    shown = shell(sys.executable, "tools/sim_tables.py")
    assert "| configuration | ranks |" in shown.stdout


SMOKE = {
    f.__name__: f
    for f in (
        make_targets,
        run_model_mapping,
        predict_collect_train_propose,
        predict_propose_machine,
        calibrate_inputs,
        simulate_steady_decode,
        bench_scale,
        bench_memory,
        bench_split,
        project_sim,
        validate_sim,
        sim_tables,
        report_and_export,
        checkpoint_config,
    )
}


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_documented_command_at_tiny_size(name, tmp_path):
    SMOKE[name](tmp_path)
