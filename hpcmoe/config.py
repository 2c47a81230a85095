"""Run configuration: one YAML file with sections model / parallel / run / output.

Pure Python (no torch, no MPI) so that a bad config fails in milliseconds, identically on
every rank, before any communicator or file exists. Every user error is a ValueError whose
one line names the key path, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

DEBUG = dict(
    attention="gqa",
    router="softmax",
    vocab=512,
    hidden=64,
    num_layers=3,
    dense_layers=1,
    heads=8,
    kv_heads=4,
    head_dim=8,
    num_experts=4,
    top_k=2,
    expert_hidden=128,
    dense_hidden=256,
    norm_topk_prob=True,
    rope_theta=10000.0,
    norm_eps=1e-6,
    dtype="float32",
    seed=0,
)
DEEPSEEK_V3 = dict(
    attention="mla",
    router="sigmoid",
    vocab=129280,
    hidden=7168,
    num_layers=61,
    dense_layers=3,
    heads=128,
    kv_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    rope_interleave=True,
    num_experts=256,
    top_k=8,
    expert_hidden=2048,
    dense_hidden=18432,
    shared_experts=1,
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    rope_theta=10000.0,
    rope_scaling={
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    norm_eps=1e-6,
    dtype="bfloat16",
    seed=0,
)
GPT_OSS = dict(
    attention="gqa",
    router="softmax",
    router_bias=True,
    vocab=201088,
    hidden=2880,
    dense_layers=0,
    heads=64,
    kv_heads=8,
    head_dim=64,
    attention_bias=True,
    attention_output_bias=True,
    attention_sinks=True,
    sliding_window=128,
    top_k=4,
    expert_hidden=2880,
    dense_hidden=2880,
    expert_bias=True,
    swiglu_limit=7.0,
    swiglu_alpha=1.702,
    norm_topk_prob=True,
    rope_theta=150000.0,
    rope_scaling={
        "rope_type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
    },
    norm_eps=1e-5,
    max_positions=131072,
    mxfp4=True,
    dtype="bfloat16",
    seed=0,
)
PRESETS: dict[str, dict[str, Any]] = {
    # A seconds-long model for tests and the README's first command.
    "debug": DEBUG,
    # DeepSeek-V3's published config.json (its weights are FP8; here seeded random, bfloat16).
    "deepseek-v3": DEEPSEEK_V3,
    # Qwen3-MoE's published config.json files (bfloat16): 235B-A22B and 30B-A3B.
    "qwen3-235b-a22b": dict(
        attention="gqa",
        router="softmax",
        qk_norm=True,
        vocab=151936,
        hidden=4096,
        num_layers=94,
        dense_layers=0,
        heads=64,
        kv_heads=4,
        head_dim=128,
        num_experts=128,
        top_k=8,
        expert_hidden=1536,
        dense_hidden=12288,
        norm_topk_prob=True,
        rope_theta=1000000.0,
        norm_eps=1e-6,
        max_positions=40960,
        dtype="bfloat16",
        seed=0,
    ),
    "qwen3-30b-a3b": dict(
        attention="gqa",
        router="softmax",
        qk_norm=True,
        vocab=151936,
        hidden=2048,
        num_layers=48,
        dense_layers=0,
        heads=32,
        kv_heads=4,
        head_dim=128,
        num_experts=128,
        top_k=8,
        expert_hidden=768,
        dense_hidden=6144,
        norm_topk_prob=True,
        rope_theta=1000000.0,
        norm_eps=1e-6,
        max_positions=40960,
        dtype="bfloat16",
        seed=0,
    ),
    # GLM-4.6's published config.json (GLM-4.5: the same shape, 131,072 positions); bfloat16.
    "glm-4.6": dict(
        attention="gqa",
        router="sigmoid",
        qk_norm=True,
        attention_bias=True,
        partial_rotary_factor=0.5,
        vocab=151552,
        hidden=5120,
        num_layers=92,
        dense_layers=3,
        heads=96,
        kv_heads=8,
        head_dim=128,
        num_experts=160,
        top_k=8,
        expert_hidden=1536,
        dense_hidden=12288,
        shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rope_theta=1000000.0,
        norm_eps=1e-5,
        max_positions=202752,
        dtype="bfloat16",
        seed=0,
    ),
    # MiniMax-M2's published config.json (its weights are FP8; here bfloat16).
    "minimax-m2": dict(
        attention="gqa",
        router="sigmoid",
        qk_norm=True,
        qk_norm_all_heads=True,
        partial_rotary_factor=0.5,
        vocab=200064,
        hidden=3072,
        num_layers=62,
        dense_layers=0,
        heads=48,
        kv_heads=8,
        head_dim=128,
        num_experts=256,
        top_k=8,
        expert_hidden=1536,
        dense_hidden=1536,
        norm_topk_prob=True,
        rope_theta=5000000.0,
        norm_eps=1e-6,
        max_positions=196608,
        dtype="bfloat16",
        seed=0,
    ),
    # gpt-oss's published config.json files: experts in MXFP4 (as published), the rest bfloat16
    "gpt-oss-120b": dict(
        GPT_OSS, num_layers=36, num_experts=128, layer_types=["sliding_attention", "full_attention"] * 18
    ),
    "gpt-oss-20b": dict(
        GPT_OSS, num_layers=24, num_experts=32, layer_types=["sliding_attention", "full_attention"] * 12
    ),
    # Kimi-K2's published config.json: DeepSeek-V3's architecture with 384 experts, 64 heads, one dense
    # layer and its own routing scale and YaRN (its weights are FP8; here bfloat16)
    "kimi-k2": dict(
        DEEPSEEK_V3,
        vocab=163840,
        dense_layers=1,
        heads=64,
        kv_heads=64,
        num_experts=384,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.827,
        rope_theta=50000.0,
        max_positions=131072,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 1,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    ),
    # The MA-separation paper's model: 4 layers, hidden 4096, 32 heads, 16 experts top-2.
    "ma-paper": dict(
        attention="gqa",
        router="softmax",
        vocab=32000,
        hidden=4096,
        num_layers=4,
        dense_layers=0,
        heads=32,
        kv_heads=32,
        head_dim=128,
        num_experts=16,
        top_k=2,
        expert_hidden=16384,
        dense_hidden=16384,
        rope_theta=10000.0,
        seed=0,
    ),
}
DTYPES = ("float32", "bfloat16")
MXFP4_BLOCK = 32  # weights per shared exponent
# run.kill points: in MoE layer `layer` (route, dispatch, experts, combine), or of the step (its record to
# rank 0, its stop vote, after it), or in the recovery from an earlier death (after the survivors shrank)
LAYER_KILL_PHASES = ("route", "dispatch", "experts", "combine")
KILL_PHASES = LAYER_KILL_PHASES + ("record", "stop_vote", "between_steps", "recovery")
ROPE_SCALING_KEYS = (
    "rope_type",
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
    "truncate",
)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder-only MoE transformer; a preset or a checkpoint fills every field."""

    preset: Optional[str] = None
    checkpoint: Optional[str] = None  # a local Hugging Face directory: config.json + *.safetensors
    attention: str = "gqa"  # gqa (Mixtral, debug) | mla (DeepSeek-V3)
    router: str = "softmax"  # softmax top-k | sigmoid: DeepSeek-V3 group-limited with correction bias
    vocab: int = 0
    hidden: int = 0
    num_layers: int = 0
    dense_layers: int = 0  # the first `dense_layers` layers use a dense SwiGLU MLP
    heads: int = 0  # query heads
    kv_heads: int = 0  # key/value heads (gqa)
    head_dim: int = 0  # gqa
    q_lora_rank: int = 0  # mla: 0 = no low-rank query projection
    kv_lora_rank: int = 0  # mla: latent size, what the cache keeps per token
    qk_nope_head_dim: int = 0  # mla
    qk_rope_head_dim: int = 0  # mla: decoupled rotary key, shared by all heads
    v_head_dim: int = 0  # mla
    rope_interleave: bool = False  # rotate interleaved pairs (DeepSeek checkpoints)
    qk_norm: bool = False  # gqa: RMS norm of each head's query and key before rotary (Qwen3)
    qk_norm_all_heads: bool = (
        False  # gqa: ... over every head's features at once instead (MiniMax-M2; not in ma)
    )
    attention_bias: bool = False  # gqa: biases in the query, key and value projections (GLM-4.5)
    partial_rotary_factor: float = 1.0  # gqa: the share of each head's features that rotary rotates (GLM-4.5)
    attention_output_bias: bool = False  # gqa: a bias in the output projection too (gpt-oss)
    attention_sinks: bool = (
        False  # gqa: one learned logit per head joins each softmax, its value zero (gpt-oss)
    )
    sliding_window: Optional[int] = (
        None  # gqa: a sliding layer's query sees only the last this many positions
    )
    layer_types: Optional[list[str]] = (
        None  # per layer full_attention | sliding_attention (gpt-oss alternates)
    )
    num_experts: int = 0
    top_k: int = 0
    expert_hidden: int = 0
    dense_hidden: int = 0
    shared_experts: int = 0  # always-on experts added to the routed output
    n_group: int = 1  # sigmoid router: expert groups ...
    topk_group: int = 1  # ... of which each token may use this many
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True  # renormalize the top-k router weights to sum to one
    router_bias: bool = False  # softmax router: a learned bias on the logits (gpt-oss)
    expert_bias: bool = False  # biases in every expert's projections (gpt-oss)
    swiglu_limit: Optional[float] = (
        None  # clamped SwiGLU (gpt-oss): gate <= limit, |up| <= limit, (up + 1) ...
    )
    swiglu_alpha: float = 1.702  # ... x gate x sigmoid(alpha x gate); None: plain silu(gate) x up
    router_skew: float = 0.0  # synthetic skew for benchmarks: expert e's logit += skew * (1 - e / (E - 1))
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = (
        None  # YaRN: {rope_type: yarn, factor, original_max_position_embeddings, ...}
    )
    norm_eps: float = 1e-6
    dtype: Optional[str] = None  # None: the device's default (float32 on a CPU, bfloat16 on a GPU)
    seed: int = 0  # random weights are seeded per tensor name from this
    max_positions: Optional[int] = (
        None  # longest prompt + new tokens (a checkpoint's max_position_embeddings)
    )
    fp8_block: Optional[list[int]] = (
        None  # an FP8 checkpoint's scale block (rows, columns): routed experts stay FP8
    )
    mxfp4: bool = False  # routed experts stored MXFP4 (gpt-oss): 4-bit values, an exponent per 32

    def window(self, layer: int) -> Optional[int]:
        """The sliding window of `layer`'s attention, None where it sees every earlier position."""
        sliding = self.layer_types is not None and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.dense_layers

    @property
    def dtype_name(self) -> str:
        """The dtype weights are built in: model.dtype, or float32 when it is left to the device and
        the config has not been placed on one yet (Config.on_device)."""
        return self.dtype or "float32"


