"""How features are encoded in a store: float32 as they are, or float16 with a per-row scale.

A float16 row is stored divided by a power of two chosen so that the row's largest magnitude
lands in (2^14, 2^15]: float16 cannot overflow (max 65504), the scaling itself is exact, and
every value above 2^-29 times its row's maximum keeps a relative error <= 2^-11 (smaller ones,
float16 subnormals, an absolute error < 2^-39 times the maximum). A score from a float16 store
is therefore within 2^-11 |Q[q]|_2 |F[m]|_2 (+ 2^-39 max|F[m]| |Q[q]|_1) of the exact one.
"""

from __future__ import annotations

import numpy as np
import torch

STORE_DTYPES = ("float32", "float16")
# float16 rows are scaled so that their largest magnitude is at most 2^_F16_MAX_EXPONENT.
_F16_MAX_EXPONENT = 15


def power_of_two_scale(block: np.ndarray) -> np.ndarray:
    """Per-row (all axes but the last) power-of-two scale for float16 storage, float32."""
    max_abs = np.maximum(block.max(axis=-1), -block.min(axis=-1))
    _, exponent = np.frexp(max_abs)  # max_abs <= 2^exponent
    # (Rows below 2^-111 keep the smallest normal float32 scale rather than underflow.)
    scale = np.ldexp(np.float32(1.0), np.maximum(exponent - _F16_MAX_EXPONENT, -126)).astype(np.float32)
    return np.where(max_abs > 0, scale, np.float32(1.0))


def encode(block: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored values and per-row scale (None for float32) of a float block."""
    values = np.require(block, np.float32, ["C", "W"])
    if dtype == "float32":
        return values, None
    scale = power_of_two_scale(values)
    # Dividing by a power of two is exact: the only rounding is float32 -> float16.
    inverse = torch.from_numpy(1.0 / scale)[..., None]
    return (torch.from_numpy(values) * inverse).half().numpy(), scale


def decode(stored: np.ndarray, scale: np.ndarray | None, out: torch.Tensor | None = None) -> np.ndarray:
    """float32 values of stored rows (float16 ones times their per-row scale), into ``out``."""
    values = torch.from_numpy(np.ascontiguousarray(stored))
    if out is None:
        out = torch.empty(values.shape, dtype=torch.float32)
    if scale is None:
        out.copy_(values)
    else:  # one pass, float16 * float32 -> float32, no float32 temporary
        torch.mul(values, torch.from_numpy(scale)[..., None], out=out)
    return out.numpy()
