"""Training features: how they are formed from segment gradients (``rows``), the zarr feature
store (``store``) with its crash-safe completion ledger and digests (``ledger``), the
writers' lock (``lock``, ``locking`` for a group of ranks).

Layer: above ``curvature`` and ``distributed``, below ``retrieval`` (which searches stores) and
the attributor. Filling a store from an attributor is the attributor's job (``store_fit``), so
nothing here imports the attributor."""
