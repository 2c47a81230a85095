"""Time predictor (seed 002): an MLP 5 -> 64 -> 32 -> 2 from the workload to the attention and
MoE time of one rank in one step, trained on the /timings of earlier run files.

The features, one sample per (rank, step) of a run, all known before the step runs (none is
measured from the timings the targets come from; the seed's "utilization" was such a feature and
is replaced by the attended context):
  sequence_length  new tokens the rank ran attention for, times its share of the query heads
  context_length   positions those tokens attended to (summed over requests), times the share
  hidden_size      the model's hidden size
  active_experts   token slots the rank's experts processed (from /traffic)
  memory_bandwidth the machine's measured copy bandwidth, GB/s (constant on one machine)
targets: the rank's compute milliseconds in the step outside its experts (attention with the
norms, embedding, dense layers, routing and LM head that go with it: what an attention rank does)
and inside them (what a MoE rank does). A roofline estimate
(FLOPs / peak + weight bytes / bandwidth, both measured here) is reported beside it. Scoring is
by run: the runs a predictor is scored on are never among those it was trained on.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import yaml
from torch import nn

from hpcmoe.config import build_config
from hpcmoe.model.attention import split_heads
from hpcmoe.runfile.metrics import is_compute, length, union

FEATURES = ("sequence_length", "context_length", "hidden_size", "active_experts", "memory_bandwidth")
TARGETS = ("attention_ms", "moe_ms")


def machine_profile() -> dict[str, float]:
    """Copy bandwidth (GB/s), single-thread float32 matmul rate (GFLOP/s) and cores of this machine."""
    a = np.ones(2**24, np.float32)
    start = time.perf_counter()
    for _ in range(5):
        b = a.copy()
    bandwidth = 5 * 2 * a.nbytes / (time.perf_counter() - start) / 1e9
    x = torch.randn(512, 512)
    start = time.perf_counter()
    for _ in range(10):
        x @ x
    peak = 10 * 2 * 512**3 / (time.perf_counter() - start) / 1e9
    del b
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"memory_bandwidth": bandwidth, "peak_gflops": peak, "cores": cores}


def samples_from_run(path: str, machine: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (features [n, 5], targets [n, 2] ms, roofline [n, 2] ms) for every (rank, step) of a run file."""
    import h5py

    with h5py.File(path, "r") as f:
        config = build_config(yaml.safe_load(f.attrs["config"]))
        timings, traffic = f["timings"][:], f["traffic"][:]
        prompt_lengths = f["prompt_lengths"][:]
    m = config.model
    # the steps that made tokens (the file may hold a row beyond them: the last record's)
    ranks, steps = traffic.shape[2], min(traffic.shape[0], config.run.max_new_tokens)
    itemsize = 4 if m.dtype_name == "float32" else 2
    row_bytes = m.hidden * itemsize
    slots = traffic.sum(axis=(1, 2)) / row_bytes  # [steps, ranks] token slots received
    attention_params = m.hidden * (2 * m.heads + 2 * m.kv_heads) * m.head_dim
    expert_params = 3 * m.hidden * m.expert_hidden
    features, targets, roofline = [], [], []
    for rank in range(ranks):
        tokens_share, context_share = attention_tokens(config, prompt_lengths, rank, ranks)
        for step in range(steps):
            rows = timings[(timings["rank"] == rank) & (timings["step"] == step)]
            busy = length(union([(r["start"], r["end"]) for r in rows if is_compute(r["phase"])]))
            experts = 1e3 * length(union([(r["start"], r["end"]) for r in rows if r["phase"] == b"experts"]))
            attention = 1e3 * busy - experts
            tokens = tokens_share[step]
            features.append(
                [tokens, context_share[step], m.hidden, slots[step, rank], machine["memory_bandwidth"]]
            )
            targets.append([attention, experts])
            flops = (
                2 * tokens * attention_params * m.num_layers,
                2 * slots[step, rank] * expert_params * m.moe_layers,
            )
            weights = (
                attention_params * m.num_layers * (tokens > 0),
                expert_params * m.moe_layers * (slots[step, rank] > 0),
            )
            roofline.append(
                [
                    1e3
                    * (
                        fl / (machine["peak_gflops"] * 1e9)
                        + itemsize * w / (machine["memory_bandwidth"] * 1e9)
                    )
                    for fl, w in zip(flops, weights)
                ]
            )
    return np.array(features, float), np.array(targets, float), np.array(roofline, float)


