"""Queries against a feature store: exact top-k (``exact``), approximate IVF top-k (``ivf``) and
bulk score matrices and self-influence (``bulk``).

Layer: above ``features`` (it reads stores) and ``distributed``, below the attributor; it knows
nothing of models or gradients: queries arrive as feature vectors."""
