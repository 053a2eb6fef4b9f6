"""Sums over many processes that are bit-identical to the one-process sum.

Floating-point addition is not associative, so an all-reduce whose grouping depends on the
number of processes (or on timing) changes the last bits of the result. ``TreeSum`` fixes the
grouping instead: leaves 0, 1, ..., n - 1 are added in a binary tree of aligned blocks (leaves
[j 2^l, (j + 1) 2^l) form a node of level l; a node is the sum left + right of its two
halves), and the blocks left over are added left to right. Each node's value depends only on
its leaves, so a process that owns a contiguous run of leaves can form the nodes inside its
run, and ``tree_total`` combines every process's nodes, in order, into the very sum one
process would have formed over all leaves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from source_proj.distributed.group import ProcessGroup
from source_proj.errors import InputError


class TreeSum:
    """A running sum of consecutive leaves (or nodes) in the fixed tree described above."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, int, torch.Tensor]] = []

    def add(self, index: int, value: torch.Tensor) -> None:
        """Add leaf ``index`` (the next one after those added so far)."""
        self.add_node(index, index + 1, value)

    def add_node(self, lo: int, hi: int, value: torch.Tensor) -> None:
        """Add the node of leaves [lo, hi), which must directly follow those added so far."""
        if self._stack and self._stack[-1][1] != lo:
            raise InputError(f"tree nodes must be added in order: got [{lo}, {hi}) after [..., {self._stack[-1][1]})")
        self._stack.append((lo, hi, value))
        while len(self._stack) >= 2:
            (a_lo, a_hi, a), (b_lo, b_hi, b) = self._stack[-2], self._stack[-1]
            size = b_hi - b_lo
            if a_hi - a_lo != size or a_lo % (2 * size):
                break  # not two halves of one aligned node
            del self._stack[-2:]
            self._stack.append((a_lo, b_hi, a + b))

    def nodes(self) -> list[tuple[int, int, torch.Tensor]]:
        """The maximal nodes formed so far, as (lo, hi, value), left to right."""
        return list(self._stack)

    def total(self) -> torch.Tensor:
        """The sum of everything added (nodes left over added left to right)."""
        if not self._stack:
            raise InputError("empty sum")
        values = [value for _, _, value in self._stack]
        out = values[0]
        for value in values[1:]:
            out = out + value
        return out


def tree_total(group: ProcessGroup, tree: TreeSum, like: torch.Tensor) -> torch.Tensor:
    """The total over all ranks of their ``tree`` s, each holding a contiguous run of leaves
    (rank r's run before rank r + 1's), on every rank; bit-identical to one ``TreeSum`` fed all
    leaves. ``like`` gives the values' shape, dtype and device (for ranks without leaves).

    Each rank sends its O(log n) nodes once (a broadcast per node), so the traffic is about
    W log2(n) values, whatever the number of leaves.
    """
    if not group.distributed:
        return tree.total()
    device = group.collective_device
    mine = tree.nodes()
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(group.world_size)]
    dist.all_gather(counts, torch.tensor([len(mine)], dtype=torch.int64, device=device))
    combined = TreeSum()
    for src in range(group.world_size):
        for j in range(int(counts[src].item())):
            span = torch.tensor(mine[j][:2] if src == group.rank else (0, 0), dtype=torch.int64, device=device)
            value = mine[j][2].to(device) if src == group.rank else torch.empty_like(like, device=device)
            dist.broadcast(span, src)
            dist.broadcast(value, src)
            combined.add_node(int(span[0]), int(span[1]), value.to(like.device))
    return combined.total()