def attention_tokens(
    config, prompt_lengths: np.ndarray, rank: int, ranks: int
) -> tuple[list[float], list[float]]:
    """Per step: (new tokens `rank` ran attention for, positions they attended to), each times the
    rank's share of the heads (0 on MoE ranks)."""
    from hpcmoe.parallel.layout import MALayout, ParallelLayout

    batch, steps = len(prompt_lengths), config.run.max_new_tokens
    layout = ParallelLayout.from_config(config, ranks)
    if isinstance(layout, MALayout):
        if not layout.is_attention(rank):
            return [0.0] * steps, [0.0] * steps
        requests, share = layout.group_requests(batch, rank), 1.0 / len(layout.primaries(rank))
    else:
        requests, share = range(rank, batch, ranks), 1.0
    lengths = prompt_lengths[list(requests)].astype(float)
    tokens = [share * lengths.sum()] + [share * len(lengths)] * (steps - 1)
    context = [share * (lengths * (lengths + 1) / 2).sum()] + [
        share * (lengths + step).sum() for step in range(1, steps)
    ]
    return tokens, context


class Predictor(nn.Module):
    """5 -> 64 -> 32 -> 2 on log-scaled, standardized features; outputs log1p milliseconds."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
        self.register_buffer("mean", torch.zeros(5))
        self.register_buffer("std", torch.ones(5))
        self.fitted_ranges: dict = {}  # of the runs it was trained on (fitted_ranges), as saved

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((torch.log1p(features) - self.mean) / self.std)

    def predict_ms(self, features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.expm1(self(torch.tensor(features, dtype=torch.float32)).clamp(min=0).numpy())


def train(features: np.ndarray, targets: np.ndarray, epochs: int = 3000, seed: int = 0) -> Predictor:
    torch.manual_seed(seed)
    model = Predictor()
    x, y = (
        torch.tensor(features, dtype=torch.float32),
        torch.log1p(torch.tensor(targets, dtype=torch.float32)),
    )
    logs = torch.log1p(x)
    model.mean.copy_(logs.mean(0))
    model.std.copy_(
        logs.std(0).clamp(min=1e-3)
    )  # a constant feature (one machine's bandwidth) stays harmless
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
    return model.eval()


def relative_error(predicted: np.ndarray, measured: np.ndarray) -> list[float]:
    """Per target: total |predicted - measured| / total measured (samples with no such work count as zero)."""
    return [
        float(np.abs(predicted[:, i] - measured[:, i]).sum() / max(measured[:, i].sum(), 1e-12))
        for i in range(measured.shape[1])
    ]


def split_features(config, attention: int, moe: int, machine: dict) -> np.ndarray:
    """The features of an attention rank and of a MoE rank of an attention:MoE split, for the prefill
    and for a decode step halfway through: -> [2 (prefill, decode), 2 (attention, MoE rank), 5]."""
    m, prompts, steps = config.model, config.prompts, config.run.max_new_tokens
    lengths = np.array(list(map(len, prompts)), float)
    share = 1.0 / attention  # every attention rank takes its share of the heads of all requests
    half = max(steps // 2, 1)
    rows = []
    for tokens, context in (
        (lengths.sum(), (lengths * (lengths + 1) / 2).sum()),
        (float(len(lengths)), (lengths + half).sum()),
    ):
        slots = tokens * m.top_k / moe
        rows.append(
            [
                [share * tokens, share * context, m.hidden, 0.0, machine["memory_bandwidth"]],
                [0.0, 0.0, m.hidden, slots, machine["memory_bandwidth"]],
            ]
        )
    return np.array(rows)


def step_ms(attention_ms: float, moe_ms: float, attention: int, moe: int, cores: int) -> float:
    """A step of a split: its slower side, or all ranks' work shared over the cores when they are fewer."""
    slower = max(attention_ms, moe_ms)
    if attention + moe <= cores:
        return slower
    return max(slower, (attention * attention_ms + moe * moe_ms) / cores)


