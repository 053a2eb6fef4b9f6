"""How the model was trained: checkpoints, optimizer settings, segments (``checkpoints``), and
small trainers that record a trajectory (``training``)."""