@dataclass(frozen=True)
class SamplingConfig:
    """Seeded sampling: each request draws from its own generator seeded by (seed, request id, step)."""

    temperature: float = 1.0  # 0: greedy
    top_k: Optional[int] = None  # keep the k most likely tokens
    top_p: Optional[float] = None  # keep the most likely tokens until their probability reaches p
    seed: int = 0


@dataclass(frozen=True)
class LinkConfig:
    """An emulated inter-node link (testing schedules on one machine): Gbit/s and microseconds."""

    bandwidth_gbps: float = 0.0
    latency_us: float = 0.0


@dataclass(frozen=True)
class RebalanceConfig:
    """Online expert rebalancing: every `every_steps` steps, place again by the last `window_steps`
    steps' load; adopt when the predicted rank load max/mean drops by at least `min_gain` (relative)."""

    every_steps: int = 4
    window_steps: int = 4
    min_gain: float = 0.05
    chunk_kib: int = 256  # weights move in messages of at most this many KiB ...
    chunks_in_flight: int = 4  # ... at most this many at a time from a rank
    checksums: bool = False  # testing: each rank's expert weights hashed after every switch


@dataclass(frozen=True)
class ParallelConfig:
    layout: str = "ep"  # ep: data-parallel attention, experts spread over ranks | ma
    attention_ranks: Union[int, str, None] = (
        None  # ma: world ranks 0..A-1 run attention ... (auto: ask the predictor)
    )
    moe_ranks: Union[int, str, None] = None  # ma: ... the other M ranks own the experts (auto: the rest)
    predictor: Optional[str] = None  # ma: a file from `hpcmoe predict train`, which chooses auto splits
    attention_replicas: int = 1  # ma: attention groups, each serving a slice of the requests
    attention_standby: bool = False  # ma: each head shard on two ranks, the second a bit-identical standby
    placement: str = "auto"  # auto | packed | one_per_rank | replicated | topology_aware
    experts_per_rank: Optional[int] = None  # packed: k experts on each of the first ceil(E/k) ranks
    ranks_per_node: Optional[int] = None  # pretend nodes of this many ranks (default: real nodes)
    threads: Optional[int] = None  # torch threads per rank (default: cores per rank)
    dispatch: str = "flat"  # flat | two_stage: cross to each other node once per token
    expert_schedule: str = (
        "auto"  # per_layer: one collective each way, experts once | per_source | auto (by phase)
    )
    link: Optional[LinkConfig] = None  # emulate inter-node links between (emulated) nodes
    placement_from: Optional[str] = None  # place by the observed /routing of an earlier run file
    capacity_factor: Optional[float] = None  # lossy: cap token slots per expert slot, drop the overflow
    expert_tp: int = 1  # tensor parallelism inside experts: each expert slot on a group of this many ranks
    expert_tp_dispatch: str = (
        "members"  # expert_tp: tokens go to every member | to the group's leader, which forwards
    )
    rebalance: Optional[RebalanceConfig] = None  # move experts during the run as the load changes (ep)
    wait: str = "yield"  # yield: sleep while waiting (ranks may share cores) | spin
    cuda_aware_mpi: Union[bool, str] = "auto"  # the MPI reads device memory: auto (ask it) | true | false