def propose(model, config, ranks: int, machine: dict, threshold: float = 0.05) -> dict:
    """Best attention:MoE split of `ranks` for a config's workload by predicted times.

    Attention work divides over attention ranks (head shards), expert work over MoE ranks; a step
    takes as long as its slower side, or, when the ranks outnumber the machine's cores (a box where
    they share cores), as long as all ranks' work over the cores. Each split is scored by its
    predicted generation time (the prefill plus max_new_tokens - 1 decode steps taken halfway
    through), and the fastest wins.
    Rebalancing is flagged when the two sides of the chosen split's decode step differ by more
    than `threshold`. model: anything with predict_ms(features [n, 5]) -> [n, 2] milliseconds."""
    m = config.model
    options = []
    for attention in range(1, ranks):
        moe = ranks - attention
        if moe > m.num_experts or attention > m.heads:
            continue
        predicted = model.predict_ms(split_features(config, attention, moe, machine).reshape(-1, 5)).reshape(
            2, 2, 2
        )
        sides = [
            (predicted[phase, 0, 0], predicted[phase, 1, 1]) for phase in range(2)
        ]  # (attention, MoE) ms
        step = [step_ms(a, e, attention, moe, machine.get("cores", ranks)) for a, e in sides]
        total = step[0] + (config.run.max_new_tokens - 1) * step[1]
        options.append((total, attention, moe, *sides[1]))
    if not options:
        raise ValueError(
            f"no attention:MoE split of {ranks} ranks fits {m.heads} heads and {m.num_experts} experts"
        )
    total, attention, moe, t_attention, t_moe = min(options)
    mismatch = abs(t_attention - t_moe) / max(t_attention, t_moe, 1e-12)
    return {
        "attention_ranks": attention,
        "moe_ranks": moe,
        "predicted_attention_ms": float(t_attention),
        "predicted_moe_ms": float(t_moe),
        "predicted_total_ms": float(total),
        "mismatch": float(mismatch),
        "rebalance": bool(mismatch > threshold),
        "heads_per_rank": [len(r) for r in split_heads(m.heads, attention)],
        "options": {f"{a}:{e}": float(t) for t, a, e, *_ in sorted(options, key=lambda o: o[1])},
    }


def check_run_files(paths: list[str], what: str) -> None:
    """Every file a complete run file with what training reads, before any training: ValueError in one
    line naming the first that is not (a shell glob that matched nothing arrives as its pattern)."""
    import h5py

    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"{what}: {path}: no such file")
        try:
            with h5py.File(path, "r") as f:
                missing = [n for n in ("timings", "traffic", "prompt_lengths") if n not in f] + [
                    n for n in ("config",) if n not in f.attrs
                ]
                complete = bool(f.attrs.get("complete", False))
        except OSError:
            raise ValueError(f"{what}: {path}: not an HDF5 file") from None
        if missing or not complete:
            raise ValueError(
                f"{what}: {path}: not a complete hpcmoe run file "
                f"({'missing ' + ', '.join(missing) if missing else 'complete is not set'})"
            )


