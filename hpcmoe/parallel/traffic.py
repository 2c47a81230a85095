"""Token traffic between nodes under a placement (no torch, no MPI): how a node's tokens for an
expert split over its replicas, the load on each link and each rank, the routing a run recorded
summed per node, and the topology-aware placement that puts experts where the largest link load is
least. Apart from placement.py because these read a placement against traffic; they do not make one
by counting slots.
"""

from __future__ import annotations

import numpy as np

from hpcmoe.parallel.placement import Placement, replica_split


def _num_nodes(tokens_from_node: list[list[float]], node_of_rank: list[int]) -> int:
    """Nodes in node_of_rank, checked against tokens_from_node: [nodes][experts]."""
    nodes = max(node_of_rank) + 1
    missing = sorted(set(range(nodes)) - set(node_of_rank))
    if missing:
        raise ValueError(f"node_of_rank names {nodes} nodes but nodes {missing} have no rank")
    if len(tokens_from_node) != nodes:
        raise ValueError(
            f"tokens_from_node has {len(tokens_from_node)} rows, node_of_rank names {nodes} nodes"
        )
    return nodes


def _split_tokens(placement: Placement, tokens_from_node: list[list[float]], node_of_rank: list[int]):
    """Yield (src_node, expert, dst_rank, tokens): a node's tokens for e split evenly over its candidates."""
    if len(node_of_rank) != placement.num_ranks:
        raise ValueError(
            f"node_of_rank has {len(node_of_rank)} entries, placement has {placement.num_ranks} ranks"
        )
    expert_ranks = placement.expert_ranks()
    for a in range(_num_nodes(tokens_from_node, node_of_rank)):
        for e, tokens in enumerate(tokens_from_node[a]):
            ranks = expert_ranks[e] if e < len(expert_ranks) else []
            if tokens and not ranks:
                raise ValueError(f"node {a} sends {tokens} tokens to expert {e}, which has no replica")
            candidates = replica_split(ranks, node_of_rank.index(a), node_of_rank) if ranks else []
            for rank in candidates:
                yield a, e, rank, tokens / len(candidates)


def link_loads(
    placement: Placement, tokens_from_node: list[list[float]], node_of_rank: list[int]
) -> dict[tuple[int, int], float]:
    """{(src_node, dst_node): tokens crossing}, for every pair of distinct nodes.

    tokens_from_node: [nodes][experts], tokens each node sends to each expert; node_of_rank:
    [ranks]. A node's tokens for e split evenly over replica_split's candidates for e.
    """
    nodes = _num_nodes(tokens_from_node, node_of_rank)
    loads = {(a, b): 0.0 for a in range(nodes) for b in range(nodes) if a != b}
    for a, _, rank, tokens in _split_tokens(placement, tokens_from_node, node_of_rank):
        if node_of_rank[rank] != a:
            loads[(a, node_of_rank[rank])] += tokens
    return loads


def max_link_load(
    placement: Placement, tokens_from_node: list[list[float]], node_of_rank: list[int]
) -> float:
    """Largest link_loads value (0.0 with a single node): the cost topology_aware minimises."""
    return max(link_loads(placement, tokens_from_node, node_of_rank).values(), default=0.0)


def expected_rank_load(
    placement: Placement, tokens_from_node: list[list[float]], node_of_rank: list[int]
) -> list[float]:
    """[ranks] expected tokens each rank's experts receive.

    tokens_from_node: [nodes][experts]. The dispatcher gives the i-th token of source rank s
    for expert e to candidate (i + s) % len(candidates), candidates = replica_split(...); in
    expectation that splits a source's tokens for e evenly over its candidates, as here.
    """
    out = [0.0] * placement.num_ranks
    for _, _, rank, tokens in _split_tokens(placement, tokens_from_node, node_of_rank):
        out[rank] += tokens
    return out


def rank_load_shares(placement: Placement, node_of_rank: list[int]) -> np.ndarray:
    """[nodes, experts, ranks] the share of a node's token slots for an expert that each rank
    receives: expected_rank_load is tokens_from_node contracted with it, for many steps at once.
    An expert without a replica has no share (it may receive no tokens)."""
    nodes, expert_ranks = max(node_of_rank) + 1, placement.expert_ranks()
    ones = [[1.0 if ranks else 0.0 for ranks in expert_ranks] for _ in range(nodes)]
    shares = np.zeros((nodes, len(expert_ranks), placement.num_ranks))
    for a, e, rank, share in _split_tokens(placement, ones, node_of_rank):
        shares[a, e, rank] += share
    return shares


