"""`hpcmoe simulate` and machine files: hand arithmetic, the engine's own plan code, measured runs,
the run-file schema and `hpcmoe report`, and clear errors on a bad machine file."""

import dataclasses
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml

from hpcmoe.config import load_config
from hpcmoe.sim.events import FIRST_PAUSE_S, LONGEST_PAUSE_S
from hpcmoe.sim.machine import PHASES, machine_from
from hpcmoe.sim.simulate import Simulation, simulate
from tests.conftest import DEBUG_CONFIG, ROOT, run_job

THIS_BOX = os.path.join(ROOT, "machines", "this_box.yaml")
FAST = 1e9  # TFLOP/s and GB/s so large that the modelled math takes no time


def machine(fixed_us: dict = None, **figures) -> dict:
    """A machine file as a dict: every rate FAST, every fixed cost 0 unless given."""
    raw = {
        "name": "hand",
        "device": "cpu",
        "one_box": True,
        "compute_units_per_node": 8,
        "device_memory_gb": 100,
        "gemm_tflops": {"float32": FAST, "bfloat16": FAST},
        "gemm_decode_gb_per_s": {"float32": FAST, "bfloat16": FAST},
        "decode_rows_below": 32,
        "attention_tflops": {"float32": FAST, "bfloat16": FAST},
        "attention_gb_per_s": FAST,
        "memory_gb_per_s": FAST,
        "elementwise_gb_per_s": FAST,
        "host_link_gb_per_s": FAST,
        "mfu": 1.0,
        "bandwidth_efficiency": 1.0,
        "intra_node": {"latency_us": 0, "gb_per_s": FAST},
        "inter_node": {"latency_us": 0, "gb_per_s": FAST},
        "collective_latency_us": 0,
        "sleep_overshoot_us": 0,
        "scheduler_quantum_us": 4000,
        "first_step_slowdown": 0,
        "shared_node_slowdown": 0,
        "fixed_us": {phase: 0.0 for phase in PHASES},
    }
    raw["fixed_us"].update(fixed_us or {})
    raw.update(figures)
    return raw


def test_one_rank_is_the_sum_of_its_fixed_costs():
    """debug model, one rank: 3 layers (1 dense), 2 MoE layers that run their experts at once (alone)."""
    fixed = {
        "step": 100,
        "first_step": 5000,
        "embed": 10,
        "attention": 300,
        "mlp": 70,
        "route": 40,
        "shared_experts": 3,
        "dispatch_post": 20,
        "experts": 90,
        "combine": 15,
        "lm_head": 60,
        "output": 200,
    }
    config = load_config(DEBUG_CONFIG, ["run.max_new_tokens=4"])
    metrics = simulate(config, machine_from(machine(fixed)), 1)
    per_moe_layer = 40 + 3 + 20 + 90 + 15
    forward = 10 + 3 * 300 + 70 + 2 * per_moe_layer + 60  # embed, attention x 3, dense MLP, MoE x 2, LM head
    assert metrics["ttft_ms"] == pytest.approx(1e-3 * (5000 + 100 + forward), abs=1e-6)
    # output, then the next step
    assert metrics["tpot_ms"] == pytest.approx(1e-3 * (200 + 100 + forward), abs=1e-6)


def test_two_ranks_over_a_link_take_the_bytes_over_the_bandwidth():
    """Two ranks as two nodes over an emulated link, no compute: every token chooses both experts
    (one per rank), so each MoE layer sends each rank's prompt tokens to the other and back:
    2 x (bytes / bandwidth + latency); then rank 1's record (4096 bytes) crosses to rank 0."""
    gbps, latency_us, prompt = 0.01, 100.0, 8
    config = load_config(
        DEBUG_CONFIG,
        [
            "model.num_experts=2",
            "model.top_k=2",
            "run.batch=2",
            f"run.prompt_len={prompt}",
            f"run.prompt_len_min={prompt}",
            "run.max_new_tokens=2",
            "parallel.ranks_per_node=1",
            "parallel.wait=spin",
            f"parallel.link={{bandwidth_gbps: {gbps}, latency_us: {latency_us}}}",
        ],
    )
    metrics = simulate(config, machine_from(machine()), 2)
    # 8 tokens x hidden 64 x float32, one way
    message = prompt * 64 * 4 * 8 / (gbps * 1e9) + latency_us * 1e-6
    record = 4096 * 8 / (gbps * 1e9) + latency_us * 1e-6
    assert metrics["ttft_ms"] == pytest.approx(1e3 * (2 * 2 * message + record), rel=1e-9)


