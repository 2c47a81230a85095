"""Every MPI message tag of a run, in one place.

A step's exchanges tag each point-to-point message with tag_for(kind, layer, micro-batch): the same
kind of message in another layer or micro-batch has another tag, so exchanges in flight never cross.
Messages outside the exchanges use the fixed tags below 100 (each on its own communicator or peer)."""

from __future__ import annotations

from enum import IntEnum


class Kind(IntEnum):
    """What a message of an exchange carries."""

    DISPATCH = 0  # moe_layer: token rows to the experts' ranks
    RETURNS = 1  # moe_layer: the experts' answers back to the source
    GATEWAY_DISPATCH = 2  # two_stage: packed rows to a node's gateway
    GATEWAY_RETURNS = 3  # two_stage: the node's weighted sums back to the source
    SCATTER = 4  # ma's hierarchical sum: reduce-scatter inside a node
    ACROSS_NODES = 5  # ma: all-reduce of a chunk across nodes
    GATHER_BACK = 6  # ma: all-gather inside a node
    GATHER = 7  # ma: the group's token rows gathered after the MoE layer
    TO_STANDBY = 8  # ma: a primary's total to its standby
    CHOICE = 9  # ma: (max, index) of each vocabulary slice
    LOGITS = 10  # ma: each vocabulary slice's logits
    TP_FORWARD = 11  # expert groups: the leader forwards rows to its members
    TP_PARTIAL = 12  # expert groups: a member's partial sums to the leader


KINDS = 16  # tag_for leaves room for this many kinds per (layer, micro-batch)
FIRST_EXCHANGE = 100  # exchange tags start here
LAST_EXCHANGE = 32100  # and wrap before this (a tag's upper bound is 32767 in MPI)

RECORD = 7  # a step's record to rank 0 (world)
MIRROR = 8  # rank 0 to its deputy: each step's records (world)
MOVE = 7  # rebalancing moves (on the rebalancer's own communicator)


def tag_for(kind: int, layer: int, micro_batch: int, micro_batches: int) -> int:
    """The tag of a message of `kind` in (layer, micro-batch)."""
    return (kind + KINDS * (micro_batch + micro_batches * max(layer, 0))) % (
        LAST_EXCHANGE - FIRST_EXCHANGE
    ) + FIRST_EXCHANGE
