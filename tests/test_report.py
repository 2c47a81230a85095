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
    settings = {
        "ep": ["parallel.ranks_per_node=2"],
        "ma": ["parallel.layout=ma", "parallel.attention_ranks=3", "parallel.moe_ranks=1"],
    }
    paths = {}
    for name, extra in settings.items():
        paths[name] = folder / f"{name}.h5"
        result = run_job(4, paths[name], *extra)
        assert result.returncode == 0, result.stderr
    return paths


def report(*args):
    """`python -m hpcmoe report ARGS` -> CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-m", "hpcmoe", "report", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def parse(stdout: str) -> dict[str, dict]:
    """{run path: {(section, key): value}} from the `key: value` lines; sections are unindented `...:`
    lines."""
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
        parsed[lines[0][len("run: ") :]] = values
    return parsed


def expected(path) -> dict:
    """The numbers the report should print, computed here from the run file itself."""
    with h5py.File(path, "r") as f:
        t, m = f["timings"][:], f["metrics"].attrs
        held = f["metrics/token_time_s"][:]  # when rank 0 held each step's tokens
        spans = np.diff(np.concatenate([[0.0], held]))
        routing, table = f["routing"][:], f["placement"][0]  # one node: replicas share evenly
        slots = routing.sum(axis=(0, 1, 2))
        hosting = sorted({int(r) for ranks in table for r in ranks if r >= 0})
        per_layer = []
        for layer in range(routing.shape[1]):  # max/mean over expert hosts, per layer
            load = np.zeros(f.attrs["world_size"])
            for expert, ranks in enumerate(table):
                ranks = [r for r in ranks if r >= 0]
                load[ranks] += routing[:, layer, :, expert].sum() / len(ranks)
            per_layer.append(load[hosting].max() / load[hosting].mean())
        prompt, batch = f["prompt_lengths"][:].sum(), f["generated"].shape[0]
        return {
            "ttft_ms": 1e3 * held[0],
            "tpot_ms": 1e3 * np.mean(spans[1:]),
            "tps": (prompt + batch * (len(spans) - 1)) / held[-1],
            "idle_fraction": float(np.mean(f["metrics/idle_fraction_per_rank"][:])),
            "busy_fraction": float(m["busy_fraction"]),
            "rank_load_max_over_mean": float(np.mean(per_layer)),
            "expert_slots_max": slots.max(),
            "timings": t,
            "placement": f["placement"][0],
        }


def mean_phase_seconds(timings, phase: bytes, ranks) -> float:
    rows = timings[(timings["phase"] == phase) & np.isin(timings["rank"], ranks)]
    return float((rows["end"] - rows["start"]).sum()) / len(ranks)


def check_metrics(values: dict, want: dict):
    for key, tolerance in (
        ("ttft_ms", 2e-3),
        ("tpot_ms", 2e-3),
        ("tps", 2e-3),
        ("idle_fraction", 2e-4),
        ("busy_fraction", 2e-4),
    ):
        assert values[("metrics", key)] == pytest.approx(want[key], abs=tolerance), key
    assert values[("load imbalance", "rank_load_max_over_mean")] == pytest.approx(
        want["rank_load_max_over_mean"], abs=2e-4
    )
    assert values[("load imbalance", "expert_slots_max")] == want["expert_slots_max"]


def assert_pngs(paths):
    for path in paths:
        data = open(path, "rb").read()
        assert data.startswith(PNG_MAGIC), path
        assert len(data) > 5000, path


def test_report_one_ep_run(runs, tmp_path):
    result = report(runs["ep"], "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    written = [line[len("wrote ") :] for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert written == [str(tmp_path / f"ep.{name}.png") for name in PLOTS]
    assert_pngs(written)
    values, want = parse(result.stdout)[str(runs["ep"])], expected(runs["ep"])
    assert (
        values[("", "layout")] == "ep" and values[("", "world_size")] == 4 and values[("", "num_nodes")] == 2
    )
    check_metrics(values, want)
    section = "phase seconds per rank, all ranks (ranks 0-3)"
    for phase in (b"attention", b"experts", b"step"):
        assert values[(section, phase.decode())] == pytest.approx(
            mean_phase_seconds(want["timings"], phase, range(4)), abs=2e-6
        )
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
        mean_phase_seconds(want["timings"], b"attention", [0, 1, 2]), abs=2e-6
    )
    assert values[(moe, "experts")] == pytest.approx(
        mean_phase_seconds(want["timings"], b"experts", [3]), abs=2e-6
    )
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


@pytest.mark.parametrize(
    "make",
    [lambda tmp_path, runs: tmp_path / "missing.h5", not_hdf5, other_hdf5, incomplete_run],
    ids=["missing", "not_hdf5", "other_hdf5", "incomplete"],
)
def test_bad_input_exits_2_with_one_line(runs, tmp_path, make):
    path = make(tmp_path, runs)
    result = report(runs["ep"], path, "--out", tmp_path / "plots")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("hpcmoe: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert str(path) in result.stderr
    assert not (tmp_path / "plots").exists()  # nothing written before the input was checked


def test_without_matplotlib_says_what_to_install(runs):
    code = (
        "import sys; sys.modules['matplotlib'] = None; from hpcmoe.cli import main; "
        f"sys.exit(main(['report', {str(runs['ep'])!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == "hpcmoe: error: hpcmoe report needs matplotlib: pip install 'hpcmoe[plots]'\n"
    assert result.stdout == ""


# --- at scale: figures of bounded size, partial files, the zoom flags --------------------------------


def simulated(path, ranks: int, *settings: str):
    """`hpcmoe simulate` of the debug model with one expert per rank on H100 nodes of 8 ranks."""
    command = [
        sys.executable,
        "-m",
        "hpcmoe",
        "simulate",
        os.path.join(ROOT, "inputs", "debug.yaml"),
        "--ranks",
        str(ranks),
        "--machine",
        os.path.join(ROOT, "machines", "h100_sxm.yaml"),
        "--set",
        f"model.num_experts={ranks}",
        "--set",
        "run.max_new_tokens=3",
        "--set",
        "run.batch=32",
        *[x for s in settings for x in ("--set", s)],
        "--output",
        str(path),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stderr
    return path


def tiled(source, path, times: int):
    """A run file of `times` x the ranks of `source`: its ranks, nodes and experts repeated (simulating
    1024 ranks takes ~20 s, most of it compiling the dispatch plan; the report reads the same schema)."""
    shutil.copy(source, path)
    with h5py.File(path, "a") as f:
        ranks, nodes = int(f.attrs["world_size"]), np.asarray(f.attrs["node_of_rank"])
        f.attrs["world_size"] = ranks * times
        f.attrs["node_of_rank"] = np.concatenate([nodes + i * (nodes.max() + 1) for i in range(times)])
        table, timings = f["placement"][:], np.concatenate([f["timings"][:] for _ in range(times)])
        timings["rank"] += np.repeat(np.arange(times) * ranks, len(timings) // times).astype(
            timings["rank"].dtype
        )
        copies = [np.where(table >= 0, table + i * ranks, -1) for i in range(times)]
        replaced = {"placement": np.concatenate(copies, axis=1), "timings": timings}
        for name in ("routing", "traffic"):  # each copy routes to its own experts: block diagonal
            data = f[name][:]
            replaced[name] = np.zeros(data.shape[:2] + (ranks * times, data.shape[3] * times), data.dtype)
            for i in range(times):
                replaced[name][
                    :, :, i * ranks : (i + 1) * ranks, i * data.shape[3] : (i + 1) * data.shape[3]
                ] = data
        for name, data in replaced.items():
            attrs = dict(f[name].attrs)
            del f[name]
            f[name] = data
            f[name].attrs.update(attrs)
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report_big")
    ep256 = simulated(folder / "ep256.h5", 256)
    # one group's 32 prompts (557 tokens) in one step
    return {
        "ep256": ep256,
        "ep1024": tiled(ep256, folder / "ep1024.h5", 4),
        "ma256": simulated(
            folder / "ma256.h5",
            256,
            "model.heads=32",
            "parallel.layout=ma",
            "parallel.attention_ranks=32",
            "parallel.moe_ranks=224",
            "model.num_experts=224",
            "run.prefill_chunk=1024",
        ),
    }


@pytest.mark.parametrize("name", ["ep256", "ep1024", "ma256"])
def test_figures_of_bounded_size_at_scale(big, tmp_path, name):
    from PIL import Image

    result = report(big[name], "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    written = [line[len("wrote ") :] for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert len(written) == len(PLOTS)
    for path in written:
        assert max(Image.open(path).size) <= 4000, path
    lines = result.stdout.splitlines()
    experts = [line for line in lines if line.startswith("  expert ")]
    # not one per expert
    assert len(experts) == 16 and lines[lines.index(experts[-1]) + 1].startswith("  ... ")
    assert "  replicas per expert: 1: " in result.stdout


def test_rows_are_nodes_past_64_ranks_and_roles_are_not_mixed():
    from hpcmoe.analysis.plots import groups

    for layout, world in (("ep", 16), ("ep", 256), ("ep", 1024), ("ma", 256)):
        run = {
            "world_size": world,
            "node_of_rank": np.arange(world) // 8,
            "parallel": {"layout": layout, "attention_ranks": 32},
        }
        rows = groups(run)
        assert len(rows) <= 64
        assert sorted(r for _, _, ranks in rows for r in ranks) == list(range(world))  # each rank once
        for _, role, ranks in rows:
            assert all((r < 32) == (role == "attention") for r in ranks) or layout == "ep"
        if world <= 64:
            assert [label for label, _, _ in rows] == [f"rank {r}" for r in range(world)]
        else:
            assert all(len({r // 8 for r in ranks}) * 8 == len(ranks) for _, _, ranks in rows)  # whole nodes


def drawn(path, ranks=None, nodes=None, step=None) -> dict:
    """{plot name: figure} of one run, drawn in this process."""
    from hpcmoe.analysis import plots, report

    run = report.load(str(path))
    report.choose(run, ranks, nodes, step)
    figures = {}
    original = plots.save
    try:
        plots.save = lambda fig, path: figures.__setitem__(path, fig)
        for name in ("timeline", "expert_load", "traffic"):
            getattr(plots, f"plot_{name}")(run, name)
    finally:
        plots.save = original
    return figures


def test_timeline_shows_prefill_and_decode_and_colours_start_at_zero(big):
    figures = drawn(big["ma256"])
    titles = [ax.get_title() for ax in figures["timeline"].axes]
    assert "prefill step 0" in titles[0] and "representative decode step" in titles[1]
    labels = [t.get_text() for t in figures["timeline"].axes[0].get_yticklabels()]
    assert labels[0].startswith("attn node 0 (ranks 0-7)") and labels[-1].startswith(
        "moe node 31 (ranks 248-255)"
    )
    legend = [t.get_text() for t in figures["timeline"].axes[0].get_legend().get_texts()]
    assert (
        legend.index("COMPUTE")
        < legend.index("experts")
        < legend.index("COMMUNICATION IN FLIGHT (THIN LANES)")
        < legend.index("dispatch_comm")
        < legend.index("WAITING (HATCHED)")
        < legend.index("dispatch_wait")
    )
    for name in ("expert_load", "traffic"):
        assert figures[name].axes[0].images[0].get_clim()[0] == 0, name


def test_ranks_nodes_and_step_zoom(big):
    figures = drawn(big["ep256"], ranks="8-31", nodes="2-9", step=1)
    timeline = figures["timeline"].axes[0]
    assert [t.get_text() for t in timeline.get_yticklabels()] == [f"rank {r}" for r in range(16, 32)]
    assert "chosen step 1" in timeline.get_title() and len(figures["timeline"].axes) == 1  # one panel
    assert figures["traffic"].axes[0].images[0].get_array().shape == (16, 16)


def test_partial_file_is_reported_as_partial(tmp_path):
    assert run_job(2, tmp_path / "run.h5", "run.signal_at_step=1").returncode == 0
    partial = tmp_path / "run.partial.h5"
    with h5py.File(partial) as f:
        done = int(f.attrs["stopped_at_step"])
    result = report(partial, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"partial: yes, stopped at step {done} (steps 0-{done - 1} done so far" in result.stdout
    titles = [ax.get_title() for fig in drawn(partial).values() for ax in fig.axes if ax.get_title()]
    assert titles and all(f"PARTIAL: steps 0-{done - 1} only" in t for t in titles)
    beyond = report(partial, "--step", done, "--out", tmp_path / "more")
    assert beyond.returncode == 2 and f"--step {done}: " in beyond.stderr and "partial" in beyond.stderr


@pytest.mark.parametrize(
    "args, says",
    [
        (["--ranks", "5-2"], "--ranks 5-2: expected A-B"),
        (["--ranks", "x"], "--ranks x: expected A-B"),
        (["--ranks", "0-4"], "--ranks 0-4: "),
        (["--nodes", "0-7"], "--nodes 0-7: "),
        (["--step", "99"], "--step 99: "),
    ],
)
def test_bad_zoom_flags_exit_2_with_one_line(runs, tmp_path, args, says):
    result = report(runs["ep"], *args, "--out", tmp_path / "plots")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"hpcmoe: error: {says}") and result.stderr.count("\n") == 1, (
        result.stderr
    )
    assert not (tmp_path / "plots").exists()


def test_json_and_csv_give_the_figures_users_compare(runs, tmp_path):
    """--json and --csv: one entry per run with the per-request percentiles, throughput and wall
    times, equal to the run file's /metrics (read here apart), NaN where a run has none."""
    import csv
    import json

    result = report(
        runs["ep"], runs["ma"], "--out", tmp_path, "--json", tmp_path / "f.json", "--csv", tmp_path / "f.csv"
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "f.json").read_text())
    table = list(csv.DictReader(open(tmp_path / "f.csv")))
    assert [r["run"] for r in rows] == [r["run"] for r in table] == [str(runs["ep"]), str(runs["ma"])]
    for row, line in zip(rows, table):
        with h5py.File(row["run"]) as f:
            attrs = f["metrics"].attrs
            for key in (
                "request_ttft_ms_p99",
                "request_itl_ms_p50",
                "request_latency_s_p90",
                "output_tokens_per_s",
                "requests_per_s",
                "wall_with_load_s",
            ):
                assert row[key] == pytest.approx(float(attrs[key])) and float(line[key]) == pytest.approx(
                    row[key]
                )
    assert "request_itl_ms_p99" in result.stdout  # the text summary shows them too


def test_a_reader_that_leaves_early_costs_no_figure(runs, tmp_path):
    """`hpcmoe report run.h5 | head -1`: no BrokenPipeError traceback, exit 0, every figure drawn."""
    command = (
        f"{sys.executable} -m hpcmoe report {runs['ep']} --output {tmp_path} | head -1; "
        f"exit ${{PIPESTATUS[0]}}"
    )
    result = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith("run: ") and result.stdout.count("\n") == 1
    assert_pngs([tmp_path / f"ep.{name}.png" for name in PLOTS])


def test_a_second_report_refuses_to_replace_the_first_unless_overwrite(runs, tmp_path):
    assert report(runs["ep"], "--out", tmp_path).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = report(runs["ep"], "--out", tmp_path, "--json", tmp_path / "f.json")
    assert again.returncode == 2 and again.stdout == "" and len(again.stderr.splitlines()) == 1, again.stderr
    assert "--overwrite" in again.stderr and not (tmp_path / "f.json").exists()
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    assert report(runs["ep"], "--out", tmp_path, "--overwrite").returncode == 0
