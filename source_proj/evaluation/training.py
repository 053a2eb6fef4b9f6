"""Small trainers that record a :class:`Trajectory`: SGD(-with-momentum) and AdamW.

Used by the demo, the evaluation harness (retraining on subsets) and tests. Both train in
place on the batch-mean of the task's loss and save a checkpoint (a copy of the state dict,
optionally also written to disk) at regular step intervals. ``train_sgd`` runs
``torch.optim.SGD`` at a constant rate; ``train_adamw`` runs ``torch.optim.AdamW`` with a
linear warm-up and a cosine decay, recording each checkpoint's per-step learning rates and
its optimizer state (as Hugging Face's Trainer saves ``optimizer.pt`` beside each checkpoint).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from source_proj.errors import InputError
from source_proj.gradients.model import Inputs, call_module, take_rows
from source_proj.gradients.tasks import Task
from source_proj.trajectory.checkpoints import Checkpoint, Trajectory
from source_proj.trajectory.lr_history import LearningRateRecorder


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


@dataclass(frozen=True)
class AdamWSettings:
    """AdamW settings with a warm-up + cosine schedule.

    Attributes:
        epochs, batch_size, checkpoints_per_epoch, seed: as for :class:`TrainSettings`.
        lr: the peak learning rate.
        betas, eps: Adam's (beta1, beta2) and eps.
        weight_decay: the decoupled decay lambda (theta <- theta - lr * lambda * theta).
        warmup_fraction: fraction of all steps over which the rate rises linearly to ``lr``
            (step s < W uses lr * (s + 1) / W); after it the rate follows a cosine from ``lr``
            towards 0 at the end of training.
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    warmup_fraction: float = 0.1
    checkpoints_per_epoch: int = 1
    seed: int = 0

    def trajectory(self, checkpoints: list[Checkpoint]) -> Trajectory:
        """The trajectory of checkpoints saved with these settings."""
        return Trajectory(
            tuple(checkpoints), optimizer="adamw", weight_decay=self.weight_decay, betas=self.betas, eps=self.eps
        )

    def rate_factor(self, step: int, total: int) -> float:
        """The schedule's multiplier of ``lr`` at 0-based ``step`` of ``total`` steps (> 0)."""
        warmup = max(1, round(self.warmup_fraction * total)) if self.warmup_fraction > 0 else 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train(
    model: nn.Module,
    task: Task,
    inputs: Inputs,
    targets: torch.Tensor,
    settings: TrainSettings | AdamWSettings,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    stage: object,
    checkpoint_dir: str | os.PathLike | None,
    sample_weights: torch.Tensor | None,
    keep_optimizer_state: bool,
) -> list[Checkpoint]:
    """The training loop both trainers share: shuffled mini-batches, checkpoints every
    ``steps_per_epoch // checkpoints_per_epoch`` steps and at the end."""
    n = int(targets.shape[0])
    order_gen = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = -(-n // settings.batch_size)
    total = settings.epochs * steps_per_epoch
    every = max(1, steps_per_epoch // settings.checkpoints_per_epoch)
    save_at = set(range(every, total + 1, every)) | {total}
    checkpoints: list[Checkpoint] = []
    step = 0
    recorder = LearningRateRecorder(optimizer)
    model.train()
    try:
        for _ in range(settings.epochs):
            perm = torch.randperm(n, generator=order_gen)
            for start in range(0, n, settings.batch_size):
                idx = perm[start : start + settings.batch_size]
                losses = task.loss(call_module(model, take_rows(inputs, idx)), targets[idx])
                if sample_weights is not None:
                    losses = losses * sample_weights[idx]
                optimizer.zero_grad()
                losses.mean().backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                step += 1
                if step in save_at:
                    index, rates = len(checkpoints), recorder.take()
                    saved = _save(model, optimizer, rates, stage, index, checkpoint_dir, keep_optimizer_state)
                    checkpoints.append(saved)
    finally:
        recorder.close()
    model.eval()
    return checkpoints


def _save(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rates: tuple[float, ...],
    stage: object,
    index: int,
    checkpoint_dir: str | os.PathLike | None,
    keep_optimizer_state: bool,
) -> Checkpoint:
    state: dict[str, Any] | str = copy.deepcopy(model.state_dict())
    opt_state: dict[str, Any] | str | None = copy.deepcopy(optimizer.state_dict()) if keep_optimizer_state else None
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, folder / f"ckpt-{stage}-{index}.pt")
        state = str(folder / f"ckpt-{stage}-{index}.pt")
        if opt_state is not None:
            torch.save(opt_state, folder / f"optimizer-{stage}-{index}.pt")
            opt_state = str(folder / f"optimizer-{stage}-{index}.pt")
    lr = rates[0] if all(r == rates[0] for r in rates) else rates  # a constant rate stays one number
    return Checkpoint(state, steps=len(rates), lr=lr, stage=stage, optimizer_state=opt_state)


def _check_data(targets: torch.Tensor) -> None:
    if int(targets.shape[0]) == 0:
        raise InputError("cannot train on an empty data set")


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
    """Train ``model`` in place with SGD; return the checkpoints saved along the way.

    Args:
        inputs, targets: the training set (N rows); inputs a tensor, a tuple (positional
            arguments) or a dict of tensors (keyword arguments), outputs selected as in
            ``gradients.model.select_output``.
        stage: the stage label given to the checkpoints.
        checkpoint_dir: if given, also save each state there as ``ckpt-<stage>-<i>.pt`` and
            reference it by path.
        sample_weights: optional (N,) per-example loss weights (1 by default).
    """
    _check_data(targets)
    opt = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    return _train(model, task, inputs, targets, settings, opt, None, stage, checkpoint_dir, sample_weights, False)


def train_adamw(
    model: nn.Module,
    task: Task,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    settings: AdamWSettings,
    *,
    stage: object = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    sample_weights: torch.Tensor | None = None,
) -> list[Checkpoint]:
    """Train ``model`` in place with AdamW and a warm-up + cosine schedule; return the
    checkpoints, each with its per-step learning rates and the optimizer's ``state_dict()``.

    Args: as for :func:`train_sgd`; with ``checkpoint_dir`` the optimizer states are saved as
    ``optimizer-<stage>-<i>.pt`` beside the checkpoints and referenced by path.
    """
    _check_data(targets)
    opt = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay
    )
    total = settings.epochs * -(-int(targets.shape[0]) // settings.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: settings.rate_factor(s, total))
    return _train(model, task, inputs, targets, settings, opt, scheduler, stage, checkpoint_dir, sample_weights, True)


def train(
    model: nn.Module,
    task: Task,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    settings: TrainSettings | AdamWSettings,
    **options: Any,
) -> list[Checkpoint]:
    """:func:`train_sgd` or :func:`train_adamw`, chosen by the type of ``settings``."""
    if isinstance(settings, AdamWSettings):
        return train_adamw(model, task, inputs, targets, settings, **options)
    return train_sgd(model, task, inputs, targets, settings, **options)
