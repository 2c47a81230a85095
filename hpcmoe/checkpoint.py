"""Local Hugging Face checkpoints: config.json -> model fields, safetensors headers -> an index of
every tensor, then lazy reads of only the tensors a rank needs.

Headers are read with json + struct (no torch), so every rank checks every expected tensor name
and shape, and fails with the same message, before any communicator or file exists.
"""
from __future__ import annotations

import glob
import json
import os
import re
import struct
from dataclasses import dataclass

SUPPORTED = ("deepseek_v3", "mixtral")
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"model.checkpoint: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"model.checkpoint: {path} is not valid JSON: {e}") from None


def rope_fields(c: dict, where: str) -> dict:
    """Rope theta and scaling from `rope_parameters` (current transformers) or the older top-level keys."""
    params = c.get("rope_parameters") or {**(c.get("rope_scaling") or {}), "rope_theta": c.get("rope_theta", 10000.0)}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return {"rope_theta": float(params.get("rope_theta") or 10000.0), "rope_scaling": None}
    if kind != "yarn":
        raise ValueError(f"model.checkpoint: {where}: rope type {kind!r} is not supported; expected default or yarn")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    return {"rope_theta": float(params.get("rope_theta") or 10000.0), "rope_scaling": {**scaling, "rope_type": "yarn"}}


class Fields(dict):
    """config.json's mapping; a field that is needed but absent is one clear error naming it and the file."""

    def __init__(self, values: dict, where: str):
        super().__init__(values)
        self.where = where

    def __missing__(self, key):
        raise ValueError(f"model.checkpoint: {self.where}: field {key!r} is missing")


def model_fields(directory: str) -> dict:
    """config.json -> hpcmoe model fields (pure: no torch)."""
    where = os.path.join(directory, "config.json")
    c = Fields(read_config(directory), where)
    kind = c.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"model.checkpoint: {where}: model_type {kind!r} is not supported; "
                         f"expected one of {', '.join(SUPPORTED)}")
    if c.get("quantization_config"):
        method = c["quantization_config"].get("quant_method")
        raise ValueError(f"model.checkpoint: {where}: quantized checkpoints ({method}) are not supported; "
                         f"dequantize to bfloat16 first")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"model.checkpoint: {where}: hidden_act {c['hidden_act']!r} is not supported; expected silu")
    common = dict(vocab=c["vocab_size"], hidden=c["hidden_size"], num_layers=c["num_hidden_layers"],
                  heads=c["num_attention_heads"], top_k=c["num_experts_per_tok"], norm_eps=float(c["rms_norm_eps"]),
                  max_positions=c.get("max_position_embeddings"), **rope_fields(c, where))
    if kind == "mixtral":
        if c.get("sliding_window") is not None:
            raise ValueError(f"model.checkpoint: {where}: sliding_window {c['sliding_window']} is not supported")
        return dict(common, attention="gqa", router="softmax", dense_layers=0,
                    kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                    head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                    num_experts=c["num_local_experts"], expert_hidden=c["intermediate_size"],
                    dense_hidden=c["intermediate_size"], norm_topk_prob=True)
    if c.get("attention_bias"):
        raise ValueError(f"model.checkpoint: {where}: attention_bias true is not supported")
    for key, wanted in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if c.get(key, wanted) != wanted:
            raise ValueError(f"model.checkpoint: {where}: {key} {c[key]!r} is not supported; expected {wanted}")
    return dict(common, attention="mla", router="sigmoid", dense_layers=c["first_k_dense_replace"],
                kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                q_lora_rank=c.get("q_lora_rank") or 0, kv_lora_rank=c["kv_lora_rank"],
                qk_nope_head_dim=c["qk_nope_head_dim"], qk_rope_head_dim=c["qk_rope_head_dim"],
                v_head_dim=c["v_head_dim"], rope_interleave=c.get("rope_interleave", True),
                num_experts=c["n_routed_experts"], expert_hidden=c["moe_intermediate_size"],
                dense_hidden=c["intermediate_size"], shared_experts=c.get("n_shared_experts") or 0,
                n_group=c.get("n_group") or 1, topk_group=c.get("topk_group") or 1,
                routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
                norm_topk_prob=c.get("norm_topk_prob", True))