def test_the_simulator_runs_the_engines_placement_and_plan(monkeypatch):
    """Change the engine's slot choice (every token slot to slot 0) and its placement code: the
    simulated traffic follows, so the simulator has no plan of its own."""
    import hpcmoe.runtime.moe_layer
    from hpcmoe.parallel.layout import ParallelLayout

    config = load_config(DEBUG_CONFIG, ["run.max_new_tokens=2"])

    def received(*patches):
        with monkeypatch.context() as patch:
            for owner, name, replacement in patches:
                patch.setattr(owner, name, replacement)
            from hpcmoe.sim.simulate import Simulation

            sim = Simulation(config, machine_from(machine()), 4)
            sim.run()
            return sim.traffic.sum(axis=(0, 1, 2))  # bytes received per rank

    spread = received()
    assert (spread > 0).all()  # one expert per rank, every rank gets rows
    choose = hpcmoe.runtime.moe_layer.choose_slots  # as the engine's exchange calls it
    to_slot_0 = received(
        (hpcmoe.runtime.moe_layer, "choose_slots", lambda ids, tables: choose(ids, tables) * 0)
    )
    assert to_slot_0[0] == spread.sum() and (to_slot_0[1:] == 0).all()
    place = ParallelLayout.place
    reversed_ranks = received(
        (
            ParallelLayout,
            "place",
            lambda self, nodes, routing: hpcmoe.parallel.placement.Placement(
                tuple(reversed(place(self, nodes, routing).slot_expert)), tuple(range(4)), 4, "reversed"
            ),
        )
    )
    assert reversed_ranks.sum() == spread.sum() and not np.array_equal(reversed_ranks, spread)


def test_waits_poll_as_the_engine_does(monkeypatch):
    """The simulator's model of waits.wait_until's sleeps: 20 us doubling to at most 1 ms."""
    import hpcmoe.runtime.waits

    pauses = []
    monkeypatch.setattr(hpcmoe.runtime.waits.time, "sleep", pauses.append)
    hpcmoe.runtime.waits.wait_until(lambda: len(pauses) >= 9, "test", hpcmoe.runtime.waits.WaitPolicy())
    expected = [min(FIRST_PAUSE_S * 2**i, LONGEST_PAUSE_S) for i in range(9)]
    assert pauses == pytest.approx(expected)


@pytest.fixture(scope="module")
def measured_and_simulated(tmp_path_factory):
    """A short real run at -n 2 and its simulation on this box's machine file (written as a run file)."""
    folder = tmp_path_factory.mktemp("simulate")
    settings = ["run.max_new_tokens=6", "parallel.threads=1"]
    result = run_job(2, folder / "real.h5", *settings)
    assert result.returncode == 0, result.stderr
    command = [
        sys.executable,
        "-m",
        "hpcmoe",
        "simulate",
        DEBUG_CONFIG,
        "--machine",
        THIS_BOX,
        "--ranks",
        "2",
        "--output",
        str(folder / "sim.h5"),
    ] + [part for s in settings for part in ("--set", s)]
    simulated = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
    )
    assert simulated.returncode == 0, simulated.stderr
    return folder / "real.h5", folder / "sim.h5", simulated.stdout


def median_step_ms(path) -> tuple[float, float]:
    """(median decode step, first token) in ms of a run file: the median, not the mean, so that a burst
    of other work on this shared box during a few steps does not move it."""
    with h5py.File(path) as f:
        held = f["metrics/token_time_s"][:]
    return 1e3 * float(np.median(np.diff(held))), 1e3 * float(held[0])


