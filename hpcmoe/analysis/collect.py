"""`hpcmoe predict collect`: the timing runs a predictor is trained and scored on, each a whole
`mpiexec` run of one attention:MoE split, batch and prompt length on this machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from hpcmoe.analysis.ma_split import splits


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
    from hpcmoe.config import load_config
    from hpcmoe.progress import Progress

    os.makedirs(out, exist_ok=True)
    mpiexec = (
        shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec") or "mpiexec"
    )
    config = load_config(
        config_path, settings + ["parallel.layout=ma", "parallel.attention_ranks=1", "parallel.moe_ranks=1"]
    )
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
        run_settings = settings + [
            "parallel.layout=ma",
            f"parallel.attention_ranks={attention}",
            f"parallel.moe_ranks={moe}",
            f"run.batch={batch}",
            f"run.prompt_len={prompt_len}",
            f"run.prompt_len_min={prompt_len}",
            f"run.max_new_tokens={steps}",
        ]
        if timing_run(run_command(mpiexec, n, config_path, run_settings, timeout), path):
            written.append(path)
    return written


def run_command(
    mpiexec: str, n: int, config_path: str | None, settings: list[str], timeout: int
) -> list[str]:
    """`hpcmoe run` on `n` ranks under `timeout` seconds, the config and its --set settings."""
    command = ["timeout", str(timeout), mpiexec, "-n", str(n), sys.executable, "-m", "hpcmoe", "run"]
    command += [config_path] if config_path else []
    for setting in settings:
        command += ["--set", setting]
    return command


def timing_run(command: list[str], path: str) -> bool:
    """Run `command` writing `path` (replaced: the directory is collect's own, its runs are redone on
    purpose); one line either way -> whether it wrote the file."""
    started = time.perf_counter()
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
        return False
    print(f"hpcmoe predict collect: {path} ({time.perf_counter() - started:.0f} s)", flush=True)
    return True
