"""Local Hugging Face checkpoints: config.json -> model fields, safetensors headers -> an index of
every tensor, then lazy reads of only the tensors a rank needs.

Headers are read with json + struct (no torch), so every rank checks every expected tensor name
and shape, and every header against its file (offsets, sizes, overlaps: a truncated or corrupt file
is refused), and fails with the same message, before any communicator or file exists.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
from dataclasses import dataclass

SUPPORTED = (
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
    "kimi_k2",
    "minimax_m2",
    "mixtral",
    "qwen3_moe",
)  # kimi_k2: DeepSeek-V3's
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


def rope_fields(c: dict, where: str) -> dict:
    """Rope theta and scaling from `rope_parameters` (current transformers) or the older top-level keys."""
    params = c.get("rope_parameters") or {
        **(c.get("rope_scaling") or {}),
        "rope_theta": c.get("rope_theta", 10000.0),
    }
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return {"rope_theta": float(params.get("rope_theta") or 10000.0), "rope_scaling": None}
    if kind != "yarn":
        raise ValueError(
            f"model.checkpoint: {where}: rope type {kind!r} is not supported; expected default or yarn"
        )
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    return {
        "rope_theta": float(params.get("rope_theta") or 10000.0),
        "rope_scaling": {**scaling, "rope_type": "yarn"},
    }


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
        raise ValueError(
            f"model.checkpoint: {where}: model_type {kind!r} is not supported; "
            f"expected one of {', '.join(SUPPORTED)}"
        )
    quantization = (c.get("quantization_config") or {}).get("quant_method")
    if quantization == "mxfp4" and kind != "gpt_oss":
        raise ValueError(
            f"model.checkpoint: {where}: quantization_config mxfp4 is read for gpt_oss only, not {kind}"
        )
    block = None if quantization == "mxfp4" else fp8_block(c, where)
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"model.checkpoint: {where}: hidden_act {c['hidden_act']!r} is not supported; expected silu"
        )
    common = dict(
        vocab=c["vocab_size"],
        hidden=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"],
        top_k=c["num_experts_per_tok"],
        norm_eps=float(c["rms_norm_eps"]),
        max_positions=c.get("max_position_embeddings"),
        fp8_block=block,
        **rope_fields(c, where),
    )
    if kind == "mixtral":
        if c.get("sliding_window") is not None:
            raise ValueError(
                f"model.checkpoint: {where}: sliding_window {c['sliding_window']} is not supported"
            )
        return dict(
            common,
            attention="gqa",
            router="softmax",
            dense_layers=0,
            kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            num_experts=c["num_local_experts"],
            expert_hidden=c["intermediate_size"],
            dense_hidden=c["intermediate_size"],
            norm_topk_prob=True,
        )
    if kind == "gpt_oss":  # sinks, sliding windows, biases, the clamped SwiGLU, MXFP4 experts
        bias = bool(c.get("attention_bias", True))
        types = c.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(c["num_hidden_layers"])
        ]
        return dict(
            common,
            attention="gqa",
            router="softmax",
            router_bias=True,
            norm_topk_prob=True,
            dense_layers=0,
            attention_bias=bias,
            attention_output_bias=bias,
            attention_sinks=True,
            sliding_window=c.get("sliding_window"),
            layer_types=list(types),
            expert_bias=True,
            swiglu_limit=float(c["swiglu_limit"]),
            swiglu_alpha=float(c.get("swiglu_alpha", 1.702)),
            kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            num_experts=c["num_local_experts"],
            expert_hidden=c["intermediate_size"],
            dense_hidden=c["intermediate_size"],
            mxfp4=quantization == "mxfp4",
        )
    if kind in (
        "deepseek_v3",
        "kimi_k2",
        "glm4_moe",
    ):  # DeepSeek-V3's router, shared experts, leading dense layers
        router = dict(
            router="sigmoid",
            num_experts=c["n_routed_experts"],
            shared_experts=c.get("n_shared_experts") or 0,
            n_group=c.get("n_group") or 1,
            topk_group=c.get("topk_group") or 1,
            routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=c.get("norm_topk_prob", True),
            dense_layers=c["first_k_dense_replace"],
            expert_hidden=c["moe_intermediate_size"],
            dense_hidden=c["intermediate_size"],
        )
    if kind == "glm4_moe":  # with grouped-query attention
        partial = (c.get("rope_parameters") or {}).get(
            "partial_rotary_factor", c.get("partial_rotary_factor", 1.0)
        )
        return dict(
            common,
            **router,
            attention="gqa",
            qk_norm=bool(c.get("use_qk_norm")),
            attention_bias=bool(c.get("attention_bias")),
            partial_rotary_factor=float(partial),
            kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        )
    if kind == "minimax_m2":  # sigmoid top-k with the correction bias, no groups; q/k norm over all heads
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        partial = (
            (c.get("rotary_dim") or head_dim) / head_dim
            if "rotary_dim" in c
            else (c.get("rope_parameters") or {}).get(
                "partial_rotary_factor", c.get("partial_rotary_factor", 1.0)
            )
        )
        return dict(
            common,
            attention="gqa",
            router="sigmoid",
            dense_layers=0,
            qk_norm=True,
            qk_norm_all_heads=True,
            partial_rotary_factor=float(partial),
            kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=head_dim,
            num_experts=c["num_local_experts"],
            expert_hidden=c["intermediate_size"],
            dense_hidden=c["intermediate_size"],
            norm_topk_prob=True,
        )
    if c.get("attention_bias"):
        raise ValueError(f"model.checkpoint: {where}: attention_bias true is not supported")
    if kind == "qwen3_moe":
        if c.get("use_sliding_window"):
            raise ValueError(f"model.checkpoint: {where}: use_sliding_window true is not supported")
        return dict(
            common,
            attention="gqa",
            router="softmax",
            qk_norm=True,
            dense_layers=leading_dense_layers(c, where),
            kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            num_experts=c.get("num_experts") or c["num_local_experts"],  # (transformers 5 saves the latter)
            expert_hidden=c["moe_intermediate_size"],
            dense_hidden=c["intermediate_size"],
            norm_topk_prob=bool(c.get("norm_topk_prob", True)),
        )
    for key, wanted in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if c.get(key, wanted) != wanted:
            raise ValueError(
                f"model.checkpoint: {where}: {key} {c[key]!r} is not supported; expected {wanted}"
            )
    return dict(
        common,
        **router,
        attention="mla",
        kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        q_lora_rank=c.get("q_lora_rank") or 0,
        kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"],
        rope_interleave=c.get("rope_interleave", True),
    )


def leading_dense_layers(c: dict, where: str) -> int:
    """Qwen3-MoE: layer i is MoE unless it is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0.
    hpcmoe runs dense layers only before the MoE layers: -> how many lead."""
    layers, step = c["num_hidden_layers"], c.get("decoder_sparse_step") or 1
    dense = sorted(set(c.get("mlp_only_layers") or []) | {i for i in range(layers) if (i + 1) % step})
    if dense != list(range(len(dense))):
        raise ValueError(
            f"model.checkpoint: {where}: mlp_only_layers {c.get('mlp_only_layers')} with "
            f"decoder_sparse_step {step} make layers {dense} dense; hpcmoe runs dense layers only "
            f"before the MoE layers (0, 1, ...)"
        )
    return len(dense)


def fp8_block(c: dict, where: str) -> list[int] | None:
    """DeepSeek-V3's FP8 format: quant_method fp8, e4m3 weights, one float scale per block of
    weight_block_size (rows x columns); None for an unquantized checkpoint."""
    q = c.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise ValueError(
            f"model.checkpoint: {where}: quantization {q.get('quant_method')!r} "
            f"(fmt {q.get('fmt')!r}) is not supported; expected fp8 with e4m3 weights and block scales"
        )
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(
            f"model.checkpoint: {where}: quantization_config.weight_block_size {block!r}: "
            f"expected two positive integers (rows, columns), e.g. [128, 128]"
        )
    return block


MIXTRAL_RENAMES = [
    (r"\.mlp\.gate\.", ".block_sparse_moe.gate."),
    (r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".block_sparse_moe.experts.\1.w1."),
    (r"\.mlp\.experts\.(\d+)\.up_proj\.", r".block_sparse_moe.experts.\1.w3."),
    (r"\.mlp\.experts\.(\d+)\.down_proj\.", r".block_sparse_moe.experts.\1.w2."),
]


# MiniMax-M2: Mixtral's names, and the correction bias on the MoE block rather than on its gate
MINIMAX_RENAMES = [
    (r"\.mlp\.gate\.e_score_correction_bias$", ".block_sparse_moe.e_score_correction_bias")
] + MIXTRAL_RENAMES


# gpt-oss: the router is `router`; the experts are stacked (below)
GPT_OSS_RENAMES = [(r"\.mlp\.gate\.(weight|bias)$", r".mlp.router.\1")]
GPT_OSS_EXPERT = re.compile(
    r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.(weight|bias|weight_blocks|weight_scales)$"
)
GPT_OSS_SUFFIX = {"weight": "", "bias": "_bias", "weight_blocks": "_blocks", "weight_scales": "_scales"}


@dataclass(frozen=True)
class ExpertView:
    """gpt-oss stores each layer's experts stacked: `experts.gate_up_proj` [E, H, 2I] (gate and up
    interleaved along the last axis: gate the even entries), `experts.down_proj` [E, I, H], biases
    [E, 2I] and [E, H]; as MXFP4, `_blocks` [E, 2I, H / 32, 16] and `_scales` [E, 2I, H / 32] (rows
    are output features there). One hpcmoe expert tensor is a view of one of these."""

    expert: int
    interleaved: int | None  # 0: gate (even entries of the output axis), 1: up (odd), None: down
    transposed: bool  # stored [in, out] (the unquantized weights)


def checkpoint_name(name: str, config: dict) -> str:
    """hpcmoe parameter name -> the tensor name in the checkpoint."""
    if name == "lm_head.weight":
        return "model.embed_tokens.weight" if config.get("tie_word_embeddings") else name
    expert = GPT_OSS_EXPERT.match(name) if config["model_type"] == "gpt_oss" else None
    if expert:
        layer, _, kind, part = expert.groups()
        return (
            f"model.layers.{layer}.mlp.experts.{'down_proj' if kind == 'down' else 'gate_up_proj'}"
            f"{GPT_OSS_SUFFIX[part]}"
        )
    name = "model." + name
    renames = {"mixtral": MIXTRAL_RENAMES, "minimax_m2": MINIMAX_RENAMES, "gpt_oss": GPT_OSS_RENAMES}
    for pattern, replacement in renames.get(config["model_type"], []):
        name = re.sub(pattern, replacement, name)
    return name


def expert_view(name: str, config: dict) -> ExpertView | None:
    """The view of a stacked gpt-oss tensor that hpcmoe tensor `name` is, None for any other tensor."""
    expert = GPT_OSS_EXPERT.match(name) if config["model_type"] == "gpt_oss" else None
    if not expert:
        return None
    _, e, kind, part = expert.groups()
    return ExpertView(int(e), None if kind == "down" else ("gate", "up").index(kind), part == "weight")


def stored_shape(shape: tuple[int, ...], view: ExpertView, experts: int) -> tuple[int, ...]:
    """hpcmoe's shape of one expert's tensor -> the stacked tensor's shape in the checkpoint."""
    one = list(reversed(shape)) if view.transposed else list(shape)
    axis = len(one) - 1 if view.transposed else 0  # the output features
    if view.interleaved is not None:
        one[axis] *= 2
    return (experts, *one)