def load_from_routing(routing: np.ndarray, node_of_rank: list[int]) -> tuple[list[list[float]], list[float]]:
    """(tokens_from_node [nodes][experts], load [experts]) from /routing [steps][layers][sources][experts].

    Sums over steps and MoE layers. Source rank r is on node node_of_rank[r]; if the run had a
    different number of source ranks S than len(node_of_rank), r goes to node r * nodes // S.
    """
    routing = np.asarray(routing)
    if routing.ndim != 4:
        raise ValueError(
            f"routing needs 4 axes [steps, moe_layers, source_ranks, experts], got {routing.ndim}"
        )
    per_source = routing.sum(axis=(0, 1)).astype(float)
    sources, nodes = per_source.shape[0], max(node_of_rank) + 1
    if sources == len(node_of_rank):
        node_of_source = list(node_of_rank)
    else:
        node_of_source = [r * nodes // sources for r in range(sources)]
    tokens = np.zeros((nodes, per_source.shape[1]))
    for r, node in enumerate(node_of_source):
        tokens[node] += per_source[r]
    return tokens.tolist(), per_source.sum(axis=0).tolist()


def _column_max(column: np.ndarray, b: int) -> float:
    """Largest link into node b: max of column over source rows other than b."""
    return float(max((v for a, v in enumerate(column) if a != b), default=0.0))


def _improve(traffic: np.ndarray, node_of_expert: list[int], free: list[int], passes: int = 20) -> None:
    """Local search on node_of_expert: [experts] and free: [nodes], given traffic: [nodes][experts]."""
    nodes, experts = len(free), len(node_of_expert)
    links = np.zeros((nodes, nodes))
    for e, b in enumerate(node_of_expert):
        links[:, b] += traffic[:, e]
    col_max = [_column_max(links[:, b], b) for b in range(nodes)]

    def try_change(changes: dict[int, int]) -> bool:  # changes: {expert: new node}
        new = links.copy()
        for e, b in changes.items():
            new[:, node_of_expert[e]] -= traffic[:, e]
            new[:, b] += traffic[:, e]
        touched = {node_of_expert[e] for e in changes} | set(changes.values())
        new_max = {b: _column_max(new[:, b], b) for b in touched}
        best = max(new_max.values())
        rest = max((col_max[b] for b in range(nodes) if b not in touched), default=0.0)
        if max(best, rest) >= max(col_max):
            return False
        links[:] = new
        for b, v in new_max.items():
            col_max[b] = v
        for e, b in changes.items():
            free[node_of_expert[e]] += 1
            free[b] -= 1
            node_of_expert[e] = b
        return True

    for _ in range(passes):
        improved = False
        for e in range(experts):
            for f in range(e + 1, experts):
                if node_of_expert[e] != node_of_expert[f]:
                    improved |= try_change({e: node_of_expert[f], f: node_of_expert[e]})
            for b in range(nodes):
                if b != node_of_expert[e] and free[b] > 0:
                    improved |= try_change({e: b})
        if not improved:
            return


def topology_aware(tokens_from_node: list[list[float]], node_of_rank: list[int]) -> Placement:
    """At most one expert per rank, experts on nodes chosen to minimise max_link_load.

    tokens_from_node: [nodes][experts]; node_of_rank: [ranks]. Greedy (hottest expert first,
    to the node with the lowest resulting max link load; ties: most free ranks, lowest node),
    then swaps and moves across nodes while max_link_load strictly drops (at most 20 passes).
    """
    nodes = _num_nodes(tokens_from_node, node_of_rank)
    traffic = np.asarray(tokens_from_node, dtype=float)
    experts, ranks = traffic.shape[1], len(node_of_rank)
    if experts > ranks:
        raise ValueError(f"topology_aware placement needs num_experts ({experts}) <= ranks ({ranks})")
    free = [node_of_rank.count(b) for b in range(nodes)]
    node_of_expert = [-1] * experts
    links = np.zeros((nodes, nodes))
    for e in sorted(range(experts), key=lambda e: (-traffic[:, e].sum(), e)):
        col_max = [_column_max(links[:, c], c) for c in range(nodes)]
        options = [
            (max([_column_max(links[:, b] + traffic[:, e], b)] + col_max[:b] + col_max[b + 1 :]), -free[b], b)
            for b in range(nodes)
            if free[b] > 0
        ]
        b = min(options)[2]
        node_of_expert[e], free[b] = b, free[b] - 1
        links[:, b] += traffic[:, e]
    _improve(traffic, node_of_expert, free)
    pairs = []
    for b in range(nodes):
        on_node = [r for r in range(ranks) if node_of_rank[r] == b]
        pairs += zip(on_node, [e for e in range(experts) if node_of_expert[e] == b])
    pairs.sort()
    return Placement(tuple(e for _, e in pairs), tuple(r for r, _ in pairs), ranks, "topology_aware")
