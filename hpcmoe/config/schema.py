"""The config's schema: one frozen dataclass per YAML section (model, parallel, run, output) and
its nested sections, every key with its default and a comment saying what it means; the constants
the checks share; and `require`, the one-line ValueError every check raises. A config key is added
here (and checked in the model, parallel or run checks).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Optional, Union

import yaml

from hpcmoe.workload import requests_of

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
        """The run's requests (hpcmoe.workload.Request: id, prompt ids, max_new_tokens), made once per
        config."""
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


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