def select_expert(stacked, view: ExpertView):
    """The stacked tensor's slab of one expert ([1, ...], as read) -> hpcmoe's tensor of that expert."""
    one = stacked[0]
    if view.transposed:
        one = one.transpose(0, 1)
    if view.interleaved is not None:
        one = one[view.interleaved :: 2]
    return one.contiguous()


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

    def bad(name, what):
        return ValueError(f"model.checkpoint: {path}: tensor {name!r}: {what}")

    if not isinstance(header, dict):
        raise ValueError(
            f"model.checkpoint: {path}: safetensors header is a JSON {type(header).__name__}, "
            f"expected an object"
        )
    data = file_size - 8 - length
    entries: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise bad(name, f"entry is {meta!r}, expected an object with dtype, shape and data_offsets")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if dtype not in ITEMSIZE:
            raise bad(name, f"dtype {dtype!r} is not a safetensors dtype")
        if not (isinstance(shape, list) and all(is_int(n) and n >= 0 for n in shape)):
            raise bad(name, f"shape {shape!r} is not a list of non-negative integers")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(name, f"data_offsets {offsets!r}: expected [begin, end] with 0 <= begin <= end")
        size = ITEMSIZE[dtype]
        for n in shape:
            size *= n
        if offsets[1] - offsets[0] != size:
            raise bad(
                name,
                f"data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes but {dtype} x "
                f"{shape} needs {size}",
            )
        entries[name] = TensorEntry(
            path, dtype, tuple(shape), 8 + length + offsets[0], 8 + length + offsets[1]
        )
    previous = None  # in file order: the first tensor cut off is the one named
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        begin, end = entry.start - 8 - length, entry.end - 8 - length
        if end > data:
            raise bad(
                name, f"data_offsets [{begin}, {end}] end beyond the file's {data} data bytes (truncated?)"
            )
        if begin == end:
            continue
        if previous is not None and entry.start < entries[previous].end:
            other = entries[previous]
            raise bad(
                name,
                f"data_offsets [{begin}, {end}] overlap [{other.start - 8 - length}, "
                f"{other.end - 8 - length}] of tensor {previous!r}",
            )
        if previous is None or entry.end > entries[previous].end:
            previous = name
    return entries


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
        if entry.shape != tuple(shape):
            raise ValueError(
                f"model.checkpoint: {entry.file}: tensor {stored} has shape {list(entry.shape)}, "
                f"expected {list(shape)}"
            )
        mxfp4 = name.endswith(MXFP4_PARTS)
        if entry.dtype not in SAFETENSORS_DTYPES or (entry.dtype == "U8") != mxfp4:
            raise ValueError(
                f"model.checkpoint: {entry.file}: tensor {stored} has dtype {entry.dtype}, "
                + ("expected U8 (MXFP4 blocks and exponents)" if mxfp4 else "which is not supported")
            )
        if entry.dtype == FP8:
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
    return index


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


