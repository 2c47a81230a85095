"""What each phase of a step costs on a machine: the engine's own work in FLOPs and bytes, over the
machine's rates, plus the engine's fixed cost of the phase (machine.fixed). The simulator asks for
every phase it schedules; nothing here knows about time or ranks.

Shapes as the engine runs them: attention on the micro-batch padded to [b, t] new positions over
s visible keys (the mask is applied inside a dense kernel), MLPs and experts on the valid rows.
A GEMM of m rows costs max(FLOPs / rate, weight bytes / bandwidth), the bandwidth by shape class
(m < decode_rows_below: decode-shaped, the rate at which such GEMMs stream their weights, faster
while the weights that ranks sharing a cache read each step fit in it; else the memory bandwidth).
Passes over activations (norms, rotary, residual adds, the gathers and sums of the exchange) go at
the elementwise rate. Expert calls follow MoE.run_experts: small groups as two
batched GEMMs over every hosted expert, else one GEMM chain per hit expert; FP8 experts are
dequantized per call into the model dtype (1 byte read, then written and read in that dtype).
"""

from __future__ import annotations

import numpy as np

from hpcmoe.model.moe import MoE
from hpcmoe.sim.machine import Machine

# phases whose fixed cost runs between the model's weight reads (machine.fixed_factor scales them);
# the step's record, the file append and MPI posting run apart from them. The factor is fitted on
# the first five (fit.SCALED_PHASES) and taken to hold for the exchange's phases too.
AMONG_WEIGHTS = (
    "embed",
    "attention",
    "mlp",
    "route",
    "shared_experts",
    "dispatch_post",
    "experts",
    "combine",
    "gateway",
    "reduce",
    "gather",
    "lm_head",
)
ELEMENTWISE_PASSES = (
    12  # norms, rotary, cache writes, residual adds around one attention: passes over [rows, H]
)