def test_the_simulator_tracks_what_a_wider_model_costs_against_the_debug_model(tmp_path):
    """Measured against simulated as a ratio of one-rank runs (absolute times here move 2x with the other
    jobs on this box): the wide model (hidden 256, experts 1024 wide, 64-token prompts, 30 MiB of
    weights: past this box's cache) over the debug model (1.4 MiB), neither a calibration run. Each
    is measured twice, interleaved, and the faster kept. Decode measured 3.3 to 3.7, simulated 3.48
    (machines/this_box.yaml of 2026-12-05 17:10): within 1.3x, which these errors fail: the decode
    GEMM rate halved simulates 5.14 (1.47x), the fixed costs doubled 2.60 (0.75x), the machine
    file without its cache figures (decode_rates, fixed_by_working_set) 2.15 (0.62x: the simulator
    before them). Prefill: a known gap (reported on issue 26); the bound only keeps it from growing."""
    from hpcmoe.sim.machine import load_machine

    settings = ["run.max_new_tokens=24", "parallel.threads=1"]
    configs = {"debug": DEBUG_CONFIG, "wide": os.path.join(ROOT, "inputs", "bench_ep.yaml")}
    measured = {name: [] for name in configs}
    for rep in range(2):
        for name, path in configs.items():
            result = run_job(1, tmp_path / f"{name}{rep}.h5", *settings, config=path)
            assert result.returncode == 0, result.stderr
            measured[name].append(median_step_ms(tmp_path / f"{name}{rep}.h5"))
    simulated = {}
    for name, path in configs.items():
        simulate(
            load_config(path, settings), load_machine(THIS_BOX), 1, output=str(tmp_path / f"{name}_sim.h5")
        )
        simulated[name] = median_step_ms(tmp_path / f"{name}_sim.h5")
    fastest = {name: np.min(times, axis=0) for name, times in measured.items()}
    for index, metric, factor in ((0, "decode step", 1.3), (1, "first token", 2.5)):
        ratio = [times["wide"][index] / times["debug"][index] for times in (fastest, simulated)]
        assert 1 / factor < ratio[1] / ratio[0] < factor, (metric, ratio, measured, simulated)


def test_the_simulated_file_has_the_run_schema_and_report_reads_it(measured_and_simulated):
    from hpcmoe.analysis.report import load

    real, sim, stdout = measured_and_simulated
    assert "(simulated)" in stdout and f"wrote {sim}" in stdout
    run = load(str(sim))  # what `hpcmoe report` checks and reads
    with h5py.File(real) as f, h5py.File(sim) as g:
        assert g.attrs["simulated"] and g.attrs["machine"] == "this_box" and g.attrs["complete"]
        assert set(f.attrs) - {"device_name"} <= set(g.attrs)
        for name in (
            "prompt_ids",
            "prompt_lengths",
            "generated",
            "routing",
            "traffic",
            "placement",
            "timings",
            "request_ids",
            "generated_lengths",
        ):
            assert g[name].dtype == f[name].dtype and list(g[name].attrs["axes"]) == list(
                f[name].attrs["axes"]
            ), name
            # rows: as many as there are phases
            assert name == "timings" or g[name].shape == f[name].shape, name
        assert (g["generated"][:] == -1).all() and (g["prompt_ids"][:] == f["prompt_ids"][:]).all()
        assert (
            g["routing"][:].sum(axis=(2, 3)) == f["routing"][:].sum(axis=(2, 3))
        ).all()  # tokens x top_k per step
        assert (g["placement"][:] == f["placement"][:]).all()
        measured_only = {
            "peak_rss_bytes_attention",
            "peak_rss_bytes_moe",
            "memory_estimate_bytes",
            "peak_over_estimate",
        }
        # this process's memory: real only
        assert set(f["metrics"].attrs) - measured_only <= set(g["metrics"].attrs)
        phases = set(g["timings"]["phase"])
        assert {
            b"attention",
            b"route",
            b"dispatch_post",
            b"experts",
            b"combine",
            b"step",
            b"counts_wait",
        } <= phases
        assert set(g["timings"]["rank"]) == {0, 1} and (g["timings"]["end"] >= g["timings"]["start"]).all()
        held = g["metrics/token_time_s"][:]
        assert g["metrics"].attrs["ttft_ms"] == pytest.approx(1e3 * held[0])
        assert g["metrics"].attrs["tpot_ms"] == pytest.approx(1e3 * np.diff(held).mean())
    assert run["world_size"] == 2
    report = subprocess.run(
        [sys.executable, "-m", "hpcmoe", "report", str(sim), "--out", str(sim.parent / "plots")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
    )
    assert report.returncode == 0, report.stderr
    with h5py.File(sim) as g:
        assert f"  ttft_ms: {g['metrics'].attrs['ttft_ms']:.3f}" in report.stdout.splitlines()


@pytest.mark.parametrize(
    "figure, value, message",
    [
        ("fixed_us.attention", None, "figure fixed_us.attention is missing"),
        ("inter_node.gb_per_s", -5, "figure inter_node.gb_per_s is -5; expected a number >= 0"),
    ],
    ids=["missing", "negative"],
)
def test_a_bad_machine_file_is_one_clear_error(tmp_path, figure, value, message):
    with open(THIS_BOX) as f:
        raw = yaml.safe_load(f)
    section, name = figure.split(".")
    if value is None:
        del raw[section][name]
    else:
        raw[section][name] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, "-m", "hpcmoe", "simulate", DEBUG_CONFIG, "--machine", str(path), "--ranks", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"hpcmoe: error: machine file {path}: {message}")
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_expert_schedule_per_layer_runs_experts_once_per_layer_and_changes_decode(tmp_path):
    """parallel.expert_schedule on 4 ranks that each get rows from several sources: per_source runs
    the experts per arriving source (several `experts` rows in a layer), per_layer once per layer
    on every source's rows (one Ialltoallv each way), which changes the decode TPOT; auto is
    per_source in the prefill and per_layer in decode. The same rows travel either way."""
    costly = machine(
        {"experts": 50, "message": 10, "counts": 20, "dispatch_post": 5},
        collective_latency_us=5,
        intra_node={"latency_us": 100, "gb_per_s": 1},
    )
    runs = {}
    for schedule in ("per_source", "per_layer", "auto"):
        config = load_config(
            DEBUG_CONFIG,
            [
                "run.max_new_tokens=4",
                "run.batch=8",
                "parallel.wait=spin",
                f"parallel.expert_schedule={schedule}",
            ],
        )
        path = tmp_path / f"{schedule}.h5"
        metrics = simulate(config, machine_from(costly), 4, output=str(path))
        with h5py.File(path) as f:
            timings, traffic = f["timings"][:], f["traffic"][:]
            held = f["metrics/token_time_s"][:]
        experts = timings[timings["phase"] == b"experts"]
        calls = {}
        for row in experts:
            where = (int(row["rank"]), int(row["step"]), int(row["layer"]), int(row["micro_batch"]))
            calls[where] = calls.get(where, 0) + 1
        prefill = max(n for (_, step, _, _), n in calls.items() if step == 0)
        decode = max(n for (_, step, _, _), n in calls.items() if step > 0)
        runs[schedule] = metrics, np.diff(held), traffic, prefill, decode
    source, layer, auto = runs["per_source"], runs["per_layer"], runs["auto"]
    assert source[4] > 1 and source[3] > 1  # experts per arriving source
    assert layer[4] == 1 and layer[3] == 1  # once per (rank, step, layer, micro-batch)
    assert auto[3] > 1 and auto[4] == 1  # per_source in the prefill, per_layer in decode
    assert abs(layer[0]["tpot_ms"] - source[0]["tpot_ms"]) > 0.05 * source[0]["tpot_ms"], (
        source[0]["tpot_ms"],
        layer[0]["tpot_ms"],
    )
    assert auto[0]["ttft_ms"] == pytest.approx(source[0]["ttft_ms"])
    assert auto[1] == pytest.approx(layer[1])  # decode steps as per_layer's
    assert (source[2] == layer[2]).all() and (auto[2] == layer[2]).all()  # the same rows, per destination