def tensor_loader(directory: str, index: dict[str, TensorEntry], reads: list | None = None):
    """-> load(name, part=None, raw=False) -> float32 tensor: the tensor, or its part (dim, start, stop),
    reading only those bytes (one tensor at a time keeps the peak low). An FP8 weight comes back
    dequantized by its block scales, or with raw=True as stored (float8_e4m3fn; its scales are
    their own tensor NAME_scale_inv). `reads` collects (file, start, end) of every read."""
    import torch

    config = read_config(directory)
    block = (config.get("quantization_config") or {}).get("weight_block_size")
    slabs: dict = {}  # (stored name, expert) -> a gpt-oss slab whose gate half or up half is still to come

    def read(name: str, entry: TensorEntry, part):
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

    def load(name: str, part: tuple[int, int, int] | None = None, raw: bool = False):
        stored = checkpoint_name(name, config)
        entry = index[stored]
        view = expert_view(name, config)
        if view is not None:  # the expert's slab of the stacked tensor, then its view, then the part
            key = (stored, view.expert)
            slab = slabs.pop(key, None)  # gate and up share a slab: read once, kept until the other takes it
            if slab is None:
                slab = read(stored, entry, (0, view.expert, view.expert + 1))
                if view.interleaved is not None:
                    slabs[key] = slab
            tensor = select_expert(slab, view)
            if part is not None:
                tensor = tensor.narrow(part[0], part[1], part[2] - part[1]).contiguous()
            return tensor if raw else tensor.float()
        tensor = read(stored, entry, part)
        if entry.dtype != FP8 or raw:
            return tensor if raw else tensor.float()
        scale = read(
            stored + "_scale_inv",
            index[stored + "_scale_inv"],
            None if part is None else scale_part(part, block),
        )
        return dequantize(
            tensor,
            scale.float(),
            block,
            part[1] % block[part[0]] if part is not None else 0,
            part[0] if part is not None else 0,
        )

    return load


def scale_part(part: tuple[int, int, int], block: list[int]) -> tuple[int, int, int]:
    """The rows (or columns) of the scale tensor that cover `part` of the weight."""
    dim, start, stop = part
    return dim, start // block[dim], -(-stop // block[dim])


def dequantize(weight, scale, block: list[int], offset: int = 0, dim: int = 0):
    """weight [r, c] float8 -> float32 W = weight x scale of its block; scale [ceil(r / b0), ceil(c / b1)]
    (of a part of the weight that starts `offset` rows or columns into its first block along `dim`)."""
    import torch

    rows, columns = weight.shape
    if (
        offset == 0
        and (rows % block[0], columns % block[1]) == (0, 0)
        and tuple(scale.shape) == (rows // block[0], columns // block[1])
    ):  # whole blocks: scaled in place
        blocks = weight.to(torch.float32).view(rows // block[0], block[0], columns // block[1], block[1])
        return blocks.mul_(scale[:, None, :, None]).view(rows, columns)
    expanded = scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    expanded = expanded.narrow(dim, offset, weight.shape[dim])
    return weight.float() * expanded[: weight.shape[0], : weight.shape[1]]