def command_train(runs: list[str], out: str, test: list[str], epochs: int) -> dict:
    """Train on `runs`, save to `out`, report the error on `test` runs beside the roofline's."""
    check_run_files(runs, "predict train")
    check_run_files(test, "predict train --test")
    machine = machine_profile()
    x, y, _ = map(np.concatenate, zip(*(samples_from_run(r, machine) for r in runs)))
    model = train(x, y, epochs)
    save(model, machine, runs, out, fitted_ranges(runs))
    report = {"samples": len(x), "train_error": relative_error(model.predict_ms(x), y)}
    print(f"hpcmoe predict: trained on {len(x)} (rank, step) samples of {len(runs)} runs -> {out}")
    if test:
        tx, ty, roof = map(np.concatenate, zip(*(samples_from_run(r, machine) for r in test)))
        report["test_error"] = relative_error(model.predict_ms(tx), ty)
        report["roofline_error"] = relative_error(roof, ty)
        print(f"  on {len(test)} unseen runs ({len(tx)} samples), total relative error:")
        for i, name in enumerate(TARGETS):
            print(
                f"    {name:<13} predictor {report['test_error'][i]:.3f}   roofline {report['roofline_error'][i]:.3f}"
            )
    return report


def save(model: Predictor, machine: dict, runs: list[str], out: str, ranges: dict | None = None) -> None:
    """ranges: fitted_ranges of the runs (auto splits outside them are warned about)."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "machine": machine,
            "trained_on": runs,
            "fitted_ranges": ranges or {},
        },
        out,
    )


def fitted_ranges(runs: list[str]) -> dict:
    """{ranks, batch, prompt_length: [lowest, highest]} over the training runs (their run files; the
    ranks from the timing rows where the file does not say)."""
    import h5py

    seen = {"ranks": [], "batch": [], "prompt_length": []}
    for path in runs:
        with h5py.File(path, "r") as f:
            seen["ranks"].append(
                int(f.attrs["world_size"])
                if "world_size" in f.attrs
                else len(np.unique(f["timings"]["rank"]))
            )
            seen["batch"].append(len(f["prompt_lengths"]))
            seen["prompt_length"].append(int(f["prompt_lengths"][:].max()))
    return {name: [min(values), max(values)] for name, values in seen.items()}


def load(path: str) -> tuple[Predictor, dict]:
    """A file of `save`: plain tensors, numbers and strings, read with torch.load(weights_only=True),
    which refuses any other object (unpickling one could run code); ValueError in one line otherwise."""
    import pickle
    import warnings

    where = f"parallel.predictor: {path}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on old pickle protocols: the error below says it
            saved = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{where}: refused: it holds more than plain tensors and numbers ({refusal(e)}), and "
            f"loading that could run code; make it again with `hpcmoe predict train`"
        ) from None
    except Exception as e:  # unreadable: one line, not a traceback
        raise ValueError(
            f"{where} is not a predictor from `hpcmoe predict train` ({first_line(e)})"
        ) from None
    model = Predictor()
    try:
        model.load_state_dict(saved["state_dict"])
    except Exception as e:  # another shape, or not a mapping
        raise ValueError(
            f"{where} is not a predictor from `hpcmoe predict train` ({first_line(e)})"
        ) from None
    machine, figures = saved.get("machine"), ("memory_bandwidth", "peak_gflops")  # of machine_profile
    if not isinstance(machine, dict) or not all(
        isinstance(machine.get(name), (int, float)) for name in figures
    ):
        raise ValueError(
            f"{where}: its machine figures ({', '.join(figures)}) are missing; make it again with "
            f"`hpcmoe predict train`"
        )
    model.fitted_ranges = saved.get("fitted_ranges", {})  # {} in a file saved before they were
    return model.eval(), machine


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def refusal(error: Exception) -> str:
    """torch's reason for refusing a file under weights_only, without its advice paragraphs."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    reasons = [
        line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith(advice)
    ]
    return (reasons or [first_line(error)])[0].rstrip(".")


