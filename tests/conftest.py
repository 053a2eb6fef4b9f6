"""Shared test set-up.

Without a CUDA device, Triton kernels run in Triton's interpreter. TRITON_INTERPRET must be
set before triton compiles or imports any kernel, so it is set here, at collection time,
before any test module imports ``source_proj.kernels.triton_projection``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
