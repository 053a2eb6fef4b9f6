"""The grouped projection: each layer's gradients projected by its own i.i.d. matrix, the total
k shared among the layers by their measured gradient energy (the "grouped" structure).

What it is. The attributed parameters are grouped by layer (``layer_names.layer_key``: a
transformer block, an embedding, a head, a ``Sequential``'s numbered module). Group g gets k_g
of the k feature coordinates, and its per-example gradients g_g (rescaled by Adam's D^{1/2}
where the run used Adam) are mapped to them by the dense projection's own matrix restricted to
the group: coordinates [c_g, c_g + k_g) hold

    g_g R[rows of g, :k_g] / sqrt(k_g),

with R the seeded matrix of ``kernels.reference`` and "rows of g" each parameter's global
rows in the dense layout (the attributed parameters end to end in model order). Groups use
disjoint rows, so their matrices are independent; with a single group it *is* the dense
projection, bit for bit. E[P^T P] = I within each group, so lengths and the curvature's scale
are kept, as SOURCE needs.

Why. The projected Hessian of a dense projection mixes every layer into every coordinate, so
it can only be taken whole. Here coordinates belong to layers, so each segment's Hessian can be
restricted to one k_g x k_g block per layer (``SourceConfig.curvature_blocks="layer"``, what
"auto" picks for this structure): every eigenproblem stays small and the cross-layer terms,
which a k-dimensional sketch estimates worst, are dropped. That combination is what gained
LDS on language models (docs/settings.md).

Shares. For an inner product of two gradients through a JL map with k_g coordinates, the
error's variance grows with |a_g| |b_g| / k_g, so a layer needs coordinates in proportion to
how large its gradients are, not to how many parameters it has (embeddings and heads have few
parameters and large gradients under Adam's rescaling). :func:`energy_shares` gives k_g in
proportion to e_g, the root mean square norm of the group's rescaled per-example loss
gradients, measured on at most :data:`ENERGY_ROWS` evenly spaced training rows at the final
checkpoint (``SourceAttributor.measure_projection``), each k_g in [1, p_g] (a layer is never
given more coordinates than it has parameters) and the total min(k, p). The shares are
recorded in a feature store and read back with it, never measured again for its queries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from source_proj.errors import InputError
from source_proj.projection.jl import ProjectionConfig, project
from source_proj.projection.kronecker import share_budget

GROUPED = "grouped"
# Training rows whose gradients measure the layers' energy: enough for a stable mean square
# (each row's gradient is a sum over its tokens or a single example's), cheap beside a fit.
ENERGY_ROWS = 64


def energy_shares(sizes: Sequence[int], energies: Sequence[float], budget: int) -> tuple[int, ...]:
    """Integer k_g proportional to ``energies`` (e_g >= 0), each in [1, sizes[g]], summing to
    min(budget, sum(sizes)): :func:`~source_proj.projection.kronecker.share_budget`, then what
    its rounding leaves given one by one to the uncapped groups of largest energy."""
    shares = share_budget(sizes, budget, energies)
    left = min(budget, sum(sizes)) - sum(shares)
    order = sorted(range(len(sizes)), key=lambda g: -energies[g])
    while left > 0:
        for g in order:
            if left and shares[g] < sizes[g]:
                shares[g] += 1
                left -= 1
    return tuple(shares)


def squared_norms(
    grads: Mapping[str, torch.Tensor],
    groups: Sequence[Sequence[str]],
    scale: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(G,) float64: per group, the squared norms of the rows' gradients (name -> (B, numel))
    summed over rows, each gradient rescaled element-wise by ``scale[name]`` (D^{1/2}) first."""
    totals = torch.zeros(len(groups), dtype=torch.float64)
    for g, members in enumerate(groups):
        for name in members:
            block = grads[name].reshape(grads[name].shape[0], -1).to(torch.float64)
            if scale is not None:
                block = block * scale[name].to(block.device, torch.float64)
            totals[g] += float(block.pow(2).sum())
    return totals


