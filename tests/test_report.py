"""`hpcmoe report` on two real runs (ep on 2 nodes of 2 ranks, ma with 3 attention + 1 MoE rank):
the printed numbers against the HDF5 file, the PNG plots, and clear errors on bad input."""
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from tests.conftest import ROOT, run_job

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("timeline", "expert_load", "traffic", "rank_load")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two run files, made once for this module."""
    folder = tmp_path_factory.mktemp("report_runs")
    settings = {"ep": ["parallel.ranks_per_node=2"],
                "ma": ["parallel.layout=ma", "parallel.attention_ranks=3", "parallel.moe_ranks=1"]}
    paths = {}
    for name, extra in settings.items():
        paths[name] = folder / f"{name}.h5"
        result = run_job(4, paths[name], *extra)
        assert result.returncode == 0, result.stderr
    return paths


def report(*args):
    """`python -m hpcmoe report ARGS` -> CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "hpcmoe", "report", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def parse(stdout: str) -> dict[str, dict]:
    """{run path: {(section, key): value}} from the `key: value` lines; sections are unindented `...:` lines."""
    parsed = {}
    for block in stdout.strip().split("\n\n"):
        lines = block.splitlines()
        if not lines[0].startswith("run: "):
            continue
        values, section = {}, ""
        for line in lines[1:]:
            if not line.startswith(" ") and line.endswith(":"):
                section = line[:-1]
                continue
            key, _, value = line.strip().partition(": ")
            try:
                values[(section if line.startswith(" ") else "", key)] = float(value)
            except ValueError:
                values[(section if line.startswith(" ") else "", key)] = value
        parsed[lines[0][len("run: "):]] = values
    return parsed


def expected(path) -> dict:
    """The numbers the report should print, computed here from the run file itself."""
    with h5py.File(path, "r") as f:
        t, m = f["timings"][:], f["metrics"].attrs
        held = f["metrics/token_time_s"][:]   # when rank 0 held each step's tokens
        spans = np.diff(np.concatenate([[0.0], held]))
        routing, table = f["routing"][:], f["placement"][0]         # one node: replicas share evenly
        slots = routing.sum(axis=(0, 1, 2))
        hosting = sorted({int(r) for ranks in table for r in ranks if r >= 0})
        per_layer = []
        for layer in range(routing.shape[1]):                         # max/mean over expert hosts, per layer
            load = np.zeros(f.attrs["world_size"])
            for expert, ranks in enumerate(table):
                ranks = [r for r in ranks if r >= 0]
                load[ranks] += routing[:, layer, :, expert].sum() / len(ranks)
            per_layer.append(load[hosting].max() / load[hosting].mean())
        prompt, batch = f["prompt_lengths"][:].sum(), f["generated"].shape[0]
        return {"ttft_ms": 1e3 * held[0], "tpot_ms": 1e3 * np.mean(spans[1:]),
                "tps": (prompt + batch * (len(spans) - 1)) / held[-1],
                "idle_fraction": float(np.mean(f["metrics/idle_fraction_per_rank"][:])),
                "busy_fraction": float(m["busy_fraction"]),
                "rank_load_max_over_mean": float(np.mean(per_layer)),
                "expert_slots_max": slots.max(), "timings": t, "placement": f["placement"][0]}


def mean_phase_seconds(timings, phase: bytes, ranks) -> float:
    rows = timings[(timings["phase"] == phase) & np.isin(timings["rank"], ranks)]
    return float((rows["end"] - rows["start"]).sum()) / len(ranks)


def check_metrics(values: dict, want: dict):
    for key, tolerance in (("ttft_ms", 2e-3), ("tpot_ms", 2e-3), ("tps", 2e-3), ("idle_fraction", 2e-4),
                           ("busy_fraction", 2e-4)):
        assert values[("metrics", key)] == pytest.approx(want[key], abs=tolerance), key
    assert values[("load imbalance", "rank_load_max_over_mean")] == pytest.approx(
        want["rank_load_max_over_mean"], abs=2e-4)
    assert values[("load imbalance", "expert_slots_max")] == want["expert_slots_max"]


def assert_pngs(paths):
    for path in paths:
        data = open(path, "rb").read()
        assert data.startswith(PNG_MAGIC), path
        assert len(data) > 5000, path


