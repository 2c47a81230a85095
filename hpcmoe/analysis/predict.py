"""Time predictor (seed 002): an MLP 5 -> 64 -> 32 -> 2 from the workload to the attention and
MoE time of one rank in one step, trained on the /timings of earlier run files (their samples:
run_samples.py); saved and loaded as plain tensors; `hpcmoe predict train`. Scoring is by run: the
runs a predictor is scored on are never among those it was trained on.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hpcmoe.analysis.run_samples import (
    TARGETS,
    check_run_files,
    fitted_ranges,
    machine_profile,
    samples_from_run,
)


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
    # a constant feature (one machine's bandwidth) stays harmless
    model.std.copy_(logs.std(0).clamp(min=1e-3))
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
            errors = report["test_error"][i], report["roofline_error"][i]
            print(f"    {name:<13} predictor {errors[0]:.3f}   roofline {errors[1]:.3f}")
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
