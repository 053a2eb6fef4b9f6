"""How the model was trained: checkpoints, optimizer settings, segments (``checkpoints``);
Adam's preconditioner from the saved optimizer states (``optimizer_state``); per-step
learning-rate histories (``lr_history``); Hugging Face Trainer folders (``hf_trainer``) and the
callback that records what they lack (``trainer_callback``).

Layer: the lowest data layer (only ``errors`` below it): a trajectory is a description of files
and numbers, so it imports no gradient, projection or store code. The small trainers that
produce trajectories need gradients and live in ``evaluation.training``."""
