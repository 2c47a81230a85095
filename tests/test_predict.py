"""The time predictor learns from run files' /timings and is scored on runs it never saw."""
import h5py
import numpy as np
import pytest

from hpcmoe import predict
from hpcmoe.config import load_config
from hpcmoe.output import TIMING_DTYPE
from tests.conftest import DEBUG_CONFIG

MACHINE = {"memory_bandwidth": 10.0, "peak_gflops": 50.0}


def synthetic_run(path, batch: int, prompt_len: int, ranks: int = 2, steps: int = 4, seed: int = 0):
    """A run file whose timings follow a known law: attention 0.02 ms per token, experts 0.005 ms per
    token slot (plus 2% noise); the rest of the schema as the engine writes it."""
    rng = np.random.default_rng(seed)
    config = load_config(DEBUG_CONFIG, [f"run.batch={batch}", f"run.prompt_len={prompt_len}",
                                        f"run.prompt_len_min={prompt_len}", f"run.max_new_tokens={steps}"])
    m = config.model
    lengths = np.full(batch, prompt_len)
    traffic = np.zeros((steps, m.moe_layers, ranks, ranks), np.int64)
    rows, clock = [], 0.0
    for step in range(steps):
        tokens_per_rank = [len(range(r * batch // ranks, (r + 1) * batch // ranks)) * (prompt_len if step == 0 else 1)
                           for r in range(ranks)]
        slots = sum(tokens_per_rank) * m.top_k / ranks  # spread evenly over the experts' ranks
        traffic[step, :, :, :] = int(slots * m.hidden * 4 / ranks / m.moe_layers)
        for rank in range(ranks):
            attention = 0.02e-3 * tokens_per_rank[rank] * rng.normal(1, 0.02)
            experts = 0.005e-3 * slots * rng.normal(1, 0.02)
            rows += [(rank, 0, 0, step, b"attention", clock, clock + attention),
                     (rank, 1, 0, step, b"experts", clock + attention, clock + attention + experts),
                     (rank, -1, 0, step, b"step", clock, clock + 1.25 * (attention + experts))]
        clock += 1.3 * max(r[6] - r[5] for r in rows[-3 * ranks:])
    with h5py.File(path, "w") as f:
        f.attrs["config"] = config.to_yaml()
        f["timings"] = np.array(rows, dtype=TIMING_DTYPE)
        f["traffic"] = traffic
        f["prompt_lengths"] = lengths
    return str(path)


def test_predictor_error_on_unseen_runs_is_small_and_reported_beside_the_roofline(tmp_path):
    train_runs = [synthetic_run(tmp_path / f"train{i}.h5", batch, length, seed=i)
                  for i, (batch, length) in enumerate([(2, 8), (4, 16), (8, 8), (6, 32), (12, 24), (16, 48)])]
    test_runs = [synthetic_run(tmp_path / f"test{i}.h5", batch, length, seed=10 + i)
                 for i, (batch, length) in enumerate([(10, 20), (5, 40)])]
    x, y, _ = map(np.concatenate, zip(*(predict.samples_from_run(r, MACHINE) for r in train_runs)))
    assert x.shape[1] == 5 and y.shape[1] == 2
    model = predict.train(x, y, epochs=2000)
    tx, ty, roofline = map(np.concatenate, zip(*(predict.samples_from_run(r, MACHINE) for r in test_runs)))
    test_error = predict.relative_error(model.predict_ms(tx), ty)
    assert max(test_error) < 0.2, test_error
    assert all(e > 0 for e in predict.relative_error(roofline, ty))  # computed on the same samples
    assert sum(p.numel() for p in model.net.parameters()) == 5 * 64 + 64 + 64 * 32 + 32 + 32 * 2 + 2


def test_proposal_flags_rebalancing_over_the_threshold(tmp_path):
    runs = [synthetic_run(tmp_path / f"r{i}.h5", batch, 16, seed=i) for i, batch in enumerate([2, 4, 8, 16])]
    x, y, _ = map(np.concatenate, zip(*(predict.samples_from_run(r, MACHINE) for r in runs)))
    model = predict.train(x, y, epochs=1500)
    config = load_config(DEBUG_CONFIG)
    proposal = predict.propose(model, config, 4, MACHINE, threshold=0.05)
    assert proposal["attention_ranks"] + proposal["moe_ranks"] == 4
    assert sum(proposal["heads_per_rank"]) == config.model.heads
    assert proposal["rebalance"] == (proposal["mismatch"] > 0.05)
    assert predict.propose(model, config, 4, MACHINE, threshold=1.01)["rebalance"] is False
    with pytest.raises(ValueError, match="no attention:MoE split of 1 ranks"):
        predict.propose(model, config, 1, MACHINE)
