"""A run's requests and where they come from: a JSONL prompt file (text through the checkpoint's
own tokenizer, or token ids), explicit token ids, or the seeded synthetic workload; and what a run
has done with them (Done). Every request is checked on every rank before any communicator exists,
so a bad prompt file fails with one line naming the file and line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from hpcmoe.workload.tokenizer import load_tokenizer, tokenizer_path


def check_positions(where: str, prompt: int, new_tokens: int, max_positions: int | None) -> None:
    """A prompt of `prompt` tokens and `new_tokens` more fit in the model's positions
    (model.max_positions)."""
    if max_positions is not None and prompt + new_tokens > max_positions:
        raise ValueError(
            f"{where}: prompt of {prompt} tokens + {new_tokens} new tokens exceeds the model's "
            f"{max_positions} positions (model.max_positions)"
        )


def synthetic_prompts(run, vocab: int) -> list[list[int]]:
    """Seeded random prompts, lengths uniform in [prompt_len_min, prompt_len]; same on every rank."""
    import random

    rng = random.Random(run.seed)
    shortest = run.prompt_len if run.prompt_len_min is None else run.prompt_len_min
    lengths = [rng.randint(shortest, run.prompt_len) for _ in range(run.batch)]
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@dataclass(frozen=True)
class Request:
    id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    prompt: str | None = None  # the prompt's text, when it came as text


class RequestList:
    """The run's requests in order, held whole (run.prompt_ids or the synthetic workload: small).
    Also the interface of PromptFile: len, [i], prompt_lengths, max_new_tokens, sha256."""

    def __init__(self, requests: list[Request]):
        self.items = requests
        self.prompt_lengths = np.array([len(r.prompt_ids) for r in requests], np.int64)
        self.max_new_tokens = np.array([r.max_new_tokens for r in requests], np.int64)
        digest = hashlib.sha256()
        for r in requests:
            digest.update(json.dumps([r.id, list(r.prompt_ids), r.max_new_tokens]).encode() + b"\n")
        self.sha256 = digest.hexdigest()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Request:
        return self.items[i]


class PromptFile:
    """A JSONL prompt file, read as a stream: checked line by line once (every rank, before any
    communicator exists; errors name the file and line), keeping 24 bytes per request (where its
    line starts, its prompt length and token limit) and the file's sha256; a request is read again
    from its line when the run admits it, so a million prompts cost megabytes, not gigabytes."""

    def __init__(
        self,
        path: str,
        checkpoint: str | None,
        default_new_tokens: int,
        max_positions: int | None,
        vocab: int | None = None,
    ):
        self.path, self.checkpoint, self.default_new_tokens = path, checkpoint, default_new_tokens
        self.max_positions, self.vocab = max_positions, vocab
        offsets, lengths, limits, seen = [], [], [], set()
        digest, offset = hashlib.sha256(), 0
        try:
            with open(path, "rb") as f:
                for number, raw in enumerate(f, 1):
                    digest.update(raw)
                    if raw.strip():
                        request = self.parse(raw, number)
                        if request.id in seen:
                            raise ValueError(f"run.prompts: {path}:{number}: id {request.id!r} appears twice")
                        seen.add(request.id)
                        offsets.append(offset)
                        lengths.append(len(request.prompt_ids))
                        limits.append(request.max_new_tokens)
                    offset += len(raw)
        except OSError as e:
            raise ValueError(f"run.prompts: cannot read {path}: {e.strerror}") from None
        if not offsets:
            raise ValueError(f"run.prompts: {path} holds no prompts")
        self.offsets = np.array(offsets, np.int64)
        self.prompt_lengths, self.max_new_tokens = np.array(lengths, np.int64), np.array(limits, np.int64)
        self.sha256 = digest.hexdigest()

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Request:
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            return self.parse(f.readline(), None)

    def parse(self, raw: bytes, number: int | None) -> Request:
        """One line -> its Request; errors name the file and line (number None: a line read again)."""
        where = f"run.prompts: {self.path}:{number}" if number else f"run.prompts: {self.path}"
        try:
            item = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
        unknown = set(item) - {"id", "prompt", "prompt_ids", "max_new_tokens"}
        if unknown:
            raise ValueError(
                f"{where}: unknown field {sorted(unknown)[0]!r}; expected id, prompt or prompt_ids, "
                f"max_new_tokens"
            )
        if "id" not in item:
            raise ValueError(f"{where}: missing field 'id'")
        request_id = str(item["id"])
        if "\0" in request_id:
            raise ValueError(f"{where}: the id holds a NUL character")
        if ("prompt" in item) == ("prompt_ids" in item):
            raise ValueError(f"{where}: expected exactly one of 'prompt' (text) and 'prompt_ids' (token ids)")
        if "prompt" in item:
            if not isinstance(item["prompt"], str):
                raise ValueError(f"{where}: 'prompt' must be a string")
            found = tokenizer_path(self.checkpoint)
            if found is None:
                raise ValueError(
                    f"{where}: a text prompt needs a tokenizer: model.checkpoint "
                    f"{'has no tokenizer.json' if self.checkpoint else 'is not set'}; give prompt_ids"
                )
            ids = load_tokenizer(found).encode(item["prompt"]).ids if item["prompt"] else []
        else:
            ids = item["prompt_ids"]
            if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids
            ):
                raise ValueError(f"{where}: 'prompt_ids' must be a list of token ids (integers >= 0)")
        if not ids:
            raise ValueError(f"{where}: empty prompt")
        if self.vocab is not None and max(ids) >= self.vocab:
            raise ValueError(f"{where}: token id {max(ids)} is outside the vocabulary ({self.vocab})")
        new_tokens = item.get("max_new_tokens", self.default_new_tokens)
        if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 1:
            raise ValueError(f"{where}: 'max_new_tokens' must be an integer >= 1, got {new_tokens!r}")
        check_positions(where, len(ids), new_tokens, self.max_positions)
        return Request(request_id, tuple(ids), new_tokens, item.get("prompt"))


def requests_of(config):
    """The run's requests, in order: run.prompts (JSONL, streamed), run.prompt_ids, or the synthetic
    workload (a RequestList or a PromptFile: len, [i], prompt_lengths, max_new_tokens, sha256)."""
    r, m = config.run, config.model
    if r.prompts is not None:
        stat = os.stat(r.prompts) if os.path.exists(r.prompts) else None
        return prompt_file(
            r.prompts,
            stat and (stat.st_size, stat.st_mtime_ns),
            m.checkpoint,
            r.max_new_tokens,
            m.max_positions,
            m.vocab,
        )
    prompts = [list(p) for p in r.prompt_ids] if r.prompt_ids is not None else synthetic_prompts(r, m.vocab)
    return RequestList([Request(str(i), tuple(p), r.max_new_tokens) for i, p in enumerate(prompts)])


@functools.lru_cache(maxsize=8)
def prompt_file(path: str, version, checkpoint, default_new_tokens: int, max_positions, vocab) -> PromptFile:
    """Scanned once per process and version of the file (its size and mtime)."""
    return PromptFile(path, checkpoint, default_new_tokens, max_positions, vocab)


@dataclass
class Done:
    """What a run has done: which requests ended, and the tokens of those it stopped on the way
    (they go on from there: a resumed run, or the survivors after a dead rank)."""

    finished: np.ndarray  # [requests] bool
    partial: dict[int, list[int]]  # request index -> the tokens it had made
