"""Training features: how they are formed from segment gradients (``rows``), the zarr feature
store (``store``) with its crash-safe completion ledger and digests (``ledger``), the
writers' lock (``lock``), and the link between a ``SourceAttributor`` and a store (``fit``)."""
