"""Training and query features, whose inner products are the SOURCE scores.

Per-segment training features of example m (float32, (L, k)):
    F_l(m) = w_l * M_l g_l(m),   w_l = 1/N_l if m took part in segment l's stage, else 0,
with g_l(m) the mean projected loss gradient over segment l's checkpoints and M_l from
``curvature.transport_operators``. Query features carry the minus sign (docs/math.md, section 4), so

    score(q, m) = < Q(q), F(m) >    (> 0: including m raises the measurement of q).

How Q and F are laid out (the final checkpoint's gradient against sum_l F_l, or per-segment
blocks side by side) is the query form's business: ``query_forms``.
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


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise inner products (n,) of two (n, D) arrays, accumulated in float64."""
    return (a.to(torch.float64) * b.to(torch.float64)).sum(dim=1)