def test_the_simulator_counts_the_slots_its_routing_drops(tmp_path):
    """parallel.capacity_factor: the simulator routes with the engine's apply_capacity, so it drops
    slots; its metrics (and file) count them, as the engine's do, instead of writing 0. Skewed
    routing with capacity 0.5 must drop; without a capacity nothing is dropped."""
    from hpcmoe.sim.machine import load_machine

    machine = load_machine(os.path.join(ROOT, "machines", "h100_sxm.yaml"))
    skewed = ["model.router_skew=8", "run.max_new_tokens=3"]
    capped = simulate(
        load_config(DEBUG_CONFIG, skewed + ["parallel.capacity_factor=0.5"]),
        machine,
        4,
        output=str(tmp_path / "capped.h5"),
    )
    free = simulate(load_config(DEBUG_CONFIG, skewed), machine, 4)
    assert capped["dropped_token_slots"] > 0 and free["dropped_token_slots"] == 0
    with h5py.File(tmp_path / "capped.h5") as f:
        assert f["metrics"].attrs["dropped_token_slots"] == capped["dropped_token_slots"]


def network(ranks: int, ranks_per_node: int, **inter):
    """A Simulation of `ranks` ranks on nodes of `ranks_per_node` over a 1 GB/s, 50 us network."""
    from hpcmoe.sim.simulate import Simulation

    raw = machine(
        one_box=False,
        compute_units_per_node=ranks_per_node,
        inter_node={"latency_us": 50, "gb_per_s": 1, **inter},
    )
    config = load_config(
        DEBUG_CONFIG, [f"parallel.ranks_per_node={ranks_per_node}", f"model.num_experts={ranks}"]
    )
    return Simulation(config, machine_from(raw), ranks)


