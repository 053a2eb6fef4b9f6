"""Kronecker-factored random projection of weight-matrix gradients (the "factored" structure).

For a weight W (d_r x d_c, as stored) whose gradient is a sum of outer products over tokens,
dW = sum_t u_t v_t^T (a linear layer: output gradients times inputs), the projection

    P = r^(-1/2) sum_{s<r} A_s^T (x) B_s^T      (k_r k_c x d_r d_c, on the row-major vec(dW))

gives P vec(dW) = r^(-1/2) sum_s vec(A_s^T dW B_s) = r^(-1/2) sum_s sum_t vec((A_s^T u_t)(B_s^T v_t)^T):
2 r small projections per token and r k_r x k_c products, so dW itself is never formed. With
r = 1 (``terms``) it is the Kronecker product A^T (x) B^T. A_s (d_r x k_r) and B_s (d_c x k_c)
have independent entries of mean 0 and variance 1/k_r and 1/k_c, hence
E[P^T P] = r^-1 sum_s E[A_s A_s^T] (x) E[B_s B_s^T] = I (cross terms have mean 0): lengths,
inner products and the curvature's eigenvalues keep their absolute scale, which SOURCE needs
(exp(-t H) depends on it).

Accuracy. A Kronecker product is a looser JL map than an i.i.d. matrix of the same size. For a
rank-one gradient u v^T (one token, or an MLP's per-example gradient) and Gaussian entries,
|P g|^2 / |g|^2 has relative variance

    [(1 + 2/k_r)(1 + 2/k_c) - 1] / r + 2 (r - 1) / (r k_r k_c)

(:func:`rank_one_variance`; Rademacher entries at most that), against 2 / (k_r k_c) for an
i.i.d. matrix: with one term the error is set by the smaller factor, not by the product, and
r terms bring it down towards i.i.d. at r times the (small) cost. Gradients summed over many
tokens in varied directions are closer to i.i.d. already. Measured figures:
docs/guides/factored.md.

Layout (the contract with ``kernels.reference``; everything is a pure function of the seed):

* Factors are blocks of the same seeded Philox matrix R as the dense projection, at rows that
  dense gradient coordinates never reach (p < 2^62): for the m-th factored parameter (in model
  parameter order among the factored ones), side a (0 = rows, 1 = columns) and term s,
  the factor is R[o : o + d_a, :k_a] / sqrt(k_a) with o = 2^62 + ((2 m + a) 2^8 + s) 2^32
  (sizes d_a < 2^32, at most 256 terms).
* A side whose k_a equals its size d_a is the identity (not projected, exact); such a block has
  one term (more would not change its distribution).
* Feature coordinates: each factored parameter's block of k_r k_c coordinates, in order, block
  coordinate i k_c + j holding (r^(-1/2) sum_s A_s^T dW B_s)[i, j]; then the dense projection
  (rows [0, p_rest) of R, the remaining attributed parameters laid end to end in model order)
  of every other attributed parameter (biases, norms, ...) to k_rest coordinates, or those
  parameters as they are when k_rest = p_rest.

Budget. :func:`plan_budget` shares a total k among the blocks in proportion to their sizes
(what an i.i.d. projection gives them in expectation when gradient energy is spread evenly
over parameters), each capped at its size and given at least one coordinate, and splits each
weight's share into (k_r, k_c) with k_r k_c <= its share minimising the rank-one relative
variance above (an identity side costs nothing, so small dimensions are kept whole). What
rounding leaves goes to the dense block; the total is below k only when blocks are whole.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from source_proj.errors import InputError
from source_proj.kernels.reference import matrix_block
from source_proj.projection.jl import ProjectionConfig, project
from source_proj.projection.layer_names import layer_key

FACTOR_ROW_BASE = 2**62
MAX_SIDE = 2**32
MAX_TERMS = 256
ROWS, COLS = 0, 1


def factor_offset(index: int, side: int, term: int = 0) -> int:
    """First row of R holding term ``term`` of side ``side`` (0 rows, 1 columns) of factored
    parameter ``index``."""
    return FACTOR_ROW_BASE + (((2 * index + side) * MAX_TERMS + term) * MAX_SIDE)


def factor_matrix(seed: int, kind: str, index: int, side: int, size: int, dim: int, terms: int = 1) -> torch.Tensor | None:
    """The side's factors side by side, (size, terms * dim) float32 on the CPU (entries of
    variance 1/dim), or None for the identity (dim == size). See the module docstring."""
    if not 1 <= dim <= size or size >= MAX_SIDE:
        raise InputError(f"a factor maps {size} coordinates (below 2^32) to 1..{size} dimensions, got {dim}")
    if not 1 <= terms <= MAX_TERMS or (dim == size and terms != 1):
        raise InputError(f"a factor has 1..{MAX_TERMS} terms, and an identity side one, got {terms}")
    if dim == size:
        return None
    return torch.cat([
        matrix_block(seed, factor_offset(index, side, s), factor_offset(index, side, s) + size, dim, kind, scaled=True)
        for s in range(terms)
    ], dim=1)


def rank_one_variance(k_rows: int, k_cols: int, rows: int, cols: int, terms: int = 1) -> float:
    """Relative variance of |P g|^2 for a rank-one g under Gaussian factors (module docstring);
    an identity side is exact, and a block with one has a single term."""
    a = 0.0 if k_rows == rows else 2.0 / k_rows
    b = 0.0 if k_cols == cols else 2.0 / k_cols
    if a == 0.0 or b == 0.0:
        terms = 1
    return ((1.0 + a) * (1.0 + b) - 1.0) / terms + 2.0 * (terms - 1) / (terms * k_rows * k_cols)


def split_kronecker(target: int, rows: int, cols: int, terms: int = 1) -> tuple[int, int, int]:
    """(k_r, k_c, terms) with k_r <= rows, k_c <= cols, k_r k_c <= target (>= 1), of least
    :func:`rank_one_variance` with up to ``terms`` terms, then of largest product; a block with
    an identity side gets one term."""
    if target < 1:
        raise InputError(f"a factored block needs at least one dimension, got {target}")
    best: tuple[float, int, int, int] | None = None
    for k_rows in range(1, min(rows, target) + 1):
        k_cols = min(cols, target // k_rows)
        key = (rank_one_variance(k_rows, k_cols, rows, cols, terms), -k_rows * k_cols, k_rows, k_cols)
        if best is None or key < best:
            best = key
    assert best is not None
    k_rows, k_cols = best[2], best[3]
    return k_rows, k_cols, 1 if k_rows == rows or k_cols == cols else terms


def share_budget(sizes: Sequence[int], budget: int, weights: Sequence[float] | None = None) -> list[int]:
    """Integer shares of ``budget`` proportional to ``weights`` (default: ``sizes``), each in
    [1, size] (water-filling: capped blocks are fixed and the rest re-shared). Sum <= budget;
    ValueError when the budget cannot give every block one dimension."""
    if any(s < 1 for s in sizes):
        raise InputError(f"block sizes must be >= 1, got {list(sizes)}")
    weights = [float(s) for s in sizes] if weights is None else [float(w) for w in weights]
    if len(weights) != len(sizes) or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise InputError(f"share weights must be finite, >= 0 and one per block, got {weights}")
    if budget < len(sizes):
        raise InputError(
            f"proj_dim={budget} is below the number of projected blocks ({len(sizes)}: one per factored "
            "weight or parameter group, one for the other parameters); raise proj_dim"
        )
    fixed: dict[int, float] = {}
    while True:
        free = [i for i in range(len(sizes)) if i not in fixed]
        if not free:
            break
        left = budget - sum(fixed.values())
        total = sum(weights[i] for i in free)
        shares = {i: left * weights[i] / total if total > 0 else left / len(free) for i in free}
        capped = {i: float(sizes[i]) if shares[i] >= sizes[i] else 1.0
                  for i in free if shares[i] >= sizes[i] or shares[i] < 1}
        if not capped:
            fixed.update(shares)
            break
        fixed.update(capped)
    return [max(1, min(sizes[i], int(math.floor(fixed[i] + 1e-9)))) for i in range(len(sizes))]


@dataclass(frozen=True)
class KroneckerBlock:
    """One factored weight: its gradient (rows x cols) projected to k_rows x k_cols.

    Attributes:
        name: the parameter name.
        rows, cols: the weight's stored shape (d_r, d_c).
        k_rows, k_cols: its factors' dimensions (k_r <= d_r, k_c <= d_c).
        terms: r, Kronecker products summed (1 when a side is the identity).
    """

    name: str
    rows: int
    cols: int
    k_rows: int
    k_cols: int
    terms: int = 1

    @property
    def dim(self) -> int:
        """k_r k_c, the block's feature coordinates."""
        return self.k_rows * self.k_cols


