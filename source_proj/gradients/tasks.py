"""What the model is trained on and what a query measures.

A :class:`Task` holds the per-example training loss, the query measurement, and a factor of
the loss's Hessian with respect to the model outputs, A with A A^T = d^2 loss / d outputs^2,
from which the Gauss-Newton Hessian J^T A A^T J is built. All functions take a batch:
``outputs`` (B, C) and ``targets`` (B, ...), and return one value per example.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import hessian, vmap

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Task:
    """A training loss and a query measurement, both (B, C), (B, ...) -> (B,).

    The base class works for any twice-differentiable loss: its Hessian factor comes from
    ``torch.func.hessian`` and an eigendecomposition. Built-in tasks give closed forms.

    Attributes:
        loss: per-example training loss (the optimizer minimised its batch mean).
        measurement: per-example f(z, theta) that scores explain.
        name: a label recorded in stores.
    """

    loss: LossFn
    measurement: LossFn
    name: str = "custom"

    def hessian_factor(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A (B, C, R) with A A^T = Hessian of the loss w.r.t. the outputs (PSD part)."""
        hess = vmap(hessian(lambda o, t: self.loss(o[None], t[None])[0]))(outputs.detach(), targets)
        evals, evecs = torch.linalg.eigh(hess.to(torch.float64))
        return (evecs * evals.clamp_min(0.0).sqrt()[:, None, :]).to(outputs.dtype)

    def check_targets(self, targets: torch.Tensor, n_outputs: int, first_row: int = 0) -> None:
        """Raise ``ValueError`` for targets this task cannot train on, naming their rows
        (``first_row`` + position in the batch); ``n_outputs`` is C, the model's outputs per
        example. The generic task accepts any targets; built-in tasks override this."""

    def sampled_hessian_factor(
        self, outputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """v (B, C, 1) with E[v v^T] = the Hessian w.r.t. the outputs (one random draw each)."""
        factor = self.hessian_factor(outputs, targets)
        signs = torch.randint(0, 2, factor.shape[::2], generator=generator, device="cpu")
        signs = (2 * signs - 1).to(factor.device, factor.dtype)
        return torch.einsum("bcr,br->bc", factor, signs)[..., None]


def _margin(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    own = outputs.gather(1, targets[:, None].long())[:, 0]
    own_mask = torch.arange(outputs.shape[1], device=outputs.device)[None, :] == targets[:, None].long()
    others = outputs.masked_fill(own_mask, -math.inf)
    return own - torch.logsumexp(others, dim=1)


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets.long(), reduction="none")


@dataclass(frozen=True)
class ClassificationTask(Task):
    """Softmax cross-entropy training; the measurement is the margin
    ``logit_y - logsumexp(logits without y)``."""

    loss: LossFn = _cross_entropy
    measurement: LossFn = _margin
    name: str = "classification"

    def check_targets(self, targets: torch.Tensor, n_outputs: int, first_row: int = 0) -> None:
        """Labels must be integer class indices in [0, C), one per example. PyTorch's ignore
        index -100 is refused: cross-entropy would give such a row zero loss, hence zero
        features and self-influence, and it would silently rank as irrelevant."""
        targets = torch.as_tensor(targets)
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(
                f"classification labels must be integer class indices, got dtype {targets.dtype} (rows "
                f"{first_row}-{first_row + len(targets) - 1}); convert whole-number labels with .long(), "
                "soft labels need a custom Task"
            )
        if targets.ndim != 1:
            raise ValueError(f"classification labels must be one class index per row, got shape {tuple(targets.shape)}")
        for bad, problem in (
            (targets == -100, "-100, PyTorch's ignore index: a row without a label has no loss to attribute; "
             "drop those rows"),
            ((targets < 0) | (targets >= n_outputs), f"outside [0, {n_outputs}) (the model has {n_outputs} outputs)"),
        ):
            if bad.any():
                rows = (bad.nonzero()[:, 0][:10] + first_row).tolist()
                values = targets[bad][:10].tolist()
                raise ValueError(f"classification labels of rows {rows} (values {values}) are {problem}")

    def hessian_factor(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # diag(p) - p p^T = A A^T with A = diag(sqrt p) - p sqrt(p)^T (uses sum(p) = 1).
        probs = torch.softmax(outputs.detach().to(torch.float64), dim=1)
        root = probs.sqrt()
        factor = torch.diag_embed(root) - probs[:, :, None] * root[:, None, :]
        return factor.to(outputs.dtype)

    def sampled_hessian_factor(
        self, outputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        # One pseudo-label y ~ p per example: the CE gradient's output part is p - e_y.
        probs = torch.softmax(outputs.detach().to(torch.float64), dim=1)
        labels = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(outputs.device)
        return (probs - F.one_hot(labels, outputs.shape[1])).to(outputs.dtype)[..., None]


def _flat(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return outputs.reshape(outputs.shape[0], -1), targets.reshape(outputs.shape[0], -1).to(outputs.dtype)


def _squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    out, tgt = _flat(outputs, targets)
    return ((out - tgt) ** 2).sum(dim=1)


def _absolute_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    out, tgt = _flat(outputs, targets)
    return (out - tgt).abs().sum(dim=1)


@dataclass(frozen=True)
class RegressionTask(Task):
    """Squared-error training ``sum_o (f_o - y_o)^2``; the measurement is the absolute error."""

    loss: LossFn = _squared_error
    measurement: LossFn = _absolute_error
    name: str = "regression"

    def hessian_factor(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(outputs[0].numel(), dtype=outputs.dtype, device=outputs.device)
        return math.sqrt(2.0) * eye.expand(outputs.shape[0], -1, -1)


def resolve_task(task: Task | str) -> Task:
    """A Task from an instance or the names "classification" / "regression"."""
    if isinstance(task, Task):
        return task
    builtins = {"classification": ClassificationTask, "regression": RegressionTask}
    if task in builtins:
        return builtins[task]()
    raise ValueError(f"unknown task {task!r}; pass a Task or one of {sorted(builtins)}")
