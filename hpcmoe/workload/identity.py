"""What ties a run file to its inputs, so that --resume can refuse another run's file: the config
as dotted settings (the testing knobs and output left out), the prompts' and the checkpoint's
sha256, and a run file's saved config read back.
"""

from __future__ import annotations

import hashlib
import os

TESTING_KEYS = (
    "output.",
    "run.fail_",
    "run.stall_",
    "run.signal_",
    "run.kill",
    "run.fault_tolerance",
    "run.rebuild_slots",
)


def flat_settings(settings: dict, prefix: str = "") -> dict:
    """A config as dotted keys (as YAML reads it back); output.*, the testing knobs (run.fail_*,
    run.stall_rank, run.signal_at_step, run.kill) and run.fault_tolerance are left out: a resumed
    run writes where it is told, on whichever MPI."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        elif not f"{prefix}{key}".startswith(TESTING_KEYS):
            flat[f"{prefix}{key}"] = value
    return flat


def checkpoint_sha256(checkpoint: str | None) -> str:
    """sha256 of what defines a checkpoint: config.json, generation_config.json, tokenizer.json, the
    safetensors index and every safetensors header (names, dtypes, shapes, offsets), not the weights'
    bytes (a re-saved or edited checkpoint changes its headers or sizes; reading terabytes would not do)."""
    if not checkpoint:
        return ""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if name in (
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "model.safetensors.index.json",
        ):
            with open(path, "rb") as f:
                digest.update(name.encode() + f.read())
        elif name.endswith(".safetensors"):
            with open(path, "rb") as f:
                head = f.read(8)
                size = int.from_bytes(head, "little") if len(head) == 8 else 0
                digest.update(
                    name.encode()
                    + head
                    + f.read(min(size, 100 * 2**20))
                    + str(os.path.getsize(path)).encode()
                )
    return digest.hexdigest()


def run_identity(config) -> dict:
    """Root attributes that tie a run file to its inputs (checked by --resume)."""
    return {
        "prompts_sha256": config.requests.sha256,
        "checkpoint_sha256": checkpoint_sha256(config.model.checkpoint),
    }


def saved_settings(text, where: str) -> dict:
    """A run file's `config` attribute -> its mapping of sections; ValueError in one line otherwise."""
    import yaml

    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError:
        settings = None
    if not isinstance(settings, dict):
        raise ValueError(
            f"{where}: its config attribute is not a YAML mapping of sections (not written by "
            f"hpcmoe run?): it cannot be resumed"
        )
    return settings
