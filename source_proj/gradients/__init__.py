"""Per-example quantities in parameter space: the model as a function of its parameters
(``model``), the data it is fed (``data``), what it is trained on and measured by (``tasks``),
and per-example gradients (``per_example``)."""
