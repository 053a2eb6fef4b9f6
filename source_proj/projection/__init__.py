"""The seeded Johnson-Lindenstrauss projection (``jl``; its kernels are ``source_proj.kernels``),
the Kronecker-factored projection of weight matrices (``kronecker``, with its forward hooks in
``layer_taps``) and the projected per-example gradients and Gauss-Newton factor rows
(``projected``).

Layer: above ``gradients`` (it projects their per-example gradients) and ``kernels``, below
``curvature``."""