@dataclass(frozen=True)
class KillConfig:
    """Testing run.fault_tolerance: world rank `rank` kills itself (SIGKILL) in `step`, at `phase`
    (KILL_PHASES: route, dispatch, experts or combine of MoE layer `layer`; the step's record to rank 0,
    its stop vote, after the step; or while the survivors recover from a death in `step`)."""

    rank: int
    step: int = 1
    layer: int = 1
    phase: str = "dispatch"


@dataclass(frozen=True)
class RunConfig:
    batch: int = 4  # synthetic workload: number of requests
    prompt_len: int = 16  # synthetic workload: longest prompt
    prompt_len_min: Optional[int] = None  # synthetic workload: shortest prompt (default prompt_len)
    seed: int = 0  # synthetic workload seed
    prompt_ids: Optional[list[list[int]]] = None  # explicit prompts; replace the synthetic workload
    prompts: Optional[str] = None  # a JSONL file of {"id", "prompt" or "prompt_ids", "max_new_tokens"?}
    stop_at_eos: Optional[bool] = None  # a request ends at its eos token (default: true with a checkpoint)
    sampling: Optional[SamplingConfig] = None  # default: greedy
    max_new_tokens: int = 8
    batching: str = "continuous"  # continuous: requests join as slots free up | static: batch after batch
    max_batch: Optional[int] = (
        None  # active requests per attention-holding rank (default: what memory allows)
    )
    prefill_chunk: int = 512  # continuous: prompt tokens prefilled per step (a long prompt in chunks)
    micro_batches: int = 1  # each rank's requests in this many pipelined micro-batches
    decode_micro_batch_min: int = (
        32  # decode steps: micro-batches only as far as each keeps this many requests
    )
    device: str = "auto"  # auto (cuda when torch sees a GPU) | cpu | cuda
    timeout_s: float = 300.0  # watchdog: a rank waiting longer than this aborts the job
    stall_rank: Optional[int] = None  # testing: this rank sleeps before its first dispatch ...
    stall_at_step: int = 0  # ... in this step
    skew_drift: Optional[int] = (
        None  # benchmark workload: model.router_skew's hot experts rotate every N steps
    )
    fail_rank: Optional[int] = None  # testing: this rank raises ...
    fail_at_layer: int = 0  # ... in this layer ...
    fail_at_step: int = 0  # ... of this step
    signal_at_step: Optional[int] = None  # testing: the last rank sends itself SIGUSR1 as this step starts
    fault_tolerance: bool = False  # survive a dead rank (an MPI with ULFM): the others go on without it
    kill: Optional[list[KillConfig]] = None  # testing: ranks that kill themselves (SIGKILL), each at a point
    rebuild_slots: int = (
        1  # fault_tolerance: expert slots a survivor may add for experts that lost every replica
    )


