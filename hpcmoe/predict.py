"""Time predictor (seed 002): an MLP 5 -> 64 -> 32 -> 2 from the seed's features to the
attention and MoE time of one rank in one step, trained on the /timings of earlier run files.

The features, one sample per (rank, step) of a run:
  sequence_length  tokens the rank ran attention for, times its share of the query heads
  hidden_size      the model's hidden size
  active_experts   token slots the rank's experts processed (the seed's top_k x batch)
  utilization      the rank's busy fraction in that step
  memory_bandwidth the machine's measured copy bandwidth, GB/s (constant on one machine)
targets: the rank's attention and expert milliseconds in the step. A roofline estimate
(FLOPs / peak + weight bytes / bandwidth, both measured here) is reported beside it.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import yaml
from torch import nn

from hpcmoe.attention import split_heads
from hpcmoe.config import build_config
from hpcmoe.output import is_compute, length, union

FEATURES = ("sequence_length", "hidden_size", "active_experts", "utilization", "memory_bandwidth")
TARGETS = ("attention_ms", "moe_ms")


def machine_profile() -> dict[str, float]:
    """Copy bandwidth (GB/s) and single-thread float32 matmul rate (GFLOP/s) of this machine."""
    a = np.ones(2 ** 24, np.float32)
    start = time.perf_counter()
    for _ in range(5):
        b = a.copy()
    bandwidth = 5 * 2 * a.nbytes / (time.perf_counter() - start) / 1e9
    x = torch.randn(512, 512)
    start = time.perf_counter()
    for _ in range(10):
        x @ x
    peak = 10 * 2 * 512 ** 3 / (time.perf_counter() - start) / 1e9
    del b
    return {"memory_bandwidth": bandwidth, "peak_gflops": peak}


def samples_from_run(path: str, machine: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (features [n, 5], targets [n, 2] ms, roofline [n, 2] ms) for every (rank, step) of a run file."""
    import h5py
    with h5py.File(path, "r") as f:
        config = build_config(yaml.safe_load(f.attrs["config"]))
        timings, traffic = f["timings"][:], f["traffic"][:]
        prompt_lengths = f["prompt_lengths"][:]
    m, p = config.model, config.parallel
    ranks, steps = traffic.shape[2], traffic.shape[0]
    itemsize = 4 if m.dtype_name == "float32" else 2
    row_bytes = m.hidden * itemsize
    slots = traffic.sum(axis=(1, 2)) / row_bytes                      # [steps, ranks] token slots received
    attention_params = m.hidden * (2 * m.heads + 2 * m.kv_heads) * m.head_dim
    expert_params = 3 * m.hidden * m.expert_hidden
    features, targets, roofline = [], [], []
    for rank in range(ranks):
        tokens_share = attention_tokens(config, prompt_lengths, rank, ranks)
        for step in range(steps):
            rows = timings[(timings["rank"] == rank) & (timings["step"] == step)]
            attention = 1e3 * sum(r["end"] - r["start"] for r in rows if r["phase"] == b"attention")
            experts = 1e3 * sum(r["end"] - r["start"] for r in rows if r["phase"] == b"experts")
            span = rows["end"][rows["phase"] == b"step"].sum() - rows["start"][rows["phase"] == b"step"].sum()
            busy = length(union([(r["start"], r["end"]) for r in rows if is_compute(r["phase"])])) / max(span, 1e-9)
            tokens = tokens_share[step]
            features.append([tokens, m.hidden, slots[step, rank], busy, machine["memory_bandwidth"]])
            targets.append([attention, experts])
            flops = (2 * tokens * attention_params * m.num_layers, 2 * slots[step, rank] * expert_params * m.moe_layers)
            weights = (attention_params * m.num_layers * (tokens > 0), expert_params * m.moe_layers * (slots[step, rank] > 0))
            roofline.append([1e3 * (fl / (machine["peak_gflops"] * 1e9) + itemsize * w / (machine["memory_bandwidth"] * 1e9))
                             for fl, w in zip(flops, weights)])
    return np.array(features, float), np.array(targets, float), np.array(roofline, float)


def attention_tokens(config, prompt_lengths: np.ndarray, rank: int, ranks: int) -> list[float]:
    """Per step: tokens `rank` ran attention for, times its share of the heads (0 on MoE ranks)."""
    from hpcmoe.layout import MALayout, ParallelLayout, request_range
    batch, steps = len(prompt_lengths), config.run.max_new_tokens
    layout = ParallelLayout.from_config(config, ranks)
    if isinstance(layout, MALayout):
        if not layout.is_attention(rank):
            return [0.0] * steps
        requests, share = layout.group_requests(batch, rank), 1.0 / len(layout.primaries(rank))
    else:
        requests, share = request_range(batch, ranks, rank), 1.0
    prefill = float(prompt_lengths[list(requests)].sum()) if len(requests) else 0.0
    return [share * prefill] + [share * len(requests)] * (steps - 1)


