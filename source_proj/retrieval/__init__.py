"""Queries against a feature store: exact top-k (``exact``), approximate IVF top-k (``ivf``) and
bulk score matrices and self-influence (``bulk``)."""
