"""Token dispatch and combine math for one MoE layer (Megatron's pre / comm / post split).

Pure tensor functions, testable without MPI. A placement is compiled once into tensors
(`PlacementTables`, EPLB's phy2log / log2phy as index tables); per layer, slot choice, capacity,
per-destination counts and the send order are a handful of tensor ops (counts, argsort, cumsum,
index_select) over the n x k routing entries: no Python loop over ranks, experts or slots, and
no host synchronisation on a GPU (counts by scatter_add, which needs no maximum, not bincount).
The exchanges that move these tensors are in hpcmoe/runtime/moe_layer.py.

Shapes: n tokens, k choices, H hidden, E experts, P physical slots, R ranks, N nodes,
S = most slots on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hpcmoe.parallel.placement import Placement, replica_split


@dataclass(frozen=True)
class PlacementTables:
    """A placement compiled for one source rank; built once, read by every layer."""

    source_rank: int
    candidates: torch.Tensor  # [E, C] slots this source may use for expert e (padded by repeating the first)
    num_candidates: torch.Tensor  # [E] real entries of candidates[e]
    single: bool  # every expert has one candidate: no round robin needed
    slot_rank: torch.Tensor  # [P] rank hosting each slot (non-decreasing)
    slot_local: torch.Tensor  # [P] position of the slot among its rank's slots
    # [R + 1] rank r hosts slots rank_first_slot[r] .. rank_first_slot[r + 1] - 1
    rank_first_slot: torch.Tensor
    slot_node: torch.Tensor  # [P] node of each slot's rank
    gateway: tuple[int, ...]  # [N] the rank of each node that receives this source's tokens (two-stage)
    slots_per_rank: tuple[int, ...]  # [R] how many slots each rank hosts
    max_slots_per_rank: int  # S
    slot_is_rank: bool  # slot p is on rank p (one per rank): counts per slot are counts per rank
    tp: int = 1  # ranks per expert group (slot_rank names the leader)

    def served_slots(self, rank: int) -> int:
        """How many slots `rank` computes: its own, or with expert groups its leader's (a share of each)."""
        return self.slots_per_rank[rank - rank % self.tp]

    @property
    def num_slots(self) -> int:
        return len(self.slot_rank)

    @property
    def num_ranks(self) -> int:
        return len(self.rank_first_slot) - 1


def gateway(source: int, node: int, node_of_rank) -> int:
    """The rank of `node` that receives `source`'s tokens: the source itself on its own node, else
    the rank with the same position in its node (wrapping), which spreads sources over gateways."""
    if node_of_rank[source] == node:
        return source
    mine = [r for r, n in enumerate(node_of_rank) if n == node_of_rank[source]]
    theirs = [r for r, n in enumerate(node_of_rank) if n == node]
    return theirs[mine.index(source) % len(theirs)]


def compile_placement(placement: Placement, source_rank: int, node_of_rank, device=None) -> PlacementTables:
    """The tables of `placement` as seen from `source_rank`; node_of_rank: [R] node of every rank."""
    node_of_rank = list(node_of_rank)
    ranks = placement.num_ranks
    if len(node_of_rank) != ranks:
        raise ValueError(f"node_of_rank has {len(node_of_rank)} entries, placement has {ranks} ranks")
    candidates = []
    for slots in placement.expert_slots():  # a source uses the replicas on its own node if any, else all
        near = replica_split([placement.slot_rank[p] for p in slots], source_rank, node_of_rank)
        candidates.append([p for p in slots if placement.slot_rank[p] in near])
    width = max(map(len, candidates))
    padded = [c + [c[0]] * (width - len(c)) for c in candidates]
    per_rank = [0] * ranks
    local = []
    for r in placement.slot_rank:
        local.append(per_rank[r])
        per_rank[r] += 1
    first = [0]
    for count in per_rank:
        first.append(first[-1] + count)
    nodes = max(node_of_rank) + 1
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)
    return PlacementTables(
        source_rank=source_rank,
        candidates=as_tensor(padded),
        num_candidates=as_tensor(list(map(len, candidates))),
        single=width == 1,
        slot_rank=as_tensor(placement.slot_rank),
        slot_local=as_tensor(local),
        rank_first_slot=as_tensor(first),
        slot_node=as_tensor([node_of_rank[r] for r in placement.slot_rank]),
        gateway=tuple(gateway(source_rank, b, node_of_rank) for b in range(nodes)),
        slots_per_rank=tuple(per_rank),
        max_slots_per_rank=max(max(per_rank), 1),
        slot_is_rank=list(placement.slot_rank) == list(range(ranks)),
        tp=placement.tp,
    )


def count(keys: torch.Tensor, num_keys: int) -> torch.Tensor:
    """keys: [m] int64 in [0, num_keys) -> [num_keys] how many of each (bincount without its host read)."""
    return torch.zeros(num_keys, dtype=torch.int64, device=keys.device).scatter_add_(
        0, keys, torch.ones_like(keys)
    )