@dataclass(frozen=True)
class OutputConfig:
    path: str = "hpcmoe_run.h5"
    save_logits: bool = False


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def prompts(self) -> list[list[int]]:
        """The prompts of this run: run.prompts, run.prompt_ids, or the seeded synthetic workload."""
        return [list(r.prompt_ids) for r in self.requests]

    @functools.cached_property
    def requests(self):
        """The run's requests (hpcmoe.workload.Request: id, prompt ids, max_new_tokens), made once per config."""
        from hpcmoe.workload import requests_of

        return requests_of(self)

    @property
    def steps(self) -> int:
        """Forward steps of the run: the largest max_new_tokens of its requests."""
        return int(self.requests.max_new_tokens.max())

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)

    def on_device(self, device: str) -> "Config":
        """The config as it runs on `device` (cpu or cuda): run.device resolved, and model.dtype, when
        not set, the device's default (float32 on a CPU, bfloat16 on a GPU)."""
        dtype = self.model.dtype or ("bfloat16" if device == "cuda" else "float32")
        return dataclasses.replace(
            self,
            model=dataclasses.replace(self.model, dtype=dtype),
            run=dataclasses.replace(self.run, device=device),
        )


# ---------------------------------------------------------------- loading and overrides


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    """Read a YAML file (or nothing), apply `a.b=value` overrides, validate, return the Config."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as e:
            raise ValueError(f"cannot read config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config {path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return build_config(raw)


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b=value` override in place; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. model.num_experts=8")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"--set {key}: value {text!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def build_config(raw: dict) -> Config:
    """Turn the raw nested dict into a validated Config (unknown keys and wrong types rejected)."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for name in raw:
        if name not in sections:
            raise ValueError(f"unknown config section {name!r}: expected one of {', '.join(sections)}")
    built = {}
    for name in sections:
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{name}: expected a mapping, got {section!r}")
        cls = typing.get_type_hints(Config)[name]
        if name == "model":
            section = resolve_model(section)
        built[name] = build_section(cls, section, name)
    config = Config(**built)
    validate(config)
    return config


def resolve_model(section: dict) -> dict:
    """Model fields: a checkpoint's config.json, or a preset overlaid by what the user set."""
    checkpoint, preset = section.get("checkpoint"), section.get("preset")
    if checkpoint is not None:
        if preset is not None:
            raise ValueError("model.preset and model.checkpoint: set one, not both")
        extra = sorted(k for k, v in section.items() if k not in ("checkpoint", "dtype") and v is not None)
        if extra:
            raise ValueError(
                f"model.{extra[0]}: comes from the checkpoint's config.json; with model.checkpoint "
                f"only model.dtype may be set"
            )
        if not isinstance(checkpoint, str):
            raise ValueError(f"model.checkpoint: expected a directory path, got {checkpoint!r}")
        from hpcmoe.model.checkpoint import model_fields

        return {**model_fields(checkpoint), **section}
    if preset is None:
        raise ValueError(
            "model.preset: not set; expected one of: " + ", ".join(PRESETS) + " (or model.checkpoint)"
        )
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"model.preset: {preset!r} is not a preset; expected one of: " + ", ".join(PRESETS))
    return {**PRESETS[preset], **section}


def build_section(cls, section: dict, path: str):
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in section.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else f"expected one of {', '.join(known)}"
            raise ValueError(f"unknown config key {path}.{key}: {hint}")
        values[key] = check_type(value, hints[key], f"{path}.{key}")
    for f in dataclasses.fields(cls):  # a key without a default (run.kill[i].rank) must be given
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        require(
            f.name in values or not required,
            f"{path}.{f.name}: required; expected {expected_of(hints[f.name])}",
        )
    return cls(**values)


def expected_of(annotation) -> str:
    """What a key of this type holds, in the words of check_type's errors."""
    return "a number" if annotation is float else SIMPLE_TYPES.get(annotation, (str(annotation),))[0]


SIMPLE_TYPES = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    dict: ("a mapping", lambda v: isinstance(v, dict)),
}


