"""Rows computed in shares by the ranks, put back together in order on every rank."""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist

from source_proj.distributed.group import ProcessGroup


def gather_rows(group: ProcessGroup, local: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local`` rows (n_r, ...) concatenated in rank order, on every rank (on
    ``local``'s device). Trailing shape and dtype must agree across ranks; n_r may differ
    (ranks without rows pass (0, ...))."""
    if not group.distributed:
        return local
    device = group.collective_device
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(group.world_size)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.int64, device=device))
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).to(local.device)


def merge_mappings(group: ProcessGroup, found: dict) -> dict:
    """The union of every rank's ``found`` (picklable keys and values; keys disjoint across
    ranks), on every rank."""
    if not group.distributed:
        return found
    everyone: list[dict | None] = [None] * group.world_size
    dist.all_gather_object(everyone, found)
    # all_gather_object has filled every slot with a rank's dict
    return {key: value for part in cast("list[dict]", everyone) for key, value in part.items()}