def test_eight_senders_into_one_rank_queue_at_its_card():
    """Receiver contention: ranks 1-8, each on its own node, send 1 MB to rank 0 at once: its card
    takes one message at a time, so the k-th is in at 50 us + k ms (without the receiver's queue
    every one was in at 50 us + 1 ms)."""
    sim = network(9, 1)
    for source in range(1, 9):
        sim.send(("test",), source, [0], 1e6, 0.0)
    arrived = np.sort(sim.mail(("test",)).times[1:9, 0])
    assert arrived == pytest.approx(50e-6 + 1e-3 * np.arange(1, 9), rel=1e-12)


@pytest.mark.parametrize("nics, expected", [(None, [1, 1, 1, 1]), (1, [1, 2, 3, 4]), (2, [1, 1, 2, 2])])
def test_ranks_of_a_node_share_its_network_cards(nics, expected):
    """Ranks 0-3 (node 0) each send 1 MB to their peer on node 1 at once: one card per rank by
    default (each in at 50 us + 1 ms); one card for the node: one after another; two: two at a time."""
    sim = network(8, 4, **({"nics_per_node": nics} if nics else {}))
    for source in range(4):
        sim.send(("test",), source, [4 + source], 1e6, 0.0)
    arrived = np.sort([sim.mail(("test",)).times[s, 4 + s] for s in range(4)])
    assert arrived == pytest.approx(50e-6 + 1e-3 * np.array(expected), rel=1e-12)


@pytest.mark.parametrize("dispatch", ["members", "leader"])
def test_expert_tp_splits_each_experts_work_over_its_group(dispatch):
    """parallel.expert_tp=2 runs the engine's expert groups (each member computes half of every
    expert of its group, on all of the group's rows): the prefill's expert compute summed over the
    ranks equals that of whole experts, where charging whole experts to every member doubles it."""
    slow_gemm = machine(gemm_tflops={"float32": 1e-3, "bfloat16": 1e-3})

    def expert_seconds(settings):
        config = load_config(DEBUG_CONFIG, ["run.max_new_tokens=2"] + settings)
        sim = Simulation(config, machine_from(slow_gemm), 4)
        sim.run()
        return sum(
            end - start
            for rank, layer, mb, step, phase, start, end in sim.rows
            if phase == b"experts" and step == 0
        )

    whole = expert_seconds([])
    # within 10% (a member's small groups may pad as batched GEMMs where whole experts chain): 3.5% here
    assert expert_seconds(
        ["parallel.expert_tp=2", f"parallel.expert_tp_dispatch={dispatch}"]
    ) == pytest.approx(whole, rel=0.1)


@pytest.mark.parametrize(
    "settings, named",
    [
        (["parallel.rebalance={every_steps: 2}"], "parallel.rebalance"),
        (
            [
                "parallel.layout=ma",
                "parallel.attention_ranks=2",
                "parallel.moe_ranks=1",
                "parallel.attention_replicas=1",
                "parallel.attention_standby=true",
            ],
            "parallel.attention_standby",
        ),
    ],
)
def test_settings_the_simulator_does_not_model_are_refused_in_one_line(settings, named):
    with pytest.raises(ValueError, match=f"hpcmoe simulate does not model {named}"):
        simulate(load_config(DEBUG_CONFIG, settings), machine_from(machine()), 4)


def test_a_run_whose_message_tags_repeat_is_refused_in_one_line():
    """The simulation tells messages apart by the engine's tags (tags.tag_for), which wrap after 32000:
    64 micro-batches over 40 layers would mix one layer's messages with another's."""
    config = load_config(DEBUG_CONFIG, ["run.micro_batches=64", "model.num_layers=40", "run.batch=128"])
    with pytest.raises(ValueError, match="tags, which repeat at run.micro_batches=64 over 40 layers"):
        simulate(config, machine_from(machine()), 2)


def test_a_bad_optional_figure_is_one_clear_error(tmp_path):
    raw = machine(inter_node={"latency_us": 50, "gb_per_s": 1, "nics_per_node": 0})
    with pytest.raises(
        ValueError, match=r"figure inter_node.nics_per_node is 0; expected a whole number >= 1"
    ):
        machine_from(raw)


