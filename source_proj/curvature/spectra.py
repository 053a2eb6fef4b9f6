"""Segment curvature in the projected space and its two matrix functions.

Per segment l the projected Hessian H_l (k x k: the mean over the segment's checkpoints of the
projected Gauss-Newton Hessian of the mean training loss, plus the mean decay rate of those
checkpoints times I: lambda for SGD and AdamW, see ``trajectory.optimizer_state`` for Adam) is
eigendecomposed in float64, H_l = V diag(s) V^T, and with t_l = eta_l K_l

    S_l   = exp(-t_l H_l)                 = V diag(exp(-t s)) V^T
    phi_l = (I - exp(-t_l H_l)) H_l^{-1}  = V diag(-expm1(-t s) / s) V^T   (-> t as s -> 0)

With coordinate groups (the factored or grouped projection's layers,
``projection.projected.layer_groups``), H_l is first restricted to its diagonal blocks, one per
group, and each block is eigendecomposed on its own: V is then block-diagonal (up to the order
of the coordinates), and so are S_l, phi_l and the transport operators, which are formed block
by block. The eigenproblems and products stay as small as a layer's share of k.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from source_proj.errors import InputError
from source_proj.threads import one_thread
from source_proj.trajectory.checkpoints import Segment

# Below this t*s the series of -expm1(-x)/x is used (relative error ~ x^3/24 < 1e-17).
_SERIES_BELOW = 1e-6


@dataclass(frozen=True)
class SegmentSpectrum:
    """Eigendecomposition of one segment's projected Hessian (float64).

    Attributes:
        eigenvalues: s, shape (k,), clamped at 0 (units of loss / parameter^2).
        eigenvectors: V, shape (k, k), columns orthonormal.
        time: t = eta * K of the segment.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    time: float

    def exp(self) -> torch.Tensor:
        """S = exp(-t H), (k, k) float64."""
        return _apply(self.eigenvectors, torch.exp(-self.time * self.eigenvalues))

    def phi(self) -> torch.Tensor:
        """phi = (I - exp(-t H)) H^{-1}, (k, k) float64."""
        return _apply(self.eigenvectors, phi_values(self.eigenvalues, self.time))