def check_type(value, annotation, path: str):
    """Return `value` as `annotation` or raise naming the path; YAML 1.1 '1e-3' strings become floats."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X], or X | Y: the first that accepts the value
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        for choice in choices[:-1]:
            try:
                return check_type(value, choice, path)
            except ValueError:
                pass
        return check_type(value, choices[-1], path)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        return [check_type(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if annotation is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if dataclasses.is_dataclass(annotation):
        return build_section(annotation, check_type(value, dict, path), path)
    if annotation in SIMPLE_TYPES:
        expected, accepts = SIMPLE_TYPES[annotation]
        if not accepts(value):
            raise ValueError(f"{path}: expected {expected}, got {value!r}")
        return dict(value) if annotation is dict else value
    raise TypeError(f"{path}: unsupported annotation {annotation}")  # a bug in this file, not user input


# ---------------------------------------------------------------- relations between fields


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate_model(m: ModelConfig) -> None:
    positive = [
        "vocab",
        "hidden",
        "num_layers",
        "heads",
        "num_experts",
        "top_k",
        "expert_hidden",
        "dense_hidden",
    ]
    positive += (
        ["kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
        if m.attention == "mla"
        else ["kv_heads", "head_dim"]
    )
    for name in positive:
        require(getattr(m, name) >= 1, f"model.{name}: expected an integer >= 1, got {getattr(m, name)}")
    for name in ("q_lora_rank", "shared_experts"):
        require(getattr(m, name) >= 0, f"model.{name}: expected an integer >= 0, got {getattr(m, name)}")
    require(
        m.attention in ("gqa", "mla"),
        f"model.attention: {m.attention!r} is not supported; expected gqa or mla",
    )
    require(
        m.router in ("softmax", "sigmoid"),
        f"model.router: {m.router!r} is not supported; expected softmax or sigmoid",
    )
    require(
        0 <= m.dense_layers <= m.num_layers,
        f"model.dense_layers: {m.dense_layers} must be between 0 and model.num_layers ({m.num_layers})",
    )
    require(
        m.top_k <= m.num_experts, f"model.top_k: {m.top_k} must be <= model.num_experts ({m.num_experts})"
    )
    if m.attention == "gqa":
        require(
            m.heads % m.kv_heads == 0,
            f"model.heads: {m.heads} must be a multiple of model.kv_heads ({m.kv_heads})",
        )
    rotary = m.qk_rope_head_dim if m.attention == "mla" else m.head_dim
    require(
        rotary % 2 == 0,
        f"model.{'qk_rope_head_dim' if m.attention == 'mla' else 'head_dim'}: {rotary} "
        f"must be even (RoPE rotates pairs)",
    )
    require(
        m.n_group >= 1 and m.num_experts % m.n_group == 0,
        f"model.n_group: {m.n_group} must divide model.num_experts ({m.num_experts})",
    )
    require(
        1 <= m.topk_group <= m.n_group,
        f"model.topk_group: {m.topk_group} must be between 1 and model.n_group ({m.n_group})",
    )
    require(
        m.top_k <= m.topk_group * (m.num_experts // m.n_group),
        f"model.top_k: {m.top_k} must be <= topk_group ({m.topk_group}) x experts per group "
        f"({m.num_experts // m.n_group})",
    )
    require(
        m.router == "sigmoid" or m.n_group == 1,
        "model.n_group: group-limited routing needs model.router: sigmoid",
    )
    require(
        m.dtype is None or m.dtype in DTYPES,
        f"model.dtype: {m.dtype!r} is not supported; expected one of {', '.join(DTYPES)}",
    )
    require(m.norm_eps > 0, f"model.norm_eps: expected a number > 0, got {m.norm_eps}")
    for name in ("rope_theta", "routed_scaling_factor", "swiglu_alpha"):
        require(getattr(m, name) > 0, f"model.{name}: expected a number > 0, got {getattr(m, name)}")
    require(
        0 < m.partial_rotary_factor <= 1,
        f"model.partial_rotary_factor: expected a number in (0, 1], got {m.partial_rotary_factor}",
    )
    validate_gpt_oss_fields(m)
    require(
        m.max_positions is None or m.max_positions >= 1,
        f"model.max_positions: expected an integer >= 1, got {m.max_positions}",
    )
    require(
        m.fp8_block is None or (len(m.fp8_block) == 2 and min(m.fp8_block) >= 1),
        f"model.fp8_block: expected two integers >= 1 (the scale block's rows and columns), got {m.fp8_block}",
    )
    if m.rope_scaling is not None:
        validate_rope_scaling(m.rope_scaling)


ROPE_SCALING_NUMBERS = {
    "factor": ">",
    "original_max_position_embeddings": ">",
    "attention_factor": ">",
    "beta_fast": ">=",
    "beta_slow": ">=",
    "mscale": ">=",
    "mscale_all_dim": ">=",
}  # against 0


def validate_rope_scaling(scaling: dict) -> None:
    """YaRN's keys: known, rope_type yarn, factor and original_max_position_embeddings given, every
    number a finite number (> 0, or >= 0 where 0 means the default), truncate true or false."""
    import math

    unknown = sorted(set(scaling) - set(ROPE_SCALING_KEYS))
    require(
        not unknown,
        f"model.rope_scaling.{unknown[0] if unknown else ''}: unknown key; expected "
        f"{', '.join(ROPE_SCALING_KEYS)}",
    )
    kind = scaling.get("rope_type")
    require(
        kind == "yarn",
        f"model.rope_scaling.rope_type: {kind!r} is not supported; expected yarn "
        f"(or no rope_scaling for plain RoPE)",
    )
    for key, bound in ROPE_SCALING_NUMBERS.items():
        value = scaling.get(key)
        if value is None and key not in ("factor", "original_max_position_embeddings"):
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        require(
            number and (value > 0 if bound == ">" else value >= 0),
            f"model.rope_scaling.{key}: expected a number {bound} 0, got {value!r}",
        )
    truncate = scaling.get("truncate")
    require(
        truncate is None or isinstance(truncate, bool),
        f"model.rope_scaling.truncate: expected true or false, got {truncate!r}",
    )


def validate_gpt_oss_fields(m: ModelConfig) -> None:
    """Sinks, sliding windows, biases, the clamped SwiGLU and MXFP4 experts (gpt-oss's features)."""
    for name in ("attention_output_bias", "attention_sinks", "sliding_window"):
        require(
            m.attention == "gqa" or not getattr(m, name),
            f"model.{name}: only with model.attention: gqa (MLA has no such option here)",
        )
    if m.layer_types is not None:
        kinds = ("full_attention", "sliding_attention")
        require(
            len(m.layer_types) == m.num_layers,
            f"model.layer_types: {len(m.layer_types)} entries for model.num_layers ({m.num_layers}) layers",
        )
        bad = [kind for kind in m.layer_types if kind not in kinds]
        require(not bad, f"model.layer_types: {bad[:1]} is not one of {', '.join(kinds)}")
        require(
            "sliding_attention" not in m.layer_types or (m.sliding_window or 0) >= 1,
            f"model.sliding_window: sliding_attention layers need a window >= 1, got {m.sliding_window}",
        )
    require(
        m.sliding_window is None or m.sliding_window >= 1,
        f"model.sliding_window: expected an integer >= 1, got {m.sliding_window}",
    )
    require(
        m.swiglu_limit is None or m.swiglu_limit > 0,
        f"model.swiglu_limit: expected a number > 0, got {m.swiglu_limit}",
    )
    require(not m.router_bias or m.router == "softmax", "model.router_bias: only with model.router: softmax")
    require(
        not m.fp8_block or not (m.expert_bias or m.swiglu_limit),
        "model.fp8_block: FP8 experts run plain SwiGLU without biases; model.expert_bias and model.swiglu_limit "
        "need unquantized or MXFP4 experts",
    )
    if m.mxfp4:
        require(not m.fp8_block, "model.mxfp4 and model.fp8_block: an expert is stored one way, not both")
        for name in ("hidden", "expert_hidden"):
            require(
                getattr(m, name) % MXFP4_BLOCK == 0,
                f"model.{name}: {getattr(m, name)} must be a multiple of {MXFP4_BLOCK} with model.mxfp4 "
                f"(one exponent per {MXFP4_BLOCK} weights)",
            )


def validate_ma(m: ModelConfig, p: ParallelConfig) -> None:
    """Attention/MoE separation: the relations that do not need the rank count."""
    a, e, r = p.attention_ranks, p.moe_ranks, p.attention_replicas
    if "auto" in (a, e):
        for name, value in (("attention_ranks", a), ("moe_ranks", e)):
            require(
                value in ("auto", None),
                f"parallel.{name}: {value!r} with an auto split; set both to auto "
                f"(the predictor chooses attention_ranks + moe_ranks = world size)",
            )
        require(
            p.predictor is not None,
            "parallel.attention_ranks: auto needs parallel.predictor: PATH, a machine file (every split "
            "simulated on it, e.g. machines/this_box.yaml from `hpcmoe calibrate`) or a predictor made by "
            "`hpcmoe predict train RUN.h5 ... --out PATH` from runs of `hpcmoe predict collect`",
        )
        require(
            os.path.isfile(p.predictor),
            f"parallel.predictor: {p.predictor!r} is not a file; give a machine "
            f"file (`hpcmoe calibrate --output {p.predictor}` for a .yaml) or "
            f"a predictor (`hpcmoe predict train RUN.h5 ... --out {p.predictor}`)",
        )
        return  # the rest is checked once the predictor has chosen (hpcmoe.analysis.predict.choose_split)
    for name, value in (("attention_ranks", a), ("moe_ranks", e)):
        require(
            value is None or isinstance(value, int),
            f"parallel.{name}: expected an integer or auto, got {value!r}",
        )
    require(
        a is not None and a >= 1 and e is not None and e >= 1,
        f"parallel.layout=ma needs parallel.attention_ranks and parallel.moe_ranks >= 1, got {a} and {e}",
    )
    require(
        r >= 1 and a % r == 0,
        f"parallel.attention_ranks ({a}) must be a multiple of parallel.attention_replicas ({r})",
    )
    shards = a // r // (2 if p.attention_standby else 1)
    require(
        not p.attention_standby or (a // r) % 2 == 0,
        f"parallel.attention_standby pairs ranks: attention ranks per replica ({a // r}) must be even",
    )
    require(m.heads >= shards, f"model.heads ({m.heads}) must be >= attention ranks per replica ({shards})")
    require(m.num_experts >= e, f"model.num_experts ({m.num_experts}) must be >= parallel.moe_ranks ({e})")
    require(
        p.dispatch == "flat",
        "parallel.layout=ma sends tokens straight to the MoE ranks: use parallel.dispatch=flat",
    )
    require(
        p.placement in ("auto", "packed"),
        f"parallel.layout=ma packs experts over the MoE ranks: "
        f"parallel.placement must be auto or packed, got {p.placement}",
    )


def validate_expert_tp(m: ModelConfig, p: ParallelConfig) -> None:
    """Tensor parallelism inside experts: the relations that do not need the rank count."""
    t = p.expert_tp
    require(
        p.layout == "ep",
        f"parallel.expert_tp ({t}) splits experts over groups of ep ranks; "
        f"parallel.layout=ma keeps whole experts on its MoE ranks: use expert_tp 1",
    )
    require(
        m.expert_hidden % t == 0,
        f"parallel.expert_tp ({t}) must divide model.expert_hidden ({m.expert_hidden})",
    )
    inner = m.expert_hidden // t
    require(
        not m.fp8_block or (inner % m.fp8_block[0] == 0 and inner % m.fp8_block[1] == 0),
        f"parallel.expert_tp ({t}): each rank's share of model.expert_hidden ({m.expert_hidden} / {t} = "
        f"{inner}) must be whole FP8 blocks ({m.fp8_block}): the block scales are not split",
    )
    require(
        not m.mxfp4 or inner % MXFP4_BLOCK == 0,
        f"parallel.expert_tp ({t}): each rank's share of model.expert_hidden ({m.expert_hidden} / {t} = "
        f"{inner}) must be whole MXFP4 blocks of {MXFP4_BLOCK}: the exponents are not split",
    )


def validate(config: Config) -> None:
    """Check relations that hold whatever the rank count (the layout checks the rest)."""
    m, p, r = config.model, config.parallel, config.run
    validate_model(m)
    require(p.layout in ("ep", "ma"), f"parallel.layout: {p.layout!r} is not supported; expected ep or ma")
    if p.layout == "ma":
        validate_ma(m, p)
    placements = ("auto", "packed", "one_per_rank", "replicated", "topology_aware")
    require(
        p.placement in placements,
        f"parallel.placement: {p.placement!r} is not supported; expected one of {', '.join(placements)}",
    )
    require(
        p.dispatch in ("flat", "two_stage"),
        f"parallel.dispatch: {p.dispatch!r} is not supported; expected flat or two_stage",
    )
    require(
        p.expert_schedule in ("per_layer", "per_source", "auto"),
        f"parallel.expert_schedule: {p.expert_schedule!r} is not supported; expected per_layer, per_source or auto",
    )
    for name in ("experts_per_rank", "ranks_per_node", "threads", "expert_tp"):
        value = getattr(p, name)
        require(value is None or value >= 1, f"parallel.{name}: expected an integer >= 1, got {value}")
    require(
        p.expert_tp_dispatch in ("members", "leader"),
        f"parallel.expert_tp_dispatch: {p.expert_tp_dispatch!r} is not supported; expected members or leader",
    )
    if p.expert_tp > 1:
        validate_expert_tp(m, p)
    if p.rebalance is not None:
        b = p.rebalance
        require(
            p.layout == "ep",
            "parallel.rebalance moves experts between ep ranks; parallel.layout=ma packs them "
            "over its MoE ranks once",
        )
        for name in ("every_steps", "window_steps", "chunk_kib", "chunks_in_flight"):
            require(
                getattr(b, name) >= 1,
                f"parallel.rebalance.{name}: expected an integer >= 1, got {getattr(b, name)}",
            )
        require(
            0 <= b.min_gain < 1, f"parallel.rebalance.min_gain: expected a number in [0, 1), got {b.min_gain}"
        )
    require(
        r.skew_drift is None or r.skew_drift >= 1,
        f"run.skew_drift: expected an integer >= 1, got {r.skew_drift}",
    )
    for i, kill in enumerate(r.kill or []):
        require(
            kill.phase in KILL_PHASES,
            f"run.kill[{i}].phase: {kill.phase!r} is not one of {', '.join(KILL_PHASES)}",
        )
        for name in ("step", "layer"):
            require(
                getattr(kill, name) >= 0,
                f"run.kill[{i}].{name}: expected an integer >= 0, got {getattr(kill, name)}",
            )
    for name in ("stall_at_step", "signal_at_step"):
        value = getattr(r, name)
        require(value is None or value >= 0, f"run.{name}: expected an integer >= 0, got {value}")
    require(r.rebuild_slots >= 0, f"run.rebuild_slots: expected an integer >= 0, got {r.rebuild_slots}")
    require(r.max_new_tokens >= 1, f"run.max_new_tokens: expected an integer >= 1, got {r.max_new_tokens}")
    require(
        r.prompts is None or r.prompt_ids is None,
        "run.prompts and run.prompt_ids: give one of them, not both",
    )
    if r.sampling is not None:
        s = r.sampling
        require(s.temperature >= 0, f"run.sampling.temperature: expected a number >= 0, got {s.temperature}")
        require(
            s.top_k is None or s.top_k >= 1, f"run.sampling.top_k: expected an integer >= 1, got {s.top_k}"
        )
        require(
            s.top_p is None or 0 < s.top_p <= 1,
            f"run.sampling.top_p: expected a number in (0, 1], got {s.top_p}",
        )
    require(
        not (p.layout == "ma" and m.qk_norm_all_heads),
        "parallel.layout: ma splits the heads over ranks, but this model's q/k norm (MiniMax-M2) spans every "
        "head at once; use parallel.layout=ep",
    )
    require(
        r.batching in ("continuous", "static"),
        f"run.batching: {r.batching!r} is not supported; expected continuous or static",
    )
    require(
        r.max_batch is None or r.max_batch >= 1, f"run.max_batch: expected an integer >= 1, got {r.max_batch}"
    )
    require(r.prefill_chunk >= 1, f"run.prefill_chunk: expected an integer >= 1, got {r.prefill_chunk}")
    require(r.micro_batches >= 1, f"run.micro_batches: expected an integer >= 1, got {r.micro_batches}")
    require(
        r.decode_micro_batch_min >= 1,
        f"run.decode_micro_batch_min: expected an integer >= 1, got {r.decode_micro_batch_min}",
    )
    require(r.timeout_s > 0, f"run.timeout_s: expected a number > 0, got {r.timeout_s}")
    require(
        p.wait in ("yield", "spin"), f"parallel.wait: {p.wait!r} is not supported; expected yield or spin"
    )
    require(
        p.cuda_aware_mpi in (True, False, "auto"),
        f"parallel.cuda_aware_mpi: {p.cuda_aware_mpi!r} is not supported; expected auto, true or false",
    )
    require(
        r.device in ("auto", "cpu", "cuda"),
        f"run.device: {r.device!r} is not supported; expected auto, cpu or cuda",
    )
    require(
        p.capacity_factor is None or p.capacity_factor > 0,
        f"parallel.capacity_factor: expected a number > 0, got {p.capacity_factor}",
    )
    if p.link is not None:
        require(
            p.link.bandwidth_gbps > 0,
            f"parallel.link.bandwidth_gbps: expected a number > 0, got {p.link.bandwidth_gbps}",
        )
        require(
            p.link.latency_us >= 0,
            f"parallel.link.latency_us: expected a number >= 0, got {p.link.latency_us}",
        )
    require(
        0 <= r.fail_at_layer < m.num_layers,
        f"run.fail_at_layer: {r.fail_at_layer} must be between 0 and {m.num_layers - 1}",
    )
    require(
        0 <= r.fail_at_step < r.max_new_tokens,
        f"run.fail_at_step: {r.fail_at_step} must be between 0 and {r.max_new_tokens - 1}",
    )
    if r.prompt_ids is not None:
        require(len(r.prompt_ids) >= 1, "run.prompt_ids: expected at least one prompt, got []")
        for i, prompt in enumerate(r.prompt_ids):
            require(len(prompt) >= 1, f"run.prompt_ids[{i}]: expected at least one token, got []")
            bad = [t for t in prompt if not 0 <= t < m.vocab]
            require(not bad, f"run.prompt_ids[{i}]: token {bad[:1]} outside the vocabulary [0, {m.vocab})")
    else:
        require(r.batch >= 1, f"run.batch: expected an integer >= 1, got {r.batch}")
        require(r.prompt_len >= 1, f"run.prompt_len: expected an integer >= 1, got {r.prompt_len}")
        shortest = r.prompt_len_min
        require(
            shortest is None or 1 <= shortest <= r.prompt_len,
            f"run.prompt_len_min: {shortest} must be between 1 and run.prompt_len ({r.prompt_len})",
        )
    validate_positions(m, r)
    validate_stop_at_eos(m, r)


def validate_positions(m: ModelConfig, r: RunConfig) -> None:
    """The longest of run.prompt_ids, or the synthetic workload's run.prompt_len, plus run.max_new_tokens
    within model.max_positions (a prompt file is checked line by line: hpcmoe.workload.PromptFile)."""
    from hpcmoe.workload import check_positions

    if r.prompts is not None:
        return
    if r.prompt_ids is not None:
        i = max(range(len(r.prompt_ids)), key=lambda i: len(r.prompt_ids[i]))
        check_positions(f"run.prompt_ids[{i}]", len(r.prompt_ids[i]), r.max_new_tokens, m.max_positions)
    else:
        check_positions("run.prompt_len", r.prompt_len, r.max_new_tokens, m.max_positions)


def validate_stop_at_eos(m: ModelConfig, r: RunConfig) -> None:
    """run.stop_at_eos: true needs the checkpoint's end-of-sequence id (the default, unset, stops at it
    when there is one); the checkpoint's files that name it are read (and checked) here."""
    if r.stop_at_eos is False or not (r.stop_at_eos or m.checkpoint):
        return
    from hpcmoe.workload import eos_ids

    source = (
        f"model.checkpoint {m.checkpoint}" if m.checkpoint else f"model.preset {m.preset} (random weights)"
    )
    require(
        bool(eos_ids(m.checkpoint)) or not r.stop_at_eos,
        f"run.stop_at_eos needs an end-of-sequence id: a model.checkpoint with eos_token_id in its "
        f"generation_config.json or config.json; {source} has none (set run.stop_at_eos: false)",
    )