class Predictor(nn.Module):
    """5 -> 64 -> 32 -> 2 on log-scaled, standardized features; outputs log1p milliseconds."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
        self.register_buffer("mean", torch.zeros(5))
        self.register_buffer("std", torch.ones(5))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((torch.log1p(features) - self.mean) / self.std)

    def predict_ms(self, features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.expm1(self(torch.tensor(features, dtype=torch.float32)).clamp(min=0).numpy())


def train(features: np.ndarray, targets: np.ndarray, epochs: int = 3000, seed: int = 0) -> Predictor:
    torch.manual_seed(seed)
    model = Predictor()
    x, y = torch.tensor(features, dtype=torch.float32), torch.log1p(torch.tensor(targets, dtype=torch.float32))
    logs = torch.log1p(x)
    model.mean.copy_(logs.mean(0))
    model.std.copy_(logs.std(0).clamp(min=1e-3))  # a constant feature (one machine's bandwidth) stays harmless
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
    return model.eval()


def relative_error(predicted: np.ndarray, measured: np.ndarray) -> list[float]:
    """Per target: total |predicted - measured| / total measured (samples with no such work count as zero)."""
    return [float(np.abs(predicted[:, i] - measured[:, i]).sum() / max(measured[:, i].sum(), 1e-12))
            for i in range(measured.shape[1])]


def propose(model: Predictor, config, ranks: int, machine: dict, threshold: float = 0.05) -> dict:
    """Best attention:MoE split of `ranks` for a config's workload (prefill step) by predicted times.

    Attention work divides over attention ranks (head shards), expert work over MoE ranks; the
    split that minimizes the slower side wins. Rebalancing is flagged when the two sides of the
    chosen split differ by more than `threshold`."""
    m = config.model
    tokens = float(sum(map(len, config.prompts)))
    slots = tokens * m.top_k
    options = []
    for attention in range(1, ranks):
        moe = ranks - attention
        if moe > m.num_experts or attention > m.heads:
            continue
        features = np.array([[tokens / attention, m.hidden, slots / moe, 1.0, machine["memory_bandwidth"]]])
        t_attention, t_moe = model.predict_ms(features)[0]
        options.append((max(t_attention, t_moe), attention, moe, t_attention, t_moe))
    if not options:
        raise ValueError(f"no attention:MoE split of {ranks} ranks fits {m.heads} heads and {m.num_experts} experts")
    _, attention, moe, t_attention, t_moe = min(options)
    mismatch = abs(t_attention - t_moe) / max(t_attention, t_moe, 1e-12)
    return {"attention_ranks": attention, "moe_ranks": moe, "predicted_attention_ms": float(t_attention),
            "predicted_moe_ms": float(t_moe), "mismatch": float(mismatch), "rebalance": bool(mismatch > threshold),
            "heads_per_rank": [len(r) for r in split_heads(m.heads, attention)]}


def command_train(runs: list[str], out: str, test: list[str], epochs: int) -> dict:
    """Train on `runs`, save to `out`, report the error on `test` runs beside the roofline's."""
    machine = machine_profile()
    x, y, _ = map(np.concatenate, zip(*(samples_from_run(r, machine) for r in runs)))
    model = train(x, y, epochs)
    torch.save({"state_dict": model.state_dict(), "machine": machine, "trained_on": runs}, out)
    report = {"samples": len(x), "train_error": relative_error(model.predict_ms(x), y)}
    print(f"hpcmoe predict: trained on {len(x)} (rank, step) samples of {len(runs)} runs -> {out}")
    if test:
        tx, ty, roof = map(np.concatenate, zip(*(samples_from_run(r, machine) for r in test)))
        report["test_error"] = relative_error(model.predict_ms(tx), ty)
        report["roofline_error"] = relative_error(roof, ty)
        print(f"  on {len(test)} unseen runs ({len(tx)} samples), total relative error:")
        for i, name in enumerate(TARGETS):
            print(f"    {name:<13} predictor {report['test_error'][i]:.3f}   roofline {report['roofline_error'][i]:.3f}")
    return report


def load(path: str) -> tuple[Predictor, dict]:
    saved = torch.load(path, weights_only=False)
    model = Predictor()
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved["machine"]