@dataclass(frozen=True)
class KroneckerPlan:
    """Which parameters are factored, their factor sizes, and the dense remainder.

    Attributes:
        blocks: the factored weights, in model parameter order.
        rest: the other attributed parameters (projected densely), in model order.
        rest_numel: their total size p_rest.
        rest_dim: k_rest, their projection's dimension (p_rest: not projected; 0 when none).
        budget: the total k that was shared out.
    """

    blocks: tuple[KroneckerBlock, ...]
    rest: tuple[str, ...]
    rest_numel: int
    rest_dim: int
    budget: int

    @property
    def dim(self) -> int:
        """Total feature coordinates: sum k_r k_c + k_rest (= budget unless every block is whole)."""
        return sum(b.dim for b in self.blocks) + self.rest_dim

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable sizes (recorded in feature stores)."""
        return {
            "blocks": [[b.name, b.rows, b.cols, b.k_rows, b.k_cols, b.terms] for b in self.blocks],
            "rest_numel": self.rest_numel,
            "rest_dim": self.rest_dim,
        }

    def layer_groups(self) -> torch.Tensor:
        """(dim,) int64: the layer of each feature coordinate, for a block-diagonal curvature.

        A weight's layer is :func:`~source_proj.projection.layer_names.layer_key` of its name
        (``transformer.h.0`` for ``transformer.h.0.mlp.c_fc.weight``, ``0`` for a
        ``Sequential``'s ``0.weight``), so a weight outside numbered layers (an embedding, a
        head) is a layer of its own; the densely projected remainder (biases, norms) is one
        more. Groups are numbered in order of first appearance.
        """
        labels: dict[str, int] = {}
        parts = []
        for block in self.blocks:
            label = labels.setdefault(layer_key(block.name), len(labels))
            parts.append(torch.full((block.dim,), label, dtype=torch.int64))
        if self.rest_dim:
            parts.append(torch.full((self.rest_dim,), len(labels), dtype=torch.int64))
        return torch.cat(parts)


def plan_budget(
    weights: Mapping[str, tuple[int, int]], rest: Mapping[str, int], budget: int, terms: int = 1
) -> KroneckerPlan:
    """Share ``budget`` among factored ``weights`` (name -> (rows, cols), model order) and the
    dense block of ``rest`` (name -> numel, model order), with up to ``terms`` Kronecker
    products per weight; see the module docstring."""
    names = list(weights)
    rest_numel = sum(rest.values())
    sizes = [weights[n][0] * weights[n][1] for n in names] + ([rest_numel] if rest_numel else [])
    shares = share_budget(sizes, budget)
    blocks = []
    for name, share in zip(names, shares):
        rows, cols = weights[name]
        blocks.append(KroneckerBlock(name, rows, cols, *split_kronecker(share, rows, cols, terms)))
    used = sum(b.dim for b in blocks)
    rest_dim = min(rest_numel, budget - used) if rest_numel else 0
    return KroneckerPlan(tuple(blocks), tuple(rest), rest_numel, rest_dim, budget)


@dataclass(frozen=True)
class Side:
    """One side of a factored weight on a device: x -> (x * scale) @ matrix.

    Attributes:
        matrix: the r factors side by side, (d, r k), or None for the identity.
        scale: (d,) element-wise factor applied first (a preconditioner's rank-one part), or None.
    """

    matrix: torch.Tensor | None
    scale: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., k)."""
        if self.scale is not None:
            x = x * self.scale.to(x.dtype)
        return x if self.matrix is None else x @ self.matrix.to(x.dtype)

    def lookup(self, index: torch.Tensor, size: int) -> torch.Tensor:
        """Rows of the side's matrix at ``index`` (...,) -> (..., k): ``apply`` of one-hot rows."""
        if self.matrix is None:
            rows = torch.nn.functional.one_hot(index, size).to(torch.float32)
            return rows if self.scale is None else rows * self.scale
        rows = self.matrix[index]
        return rows if self.scale is None else rows * self.scale[index][..., None]

    def transpose_apply(self, e: torch.Tensor) -> torch.Tensor:
        """(..., k) -> (..., d): e @ (diag(scale) F)^T, whose gradient w.r.t. e is ``apply``."""
        out = e if self.matrix is None else e @ self.matrix.to(e.dtype).T
        return out if self.scale is None else out * self.scale.to(out.dtype)


def outer_sum(row_part: torch.Tensor, col_part: torch.Tensor, terms: int = 1) -> torch.Tensor:
    """r^(-1/2) sum_s sum_t a_{t,s} b_{t,s}^T flattened row-major, float32: from the r terms'
    projections side by side, (..., T, r k_r) and (..., T, r k_c), to (..., k_r k_c)."""
    a = row_part.to(torch.float32).unflatten(-1, (terms, -1))
    b = col_part.to(torch.float32).unflatten(-1, (terms, -1))
    out = torch.einsum("...tsr,...tsc->...rc", a, b)
    if terms > 1:
        out = out / math.sqrt(terms)
    return out.reshape(*out.shape[:-2], -1)


def project_formed(weight_grad: torch.Tensor, rows: Side, cols: Side, terms: int = 1) -> torch.Tensor:
    """The block's projection (k_r k_c,) of a formed gradient (d_r, d_c), float32:
    r^(-1/2) sum_s A_s^T dW B_s with the sides' scales applied (for checks; costs d_r d_c r k)."""
    both = rows.apply(cols.apply(weight_grad.to(torch.float32)).T.contiguous()).T  # (r k_r, r k_c): all term pairs
    pairs = both.unflatten(0, (terms, -1)).unflatten(-1, (terms, -1))  # (r, k_r, r, k_c)
    out = torch.diagonal(pairs, dim1=0, dim2=2).sum(-1)
    return (out / math.sqrt(terms) if terms > 1 else out).reshape(-1)


@dataclass(frozen=True)
class FittedScale:
    """A checkpoint's D^{1/2} prepared for the factored projection (``FactoredProjection.fit_scale``).

    Attributes:
        exact: name -> (numel,) for the parameters projected densely (applied exactly).
        rank_one: name -> (a (d_r,), b (d_c,)) for each factored weight, D^{1/2} ~ a b^T.
    """

    exact: Mapping[str, torch.Tensor]
    rank_one: Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class FactoredProjection:
    """The factored projection of a model's attributed parameters.

    Attributes:
        config: seed, entry kind, backend and precision (``dim`` is the total budget).
        plan: the blocks and sizes.
    """

    config: ProjectionConfig
    plan: KroneckerPlan
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def dim(self) -> int:
        """Feature coordinates."""
        return self.plan.dim

    def factors(self, device: torch.device) -> tuple[tuple[torch.Tensor | None, torch.Tensor | None], ...]:
        """(rows, columns) factors per block on ``device``, (d, r k) each (None: identity),
        generated once on the CPU."""
        key = str(device)
        if key not in self._cache:
            seed, kind = self.config.seed, self.config.kind
            pairs = []
            for m, b in enumerate(self.plan.blocks):
                pair = (
                    factor_matrix(seed, kind, m, ROWS, b.rows, b.k_rows, b.terms),
                    factor_matrix(seed, kind, m, COLS, b.cols, b.k_cols, b.terms),
                )
                pairs.append(tuple(None if f is None else f.to(device) for f in pair))
            self._cache[key] = tuple(pairs)
        return self._cache[key]

    def sides(self, device: torch.device, scales: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        """(row Side, column Side) per block, with a rank-one scale per weight when given
        (name -> (row scale (d_r,), column scale (d_c,)))."""
        out = []
        for block, (f_rows, f_cols) in zip(self.plan.blocks, self.factors(device)):
            s_rows, s_cols = (None, None) if scales is None else scales[block.name]
            out.append((Side(f_rows, s_rows), Side(f_cols, s_cols)))
        return tuple(out)

    def fit_scale(self, scale: Mapping[str, torch.Tensor]) -> FittedScale:
        """A checkpoint's element-wise rescaling prepared for this projection: ``scale`` is
        name -> (numel,) Adam's D^{1/2} (``Preconditioner.sqrt_scale``). The parameters
        projected densely keep it exactly; each factored weight gets the rank-one stand-in
        a b^T of :func:`rank_one_fit` with weights D^{-2} = (sqrt(v_hat) + eps)^2, the
        gradient's second moment as Adam estimates it (coordinates that never saw a gradient
        have almost no say). An approximation, measured in docs/guides/factored.md."""
        fitted = {}
        for block in self.plan.blocks:
            root = scale[block.name].reshape(block.rows, block.cols)
            fitted[block.name] = rank_one_fit(root, root.double().pow(-4))
        return FittedScale({n: scale[n] for n in self.plan.rest}, fitted)

    def rest_config(self) -> ProjectionConfig | None:
        """The dense projection of the other parameters (None: kept as they are, or none)."""
        if self.plan.rest_dim in (0, self.plan.rest_numel):
            return None
        return ProjectionConfig(self.plan.rest_dim, self.config.seed, self.config.kind, self.config.backend, self.config.precision)

    def project_rest(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """(B, k_rest) float32 from the other parameters' (B, numel) gradient blocks."""
        if not self.plan.rest:
            return None
        blocks = [grads[n] for n in self.plan.rest]
        config = self.rest_config()
        if config is None:
            return torch.cat([b.to(torch.float32) for b in blocks], dim=1)
        return project(blocks, config)

    def assemble(self, factored: Mapping[str, torch.Tensor], rest: Mapping[str, torch.Tensor], rows: int) -> torch.Tensor:
        """Features (rows, dim) float32: each block's (rows, k_r k_c) projection (zeros where
        ``factored`` lacks it: its modules were not called), then the dense remainder
        projected from ``rest``'s (rows, numel) gradient blocks."""
        like = next(iter((*factored.values(), *rest.values())))
        parts = [
            factored[b.name].to(torch.float32) if b.name in factored
            else torch.zeros(rows, b.dim, dtype=torch.float32, device=like.device)
            for b in self.plan.blocks
        ]
        dense = self.project_rest(rest)
        if dense is not None:
            parts.append(dense)
        return torch.cat(parts, dim=1)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description (structure, seed, kind, sizes)."""
        return {"structure": "factored", "seed": self.config.seed, "kind": self.config.kind, **self.plan.describe()}


def rank_one_fit(scale: torch.Tensor, weights: torch.Tensor, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (d_r,), b (d_c,)) minimising sum_ij w_ij (S_ij - a_i b_j)^2 for a positive S (d_r, d_c).

    The factored projection's treatment of an element-wise rescaling S of a weight's gradient
    (Adam's D^{1/2}): S (x) dW is not a sum of outer products, but (a b^T) (x) dW =
    sum_t (a (x) u_t)(b (x) v_t)^T is, so the sides are rescaled by a and b. With w the
    gradient's expected squared entries, the fit minimises the expected squared error of the
    rescaled gradient. Starts from the log-domain least-squares fit (exact when S is rank
    one) and alternates the two closed-form weighted least-squares updates, in float64.
    """
    s, w = scale.to(torch.float64), weights.to(torch.float64)
    if s.dim() != 2 or w.shape != s.shape or not bool((s > 0).all()) or not bool((w >= 0).all()):
        raise InputError(f"rank_one_fit needs a positive 2-D scale and non-negative weights of its shape, got {tuple(s.shape)}, {tuple(w.shape)}")
    logs = s.log()
    a = (logs.mean(1) - logs.mean() / 2).exp()
    b = (logs.mean(0) - logs.mean() / 2).exp()
    tiny = torch.finfo(torch.float64).tiny
    for _ in range(iterations):
        a = torch.where((w @ b.square()) > 0, (w * s) @ b / (w @ b.square()).clamp_min(tiny), a)
        b = torch.where((a.square() @ w) > 0, a @ (w * s) / (a.square() @ w).clamp_min(tiny), b)
    return a.to(scale.dtype), b.to(scale.dtype)
