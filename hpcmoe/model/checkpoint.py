"""Local Hugging Face checkpoints: config.json read, every expected tensor checked against the index
of the checkpoint's safetensors headers, then lazy reads of only the tensors (or parts) a rank needs.

Headers are read with json + struct (no torch), so every rank checks every expected tensor name
and shape, and every header against its file (offsets, sizes, overlaps: a truncated or corrupt file
is refused), and fails with the same message, before any communicator or file exists. The parts:
families.py (config.json -> model fields), tensor_names.py (hpcmoe names -> stored names),
headers.py (the headers and their checks).
"""

from __future__ import annotations

import json
import os

from hpcmoe.model.headers import TensorEntry, tensor_index
from hpcmoe.model.tensor_names import ExpertView, checkpoint_name, expert_view, select_expert, stored_shape

SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "U8": "uint8",
}
FP8 = "F8_E4M3"
MXFP4_PARTS = ("weight_blocks", "weight_scales")  # hpcmoe names of MXFP4 tensors: uint8, nothing else is


def read_config(directory: str, name: str = "config.json") -> dict:
    """A checkpoint's JSON settings file (config.json, generation_config.json): one JSON object."""
    path = os.path.join(directory, name)
    try:
        with open(path) as f:
            settings = json.load(f)
    except OSError as e:
        raise ValueError(f"model.checkpoint: cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model.checkpoint: {path} is not valid JSON: {e}") from None
    if not isinstance(settings, dict):
        raise ValueError(
            f"model.checkpoint: {path}: expected a JSON object of settings, got a JSON "
            f"{JSON_KINDS.get(type(settings), type(settings).__name__)}"
        )
    return settings


JSON_KINDS = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def check_tensors(
    directory: str, expected: dict[str, tuple[int, ...]], block: list[int] | None = None
) -> dict[str, TensorEntry]:
    """expected: hpcmoe name -> shape. Raises, naming the file and tensor, on anything missing or
    misshapen; an FP8 weight needs its NAME_scale_inv of ceil(rows / block) x ceil(columns / block)."""
    config, index = read_config(directory), tensor_index(directory)
    experts = config.get("num_local_experts") or 0
    for name, shape in expected.items():
        stored = checkpoint_name(name, config)
        entry = index.get(stored)
        if entry is None:
            raise ValueError(f"model.checkpoint: {directory}: tensor {stored} is missing")
        view = expert_view(name, config)
        if view is not None:
            shape = stored_shape(tuple(shape), view, experts)
        check_entry(entry, stored, tuple(shape), name.endswith(MXFP4_PARTS))
        if entry.dtype == FP8:
            check_fp8_scales(directory, index, entry, stored, shape, block)
    return index


def check_entry(entry: TensorEntry, stored: str, shape: tuple[int, ...], mxfp4: bool) -> None:
    """The stored tensor has hpcmoe's shape, and a dtype hpcmoe reads (U8 for MXFP4 parts only)."""
    if entry.shape != shape:
        raise ValueError(
            f"model.checkpoint: {entry.file}: tensor {stored} has shape {list(entry.shape)}, "
            f"expected {list(shape)}"
        )
    if entry.dtype not in SAFETENSORS_DTYPES or (entry.dtype == "U8") != mxfp4:
        raise ValueError(
            f"model.checkpoint: {entry.file}: tensor {stored} has dtype {entry.dtype}, "
            + ("expected U8 (MXFP4 blocks and exponents)" if mxfp4 else "which is not supported")
        )


