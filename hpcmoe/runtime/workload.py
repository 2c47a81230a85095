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


def check_positions(where: str, prompt: int, new_tokens: int, max_positions: int | None) -> None:
    """A prompt of `prompt` tokens and `new_tokens` more fit in the model's positions (model.max_positions)."""
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


def decode(checkpoint: str | None, ids) -> str | None:
    """Token ids (a request's generated tokens, -1 padding dropped) -> text, or None without a tokenizer."""
    found = tokenizer_path(checkpoint)
    if found is None:
        return None
    return load_tokenizer(found).decode([int(t) for t in ids if t >= 0], skip_special_tokens=False)


def eos_ids(checkpoint: str | None) -> tuple[int, ...]:
    """The checkpoint's end-of-sequence token id(s): generation_config.json, else config.json."""
    from hpcmoe.model.checkpoint import read_config

    names = [
        name
        for name in ("generation_config.json", "config.json")
        if checkpoint and os.path.exists(os.path.join(checkpoint, name))
    ]
    for name in names:
        value = read_config(checkpoint, name).get("eos_token_id")
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
        ):
            raise ValueError(
                f"model.checkpoint: {os.path.join(checkpoint, name)}: eos_token_id is {value!r}; "
                f"expected a token id or a list of them (integers >= 0)"
            )
        if value is not None:
            return tuple(ids)
    return ()


# ---------------------------------------------------------------- choosing the next token


def choose(logits: np.ndarray, request_ids: list[str], positions: list[int], sampling) -> np.ndarray:
    """logits: [b, vocab] float32 on the host -> [b] token ids. Greedy (the largest logit, ties to the
    lower index) without `sampling` or at temperature 0; otherwise top-k, then top-p (the smallest set
    of most likely tokens whose probability reaches p), then a draw by the Gumbel-max rule with noise
    from a generator seeded by (seed, request id, position: the index of the token in its request):
    a request's draw never depends on which rank, micro-batch or step it ran in, or on the others."""
    if sampling is None or sampling.temperature == 0 or len(logits) == 0:
        return logits.argmax(axis=-1)
    chosen = np.empty(len(logits), dtype=np.int64)
    for row, (scores, request_id, position) in enumerate(
        zip(logits.astype(np.float64), request_ids, positions)
    ):
        scores = scores / sampling.temperature
        keep = np.ones(len(scores), dtype=bool)
        if sampling.top_k:
            kth = np.sort(scores)[-min(sampling.top_k, len(scores))]
            keep &= scores >= kth
        if sampling.top_p is not None and sampling.top_p < 1:
            order = np.argsort(-np.where(keep, scores, -np.inf), kind="stable")
            probs = np.exp(scores[order] - scores[order[0]]) * keep[order]
            probs /= probs.sum()
            before = np.cumsum(probs) - probs  # probability of the more likely tokens
            keep[order[before >= sampling.top_p]] = False  # the most likely token always stays
        noise = gumbel(sampling.seed, request_id, position, len(scores))
        chosen[row] = int(np.argmax(np.where(keep, scores + noise, -np.inf)))
    return chosen


def gumbel(seed: int, request_id: str, position: int, size: int) -> np.ndarray:
    digest = hashlib.sha256(f"{seed}/{request_id}/{position}".encode()).digest()
    uniform = np.random.default_rng(int.from_bytes(digest[:8], "little")).random(size)
    return -np.log(-np.log(np.clip(uniform, 1e-300, 1.0)))


# ---------------------------------------------------------------- resuming a stopped run


@dataclass
class Done:
    """What a run has done: which requests ended, and the tokens of those it stopped on the way
    (they go on from there: a resumed run, or the survivors after a dead rank)."""

    finished: np.ndarray  # [requests] bool
    partial: dict[int, list[int]]  # request index -> the tokens it had made


@dataclass(frozen=True)
class Resume:
    """What a partial run file holds: the steps it ran, the requests it finished or stopped."""

    path: str
    step: int  # steps done: the resumed run starts here
    done: Done
    routing: np.ndarray  # [step, moe_layers, ranks, experts]
    traffic: np.ndarray  # [step, moe_layers, ranks, ranks]


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


def read_partial(path: str, config, world_size: int) -> Resume:
    """The partial file of an earlier run of the same config, prompts and checkpoint (the config as
    it ran: device and dtype resolved). Each mismatch is one line naming it."""
    import h5py
    import yaml

    where = f"--resume {path}"
    try:
        with h5py.File(path, "r", locking=False) as f:
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
            theirs = flat_settings(saved_settings(f.attrs["config"], where))
            identity = {name: f.attrs[name] for name in ("prompts_sha256", "checkpoint_sha256")}
            # stopped by a signal: its steps and stopped requests go on; killed (a NAME.h5.tmp): the
            # requests it had finished are kept, the others start again, and so do the steps' statistics
            step = int(f.attrs["stopped_at_step"]) if "stopped_at_step" in f.attrs else 0
            ranks = int(f.attrs["world_size"])
            rows = f["requests"]
            reasons, indices = rows["finish_reason"][:], rows["index"][:]
            stopped = np.flatnonzero(reasons == b"stop")
            partial = {int(indices[i]): [int(t) for t in rows["completion_ids"][i]] for i in stopped}
            finished = np.zeros(len(config.requests), bool)
            ended = indices[reasons != b"stop"]
            if len(ended) and ended.max() >= len(finished):
                raise ValueError(
                    f"{where}: it holds request {ended.max()} but the prompts have {len(finished)}"
                )
            finished[ended] = True
            resume = Resume(path, step, Done(finished, partial), f["routing"][:step], f["traffic"][:step])
    except OSError as e:
        raise ValueError(f"{where}: cannot read it ({e})") from None
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
    if ranks != world_size:  # the statistics' rank axes must line up
        raise ValueError(f"{where}: that run had {ranks} ranks, this one has {world_size}")
    return resume
