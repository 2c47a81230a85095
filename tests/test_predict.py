"""The time predictor's mechanics: features from run files, training, the split it proposes.

The synthetic runs here follow a known law, so they test the machinery, not the predictor's worth:
its error on real runs (split by run, against the roofline) is measured by tools/bench_predict.py
and reported in docs/PERFORMANCE.md."""

import os

import h5py
import numpy as np
import pytest
import yaml

from hpcmoe.analysis import ma_split, predict, run_samples
from hpcmoe.config import load_config
from hpcmoe.runfile.schema import TIMING_DTYPE
from tests.conftest import DEBUG_CONFIG, ROOT

MACHINE = {"memory_bandwidth": 10.0, "peak_gflops": 50.0}


def synthetic_run(path, batch: int, prompt_len: int, ranks: int = 2, steps: int = 4, seed: int = 0):
    """A run file whose timings follow a known law: attention 0.02 ms per token, experts 0.005 ms per
    token slot (plus 2% noise); the rest of the schema as the engine writes it."""
    rng = np.random.default_rng(seed)
    config = load_config(
        DEBUG_CONFIG,
        [
            f"run.batch={batch}",
            f"run.prompt_len={prompt_len}",
            f"run.prompt_len_min={prompt_len}",
            f"run.max_new_tokens={steps}",
        ],
    )
    m = config.model
    lengths = np.full(batch, prompt_len)
    traffic = np.zeros((steps, m.moe_layers, ranks, ranks), np.int64)
    rows, clock = [], 0.0
    for step in range(steps):
        tokens_per_rank = [
            len(range(r * batch // ranks, (r + 1) * batch // ranks)) * (prompt_len if step == 0 else 1)
            for r in range(ranks)
        ]
        slots = sum(tokens_per_rank) * m.top_k / ranks  # spread evenly over the experts' ranks
        traffic[step, :, :, :] = int(slots * m.hidden * 4 / ranks / m.moe_layers)
        for rank in range(ranks):
            attention = 0.02e-3 * tokens_per_rank[rank] * rng.normal(1, 0.02)
            experts = 0.005e-3 * slots * rng.normal(1, 0.02)
            rows += [
                (rank, 0, 0, step, b"attention", clock, clock + attention),
                (rank, 1, 0, step, b"experts", clock + attention, clock + attention + experts),
                (rank, -1, 0, step, b"step", clock, clock + 1.25 * (attention + experts)),
            ]
        clock += 1.3 * max(r[6] - r[5] for r in rows[-3 * ranks :])
    with h5py.File(path, "w") as f:
        f.attrs["config"] = config.to_yaml()
        f["timings"] = np.array(rows, dtype=TIMING_DTYPE)
        f["traffic"] = traffic
        f["prompt_lengths"] = lengths
    return str(path)


def test_predictor_learns_a_known_law_from_run_files(tmp_path):
    train_runs = [
        synthetic_run(tmp_path / f"train{i}.h5", batch, length, seed=i)
        for i, (batch, length) in enumerate([(2, 8), (4, 16), (8, 8), (6, 32), (12, 24), (16, 48)])
    ]
    test_runs = [
        synthetic_run(tmp_path / f"test{i}.h5", batch, length, seed=10 + i)
        for i, (batch, length) in enumerate([(10, 20), (5, 40)])
    ]
    x, y, _ = map(np.concatenate, zip(*(run_samples.samples_from_run(r, MACHINE) for r in train_runs)))
    assert x.shape[1] == 5 and y.shape[1] == 2
    model = predict.train(x, y, epochs=2000)
    tx, ty, roofline = map(
        np.concatenate, zip(*(run_samples.samples_from_run(r, MACHINE) for r in test_runs))
    )
    test_error = predict.relative_error(model.predict_ms(tx), ty)
    assert max(test_error) < 0.2, test_error
    assert sum(p.numel() for p in model.net.parameters()) == 5 * 64 + 64 + 64 * 32 + 32 + 32 * 2 + 2


def test_roofline_is_flops_over_peak_plus_weight_bytes_over_bandwidth(tmp_path):
    """Hand arithmetic on the debug model (float32), 2 ranks, 2 requests of 8 tokens, MACHINE's 50 GFLOP/s
    and 10 GB/s. Attention weights per layer: hidden 64 x (2 x 8 heads + 2 x 4 kv heads) x head_dim 8
    = 12288, 3 layers; expert weights 3 x 64 x 128 = 24576, 2 MoE layers. Rank 0 runs attention for
    8 tokens in the prefill and 1 in decode; its experts get 16 token slots, then 2."""
    run = synthetic_run(tmp_path / "run.h5", batch=2, prompt_len=8, steps=2)
    _, _, roofline = run_samples.samples_from_run(run, MACHINE)

    def ms(flops, weight_bytes):
        return 1e3 * (flops / 50e9 + weight_bytes / 10e9)

    attention_bytes, expert_bytes = 4 * 12288 * 3, 4 * 24576 * 2
    # rank 0, decode
    expected = [
        [ms(2 * 8 * 12288 * 3, attention_bytes), ms(2 * 16 * 24576 * 2, expert_bytes)],  # rank 0, prefill
        [ms(2 * 1 * 12288 * 3, attention_bytes), ms(2 * 2 * 24576 * 2, expert_bytes)],
    ]
    np.testing.assert_allclose(roofline[:2], expected, rtol=1e-12)
    # 11.8 us of math + 14.7 us of weights, written out once
    assert roofline[0, 0] == pytest.approx(0.02654208)


class LawPredictor:
    """Constructed timings: attention ms = a x (new tokens + context / 8), MoE ms = e x token slots."""

    def __init__(self, a: float, e: float):
        self.a, self.e = a, e

    def predict_ms(self, features):
        return np.stack([self.a * (features[:, 0] + features[:, 1] / 8), self.e * features[:, 3]], axis=1)


def best_split_by_law(law, config, ranks):
    """The split that minimizes prefill + (steps - 1) decode steps, each as slow as its slower side."""

    def total(attention, moe):
        f = ma_split.split_features(config, attention, moe, MACHINE)
        p = [law.predict_ms(f[phase]) for phase in range(2)]
        return max(p[0][0, 0], p[0][1, 1]) + (config.run.max_new_tokens - 1) * max(p[1][0, 0], p[1][1, 1])

    return min(ma_split.splits(config, ranks), key=lambda s: total(*s))


@pytest.mark.parametrize("a, e, expected", [(1.0, 0.001, (7, 1)), (0.001, 1.0, (4, 4)), (0.05, 0.04, None)])
def test_proposal_picks_the_best_split_of_constructed_timings_and_flags_imbalance(a, e, expected):
    """8 ranks, 8 heads, 4 experts: expensive attention takes 7 ranks, expensive experts take the 4 the
    experts allow; balanced costs land in between. rebalance is set exactly when the chosen split's
    decode sides differ by more than the threshold."""
    config = load_config(DEBUG_CONFIG)
    law = LawPredictor(a, e)
    proposal = ma_split.propose(law, config, 8, MACHINE, threshold=0.05)
    chosen = (proposal["attention_ranks"], proposal["moe_ranks"])
    assert chosen == best_split_by_law(law, config, 8)
    if expected:
        assert chosen == expected
    assert sum(proposal["heads_per_rank"]) == config.model.heads and len(proposal["options"]) == 4
    sides = law.predict_ms(ma_split.split_features(config, *chosen, MACHINE)[1])
    mismatch = abs(sides[0, 0] - sides[1, 1]) / max(sides[0, 0], sides[1, 1])
    assert proposal["mismatch"] == pytest.approx(mismatch)
    for threshold in (mismatch * 0.9, mismatch * 1.1):
        assert ma_split.propose(law, config, 8, MACHINE, threshold)["rebalance"] == (mismatch > threshold)
    with pytest.raises(ValueError, match="no attention:MoE split of 1 ranks"):
        ma_split.propose(law, config, 1, MACHINE)


def test_features_do_not_carry_the_target(tmp_path):
    """Running 3x slower (every timing stretched: what a busy fraction or any measured time would leak)
    leaves the features unchanged: they come from the config, the prompts and /traffic only."""
    path = synthetic_run(tmp_path / "run.h5", 4, 16)
    before, targets, _ = run_samples.samples_from_run(path, MACHINE)
    with h5py.File(path, "r+") as f:
        rows = f["timings"][:]
        rows["start"], rows["end"] = 3 * rows["start"], 3 * rows["end"]  # every phase 3x as long
        f["timings"][...] = rows
    after, stretched, _ = run_samples.samples_from_run(path, MACHINE)
    np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose(stretched, 3 * targets)


def test_auto_split_asks_the_predictor_and_says_why(tmp_path):
    from tests.conftest import run_job

    runs = [synthetic_run(tmp_path / f"r{i}.h5", batch, 16, seed=i) for i, batch in enumerate([2, 4, 8])]
    x, y, _ = map(np.concatenate, zip(*(run_samples.samples_from_run(r, MACHINE) for r in runs)))
    predict.save(predict.train(x, y, epochs=200), MACHINE, runs, str(tmp_path / "predictor.pt"))
    result = run_job(
        4,
        tmp_path / "run.h5",
        "parallel.layout=ma",
        "parallel.attention_ranks=auto",
        "parallel.moe_ranks=auto",
        f"parallel.predictor={tmp_path / 'predictor.pt'}",
    )
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "parallel.attention_ranks=auto:" in line]
    with h5py.File(tmp_path / "run.h5") as f:
        parallel = yaml.safe_load(f.attrs["config"])["parallel"]
    assert parallel["attention_ranks"] + parallel["moe_ranks"] == 4 and isinstance(
        parallel["attention_ranks"], int
    )
    assert f"{parallel['attention_ranks']} attention : {parallel['moe_ranks']} MoE ranks" in line


def test_auto_split_by_the_simulator_says_so_and_takes_its_fastest_split(tmp_path):
    """parallel.predictor a machine file: every split simulated with the engine's schedule; the run
    takes the split ma_split.simulate_splits ranks first, and its line names the machine file."""
    from hpcmoe.analysis.ma_split import simulate_splits as propose
    from tests.conftest import run_job

    machine = os.path.join(ROOT, "machines", "this_box.yaml")
    settings = [
        "parallel.layout=ma",
        "parallel.attention_ranks=auto",
        "parallel.moe_ranks=auto",
        f"parallel.predictor={machine}",
    ]
    result = run_job(4, tmp_path / "run.h5", *settings)
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "parallel.attention_ranks=auto:" in line]
    expected = propose(
        load_config(DEBUG_CONFIG, settings[:1] + ["parallel.attention_ranks=1", "parallel.moe_ranks=1"]),
        4,
        machine,
    )
    with h5py.File(tmp_path / "run.h5") as f:
        parallel = yaml.safe_load(f.attrs["config"])["parallel"]
    assert (parallel["attention_ranks"], parallel["moe_ranks"]) == (
        expected["attention_ranks"],
        expected["moe_ranks"],
    )
    assert f"simulated on {machine}" in line and "WARNING" not in line


