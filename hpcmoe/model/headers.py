"""Safetensors headers, read with json + struct (no torch) and checked against their files: known
dtypes, shapes, data offsets inside the file and not overlapping, so a truncated or corrupt file is
refused in one line before any tensor is read; and the index of every tensor of a checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class TensorEntry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets in the file
    end: int


# Bytes per element of every safetensors dtype (hpcmoe computes with SAFETENSORS_DTYPES; the
# others may sit in a checkpoint unused, and are still checked against the file).
ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


MAX_HEADER = 100 * 2**20  # the safetensors format's own limit


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_header(path: str, header, file_size: int, length: int) -> dict[str, TensorEntry]:
    """The tensors of a parsed safetensors header (`length` bytes after the 8-byte length), checked
    against the file's size: known dtypes, shapes of non-negative ints, data_offsets [begin, end]
    with end - begin = itemsize x elements, inside the data region, no two overlapping. Pure; raises
    one-line ValueErrors naming the file and the tensor."""
    if not isinstance(header, dict):
        raise ValueError(
            f"model.checkpoint: {path}: safetensors header is a JSON {type(header).__name__}, "
            f"expected an object"
        )
    entries = {
        name: header_entry(path, name, meta, length)
        for name, meta in header.items()
        if name != "__metadata__"
    }
    check_extents(path, entries, file_size - 8 - length, length)
    return entries


def bad_tensor(path: str, name: str, what: str) -> ValueError:
    return ValueError(f"model.checkpoint: {path}: tensor {name!r}: {what}")


def header_entry(path: str, name: str, meta, length: int) -> TensorEntry:
    """One tensor's header entry, checked on its own: dtype, shape, and offsets that hold its bytes."""
    if not isinstance(meta, dict):
        raise bad_tensor(
            path, name, f"entry is {meta!r}, expected an object with dtype, shape and data_offsets"
        )
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise bad_tensor(path, name, f"dtype {dtype!r} is not a safetensors dtype")
    if not (isinstance(shape, list) and all(is_int(n) and n >= 0 for n in shape)):
        raise bad_tensor(path, name, f"shape {shape!r} is not a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise bad_tensor(
            path, name, f"data_offsets {offsets!r}: expected [begin, end] with 0 <= begin <= end"
        )
    size = ITEMSIZE[dtype]
    for n in shape:
        size *= n
    if offsets[1] - offsets[0] != size:
        raise bad_tensor(
            path,
            name,
            f"data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes but {dtype} x {shape} needs {size}",
        )
    return TensorEntry(path, dtype, tuple(shape), 8 + length + offsets[0], 8 + length + offsets[1])


def check_extents(path: str, entries: dict[str, TensorEntry], data: int, length: int) -> None:
    """Every tensor's bytes inside the `data` bytes after the header, no two overlapping."""
    previous = None  # in file order: the first tensor cut off is the one named
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        begin, end = entry.start - 8 - length, entry.end - 8 - length
        if end > data:
            raise bad_tensor(
                path,
                name,
                f"data_offsets [{begin}, {end}] end beyond the file's {data} data bytes (truncated?)",
            )
        if begin == end:
            continue
        if previous is not None and entry.start < entries[previous].end:
            other = entries[previous]
            raise bad_tensor(
                path,
                name,
                f"data_offsets [{begin}, {end}] overlap [{other.start - 8 - length}, "
                f"{other.end - 8 - length}] of tensor {previous!r}",
            )
        if previous is None or entry.end > entries[previous].end:
            previous = name


def read_header(path: str) -> dict[str, TensorEntry]:
    """The tensors a .safetensors file holds, from its header alone, checked against the file."""
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            start = f.read(8)
            if len(start) < 8:
                raise ValueError(
                    f"model.checkpoint: {path}: {file_size} bytes, too short for a safetensors "
                    f"file (truncated?)"
                )
            (length,) = struct.unpack("<Q", start)
            if length > min(file_size - 8, MAX_HEADER):
                raise ValueError(
                    f"model.checkpoint: {path}: header length {length} does not fit in the file's "
                    f"{file_size} bytes (truncated, or not a safetensors file?)"
                )
            text = f.read(length)
            if len(text) != length:
                raise ValueError(
                    f"model.checkpoint: {path}: short read of the header: {len(text)} of "
                    f"{length} bytes (truncated?)"
                )
            header = json.loads(text)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"model.checkpoint: {path}: not a readable safetensors file "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    return check_header(path, header, file_size, length)


def tensor_index(directory: str) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint: sharded (model.safetensors.index.json) or not."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"model.checkpoint: {index_path}: not a readable index with a weight_map ({type(e).__name__})"
            ) from None
        files = sorted({os.path.join(directory, v) for v in weight_map.values()})
    else:
        files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ValueError(f"model.checkpoint: {directory}: no *.safetensors files")
    index: dict[str, TensorEntry] = {}
    for path in files:
        if not os.path.exists(path):
            raise ValueError(
                f"model.checkpoint: {index_path} names {os.path.basename(path)}, which does not exist"
            )
        index.update(read_header(path))
    return index