def test_calibration_keeps_the_median_of_its_repeats_and_writes_their_spread_and_date(tmp_path):
    from hpcmoe.sim.machine import load_machine, write_machine
    from hpcmoe.sim.measure import repeated

    samples = iter(
        [
            {"gemm_tflops": {"float32": 1.0}, "memory_gb_per_s": 10.0},
            {"gemm_tflops": {"float32": 3.0}, "memory_gb_per_s": 10.0},
            {"gemm_tflops": {"float32": 2.0}, "memory_gb_per_s": 10.0},
        ]
    )
    medians, spread = repeated(lambda: next(samples), 3)
    assert medians == {"gemm_tflops": {"float32": 2.0}, "memory_gb_per_s": 10.0}
    assert spread == {"gemm_tflops.float32": pytest.approx(100.0), "memory_gb_per_s": 0.0}
    raw = machine(measured_at="2026-12-05T13:00:00+0000", spread_percent=spread)
    write_machine(str(tmp_path / "m.yaml"), raw, "test")
    assert load_machine(str(tmp_path / "m.yaml")).measured_at == "2026-12-05T13:00:00+0000"
    with open(tmp_path / "m.yaml") as f:
        assert yaml.safe_load(f)["spread_percent"] == {"gemm_tflops.float32": 100, "memory_gb_per_s": 0}
    with pytest.raises(ValueError, match="spread_percent must map figure names to numbers >= 0"):
        machine_from(machine(spread_percent={"gemm_tflops.float32": -1}))


# ---------------------------------------------------------------- weights in the cache or streamed

MIB = 2**20


def test_a_decode_gemm_streams_at_the_rate_of_its_rows_and_working_set_by_hand():
    """decode_rates linear: 1 row {4 MiB: 2.0, 64 MiB: 0.5}, 9 rows {4: 1.0, 64: 0.25}. At 16 MiB (the
    log midpoint) and 5 rows (the rows' midpoint): 1 row 1.25, 9 rows 0.625 -> 0.9375 of 10 GB/s."""
    from hpcmoe.sim.costs import Costs

    raw = machine(
        gemm_decode_gb_per_s={"float32": 10.0, "bfloat16": 10.0},
        decode_rates={"linear": {1: {4: 2.0, 64: 0.5}, 9: {4: 1.0, 64: 0.25}}},
    )
    model = load_config(DEBUG_CONFIG, []).model
    costs = Costs(model, machine_from(raw), 16 * MIB)
    weights = 1e6
    assert costs.gemm(5, 0, weights) == pytest.approx(weights / (0.9375 * 10e9), rel=1e-12)
    assert costs.gemm(1, 0, weights) == pytest.approx(weights / (1.25 * 10e9), rel=1e-12)
    # clamped
    assert Costs(model, machine_from(raw), 1 * MIB).gemm(1, 0, weights) == pytest.approx(weights / 20e9)
    assert Costs(model, machine_from(raw), 16 * MIB).gemm(5, 0, weights, "grouped") == pytest.approx(
        weights / 10e9
    )
    plain = Costs(
        model, machine_from(machine(gemm_decode_gb_per_s={"float32": 10.0, "bfloat16": 10.0})), 16 * MIB
    )
    assert plain.gemm(5, 0, weights) == pytest.approx(weights / 10e9)  # no table: the figure as it is


def test_fixed_costs_among_the_weights_grow_with_the_working_set_by_hand():
    """fixed_by_working_set {2 MiB: 1, 32 MiB: 3}: at 8 MiB (the log midpoint) the phases among the
    weights cost 2x their fixed_us; the step's output does not."""
    from hpcmoe.sim.costs import Costs

    raw = machine({"attention": 100, "output": 100}, fixed_by_working_set={2: 1.0, 32: 3.0})
    costs = Costs(load_config(DEBUG_CONFIG, []).model, machine_from(raw), 8 * MIB)
    assert costs.fixed["attention"] == pytest.approx(200e-6) and costs.fixed["output"] == pytest.approx(
        100e-6
    )


def test_the_working_set_is_what_the_ranks_sharing_a_cache_hold():
    """ep on one box: every rank holds all but the routed experts, and its share of the experts;
    one cpu cache for them all. A GPU's ranks: its own. ma: attention shards and expert slots."""
    from hpcmoe.model.sizes import parameter_bytes
    from hpcmoe.sim.simulate import weights_per_cache

    config = load_config(DEBUG_CONFIG, [])
    whole, base = parameter_bytes(config.model, 0)
    sim = Simulation(config, machine_from(machine()), 4)
    assert (
        weights_per_cache(config, sim.machine, sim.layout, sim.tables, sim.host_of_rank)
        == 4 * base + whole - base
    )
    gpus = machine_from(machine(device="cuda", compute_units_per_node=4, one_box=False))
    sim = Simulation(config, gpus, 4)
    assert (
        weights_per_cache(config, gpus, sim.layout, sim.tables, sim.host_of_rank) == base + (whole - base) / 4
    )
    ma = load_config(
        DEBUG_CONFIG, ["parallel.layout=ma", "parallel.attention_ranks=2", "parallel.moe_ranks=2"]
    )
    sim = Simulation(ma, machine_from(machine()), 4)
    total = weights_per_cache(ma, sim.machine, sim.layout, sim.tables, sim.host_of_rank)
    assert whole - base < total < whole + base  # the experts once, the attention weights split in two