def test_a_trained_predictor_warns_outside_its_runs_and_refuses_when_it_cannot_tell(tmp_path):
    runs = [synthetic_run(tmp_path / f"r{i}.h5", batch, 16, seed=i) for i, batch in enumerate([2, 4])]
    x, y, _ = map(np.concatenate, zip(*(run_samples.samples_from_run(r, MACHINE) for r in runs)))
    path = str(tmp_path / "predictor.pt")
    predict.save(predict.train(x, y, epochs=50), MACHINE, runs, path, run_samples.fitted_ranges(runs))
    fitted = predict.load(path)[0].fitted_ranges
    assert fitted == {"ranks": [2, 2], "batch": [2, 4], "prompt_length": [16, 16]}
    inside = load_config(DEBUG_CONFIG, ["run.batch=4", "run.prompt_len=16", "run.prompt_len_min=16"])
    options = {"options": {"1:1": 3.0}}
    assert ma_split.outside_training(path, fitted, inside, 2, options) == ""
    outside = load_config(DEBUG_CONFIG, ["run.batch=16", "run.prompt_len=16", "run.prompt_len_min=16"])
    warning = ma_split.outside_training(path, fitted, outside, 8, {"options": {"1:7": 3.0, "2:6": 4.0}})
    assert (
        warning
        == "; WARNING: outside the runs it was fitted on: ranks 8 (fitted on 2..2), batch 16 (fitted on 2..4)"
    )
    with pytest.raises(ValueError, match=r"predicts the same time \(0.0 ms\) for every split of 8 ranks"):
        ma_split.outside_training(path, fitted, inside, 8, {"options": {"1:7": 0.0, "2:6": 0.0}})


def test_a_step_on_shared_cores_takes_every_ranks_work_over_the_cores():
    """Own cores: the slower side; fewer cores than ranks: the ranks' summed work over the cores."""
    assert ma_split.step_ms(10.0, 4.0, 1, 3, cores=8) == 10.0
    assert ma_split.step_ms(10.0, 4.0, 1, 3, cores=2) == (10.0 + 3 * 4.0) / 2
    assert ma_split.step_ms(10.0, 1.0, 1, 3, cores=2) == 10.0  # the slower side still bounds it
    config = load_config(DEBUG_CONFIG)
    law = LawPredictor(0.05, 0.04)
    shared = ma_split.propose(law, config, 8, {**MACHINE, "cores": 2}, threshold=0.05)
    for split, total in shared["options"].items():
        attention, moe = map(int, split.split(":"))
        f = ma_split.split_features(config, attention, moe, MACHINE)
        step = [
            ma_split.step_ms(law.predict_ms(f[p])[0, 0], law.predict_ms(f[p])[1, 1], attention, moe, 2)
            for p in range(2)
        ]
        assert total == pytest.approx(step[0] + (config.run.max_new_tokens - 1) * step[1])
