"""Per-example quantities in parameter space: the model as a function of its parameters
(``model``), the data it is fed (``data``), what it is trained on and measured by (``tasks``,
``causal_lm``, ``task_names``), and per-example gradients (``per_example``).

Layer: above ``trajectory`` (checkpoints to load), below ``projection``: the factored
projection's forward hooks are handed in through the ``per_example.Taps`` protocol, so this
package never imports a projection."""
