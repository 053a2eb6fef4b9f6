"""Random-projection kernels, installed as ``source_proj.kernels``.

``reference`` defines the random matrix (a pure function of seed, row and column) and computes
it on the CPU; ``cpu_projection`` multiplies gradients by it on the CPU, tile by tile;
``triton_projection`` generates the very same matrix on the fly inside a Triton kernel. See
``reference`` for the exact layout.
"""