def check_fp8_scales(
    directory: str,
    index: dict[str, TensorEntry],
    entry: TensorEntry,
    stored: str,
    shape: tuple[int, ...],
    block: list[int] | None,
) -> None:
    """An FP8 matrix needs config.json's block size and its float NAME_scale_inv, one per block."""
    if block is None or len(shape) != 2:
        raise ValueError(
            f"model.checkpoint: {entry.file}: tensor {stored} is FP8 but config.json has no "
            f"fp8 quantization_config with a weight_block_size"
            if block is None
            else f"model.checkpoint: {entry.file}: tensor {stored} is FP8 but not a matrix"
        )
    scale = index.get(stored + "_scale_inv")
    wanted = tuple(-(-n // b) for n, b in zip(shape, block))
    if scale is None:
        raise ValueError(
            f"model.checkpoint: {directory}: tensor {stored}_scale_inv (the scales of FP8 "
            f"{stored}) is missing"
        )
    if scale.shape != wanted or scale.dtype not in ("F32", "BF16", "F16"):
        raise ValueError(
            f"model.checkpoint: {scale.file}: tensor {stored}_scale_inv has shape "
            f"{list(scale.shape)} ({scale.dtype}), expected {list(wanted)} float for blocks of "
            f"{block[0]} x {block[1]} of {list(shape)}"
        )


def byte_ranges(
    entry: TensorEntry, itemsize: int, part: tuple[int, int, int] | None
) -> list[tuple[int, int]]:
    """The file's byte ranges that hold `part` = (dim, start, stop) of the tensor (all of it when None),
    in the order of the part's elements; neighbouring ranges are merged."""
    if part is None:
        return [(entry.start, entry.end)]
    dim, start, stop = part
    inner = itemsize
    for n in entry.shape[dim + 1 :]:
        inner *= n
    outer = 1
    for n in entry.shape[:dim]:
        outer *= n
    stride = entry.shape[dim] * inner
    ranges: list[tuple[int, int]] = []
    for i in range(outer):
        first, last = entry.start + i * stride + start * inner, entry.start + i * stride + stop * inner
        if ranges and ranges[-1][1] == first:
            ranges[-1] = (ranges[-1][0], last)
        else:
            ranges.append((first, last))
    return ranges


def read_tensor(name: str, entry: TensorEntry, part, reads: list | None = None):
    """The tensor `name`, or its part (dim, start, stop), as stored: only its bytes are read
    (their (file, start, end) added to `reads`)."""
    import torch

    dtype = getattr(torch, SAFETENSORS_DTYPES[entry.dtype])
    ranges = byte_ranges(entry, dtype.itemsize, part)
    data = bytearray(sum(end - start for start, end in ranges))
    view, filled = memoryview(data), 0
    with open(entry.file, "rb") as f:
        for start, end in ranges:
            f.seek(start)
            got = f.readinto(view[filled : filled + end - start])
            if got != end - start:
                raise ValueError(
                    f"model.checkpoint: {entry.file}: tensor {name!r}: short read at byte {start}: "
                    f"{got} of {end - start} bytes (truncated?)"
                )
            filled += end - start
    if reads is not None:
        reads.extend((entry.file, start, end) for start, end in ranges)
    shape = list(entry.shape)
    if part is not None:
        shape[part[0]] = part[2] - part[1]
    if not data:
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.float8_e4m3fn:  # frombuffer has no float8: read bytes, then view them
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)
    return torch.frombuffer(data, dtype=dtype).reshape(shape)


def tensor_loader(directory: str, index: dict[str, TensorEntry], reads: list | None = None):
    """-> load(name, part=None, raw=False) -> float32 tensor: the tensor, or its part (dim, start, stop),
    reading only those bytes (one tensor at a time keeps the peak low). An FP8 weight comes back
    dequantized by its block scales, or with raw=True as stored (float8_e4m3fn; its scales are
    their own tensor NAME_scale_inv). `reads` collects (file, start, end) of every read."""
    config = read_config(directory)
    block = (config.get("quantization_config") or {}).get("weight_block_size")
    slabs: dict = {}  # (stored name, expert) -> a gpt-oss slab whose gate half or up half is still to come

    def load(name: str, part: tuple[int, int, int] | None = None, raw: bool = False):
        stored = checkpoint_name(name, config)
        entry = index[stored]
        view = expert_view(name, config)
        if view is not None:
            tensor = read_expert(stored, entry, view, part, slabs, reads)
            return tensor if raw else tensor.float()
        tensor = read_tensor(stored, entry, part, reads)
        if entry.dtype != FP8 or raw:
            return tensor if raw else tensor.float()
        return read_dequantized(stored, tensor, index, part, block, reads)

    return load


def read_expert(stored: str, entry: TensorEntry, view: ExpertView, part, slabs: dict, reads: list | None):
    """One expert's tensor of a stacked gpt-oss tensor: the expert's slab, then its view, then the part.
    Gate and up share a slab: read once, kept in `slabs` until the other takes it."""
    key = (stored, view.expert)
    slab = slabs.pop(key, None)
    if slab is None:
        slab = read_tensor(stored, entry, (0, view.expert, view.expert + 1), reads)
        if view.interleaved is not None:
            slabs[key] = slab
    tensor = select_expert(slab, view)
    if part is not None:
        tensor = tensor.narrow(part[0], part[1], part[2] - part[1]).contiguous()
    return tensor


def read_dequantized(stored: str, tensor, index: dict[str, TensorEntry], part, block: list[int], reads):
    """An FP8 weight (or its part) as read -> float32, times the block scales that cover it."""
    from hpcmoe.model.fp8 import dequantize

    scale = read_tensor(
        stored + "_scale_inv",
        index[stored + "_scale_inv"],
        None if part is None else scale_part(part, block),
        reads,
    )
    return dequantize(
        tensor,
        scale.float(),
        block,
        part[1] % block[part[0]] if part is not None else 0,
        part[0] if part is not None else 0,
    )


def scale_part(part: tuple[int, int, int], block: list[int]) -> tuple[int, int, int]:
    """The rows (or columns) of the scale tensor that cover `part` of the weight."""
    dim, start, stop = part
    return dim, start // block[dim], -(-stop // block[dim])
