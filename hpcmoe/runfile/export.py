"""`hpcmoe export`: a run file's finished requests as JSON lines, read from its /requests group."""

from __future__ import annotations

import numpy as np


def export_jsonl(path: str, out: str) -> tuple[int, str]:
    """A run file's finished requests, in prompt-file order, one JSON object per line: id, index,
    prompt (text, or null for token ids), prompt_ids, completion (text, or null without a
    tokenizer), tokens, finish_reason, ttft_s, tokens_per_s. -> (requests written, a note when
    the file is not complete)."""
    import json
    import sys

    import h5py

    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it as a run file ({e})") from None
    with f:
        if "requests" not in f:
            raise ValueError(f"{path}: no /requests group (not a run file of hpcmoe run, or an older one)")
        rows = {name: f["requests"][name][:] for name in f["requests"]}
        from hpcmoe.workload import tokenizer_path

        tokenizer = tokenizer_path(_checkpoint_of(f)) is not None
        note = (
            ""
            if f.attrs.get("complete", False)
            else " (the run did not complete: the requests it had finished)"
        )
    stream = sys.stdout if out == "-" else open(out, "w", encoding="utf-8")
    try:
        for i in np.argsort(rows["index"], kind="stable"):
            prompt = bytes(rows["prompt_text"][i]).decode("utf-8")
            stream.write(
                json.dumps(
                    {
                        "id": rows["id"][i].decode(),
                        "index": int(rows["index"][i]),
                        "prompt": prompt or None,
                        "prompt_ids": rows["prompt_ids"][i].tolist(),
                        "completion": bytes(rows["text"][i]).decode("utf-8", "replace")
                        if tokenizer
                        else None,
                        "tokens": rows["completion_ids"][i].tolist(),
                        "finish_reason": rows["finish_reason"][i].decode(),
                        "ttft_s": float(rows["ttft_s"][i]),
                        "tokens_per_s": float(rows["tokens_per_s"][i]),
                    }
                )
                + "\n"
            )
    finally:
        if stream is not sys.stdout:
            stream.close()
    return len(rows["index"]), note


def _checkpoint_of(f) -> str | None:
    import yaml

    return (
        (yaml.safe_load(f.attrs["config"]).get("model") or {}).get("checkpoint")
        if "config" in f.attrs
        else None
    )