def _apply(vecs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return (vecs * values) @ vecs.T


def phi_values(s: torch.Tensor, t: float) -> torch.Tensor:
    """(1 - exp(-t s)) / s elementwise, finite at s = 0 (where it equals t); float64."""
    s = s.to(torch.float64)
    x = t * s
    small = x.abs() < _SERIES_BELOW
    safe_s = torch.where(small, torch.ones_like(s), s)
    direct = -torch.expm1(-x) / safe_s
    series = t * (1.0 - x / 2.0 + x * x / 6.0)
    return torch.where(small, series, direct)


def gauss_newton_gram(rows: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """sum_r signs_r rows_r rows_r^T, (k, k) float64, for rows (..., R, k) of projected
    Gauss-Newton factors (each example's A^T J P^T) and signs (R,) (None: all +1): one
    chunk's contribution to a Hessian.

    The Gram matrix is formed in float32 (the rows are float32 already; a chunk sums a few
    hundred terms); chunks are summed in float64 (``distributed.reduce.TreeSum``).
    """
    flat = rows.reshape(-1, rows.shape[-1]).to(torch.float32)
    weighted = flat if signs is None else (rows * signs.to(rows)[:, None]).reshape(-1, rows.shape[-1]).to(torch.float32)
    with one_thread():
        return (weighted.T @ flat).to(torch.float64)


def segment_spectrum(
    hessians: list[torch.Tensor], weight_decay: float, time: float, groups: torch.Tensor | None = None
) -> SegmentSpectrum:
    """Eigendecompose the mean of the checkpoints' projected Hessians (k, k) plus
    ``weight_decay`` times I: whole, or restricted to the diagonal blocks of ``groups``
    ((k,) integer label per coordinate; None: one block).

    Negative eigenvalues (round-off of a PSD matrix) are clamped to 0.
    """
    mean = torch.stack([h.to(torch.float64) for h in hessians]).mean(dim=0)
    mean = 0.5 * (mean + mean.T)
    mean.diagonal().add_(weight_decay)
    with one_thread():
        evals, evecs = torch.linalg.eigh(mean) if groups is None else _block_eigh(mean, groups)
    return SegmentSpectrum(evals.clamp_min(0.0), evecs, float(time))


def _block_eigh(matrix: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (k,) and eigenvectors (k, k) of ``matrix`` restricted to the diagonal blocks
    of ``groups``: each block's eigenvectors fill its own rows and columns."""
    k = matrix.shape[0]
    if groups.shape != (k,):
        raise InputError(f"curvature groups must label each of the {k} coordinates, got shape {tuple(groups.shape)}")
    evals = torch.empty(k, dtype=matrix.dtype)
    evecs = torch.zeros(k, k, dtype=matrix.dtype)
    for index in _group_indices(groups):
        values, vectors = torch.linalg.eigh(matrix[index][:, index])
        evals[index] = values
        evecs[index[:, None], index[None, :]] = vectors
    return evals, evecs


def _group_indices(groups: torch.Tensor) -> list[torch.Tensor]:
    """The coordinates of each group of ``groups`` ((k,) labels), in increasing label order."""
    return [torch.nonzero(groups == label).squeeze(1) for label in torch.unique(groups)]


def segment_spectra(
    segments: Sequence[Segment],
    hessians: Mapping[int, torch.Tensor] | torch.Tensor,
    decay: float | Sequence[float],
    used: Collection[int] | None = None,
    groups: torch.Tensor | None = None,
) -> list[SegmentSpectrum]:
    """Each segment's spectrum from the projected Hessians (k, k) of its checkpoints
    (``hessians[c]``: a mapping, or all of them stacked (C, k, k)), block-diagonal over
    ``groups`` when given (see :func:`segment_spectrum`).

    ``decay`` is the rate added to the diagonal: one number (the weight decay lambda), or one
    per checkpoint (``Preconditioner.decays``), averaged over each segment's checkpoints.

    Segments not in ``used`` (indices; default: all) need no Hessians: they get a
    zero-curvature placeholder (S = I, phi = t I), for segments whose curvature cannot change
    the scores (see ``SourceAttributor.prepare``).
    """
    if used is not None:  # the placeholder's size, from a segment that has Hessians
        k = hessians[segments[min(used)].checkpoints[0]].shape[0]
        flat = torch.zeros(k, dtype=torch.float64), torch.eye(k, dtype=torch.float64)
    return [
        segment_spectrum([hessians[c] for c in seg.checkpoints], _segment_decay(decay, seg), seg.time, groups)
        if used is None or index in used
        else SegmentSpectrum(*flat, seg.time)
        for index, seg in enumerate(segments)
    ]


def _segment_decay(decay: float | Sequence[float], segment: Segment) -> float:
    """The decay rate of ``segment``: ``decay`` itself, or the mean of its checkpoints' rates."""
    if isinstance(decay, (int, float)):
        return float(decay)
    rates = [float(decay[c]) for c in segment.checkpoints]
    return rates[0] if len(set(rates)) == 1 else sum(rates) / len(rates)


def transport_operators(
    spectra: list[SegmentSpectrum], carried: Sequence[bool], groups: torch.Tensor | None = None
) -> torch.Tensor:
    """M_l for each segment, (L, k, k) float64.

    For a segment l that is ``carried`` (the paper's form): M_l = S_L ... S_{l+1} phi_l, so that
    a perturbation made in segment l is carried to the final parameters. For the others:
    M_l = phi_l (for query gradients taken at each segment's own checkpoints). See
    ``features.query_forms``.

    With ``groups`` ((k,) labels), every spectrum must be block-diagonal over them (as
    :func:`segment_spectrum` makes them with the same groups, and a zero-curvature placeholder
    is): then so is every M_l, and each block is computed on its own, in sum_g k_g^3
    operations rather than k^3.
    """
    if len(carried) != len(spectra):
        raise InputError(f"expected one carried flag per segment ({len(spectra)}), got {len(carried)}")
    if groups is None:
        return _operators(spectra, carried)
    k = spectra[0].eigenvectors.shape[0]
    out = torch.zeros(len(spectra), k, k, dtype=torch.float64)
    for index in _group_indices(groups):
        block = [SegmentSpectrum(s.eigenvalues[index], s.eigenvectors[index][:, index], s.time) for s in spectra]
        out[:, index[:, None], index[None, :]] = _operators(block, carried)
    return out


def _operators(spectra: list[SegmentSpectrum], carried: Sequence[bool]) -> torch.Tensor:
    """:func:`transport_operators` on whole matrices."""
    ops = []
    later = torch.eye(spectra[0].eigenvectors.shape[0], dtype=torch.float64)  # S_L ... S_{l+1}
    with one_thread():
        for spectrum, carry in zip(reversed(spectra), reversed(carried)):
            ops.append(later @ spectrum.phi() if carry else spectrum.phi())
            if any(carried[: len(spectra) - len(ops)]):  # an earlier segment still needs S_l
                later = later @ spectrum.exp()
    return torch.stack(ops[::-1])