@dataclass(frozen=True)
class GroupedProjection:
    """The grouped projection (module docstring).

    Attributes:
        config: seed, entry kind, backend and precision (``config.dim`` is the total budget k).
        groups: the attributed parameters' names by layer (``layer_names.layer_members``).
        sizes: p_g, each group's number of parameters.
        shares: k_g per group (summing to :attr:`dim`), or () until measured.
    """

    config: ProjectionConfig
    groups: tuple[tuple[str, ...], ...]
    sizes: tuple[int, ...]
    shares: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.config.dim < len(self.groups):
            raise InputError(f"proj_dim={self.config.dim} is below the number of layers the grouped projection gives one "
                             f"coordinate at least ({len(self.groups)}); raise proj_dim, or use proj_structure='dense'")
        if len(self.sizes) != len(self.groups) or (self.shares and len(self.shares) != len(self.groups)):
            raise InputError(f"a grouped projection needs one size and one share per group, got {len(self.groups)} "
                             f"groups, {len(self.sizes)} sizes and {len(self.shares)} shares")
        if self.shares and (sum(self.shares) != self.dim or any(not 1 <= k <= p for k, p in zip(self.shares, self.sizes))):
            raise InputError(f"grouped projection shares {list(self.shares)} must each be in [1, group size] "
                             f"(sizes {list(self.sizes)}) and sum to {self.dim}")

    @property
    def dim(self) -> int:
        """k = min(proj_dim, p): the feature coordinates, known before the shares are."""
        return min(self.config.dim, sum(self.sizes))

    @property
    def measured(self) -> bool:
        """Whether the shares are known (the projection can be applied)."""
        return bool(self.shares)

    def with_energies(self, energies: Sequence[float]) -> GroupedProjection:
        """This projection with shares proportional to the groups' ``energies`` (:func:`energy_shares`)."""
        return dataclasses.replace(self, shares=energy_shares(self.sizes, energies, self.config.dim))

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, dim) float32 features of per-example gradients ``grads`` (name -> (B, numel), every
        attributed parameter, in the dense layout's order: a parameter's rows start where the
        previous one's end)."""
        if not self.measured:
            raise InputError("the grouped projection's shares are not measured yet: fit the attributor (or "
                             "call measure_projection(train_data)), or open the feature store it was fitted into")
        offsets, row = {}, 0
        for name, block in grads.items():
            offsets[name], row = row, row + block.shape[1]
        missing = [n for members in self.groups for n in members if n not in offsets]
        if missing:
            raise InputError(f"grouped projection: no gradients for parameters {missing}")
        batch = next(iter(grads.values())).shape[0]
        out = torch.empty(batch, self.dim, dtype=torch.float32, device=next(iter(grads.values())).device)
        column = 0
        for members, share in zip(self.groups, self.shares):
            config = dataclasses.replace(self.config, dim=share)
            target = out[:, column : column + share]
            target.zero_()
            for run in _contiguous_runs(members, offsets, grads):
                target.add_(project([grads[n] for n in run], config, row_offset=offsets[run[0]]))
            column += share
        return out

    def layer_groups(self) -> torch.Tensor:
        """(dim,) int64: each feature coordinate's group, for a block-diagonal curvature."""
        return torch.repeat_interleave(torch.arange(len(self.shares)), torch.tensor(self.shares, dtype=torch.int64))

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description (recorded in feature stores): structure, seed, kind and
        each group's members and share."""
        return {
            "structure": GROUPED, "seed": self.config.seed, "kind": self.config.kind,
            "groups": [[list(members), share] for members, share in zip(self.groups, self.shares)],
        }

    def with_recorded_shares(self, recorded: Mapping[str, Any]) -> GroupedProjection | None:
        """This projection with the shares of a recorded :meth:`describe` of the same groups
        (e.g. a feature store's), or None when ``recorded`` describes another projection."""
        entries = recorded.get("groups")
        if recorded.get("structure") != GROUPED or not isinstance(entries, list) or len(entries) != len(self.groups):
            return None
        if any(tuple(members) != group for (members, _), group in zip(entries, self.groups)):
            return None
        try:
            return dataclasses.replace(self, shares=tuple(int(share) for _, share in entries))
        except InputError:
            return None


def _contiguous_runs(
    members: Sequence[str], offsets: Mapping[str, int], grads: Mapping[str, torch.Tensor]
) -> list[list[str]]:
    """``members`` in row order, split where one's rows do not follow the previous one's."""
    runs: list[list[str]] = []
    for name in sorted(members, key=offsets.__getitem__):
        if runs and offsets[runs[-1][-1]] + grads[runs[-1][-1]].shape[1] == offsets[name]:
            runs[-1].append(name)
        else:
            runs.append([name])
    return runs