def test_report_one_ep_run(runs, tmp_path):
    result = report(runs["ep"], "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    written = [line[len("wrote "):] for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert written == [str(tmp_path / f"ep.{name}.png") for name in PLOTS]
    assert_pngs(written)
    values, want = parse(result.stdout)[str(runs["ep"])], expected(runs["ep"])
    assert values[("", "layout")] == "ep" and values[("", "world_size")] == 4 and values[("", "num_nodes")] == 2
    check_metrics(values, want)
    section = "phase seconds per rank, all ranks (ranks 0-3)"
    for phase in (b"attention", b"experts", b"step"):
        assert values[(section, phase.decode())] == pytest.approx(
            mean_phase_seconds(want["timings"], phase, range(4)), abs=2e-6)
    lines = result.stdout.splitlines()
    assert "placement (moe layer 0): mode one_per_rank, source uniform" in lines
    for expert, replicas in enumerate(want["placement"]):
        assert f"  expert {expert} -> ranks {replicas[0]}" in lines


def test_report_ep_and_ma(runs, tmp_path):
    result = report(runs["ep"], runs["ma"], "--out", tmp_path / "plots")
    assert result.returncode == 0, result.stderr
    names = [f"{run}.{plot}.png" for run in ("ep", "ma") for plot in PLOTS] + ["compare.png"]
    assert sorted(os.listdir(tmp_path / "plots")) == sorted(names)
    assert_pngs([tmp_path / "plots" / name for name in names])
    parsed = parse(result.stdout)
    assert set(parsed) == {str(runs["ep"]), str(runs["ma"])}
    values, want = parsed[str(runs["ma"])], expected(runs["ma"])
    assert values[("", "layout")] == "ma"
    check_metrics(values, want)
    for role in ("busy_fraction_attention", "busy_fraction_moe"):
        assert ("metrics", role) in values
    attention, moe = "phase seconds per rank, attention (ranks 0-2)", "phase seconds per rank, moe (rank 3)"
    assert values[(attention, "attention")] == pytest.approx(
        mean_phase_seconds(want["timings"], b"attention", [0, 1, 2]), abs=2e-6)
    assert values[(moe, "experts")] == pytest.approx(mean_phase_seconds(want["timings"], b"experts", [3]), abs=2e-6)
    assert (moe, "attention") not in values  # the MoE rank runs no attention
    assert "  expert 0 -> ranks 3" in result.stdout.splitlines()


def test_plots_go_next_to_the_run_by_default(runs, tmp_path):
    shutil.copy(runs["ep"], tmp_path / "copy.h5")
    result = report(tmp_path / "copy.h5")
    assert result.returncode == 0, result.stderr
    assert_pngs([tmp_path / f"copy.{name}.png" for name in PLOTS])


def not_hdf5(tmp_path, runs):
    (tmp_path / "notes.h5").write_text("not an HDF5 file\n")
    return tmp_path / "notes.h5"


def other_hdf5(tmp_path, runs):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["data"] = np.arange(3)
    return tmp_path / "other.h5"


def incomplete_run(tmp_path, runs):
    shutil.copy(runs["ep"], tmp_path / "crashed.h5")
    with h5py.File(tmp_path / "crashed.h5", "a") as f:
        f.attrs["complete"] = False
    return tmp_path / "crashed.h5"


@pytest.mark.parametrize("make", [lambda tmp_path, runs: tmp_path / "missing.h5", not_hdf5, other_hdf5,
                                  incomplete_run], ids=["missing", "not_hdf5", "other_hdf5", "incomplete"])
def test_bad_input_exits_2_with_one_line(runs, tmp_path, make):
    path = make(tmp_path, runs)
    result = report(runs["ep"], path, "--out", tmp_path / "plots")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("hpcmoe: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert str(path) in result.stderr
    assert not (tmp_path / "plots").exists()  # nothing written before the input was checked


def test_without_matplotlib_says_what_to_install(runs):
    code = ("import sys; sys.modules['matplotlib'] = None; from hpcmoe.__main__ import main; "
            f"sys.exit(main(['report', {str(runs['ep'])!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "hpcmoe: error: hpcmoe report needs matplotlib: pip install 'hpcmoe[plots]'\n"
    assert result.stdout == ""