def occurrence(keys: torch.Tensor, num_keys: int) -> torch.Tensor:
    """keys: [m] int64 in [0, num_keys) -> [m], how many earlier entries have the same key."""
    order = torch.argsort(keys, stable=True)
    counts = count(keys, num_keys)
    starts = torch.cumsum(counts, 0) - counts
    seen = torch.empty_like(keys)
    seen[order] = torch.arange(len(keys), device=keys.device) - starts[keys[order]]
    return seen


def choose_slots(expert_ids: torch.Tensor, tables: PlacementTables) -> torch.Tensor:
    """expert_ids: [n, k] -> [n, k] physical slots. The i-th token slot of this source for expert e
    goes to candidate (i + source_rank) % candidates: deterministic, the same on every rank."""
    flat = expert_ids.reshape(-1)
    if tables.single:
        return tables.candidates[flat, 0].view(expert_ids.shape)
    pick = (occurrence(flat, len(tables.num_candidates)) + tables.source_rank) % tables.num_candidates[flat]
    return tables.candidates[flat, pick].view(expert_ids.shape)


def apply_capacity(slots: torch.Tensor, capacity_factor: float, num_slots: int) -> torch.Tensor:
    """slots: [n, k] -> the same with choices beyond a slot's capacity set to -1 (dropped).

    Capacity per physical slot is ceil(capacity_factor * n * k / num_slots) for this source; earlier
    tokens keep their place (token order, then choice order). Dropped choices contribute nothing
    and the remaining weights are not renormalized: a lossy option, outside the equality contract."""
    capacity = -(-int(capacity_factor * slots.numel()) // num_slots)
    flat = slots.reshape(-1)
    keep = occurrence(flat, num_slots) < capacity
    return torch.where(keep, flat, -1).view(slots.shape)


@dataclass(frozen=True)
class DispatchPlan:
    """How this rank's token slots (token, k-th choice) travel to physical expert slots."""

    order: torch.Tensor  # [m] flat (token, choice) entries sent, sorted by slot, so by destination rank
    source_token: torch.Tensor  # [m] token row of each sorted entry
    slot_counts: torch.Tensor  # [P] int64 token slots sent to each physical slot
    rank_counts: torch.Tensor  # [R] int64 token slots sent to each rank (rows of its message)
    send_counts: torch.Tensor  # [R, S] slot_counts laid out per destination: what the counts exchange sends
    slots: torch.Tensor  # [n, k] physical slot of each choice, -1 where it is not sent


def plan_from_slots(slots: torch.Tensor, tables: PlacementTables, sent_all: bool = False) -> DispatchPlan:
    """slots: [n, k] physical slot per (token, choice), -1 where that choice is not sent -> the plan.
    sent_all: the caller knows no choice is -1 (no capacity limit), which saves a host read."""
    flat, total = slots.reshape(-1), tables.num_slots
    if not sent_all and flat.numel() and bool((flat < 0).any()):
        sent = flat >= 0
        order = torch.argsort(torch.where(sent, flat, total), stable=True)[: int(sent.sum())]
        slot_counts = count(flat[sent], total)
    else:
        order = torch.argsort(flat, stable=True)
        slot_counts = count(flat, total)
    if tables.slot_is_rank:
        rank_counts, send_counts = slot_counts, slot_counts.view(-1, 1)
    else:
        ends = torch.cumsum(slot_counts, 0)
        ends = torch.cat([ends.new_zeros(1), ends])
        rank_counts = ends[tables.rank_first_slot[1:]] - ends[tables.rank_first_slot[:-1]]
        send_counts = slot_counts.new_zeros(tables.num_ranks * tables.max_slots_per_rank)
        send_counts[tables.slot_rank * tables.max_slots_per_rank + tables.slot_local] = slot_counts
        send_counts = send_counts.view(tables.num_ranks, tables.max_slots_per_rank)
    k = max(slots.shape[1], 1)
    return DispatchPlan(
        order, torch.div(order, k, rounding_mode="floor"), slot_counts, rank_counts, send_counts, slots
    )


def make_plan(expert_ids: torch.Tensor, tables: PlacementTables) -> DispatchPlan:
    """expert_ids: [n, k] logical experts per token -> the flat plan for the tables' source rank."""
    return plan_from_slots(choose_slots(expert_ids, tables), tables)


def combine_tokens(plan: DispatchPlan, returned: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """returned: [m, H] expert outputs in plan order; weights: [n, k] -> [n, H] in token order.

    One fused weighted gather-sum (embedding_bag): each token's k answers are read once from where
    they landed and summed in choice order, whatever the placement or rank count. A choice that
    was not sent reads row 0 with weight 0."""
    n, k = weights.shape
    if not n:
        return returned.new_zeros(0, returned.shape[1])
    position = torch.zeros(n * k, dtype=torch.int64, device=returned.device)
    position[plan.order] = torch.arange(len(plan.order), device=returned.device)
    if len(plan.order) < n * k:
        weights = weights.reshape(-1).clone()
        sent = torch.zeros(n * k, dtype=torch.bool, device=returned.device)
        sent[plan.order] = True
        weights[~sent] = 0.0
    if not len(returned):
        return returned.new_zeros(n, returned.shape[1])
    return F.embedding_bag(
        position.view(n, k), returned, per_sample_weights=weights.reshape(n, k).to(returned.dtype), mode="sum"
    )


def expert_major(counts) -> np.ndarray:
    """counts: [G, S] rows from source g for local slot s, as received: source-major (source 0's rows
    for slot 0, 1, ..., then source 1's) -> [T] the received positions in slot-major order (slot 0's
    rows from source 0, 1, ..., then slot 1's), so that each local expert runs once on one block."""
    counts = np.asarray(counts, np.int64)
    received_at = (np.cumsum(counts.reshape(-1)) - counts.reshape(-1)).reshape(counts.shape)  # [G, S]
    sizes, starts = counts.T.reshape(-1), received_at.T.reshape(-1)  # slot-major
    placed_at = np.cumsum(sizes) - sizes
    return np.repeat(starts - placed_at, sizes) + np.arange(int(sizes.sum()))


# ---------------------------------------------------------------- two-stage: per-node groups


@dataclass(frozen=True)
class NodeGroups:
    """This source's tokens grouped by destination node: a token appears once per node it has a choice on."""

    tokens: torch.Tensor  # [t] token rows, sorted by node then token
    node_counts: list[int]  # [N] rows for each node (read to the host: the exchange's one host read)
    slots: torch.Tensor  # [t, k] the row's slots on that node, -1 elsewhere
    weights: torch.Tensor  # [t, k] the row's weights on that node, 0 elsewhere


def node_groups(slots: torch.Tensor, weights: torch.Tensor, tables: PlacementTables) -> NodeGroups:
    """slots, weights: [n, k] -> the rows each node receives (one gather for all nodes)."""
    n, nodes = slots.shape[0], len(tables.gateway)
    slot_node = tables.slot_node[slots.clamp(min=0)].masked_fill(slots < 0, nodes)  # [n, k]; nodes = not sent
    present = torch.zeros(n, nodes + 1, dtype=torch.bool, device=slots.device)
    present.scatter_(1, slot_node, True)
    present = present[:, :nodes].T.reshape(-1)  # [N * n], node-major
    counts = present.view(nodes, n).sum(1).cpu().tolist()
    # the present (node, token)s in order
    pairs = torch.argsort((~present).to(torch.int8), stable=True)[: sum(counts)]
    node, token = torch.div(pairs, n, rounding_mode="floor"), pairs % n
    here = slot_node[token] == node[:, None]
    return NodeGroups(
        token, counts, torch.where(here, slots[token], -1), torch.where(here, weights[token], 0.0)
    )


def pack_rows(rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """rows [t, H], slots [t, k] int64, weights [t, k] -> one uint8 message, row by row."""
    parts = [rows.contiguous(), slots.contiguous(), weights.float().contiguous()]
    # reshape(-1) first: a [t, 1] tensor may keep a stride of 0 that a dtype view refuses (top_k 1)
    return torch.cat(
        [p.reshape(-1).view(torch.uint8).view(len(rows), p.shape[1] * p.element_size()) for p in parts], dim=1
    )


def unpack_rows(data: torch.Tensor, hidden: int, dtype, k: int):
    """The inverse of pack_rows (several messages back to back)
    -> (rows [m, H], slots [m, k], weights [m, k])."""
    item = torch.empty(0, dtype=dtype).element_size()
    data = data.view(-1, hidden * item + 12 * k)
    rows, slots, weights = data.split([hidden * item, 8 * k, 4 * k], dim=1)
    # as pack_rows
    as_type = lambda t, dtype, width: t.contiguous().reshape(-1).view(dtype).view(len(data), width)
    return as_type(rows, dtype, hidden), as_type(slots, torch.int64, k), as_type(weights, torch.float32, k)


def packed_row_bytes(hidden: int, dtype, k: int) -> int:
    """Bytes of one packed row: the hidden state, then k slots (int64) and k weights (float32)."""
    return hidden * torch.empty(0, dtype=dtype).element_size() + 12 * k


def internode_bytes(
    slots: torch.Tensor, tables: PlacementTables, node_of_rank, row_bytes: int, two_stage: bool
) -> int:
    """Bytes a source puts on inter-node links for one layer: flat sends every (token, choice) on
    another node; two-stage sends each token once per other node, with k slots and weights."""
    me, k = node_of_rank[tables.source_rank], slots.shape[1]
    if not two_stage:
        sent = slots[slots >= 0]
        return int((tables.slot_node[sent] != me).sum()) * row_bytes
    counts = node_groups(slots, torch.zeros(slots.shape), tables).node_counts
    return (sum(counts) - counts[me]) * (row_bytes + 12 * k)
