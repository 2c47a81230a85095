"""The checkpoint's tokenizer (tokenizer.json, read by the `tokenizers` library) and its
end-of-sequence ids: text in (a prompt file's text prompts), text out (a run's completions), and
where a request ends. Apart from the requests so that the run file and reports can decode
without reading any prompt.
"""

from __future__ import annotations

import functools
import os


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