def choose_split(config, world_size: int):
    """parallel.attention_ranks: auto -> the config with the chosen split of `world_size` ranks, and
    one line saying what chose it and why. parallel.predictor a machine file (YAML): every split is
    simulated on it with the engine's schedule (simulate_splits); a file of `hpcmoe
    predict train`: the trained predictor's times, with a warning outside the runs it was fitted on."""
    import dataclasses

    from hpcmoe.config import validate

    p = config.parallel
    if is_machine_file(p.predictor):
        proposal = simulate_splits(config, world_size, p.predictor)
        by = f"simulated on {p.predictor} (machine {proposal['machine']})"
        side = f"TPOT {proposal['predicted_tpot_ms']:.2f} ms"
        warning = ""
    else:
        model, machine = load(p.predictor)
        proposal = propose(model, config, world_size, machine)
        by = f"predicted by {p.predictor}"
        side = (
            f"its decode step: attention {proposal['predicted_attention_ms']:.2f} ms, "
            f"MoE {proposal['predicted_moe_ms']:.2f} ms"
        )
        warning = outside_training(p.predictor, model.fitted_ranges, config, world_size, proposal)
    chosen = dataclasses.replace(
        p, attention_ranks=proposal["attention_ranks"], moe_ranks=proposal["moe_ranks"]
    )
    config = dataclasses.replace(config, parallel=chosen)
    validate(config)
    options = ", ".join(f"{split} {ms:.1f} ms" for split, ms in proposal["options"].items())
    why = (
        f"hpcmoe: parallel.attention_ranks=auto: {proposal['attention_ranks']} attention : {proposal['moe_ranks']} "
        f"MoE ranks (heads per attention rank {proposal['heads_per_rank']}), the fastest generation {by} "
        f"({options}); {side}{warning}"
    )
    return config, why


def is_machine_file(path: str) -> bool:
    return path.endswith((".yaml", ".yml"))


def outside_training(path: str, fitted: dict, config, world_size: int, proposal: dict) -> str:
    """'' or a warning: a trained predictor's times for ranks, batch or prompt lengths outside the
    runs it was fitted on (`fitted`: its fitted_ranges) are extrapolated, and a predictor that
    answers the same time for every split tells nothing."""
    times = list(proposal["options"].values())
    if len(times) > 1 and max(times) - min(times) <= 1e-6 * max(max(times), 1e-12):
        raise ValueError(
            f"parallel.predictor: {path} predicts the same time ({times[0]:.1f} ms) for every split "
            f"of {world_size} ranks: it cannot choose; use a machine file (the simulator) or "
            f"set parallel.attention_ranks and moe_ranks"
        )
    if not fitted:
        return ""
    batch = len(config.requests)
    prompt = int(config.requests.prompt_lengths.max())
    outside = [
        f"{name} {value} (fitted on {low}..{high})"
        for name, value, (low, high) in (
            ("ranks", world_size, fitted["ranks"]),
            ("batch", batch, fitted["batch"]),
            ("prompt length", prompt, fitted["prompt_length"]),
        )
        if not low <= value <= high
    ]
    return ("; WARNING: outside the runs it was fitted on: " + ", ".join(outside)) if outside else ""


def splits(config, ranks: int) -> list[tuple[int, int]]:
    """Every attention:MoE split of `ranks` the model and layout allow."""
    m, p = config.model, config.parallel
    step = p.attention_replicas * (2 if p.attention_standby else 1)
    return [
        (a, ranks - a)
        for a in range(1, ranks)
        if a % step == 0 and a // step <= m.heads and ranks - a <= m.num_experts
    ]


