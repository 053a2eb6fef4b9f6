"""Results that do not depend on how many threads torch uses.

A BLAS or LAPACK routine may split a sum differently with another thread count, so the same
matrix product or eigendecomposition can differ in its last bits between one process using two
threads and two processes using one thread each (``torchrun`` sets ``OMP_NUM_THREADS=1``). Where
such a result is stored or decides a stored value (curvature Gram matrices, the k x k
eigenproblems and the operators built from them), it is computed under :func:`one_thread`: these
are small next to the gradient passes, which keep every thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to 1, restoring it afterwards."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
