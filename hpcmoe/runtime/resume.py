"""Resuming a stopped run: what a partial run file holds (Resume) and the check that it is a run of
the same config, prompts, checkpoint and rank count (read_partial). Apart from the workload because
it reads HDF5 and is used only by `hpcmoe run --resume`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcmoe.workload import Done, flat_settings, run_identity, saved_settings


@dataclass(frozen=True)
class Resume:
    """What a partial run file holds: the steps it ran, the requests it finished or stopped."""

    path: str
    step: int  # steps done: the resumed run starts here
    done: Done
    routing: np.ndarray  # [step, moe_layers, ranks, experts]
    traffic: np.ndarray  # [step, moe_layers, ranks, ranks]


def read_partial(path: str, config, world_size: int) -> Resume:
    """The partial file of an earlier run of the same config, prompts and checkpoint (the config as
    it ran: device and dtype resolved). Each mismatch is one line naming it."""
    import h5py

    where = f"--resume {path}"
    try:
        with h5py.File(path, "r", locking=False) as f:
            check_resumable(f, where)
            theirs = flat_settings(saved_settings(f.attrs["config"], where))
            identity = {name: f.attrs[name] for name in ("prompts_sha256", "checkpoint_sha256")}
            ranks = int(f.attrs["world_size"])
            resume = partial_state(f, path, where, len(config.requests))
    except OSError as e:
        raise ValueError(f"{where}: cannot read it ({e})") from None
    check_same_run(where, config, theirs, identity)
    if ranks != world_size:  # the statistics' rank axes must line up
        raise ValueError(f"{where}: that run had {ranks} ranks, this one has {world_size}")
    return resume


def check_resumable(f, where: str) -> None:
    """An open run file is partial and holds every attribute and dataset a resumed run reads."""
    if f.attrs.get("complete", False):
        raise ValueError(f"{where}: not a partial run file (it is complete)")
    missing = [
        name
        for name in ("complete", "config", "world_size", "prompts_sha256", "checkpoint_sha256")
        if name not in f.attrs
    ] + [f"/{name}" for name in ("requests", "routing", "traffic") if name not in f]
    missing += [
        f"/requests/{field}"
        for field in ("index", "finish_reason", "completion_ids")
        if "requests" in f and field not in f["requests"]
    ]
    if missing:
        raise ValueError(
            f"{where}: the file lacks {', '.join(missing)} (written by an older hpcmoe, or "
            f"not by hpcmoe run): it cannot be resumed"
        )


def partial_state(f, path: str, where: str, requests: int) -> Resume:
    """What the open run file's run had done, for a run of `requests` requests."""
    # stopped by a signal: its steps and stopped requests go on; killed (a NAME.h5.tmp): the
    # requests it had finished are kept, the others start again, and so do the steps' statistics
    step = int(f.attrs["stopped_at_step"]) if "stopped_at_step" in f.attrs else 0
    rows = f["requests"]
    reasons, indices = rows["finish_reason"][:], rows["index"][:]
    stopped = np.flatnonzero(reasons == b"stop")
    partial = {int(indices[i]): [int(t) for t in rows["completion_ids"][i]] for i in stopped}
    finished = np.zeros(requests, bool)
    ended = indices[reasons != b"stop"]
    if len(ended) and ended.max() >= len(finished):
        raise ValueError(f"{where}: it holds request {ended.max()} but the prompts have {len(finished)}")
    finished[ended] = True
    return Resume(path, step, Done(finished, partial), f["routing"][:step], f["traffic"][:step])


def check_same_run(where: str, config, theirs: dict, identity: dict) -> None:
    """The earlier run's settings (flat_settings) and identity (run_identity) are this config's."""
    import yaml

    mine = flat_settings(yaml.safe_load(config.to_yaml()))
    differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differing:
        shown = ", ".join(f"{k} ({theirs.get(k)!r} there, {mine.get(k)!r} here)" for k in differing[:6])
        raise ValueError(f"{where}: that run had another config: {shown}")
    now = run_identity(config)
    if identity["prompts_sha256"] != now["prompts_sha256"]:
        raise ValueError(
            f"{where}: the prompts changed since that run ({config.run.prompts or 'run.prompt_ids'}: "
            f"sha256 {now['prompts_sha256'][:12]}, that run's {identity['prompts_sha256'][:12]})"
        )
    if identity["checkpoint_sha256"] != now["checkpoint_sha256"]:
        raise ValueError(
            f"{where}: the checkpoint changed since that run ({config.model.checkpoint}: its config, "
            f"tokenizer or safetensors headers differ)"
        )