@pytest.mark.parametrize(
    "figures, message",
    [
        ({"decode_rates": {"linear": {4: {16: 1.0}}}}, "decode_rates is"),
        ({"decode_rates": {"cubic": {4: {4: 1.0, 16: 0.5}}}}, "for kernels among linear, grouped"),
        ({"fixed_by_working_set": {4: 1.0, 16: 0}}, "fixed_by_working_set is"),
    ],
    ids=["one-point", "unknown-kernel", "zero"],
)
def test_a_bad_cache_figure_is_one_clear_error(figures, message):
    with pytest.raises(ValueError, match=message):
        machine_from(machine(**figures))


def test_the_cache_figures_are_written_and_read_back(tmp_path):
    from hpcmoe.sim.machine import load_machine, write_machine

    raw = machine(
        decode_rates={"linear": {1: {4: 2.0, 64: 0.5}}, "grouped": {4: {4: 1.5, 64: 0.25}}},
        fixed_by_working_set={1.5: 1.0, 36.5: 1.9},
    )
    write_machine(str(tmp_path / "m.yaml"), raw, "test")
    loaded = load_machine(str(tmp_path / "m.yaml"))
    assert (
        loaded.decode_rates == machine_from(raw).decode_rates
        and loaded.fixed_scale == machine_from(raw).fixed_scale
    )


# ---------------------------------------------------------------- one scheduler for the engine and the
# simulator


def test_a_change_to_the_schedulers_order_changes_the_engine_and_the_simulation_alike(monkeypatch):
    """scheduler.passes is the engine's loop and the simulator's: reversing the order a pass visits
    the coroutines (no simulator code touched) starts the engine's second micro-batch first, and the
    simulated prefill's second micro-batch embeds first too."""
    from hpcmoe.runtime import scheduler

    def first_embed(sim_rows) -> int:
        return min((start, mb) for rank, layer, mb, step, phase, start, end in sim_rows if phase == b"embed")[
            1
        ]

    def engine_order() -> list:
        log = []

        def coroutine(name):
            log.append(name)
            return name
            yield  # a generator that finishes when first resumed

        class NoSends:
            def test(self):
                return False

        assert scheduler.run_concurrently([coroutine("mb0"), coroutine("mb1")], None, 0, NoSends()) == [
            "mb0",
            "mb1",
        ]
        return log

    config = load_config(DEBUG_CONFIG, ["run.micro_batches=2", "run.max_new_tokens=2"])
    simulated = Simulation(config, machine_from(machine({"embed": 10, "attention": 50})), 1)
    simulated.run()
    assert engine_order() == ["mb0", "mb1"] and first_embed(simulated.rows) == 0
    monkeypatch.setattr(scheduler, "pass_order", lambda waiting: sorted(waiting, reverse=True))
    simulated = Simulation(config, machine_from(machine({"embed": 10, "attention": 50})), 1)
    simulated.run()
    assert engine_order() == ["mb1", "mb0"] and first_embed(simulated.rows) == 1


