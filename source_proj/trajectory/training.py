"""A small SGD(-with-momentum) trainer that records a :class:`Trajectory`.

Used by the demo, the evaluation harness (retraining on subsets) and tests. It trains in
place with ``torch.optim.SGD`` on the batch-mean of the task's loss and saves a checkpoint
(a copy of the state dict, optionally also written to disk) at regular step intervals.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from source_proj.gradients.model import Inputs, call_module, take_rows
from source_proj.gradients.tasks import Task
from source_proj.trajectory.checkpoints import Checkpoint, Trajectory


@dataclass(frozen=True)
class TrainSettings:
    """SGD settings.

    Attributes:
        epochs: passes over the data.
        batch_size: examples per step (the last batch of an epoch may be smaller).
        lr: learning rate (constant).
        momentum: heavy-ball beta (0 for plain SGD).
        weight_decay: L2 coefficient lambda.
        checkpoints_per_epoch: checkpoints saved per epoch, evenly spaced in steps.
        seed: seed of the batch order.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    checkpoints_per_epoch: int = 1
    seed: int = 0

    def trajectory(self, checkpoints: list[Checkpoint]) -> Trajectory:
        """The trajectory of checkpoints saved with these settings."""
        return Trajectory(
            tuple(checkpoints),
            optimizer="momentum" if self.momentum > 0 else "sgd",
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )


def train_sgd(
    model: nn.Module,
    task: Task,
    inputs: Inputs,
    targets: torch.Tensor,
    settings: TrainSettings,
    *,
    stage: object = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    sample_weights: torch.Tensor | None = None,
) -> list[Checkpoint]:
    """Train ``model`` in place; return the checkpoints saved along the way.

    Args:
        inputs, targets: the training set (N rows); inputs a tensor, a tuple (positional
            arguments) or a dict of tensors (keyword arguments), outputs selected as in
            ``gradients.model.select_output``.
        stage: the stage label given to the checkpoints.
        checkpoint_dir: if given, also save each state there as ``ckpt-<stage>-<i>.pt`` and
            reference it by path.
        sample_weights: optional (N,) per-example loss weights (1 by default).
    """
    n = int(targets.shape[0])
    if n == 0:
        raise ValueError("cannot train on an empty data set")
    order_gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    steps_per_epoch = -(-n // settings.batch_size)
    total = settings.epochs * steps_per_epoch
    every = max(1, steps_per_epoch // settings.checkpoints_per_epoch)
    save_at = set(range(every, total + 1, every)) | {total}
    checkpoints: list[Checkpoint] = []
    last_saved, step = 0, 0
    model.train()
    for _ in range(settings.epochs):
        perm = torch.randperm(n, generator=order_gen)
        for start in range(0, n, settings.batch_size):
            idx = perm[start : start + settings.batch_size]
            losses = task.loss(call_module(model, take_rows(inputs, idx)), targets[idx])
            if sample_weights is not None:
                losses = losses * sample_weights[idx]
            opt.zero_grad()
            losses.mean().backward()
            opt.step()
            step += 1
            if step in save_at:
                state = copy.deepcopy(model.state_dict())
                if checkpoint_dir is not None:
                    path = Path(checkpoint_dir) / f"ckpt-{stage}-{len(checkpoints)}.pt"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(state, path)
                    state = str(path)
                checkpoints.append(Checkpoint(state, steps=step - last_saved, lr=settings.lr, stage=stage))
                last_saved = step
    model.eval()
    return checkpoints