def collect(
    config_path: str | None,
    settings: list[str],
    out: str,
    ranks: list[int],
    batches: list[int],
    prompt_lens: list[int],
    steps: int,
    timeout: int = 300,
    reuse: bool = False,
) -> list[str]:
    """Timing runs for training and scoring: every attention:MoE split of each rank count (so every
    heads-per-rank share) x batch x prompt length, each a whole `mpiexec` run on this machine.
    -> the run files written (one per run; a failed run is reported and skipped; with `reuse`, a
    complete run file already there is kept)."""
    import os
    import shutil
    import subprocess
    import sys

    from hpcmoe.config import load_config

    os.makedirs(out, exist_ok=True)
    mpiexec = (
        shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec") or "mpiexec"
    )
    config = load_config(
        config_path, settings + ["parallel.layout=ma", "parallel.attention_ranks=1", "parallel.moe_ranks=1"]
    )
    from hpcmoe.progress import Progress

    runs = [
        (n, attention, moe, batch, prompt_len)
        for n in ranks
        for attention, moe in splits(config, n)
        for batch in batches
        for prompt_len in prompt_lens
    ]
    progress = Progress("hpcmoe predict collect", len(runs), "runs", quiet_s=0.0, every_s=0.0)
    written = []
    for done, (n, attention, moe, batch, prompt_len) in enumerate(runs):
        progress.update(done)
        path = os.path.join(out, f"ma_n{n}_a{attention}_m{moe}_b{batch}_l{prompt_len}.h5")
        if reuse and os.path.exists(path):
            written.append(path)
            continue
        command = ["timeout", str(timeout), mpiexec, "-n", str(n), sys.executable, "-m", "hpcmoe", "run"]
        command += [config_path] if config_path else []
        for setting in settings + [
            "parallel.layout=ma",
            f"parallel.attention_ranks={attention}",
            f"parallel.moe_ranks={moe}",
            f"run.batch={batch}",
            f"run.prompt_len={prompt_len}",
            f"run.prompt_len_min={prompt_len}",
            f"run.max_new_tokens={steps}",
        ]:
            command += ["--set", setting]
        started = time.perf_counter()  # the directory is collect's own: its runs are redone on purpose
        result = subprocess.run(
            command + ["--output", path, "--overwrite"],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if result.returncode != 0:
            print(
                f"hpcmoe predict collect: {path} failed (exit {result.returncode}): "
                f"{result.stderr.strip().splitlines()[-1:] or ''}",
                flush=True,
            )
            continue
        written.append(path)
        print(f"hpcmoe predict collect: {path} ({time.perf_counter() - started:.0f} s)", flush=True)
    return written


def simulate_splits(config, ranks: int, machine_path: str, threshold: float = 0.05) -> dict:
    """`hpcmoe predict propose --machine M.yaml`: every attention:MoE split of `ranks` (predict.splits)
    simulated on the machine; the split whose run ends first (prefill and every decode step, each as
    the engine schedules it) -> predict.propose's keys, `rebalance` when the chosen split's attention
    and MoE ranks are busy for shares of the run more than `threshold` apart. Where the engine would
    batch a rank's requests in turns (run.max_batch, run.prefill_chunk) every split is still
    simulated with all of them from the first step: a ranking, not the run's time."""
    import dataclasses

    from hpcmoe.model.attention import split_heads
    from hpcmoe.sim.machine import load_machine
    from hpcmoe.sim.simulate import simulate

    machine, options = load_machine(machine_path), {}
    for attention, moe in splits(config, ranks):
        split = dataclasses.replace(config.parallel, layout="ma", attention_ranks=attention, moe_ranks=moe)
        metrics = simulate(dataclasses.replace(config, parallel=split), machine, ranks, one_batch=False)
        options[attention, moe] = metrics
    if not options:
        raise ValueError(
            f"no attention:MoE split of {ranks} ranks fits {config.model.heads} heads and "
            f"{config.model.num_experts} experts"
        )
    (attention, moe), best = min(options.items(), key=lambda item: item[1]["total_s"])
    busy = best["busy_fraction_attention"], best["busy_fraction_moe"]
    mismatch = abs(busy[0] - busy[1]) / max(*busy, 1e-12)
    return {
        "attention_ranks": attention,
        "moe_ranks": moe,
        "predicted_total_ms": 1e3 * best["total_s"],
        "predicted_tpot_ms": best["tpot_ms"],
        "busy_fraction_attention": busy[0],
        "busy_fraction_moe": busy[1],
        "mismatch": mismatch,
        "rebalance": bool(mismatch > threshold),
        "machine": machine.name,
        "heads_per_rank": [len(r) for r in split_heads(config.model.heads, attention)],
        "options": {f"{a}:{m}": 1e3 * metrics["total_s"] for (a, m), metrics in sorted(options.items())},
    }
