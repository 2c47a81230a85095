"""What a run generates for: its requests (a JSONL prompt file through the checkpoint's own
tokenizer, explicit token ids, or the seeded synthetic workload), when each one ends (its token
limit, end-of-sequence), and how the next token is chosen (greedy, or seeded sampling that gives
the same tokens at any rank count, layout or micro-batch count).

Pure Python and torch on the host: no MPI. Everything here is checked on every rank before any
communicator exists, so a bad prompt file fails with one line naming the file and line.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Request:
    id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int


def tokenizer_path(checkpoint: str | None) -> str | None:
    path = os.path.join(checkpoint, "tokenizer.json") if checkpoint else None
    return path if path and os.path.exists(path) else None


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """The checkpoint's tokenizer.json through the `tokenizers` library (no network, no transformers)."""
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # a file the library cannot read: one line, not a traceback
        raise ValueError(f"{path}: not a tokenizer the tokenizers library can read ({e})") from None


def requests_of(config) -> list[Request]:
    """The run's requests, in order: run.prompts (JSONL), run.prompt_ids, or the synthetic workload."""
    r, m = config.run, config.model
    if r.prompts is not None:
        return list(read_prompt_file(r.prompts, m.checkpoint, r.max_new_tokens, m.max_positions))
    from hpcmoe.config import synthetic_prompts
    prompts = [list(p) for p in r.prompt_ids] if r.prompt_ids is not None else synthetic_prompts(r, m.vocab)
    return [Request(str(i), tuple(p), r.max_new_tokens) for i, p in enumerate(prompts)]


