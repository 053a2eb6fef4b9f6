"""How the model was trained: checkpoints, optimizer settings, segments (``checkpoints``);
Adam's preconditioner from the saved optimizer states (``optimizer_state``); per-step
learning-rate histories (``lr_history``); small trainers that record a trajectory
(``training``)."""
