"""Training and query features, whose inner products are the SOURCE scores.

Per-segment training features of example m (float32, (L, k)):
    F_l(m) = w_l * M_l g_l(m),   w_l = 1/N_l if m took part in segment l's stage, else 0,
with g_l(m) the mean projected loss gradient over segment l's checkpoints and M_l from
``curvature.transport_operators``. Query features carry the minus sign of the math note, so

    score(q, m) = < Q(q), F(m) >    (> 0: including m raises the measurement of q).

"final" mode: Q = -P grad f(z_q, theta_T) (k,) and F = sum_l F_l (k,).
"segment" mode: Q = (-mean_{c in l} P grad f(z_q, theta_c))_l and F = (F_l)_l, both (L*k,).
"""

from __future__ import annotations

import torch


def segment_features(seg_grads: torch.Tensor, operators: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """F_l = w_l M_l g_l for a chunk.

    Args:
        seg_grads: (n, L, k) mean projected loss gradients per segment.
        operators: (L, k, k) float64 M_l.
        weights: (L,) float64 w_l (1/N_l, or 0 for segments the rows did not train in).
    Returns:
        (n, L, k) float32.
    """
    out = torch.einsum("nlk,ljk->nlj", seg_grads.to(torch.float64), operators.to(seg_grads.device))
    return (out * weights.to(out.device)[None, :, None]).to(torch.float32)


def combine(per_segment: torch.Tensor, query_mode: str, segment_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Index-ready features (n, D) from per-segment ones (n, L, k), keeping the segments
    where ``segment_mask`` (L,) is True (all by default). D = k ("final") or L*k ("segment")."""
    if segment_mask is not None:
        per_segment = per_segment * segment_mask.to(per_segment.device, per_segment.dtype)[None, :, None]
    if query_mode == "final":
        return per_segment.sum(dim=1)
    return per_segment.reshape(per_segment.shape[0], -1)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise inner products (n,) of two (n, D) arrays, accumulated in float64."""
    return (a.to(torch.float64) * b.to(torch.float64)).sum(dim=1)
