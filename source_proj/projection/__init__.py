"""The seeded Johnson-Lindenstrauss projection (``jl``; its kernels are ``source_proj.kernels``)
and the projected per-example gradients and Gauss-Newton factor rows (``projected``)."""