MIXTRAL_RENAMES = [(r"\.mlp\.gate\.", ".block_sparse_moe.gate."),
                   (r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".block_sparse_moe.experts.\1.w1."),
                   (r"\.mlp\.experts\.(\d+)\.up_proj\.", r".block_sparse_moe.experts.\1.w3."),
                   (r"\.mlp\.experts\.(\d+)\.down_proj\.", r".block_sparse_moe.experts.\1.w2.")]


def checkpoint_name(name: str, config: dict) -> str:
    """hpcmoe parameter name -> the tensor name in the checkpoint."""
    if name == "lm_head.weight":
        return "model.embed_tokens.weight" if config.get("tie_word_embeddings") else name
    name = "model." + name
    if config["model_type"] == "mixtral":
        for pattern, replacement in MIXTRAL_RENAMES:
            name = re.sub(pattern, replacement, name)
    return name


@dataclass(frozen=True)
class TensorEntry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int   # byte offsets in the file
    end: int


def read_header(path: str) -> dict[str, TensorEntry]:
    """The tensors a .safetensors file holds, from its header alone."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model.checkpoint: {path}: not a readable safetensors file ({e})") from None
    base = 8 + length
    return {name: TensorEntry(path, meta["dtype"], tuple(meta["shape"]), base + meta["data_offsets"][0],
                              base + meta["data_offsets"][1])
            for name, meta in header.items() if name != "__metadata__"}


def tensor_index(directory: str) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint: sharded (model.safetensors.index.json) or not."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({os.path.join(directory, v) for v in weight_map.values()})
    else:
        files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ValueError(f"model.checkpoint: {directory}: no *.safetensors files")
    index: dict[str, TensorEntry] = {}
    for path in files:
        if not os.path.exists(path):
            raise ValueError(f"model.checkpoint: {index_path} names {os.path.basename(path)}, which does not exist")
        index.update(read_header(path))
    return index


def check_tensors(directory: str, expected: dict[str, tuple[int, ...]]) -> dict[str, TensorEntry]:
    """expected: hpcmoe name -> shape. Raises, naming the file and tensor, on anything missing or misshapen."""
    config, index = read_config(directory), tensor_index(directory)
    for name, shape in expected.items():
        stored = checkpoint_name(name, config)
        entry = index.get(stored)
        if entry is None:
            raise ValueError(f"model.checkpoint: {directory}: tensor {stored} is missing")
        if entry.shape != tuple(shape):
            raise ValueError(f"model.checkpoint: {entry.file}: tensor {stored} has shape {list(entry.shape)}, "
                             f"expected {list(shape)}")
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"model.checkpoint: {entry.file}: tensor {stored} has dtype {entry.dtype}, "
                             f"which is not supported")
    return index


def byte_ranges(entry: TensorEntry, itemsize: int, part: tuple[int, int, int] | None) -> list[tuple[int, int]]:
    """The file's byte ranges that hold `part` = (dim, start, stop) of the tensor (all of it when None),
    in the order of the part's elements; neighbouring ranges are merged."""
    if part is None:
        return [(entry.start, entry.end)]
    dim, start, stop = part
    inner = itemsize
    for n in entry.shape[dim + 1:]:
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


def tensor_loader(directory: str, index: dict[str, TensorEntry], reads: list | None = None):
    """-> load(name, part=None) -> float32 tensor: the tensor, or its part (dim, start, stop), reading only
    those bytes (one tensor at a time keeps the peak low). `reads` collects (file, start, end) of every read."""
    import torch
    config = read_config(directory)

    def load(name: str, part: tuple[int, int, int] | None = None):
        entry = index[checkpoint_name(name, config)]
        dtype = getattr(torch, SAFETENSORS_DTYPES[entry.dtype])
        ranges = byte_ranges(entry, dtype.itemsize, part)
        data = bytearray(sum(end - start for start, end in ranges))
        view, filled = memoryview(data), 0
        with open(entry.file, "rb") as f:
            for start, end in ranges:
                f.seek(start)
                f.readinto(view[filled:filled + end - start])
                filled += end - start
        if reads is not None:
            reads.extend((entry.file, start, end) for start, end in ranges)
        shape = list(entry.shape)
        if part is not None:
            shape[part[0]] = part[2] - part[1]
        tensor = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return tensor.reshape(shape).float()

    return load
