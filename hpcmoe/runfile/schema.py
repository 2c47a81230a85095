"""The run file's schema: the dtypes of its tables, the fields of /requests, its root attributes
and the datasets it opens with. Every array carries its axis names in attribute `axes`. Apart from
the writer, which fills them, so that what a run file holds reads in one place.
"""

from __future__ import annotations

import datetime

import numpy as np

from hpcmoe import __version__

FAILURE_DTYPE = np.dtype(
    [
        ("rank", "i4"),
        ("step", "i4"),
        ("layer", "i4"),
        ("phase", "S24"),
        ("detected_at", "f8"),
        ("recovered_at", "f8"),
        ("action", "S96"),
    ]
)
TIMING_DTYPE = np.dtype(
    [
        ("rank", "i4"),
        ("layer", "i4"),
        ("micro_batch", "i4"),
        ("step", "i4"),
        ("phase", "S16"),
        ("start", "f8"),
        ("end", "f8"),
    ]
)

REQUEST_FIELDS = {  # /requests/NAME: (dtype, meaning); one row per finished request, in the order they ended
    "index": (np.int64, "the request's place in the prompt file (0-based)"),
    "id": (None, "the request's id"),
    "finish_reason": ("S6", "eos | length | stop (the run was stopped first: --resume continues it)"),
    "prompt_ids": ("vlen_int64", "the prompt's token ids"),
    "prompt_text": ("vlen_uint8", "the prompt as given, UTF-8 bytes (empty for token-id prompts)"),
    "completion_ids": ("vlen_int64", "the tokens made, an end-of-sequence token included"),
    "text": (
        "vlen_uint8",
        "the completion decoded by the checkpoint's tokenizer, UTF-8 bytes (any byte, NUL too)",
    ),
    "admitted_at": (np.float64, "seconds since the common start when it joined the batch"),
    "first_token_at": (np.float64, "seconds since the common start when its first token was held"),
    "finished_at": (np.float64, "seconds since the common start when its last token was held"),
    "ttft_s": (np.float64, "first_token_at - admitted_at"),
    "tokens_per_s": (np.float64, "tokens made / (finished_at - admitted_at)"),
    "admitted_step": (np.int64, "the step it joined the batch in"),
    "finished_step": (np.int64, "the step of its last token"),
}


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def run_attrs(
    config, node_of_rank, ranks_per_node: int, device: str, device_name: str, max_batch: int = 0
) -> dict:
    """The run file's root attributes (a real run's and a simulated one's)."""
    from hpcmoe.workload import run_identity

    return {
        **run_identity(config),
        "requests": len(config.requests),
        "max_batch": max_batch,
        "config": config.to_yaml(),
        "hpcmoe_version": __version__,
        "world_size": len(node_of_rank),
        "ranks_per_node": ranks_per_node,
        "num_nodes": max(node_of_rank) + 1,
        "node_of_rank": np.array(node_of_rank, np.int64),
        "layout": config.parallel.layout,
        "device": device,
        "device_name": device_name,
    }


def array(file, name: str, axes: list[str], **attrs_and_args):
    """A dataset of `file` made with h5py's create_dataset arguments; `axes`, `units` and `padding`
    become its attributes."""
    attrs = {k: attrs_and_args.pop(k) for k in ("units", "padding") if k in attrs_and_args}
    dataset = file.create_dataset(name, **attrs_and_args)
    dataset.attrs.update({"axes": axes, **attrs})
    return dataset


def open_logits(file, requests: int, width: int, vocab: int) -> None:
    """/logits [request, new_token, vocab] of output.save_logits, NaN until written."""
    array(
        file,
        "logits",
        shape=(requests, width, vocab),
        dtype=np.float32,
        chunks=(1, 1, vocab),
        fillvalue=np.nan,
        axes=["request", "new_token", "vocab"],
    )


def open_step_datasets(file, moe_layers: int, num_ranks: int, num_experts: int) -> None:
    """The datasets a run appends to step by step, empty and resizable: /routing, /traffic, /timings."""
    for name, last, axes, units in (
        ("routing", num_experts, ["step", "moe_layer", "source_rank", "expert"], "token slots"),
        ("traffic", num_ranks, ["step", "moe_layer", "src_rank", "dst_rank"], "bytes (dispatch payload)"),
    ):
        array(
            file,
            name,
            shape=(0, moe_layers, num_ranks, last),
            maxshape=(None, moe_layers, num_ranks, last),
            dtype=np.int64,
            axes=axes,
            units=units,
        )
    array(
        file,
        "timings",
        shape=(0,),
        maxshape=(None,),
        dtype=TIMING_DTYPE,
        chunks=(4096,),
        axes=["row"],
        units="seconds since the common start barrier",
    )


def open_requests_group(file) -> dict:
    """/requests: one empty resizable dataset per field of REQUEST_FIELDS -> {name: (dataset, dtype)}."""
    import h5py

    group = file.create_group("requests")
    group.attrs["rows"] = "one per request, written as it ends (in that order); index: its place in the file"
    for name, (dtype, meaning) in REQUEST_FIELDS.items():
        dtype = (
            h5py.string_dtype("utf-8")
            if dtype is None
            else h5py.vlen_dtype(np.dtype(dtype[5:]))
            if str(dtype).startswith("vlen_")
            else dtype
        )
        group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,)).attrs.update(
            {"axes": ["finished_request"], "meaning": meaning}
        )
    return {name: (group[name], group[name].dtype) for name in REQUEST_FIELDS}  # (h5py lookups are slow)


def open_request_arrays(file, n: int, prompt_lengths: np.ndarray, width: int, has_text: bool) -> tuple:
    """The per-request arrays in file order, made at the end: /request_ids, /prompt_ids [request,
    position] and /generated [request, new_token] (-1 padded), /prompt_lengths (written here),
    /generated_lengths and, with `has_text`, /generated_text -> (request_ids, prompt_ids, generated,
    generated_lengths, generated_text or None)."""
    import h5py

    longest = int(prompt_lengths.max())
    strings = h5py.string_dtype("utf-8")
    padded = lambda name, columns, axis: array(  # [request, axis] token ids, -1 padded
        file,
        name,
        shape=(n, columns),
        dtype=np.int64,
        fillvalue=-1,
        padding=-1,
        chunks=(min(n, 1024), columns),
        axes=["request", axis],
        compression="gzip",
    )
    ids = array(file, "request_ids", shape=(n,), dtype=strings, axes=["request"])
    prompts = padded("prompt_ids", longest, "position")
    array(file, "prompt_lengths", data=prompt_lengths, axes=["request"])
    generated = padded("generated", width, "new_token")
    lengths = array(file, "generated_lengths", shape=(n,), dtype=np.int64, axes=["request"], units="tokens")
    texts = array(file, "generated_text", shape=(n,), dtype=strings, axes=["request"]) if has_text else None
    return ids, prompts, generated, lengths, texts