def test_a_change_to_the_engines_exchange_changes_the_simulation(monkeypatch):
    """The simulation runs moe_layer's own exchange. Change how the engine serves (experts only once
    every source's rows are in, instead of each source's as they arrive), with no simulator code
    touched: simulated experts rows that began before their layer's last dispatch wait ended (its
    own rows, served while the others travel) are gone, and the decode time moves."""
    from hpcmoe.runtime import moe_layer

    config = load_config(
        DEBUG_CONFIG,
        [
            "run.max_new_tokens=3",
            "parallel.ranks_per_node=2",
            "parallel.link={bandwidth_gbps: 0.02, latency_us: 500}",
            "parallel.expert_schedule=per_source",
        ],
    )
    costly = machine({"experts": 100, "message": 5})

    def early_experts(rows) -> int:
        """experts rows that start before the last dispatch_wait of their (rank, step, layer, micro-batch)
        ends"""
        last = {}
        for rank, layer, mb, step, phase, _start, end in rows:
            if phase == b"dispatch_wait":
                last[rank, step, layer, mb] = max(end, last.get((rank, step, layer, mb), -1.0))
        return sum(
            1
            for rank, layer, mb, step, phase, start, end in rows
            if phase == b"experts" and start < last.get((rank, step, layer, mb), -1.0)
        )

    def simulated():
        sim = Simulation(config, machine_from(costly), 4)
        sim.run()
        return early_experts(sim.rows), simulate(config, machine_from(costly), 4)["tpot_ms"]

    def serve_once_all_are_in(ctx, moe, incoming, own_answers, at, returns_tag):
        yield from incoming.start()
        yield incoming.all_in()
        for source in sorted(incoming.sources):
            with ctx.timer.phase("experts", at.step, at.layer, at.micro_batch):
                out = moe.run_experts(
                    incoming.rows(source),
                    incoming.slot_counts(source),
                    own_answers if source == ctx.rank else None,
                )
                if source != ctx.rank:
                    ctx.sender.send(source, out, returns_tag)
            incoming.served.add(source)

    as_they_arrive, tpot = simulated()
    monkeypatch.setattr(moe_layer, "serve", serve_once_all_are_in)
    all_in, tpot_all_in = simulated()
    assert as_they_arrive > 0 and all_in == 0, (as_they_arrive, all_in)
    assert tpot_all_in != pytest.approx(tpot, rel=0.02)  # and the decode time moves (here 8.37 -> 6.76 ms)


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "run.max_batch=1",
            "rank 0 holds 3 requests and the engine would start 1 (run.max_batch=1); continuous "
            "batching is not simulated",
        ),
        ("run.prefill_chunk=16", "rank 0's 53 prompt tokens take more than one step at run.prefill_chunk=16"),
    ],
    ids=["max_batch", "prefill_chunk"],
)
def test_batching_the_simulator_does_not_model_is_refused_in_one_line(setting, message):
    """The engine would start these requests in turns (batch.Batch); a simulation of them all at
    once would be another schedule. Steady decode (no prefill, every request live) still runs."""
    config = load_config(DEBUG_CONFIG, [setting])
    with pytest.raises(ValueError, match=re.escape(message)):
        simulate(config, machine_from(machine()), 2)
    assert simulate(config, machine_from(machine({"step": 10})), 2, context=64)["tpot_ms"] > 0


def test_an_unset_max_batch_is_what_memory_allows_as_the_engine_resolves_it():
    """run.max_batch unset: the engine starts what plan.default_max_batch allows in a rank's memory.
    A 2 GB box holds the debug model's 3 requests per rank; 4 MB (2 MB a rank: 1.4 MB at one request,
    2.2 MB at three, within 80%) does not: refused, naming the engine's number."""
    from hpcmoe.parallel.plan import default_max_batch

    config = load_config(DEBUG_CONFIG, [])
    assert simulate(config, machine_from(machine(device_memory_gb=2)), 2)["tpot_ms"] >= 0
    small = 0.004
    held = default_max_batch(config, 2, small * 1e9 / 2)
    assert held < 3
    with pytest.raises(
        ValueError, match=re.escape(f"the engine would start {held} (run.max_batch unset: {held}")
    ):
        simulate(config, machine_from(machine(device_memory_gb=small)), 2)


def test_spinning_ranks_on_shared_cores_keep_them_and_read_badly():
    """parallel.wait=spin with more ranks than cores: a waiting rank keeps testing, so its core is
    busy until its time slice ends and the rank it waits for cannot run meanwhile (measured here,
    debug -n 4 on 2 cores: TPOT 24.7-26.5 ms spinning, simulated 24.4; ma 3:1 69 ms, simulated
    72). Two ranks on one core, a 4 ms slice: every exchange of a decode step waits out a slice;
    sleeping (yield) ranks give the core up; with a core each, spinning costs nothing."""
    config = load_config(DEBUG_CONFIG, ["run.max_new_tokens=4"])
    fixed = {"attention": 100, "experts": 100, "step": 50}

    def tpot(wait: str, cores: int) -> float:
        raw = machine(fixed, compute_units_per_node=cores, scheduler_quantum_us=4000)
        return simulate(
            dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, wait=wait)),
            machine_from(raw),
            2,
        )["tpot_ms"]

    spinning, sleeping = tpot("spin", 1), tpot("yield", 1)
    assert spinning >= 4.0 and spinning > 3 * sleeping, (spinning, sleeping)
    assert tpot("spin", 2) <= tpot("yield", 2)