@functools.lru_cache(maxsize=8)
def read_prompt_file(path: str, checkpoint: str | None, default_new_tokens: int,
                     max_positions: int | None) -> tuple[Request, ...]:
    """One JSON object per line: {"id": ..., "prompt": "text"} or {"id": ..., "prompt_ids": [...]},
    optionally "max_new_tokens". Errors name the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"run.prompts: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"run.prompts: {path} is not UTF-8 text") from None
    tokenizer = None
    requests, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"run.prompts: {path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
        unknown = set(item) - {"id", "prompt", "prompt_ids", "max_new_tokens"}
        if unknown:
            raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r}; expected id, prompt or prompt_ids, "
                             f"max_new_tokens")
        if "id" not in item:
            raise ValueError(f"{where}: missing field 'id'")
        request_id = str(item["id"])
        if request_id in seen:
            raise ValueError(f"{where}: id {request_id!r} appears twice")
        seen.add(request_id)
        if ("prompt" in item) == ("prompt_ids" in item):
            raise ValueError(f"{where}: expected exactly one of 'prompt' (text) and 'prompt_ids' (token ids)")
        if "prompt" in item:
            if not isinstance(item["prompt"], str):
                raise ValueError(f"{where}: 'prompt' must be a string")
            if tokenizer is None:
                found = tokenizer_path(checkpoint)
                if found is None:
                    raise ValueError(f"{where}: a text prompt needs a tokenizer: model.checkpoint "
                                     f"{'has no tokenizer.json' if checkpoint else 'is not set'}; give prompt_ids")
                tokenizer = load_tokenizer(found)
            ids = tokenizer.encode(item["prompt"]).ids if item["prompt"] else []
        else:
            ids = item["prompt_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                    for t in ids):
                raise ValueError(f"{where}: 'prompt_ids' must be a list of token ids (integers >= 0)")
        if not ids:
            raise ValueError(f"{where}: empty prompt")
        new_tokens = item.get("max_new_tokens", default_new_tokens)
        if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 1:
            raise ValueError(f"{where}: 'max_new_tokens' must be an integer >= 1, got {new_tokens!r}")
        if max_positions is not None and len(ids) + new_tokens > max_positions:
            raise ValueError(f"{where}: prompt of {len(ids)} tokens + {new_tokens} new tokens exceeds the model's "
                             f"{max_positions} positions")
        requests.append(Request(request_id, tuple(ids), new_tokens))
    if not requests:
        raise ValueError(f"run.prompts: {path} holds no prompts")
    return tuple(requests)


def check_vocabulary(requests: list[Request], vocab: int) -> None:
    for r in requests:
        if max(r.prompt_ids) >= vocab:
            raise ValueError(f"request {r.id!r}: token id {max(r.prompt_ids)} is outside the vocabulary ({vocab})")


def decode(checkpoint: str | None, ids) -> str | None:
    """Token ids (a request's generated tokens, -1 padding dropped) -> text, or None without a tokenizer."""
    found = tokenizer_path(checkpoint)
    if found is None:
        return None
    return load_tokenizer(found).decode([int(t) for t in ids if t >= 0], skip_special_tokens=False)


def eos_ids(checkpoint: str | None) -> tuple[int, ...]:
    """The checkpoint's end-of-sequence token id(s): generation_config.json, else config.json."""
    if not checkpoint:
        return ()
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(checkpoint, name)
        if os.path.exists(path):
            with open(path) as f:
                value = json.load(f).get("eos_token_id")
            if value is not None:
                return tuple(value) if isinstance(value, list) else (int(value),)
    return ()


# ---------------------------------------------------------------- choosing the next token

def choose(logits: np.ndarray, request_ids: list[str], step: int, sampling) -> np.ndarray:
    """logits: [b, vocab] float32 on the host -> [b] token ids. Greedy (the largest logit, ties to the
    lower index) without `sampling` or at temperature 0; otherwise top-k, then top-p (the smallest set
    of most likely tokens whose probability reaches p), then a draw by the Gumbel-max rule with noise
    from a generator seeded by (seed, request id, step): a request's draw never depends on which rank
    or micro-batch it ran in, or on the other requests."""
    if sampling is None or sampling.temperature == 0 or len(logits) == 0:
        return logits.argmax(axis=-1)
    chosen = np.empty(len(logits), dtype=np.int64)
    for row, (scores, request_id) in enumerate(zip(logits.astype(np.float64), request_ids)):
        scores = scores / sampling.temperature
        keep = np.ones(len(scores), dtype=bool)
        if sampling.top_k:
            kth = np.sort(scores)[-min(sampling.top_k, len(scores))]
            keep &= scores >= kth
        if sampling.top_p is not None and sampling.top_p < 1:
            order = np.argsort(-np.where(keep, scores, -np.inf), kind="stable")
            probs = np.exp(scores[order] - scores[order[0]]) * keep[order]
            probs /= probs.sum()
            before = np.cumsum(probs) - probs            # probability of the more likely tokens
            keep[order[before >= sampling.top_p]] = False  # the most likely token always stays
        noise = gumbel(sampling.seed, request_id, step, len(scores))
        chosen[row] = int(np.argmax(np.where(keep, scores + noise, -np.inf)))
    return chosen


def gumbel(seed: int, request_id: str, step: int, size: int) -> np.ndarray:
    digest = hashlib.sha256(f"{seed}/{request_id}/{step}".encode()).digest()
    uniform = np.random.default_rng(int.from_bytes(digest[:8], "little")).random(size)
    return -np.log(-np.log(np.clip(uniform, 1e-300, 1.0)))


# ---------------------------------------------------------------- resuming a stopped run

@dataclass(frozen=True)
class Resume:
    """What a partial run file holds: the steps it finished, and their tokens and statistics."""
    path: str
    step: int                    # steps done: the resumed run starts here
    generated: np.ndarray        # [batch, step] int64, -1 after a request ended
    logits: np.ndarray | None    # [batch, step, vocab] when the partial run saved them
    routing: np.ndarray          # [step, moe_layers, ranks, experts]
    traffic: np.ndarray          # [step, moe_layers, ranks, ranks]


def flat_settings(config) -> dict:
    """The config as dotted keys; output.*, the testing knobs (run.fail_*, run.stall_rank,
    run.signal_at_step) and run.fault_tolerance are left out: a resumed run writes where it is told,
    on whichever MPI."""
    import dataclasses

    def walk(value, prefix):
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                yield from walk(getattr(value, f.name), f"{prefix}{f.name}.")
        else:
            yield prefix[:-1], value
    testing = ("output.", "run.fail_", "run.stall_", "run.signal_", "run.kill", "run.fault_tolerance",
               "run.rebuild_slots")
    return {k: v for k, v in walk(config, "") if not k.startswith(testing)}


def read_partial(path: str, config, world_size: int) -> Resume:
    """The partial file of an earlier run of the same config (as it ran: device and dtype resolved)."""
    import h5py
    import yaml
    from hpcmoe.config import build_config
    try:
        with h5py.File(path, "r", locking=False) as f:
            if f.attrs.get("complete", True) or "stopped_at_step" not in f.attrs:
                raise ValueError(f"--resume {path}: not a partial run file (complete, or not stopped by a signal)")
            earlier = build_config(yaml.safe_load(f.attrs["config"]))
            step = int(f.attrs["stopped_at_step"])
            ranks = int(f.attrs["world_size"])
            resume = Resume(path, step, f["generated"][:, :step], f["logits"][:, :step] if "logits" in f else None,
                            f["routing"][:step], f["traffic"][:step])
    except OSError as e:
        raise ValueError(f"--resume {path}: cannot read it ({e})") from None
    mine, theirs = flat_settings(config), flat_settings(earlier)
    differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differing:
        shown = ", ".join(f"{k} ({theirs.get(k)!r} there, {mine.get(k)!r} here)" for k in differing[:6])
        raise ValueError(f"--resume {path}: that run had another config: {shown}")
    if ranks != world_size:  # the statistics' rank axes must line up
        raise ValueError(f"--resume {path}: that run had {ranks} ranks, this one has {world_size}")
    return resume