class Costs:
    """Seconds of each phase for one model (config.model with its dtype resolved) on one machine."""

    def __init__(self, model, machine: Machine, weights_per_cache: float = 0.0, expert_tp: int = 1):
        """weights_per_cache: bytes of weights the ranks sharing a cache read each step (their sum):
        whether decode GEMMs find them in the cache (Machine.decode_rate_factors), and how much of the
        engine's own code and data they evict (Machine.fixed_factor). expert_tp: a rank computes
        1/expert_tp of each expert it serves (parallel.expert_tp)."""
        self.m, self.machine, self.expert_tp = model, machine, expert_tp
        self.item = 2 if model.dtype_name == "bfloat16" else 4
        self.rate = machine.gemm_flops[model.dtype_name]
        self.decode_weights = machine.gemm_decode_bytes_per_s[model.dtype_name]
        self.decode_factors = {
            kernel: machine.decode_rate_factors(weights_per_cache, kernel) for kernel in ("linear", "grouped")
        }
        self.attention_rate = machine.attention_flops[model.dtype_name]
        scale = machine.fixed_factor(weights_per_cache)
        self.fixed = {
            phase: seconds * (scale if phase in AMONG_WEIGHTS else 1.0)
            for phase, seconds in machine.fixed.items()
        }
        # bytes per weight an expert call reads: FP8 (MXFP4: 4.25 bits) is read, written in the model
        # dtype, read again
        quantized = 1 if model.fp8_block else 4.25 / 8 if model.mxfp4 else 0
        self.expert_item = quantized + 2 * self.item if quantized else self.item

    def bandwidth(self, nbytes):
        return np.asarray(nbytes, float) / self.machine.memory_bytes_per_s

    def activations(self, nbytes):
        return np.asarray(nbytes, float) / self.machine.elementwise_bytes_per_s

    def gemm(self, rows, flops, weight_bytes, kernel: str = "linear"):
        """rows, flops: scalars or arrays -> seconds: max(compute, weights streamed at the shape class's
        rate: decode-shaped, the kernel's at those rows and this working set)."""
        rows = np.asarray(rows, float)
        decode = self.decode_weights * np.interp(rows, *self.decode_factors[kernel])
        stream = np.where(rows < self.machine.decode_rows_below, decode, self.machine.memory_bytes_per_s)
        return np.maximum(np.asarray(flops, float) / self.rate, np.asarray(weight_bytes, float) / stream)

    # ------------------------------------------------------------ per micro-batch and layer

    def attention(self, b: int, t: int, s: int, heads: int, kv_heads: int) -> float:
        """One layer's attention half for b requests padded to t new positions over s keys, `heads`
        query heads (all, or an ma rank's shard) reading `kv_heads` key/value heads (gqa)."""
        m, item, rows = self.m, self.item, b * t
        H = m.hidden
        if m.attention == "gqa":
            d, width = m.head_dim, (heads + 2 * kv_heads) * m.head_dim
            projections = self.gemm(rows, 2 * rows * H * width, H * width * item) + self.gemm(
                rows, 2 * rows * heads * d * H, heads * d * H * item
            )
            score_flops, cache_bytes = 4 * b * heads * t * s * d, b * s * 2 * kv_heads * d * item
        else:
            r, nope, rope, v, q_rank = (
                m.kv_lora_rank,
                m.qk_nope_head_dim,
                m.qk_rope_head_dim,
                m.v_head_dim,
                m.q_lora_rank,
            )
            query = heads * (nope + rope)
            projections = (
                (
                    self.gemm(rows, 2 * rows * H * q_rank, H * q_rank * item)
                    + self.gemm(rows, 2 * rows * q_rank * query, q_rank * query * item)
                )
                if q_rank
                else self.gemm(rows, 2 * rows * H * query, H * query * item)
            )
            projections += self.gemm(rows, 2 * rows * H * (r + rope), H * (r + rope) * item)
            projections += self.gemm(rows, 2 * rows * heads * v * H, heads * v * H * item)
            up = heads * (nope + v) * r  # the key/value up-projection
            if t == 1:  # absorbed into the query and the output: attention over the latent
                projections += self.gemm(b, 2 * b * up, up * item)
                score_flops, cache_bytes = 2 * b * heads * s * (2 * r + rope), b * s * (r + rope) * item
            else:  # keys and values built for every visible position
                projections += self.gemm(b * s, 2 * b * s * up, up * item) + self.activations(
                    b * s * heads * (nope + v) * item
                )
                score_flops, cache_bytes = (
                    2 * b * heads * t * s * (nope + rope + v),
                    b * s * (r + rope) * item,
                )
        scores = max(score_flops / self.attention_rate, cache_bytes / self.machine.attention_bytes_per_s)
        return float(
            self.fixed["attention"]
            + projections
            + scores
            + self.activations(ELEMENTWISE_PASSES * rows * H * item)
        )

    def residual(self, b: int, t: int) -> float:
        """ma: the group's summed attention added to the residual stream, then the post-attention norm."""
        return float(self.fixed["embed"] + self.activations(3 * b * t * self.m.hidden * self.item))

    def embed(self, b: int, t: int) -> float:
        return float(self.fixed["embed"] + self.activations(2 * b * t * self.m.hidden * self.item))

    def mlp(self, n: int) -> float:
        """A dense layer's SwiGLU on n valid rows."""
        H, inner = self.m.hidden, self.m.dense_hidden
        return float(self.fixed["mlp"] + self.gemm(n, 6 * n * H * inner, 3 * H * inner * self.item))

    def route(self, n: int) -> float:
        """Router GEMM (float32 for the sigmoid router, as the engine keeps it), top-k, slot choice."""
        m = self.m
        item = 4 if m.router == "sigmoid" else self.item
        return float(
            self.fixed["route"]
            + self.gemm(n, 2 * n * m.hidden * m.num_experts, m.num_experts * m.hidden * item)
        )

    def shared_experts(self, n: int) -> float:
        """The phase runs in every MoE layer; without shared experts it only asks for them."""
        m = self.m
        if not m.shared_experts:
            return float(self.fixed["shared_experts"])
        inner = m.expert_hidden * m.shared_experts
        return float(
            self.fixed["mlp"] + self.gemm(n, 6 * n * m.hidden * inner, 3 * m.hidden * inner * self.item)
        )

    def dispatch_post(self, rows: int) -> float:
        """The host read of the counts and the gather of `rows` sent rows into one buffer."""
        return float(self.fixed["dispatch_post"] + self.activations(2 * rows * self.m.hidden * self.item))

    def combine(self, tokens: int = 0, partial_rows: int = 0) -> float:
        """The tokens' k answers summed with their weights (one weighted gather-sum); with expert_tp,
        `partial_rows` members' partial rows summed in float32 (per_layer.sum_partials)."""
        m = self.m
        weighted = (tokens * m.top_k + 2 * tokens) * self.item
        return float(
            self.fixed["combine"] + self.activations((weighted + partial_rows * (self.item + 8)) * m.hidden)
        )

    def gateway(self, rows: int, row_bytes: int) -> float:
        """A two_stage gateway phase over `rows` packed rows (unpack and plan, or partial combine)."""
        return float(self.fixed["gateway"] + self.activations(2 * rows * row_bytes))

    def lm_head(self, b: int, vocab: int) -> float:
        H = self.m.hidden
        return float(self.fixed["lm_head"] + self.gemm(b, 2 * b * H * vocab, H * vocab * self.item))

    def reduce(self, nbytes: int) -> float:
        """One step of ma's hierarchical sum: adding `nbytes` of float32 partials."""
        return float(self.fixed["reduce"] + self.activations(2 * nbytes))

    def gather(self, nbytes: int) -> float:
        return float(self.fixed["gather"] + self.activations(nbytes))

    def messages(self, count: int) -> float:
        return count * self.fixed["message"]

    # ------------------------------------------------------------ expert calls, vectorized over calls

    def experts(self, counts: np.ndarray) -> np.ndarray:
        """counts: [calls, S] rows per hosted expert slot of each run_experts call -> [calls] seconds
        (of this rank's share of each expert, with expert_tp).
        Small groups (at most MoE.GROUPED_ROWS rows, at least half the experts hit) run as two batched
        GEMMs padded over every hosted expert; otherwise one GEMM chain per hit expert."""
        counts = np.asarray(counts, float).reshape(len(counts), -1)
        slots, H, inner = counts.shape[1], self.m.hidden, self.m.expert_hidden / self.expert_tp
        per_expert = 3 * H * inner
        most, hit = counts.max(1, initial=0), (counts > 0).sum(1)
        grouped = (
            (slots >= 2)
            & (not (self.m.fp8_block or self.m.mxfp4))
            & (hit > 0)
            & (most <= MoE.GROUPED_ROWS)
            & (2 * hit >= slots)
        )
        batched = self.gemm(most, 2 * per_expert * slots * most, slots * per_expert * self.item, "grouped")
        chains = np.where(
            counts > 0, self.gemm(counts, 2 * per_expert * counts, per_expert * self.expert_item), 0.0
        )
        return self.fixed["experts"] + np.where(grouped, batched, chains.sum(1))
