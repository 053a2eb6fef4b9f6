"""Training features: how they are formed from segment gradients (``rows``) and laid out for
each query form (``query_forms``); where they live (``source``: the ``FeatureSource``
interface and features in memory); the zarr feature store (``store``) with its layout
(``layout``), errors (``errors``), encoding (``codec``), crash-safe completion ledger and
digests (``ledger``), the featurisation driver that fills it resumably (``featurize``), and the
writers' lock (``lock``, ``locking`` for a group of ranks).

Layer: above ``curvature`` and ``distributed``, below ``retrieval`` (which searches stores) and
the attributor. Filling a store from an attributor is the attributor's job (``store_fit``), so
nothing here imports the attributor."""
