"""What the model is trained on and what a query measures.

A :class:`Task` holds the per-example training loss, the query measurement, and a factor of
the loss's Hessian with respect to the model outputs, A with A A^T = d^2 loss / d outputs^2,
from which the Gauss-Newton Hessian J^T A A^T J is built.

Output-shape contract: every function takes a batch of ``outputs`` (B, *O) in the shape the
model returns them ((B, C) class logits, (B, T, V) token logits, ...) and ``targets``
(B, ...), the same in the gradient and the curvature passes. Losses and measurements return
one value per example, (B,). Hessian factors index the outputs flattened row-major,
C = prod(O): ``hessian_factor`` returns A (B, C, R); ``sampled_hessian_factor`` returns
``(columns (B, C, R), signs)`` with E[sum_r signs_r a_r a_r^T] = A A^T (``signs`` None
meaning all +1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.func import hessian, vmap
from source_proj.errors import InputError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SampleFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
Factor = tuple[torch.Tensor, torch.Tensor | None]


def rademacher(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """+-1 entries drawn on the CPU from ``generator`` (reproducible on any device), as ``like``."""
    signs = torch.randint(0, 2, shape, generator=generator, device="cpu")
    return (2 * signs - 1).to(like.device, like.dtype)


@dataclass(frozen=True)
class Task:
    """A training loss and a query measurement, both (B, *O), (B, ...) -> (B,).

    The base class works for any twice-differentiable loss. Its exact Hessian factor comes
    from ``torch.func.hessian`` and an eigendecomposition (C x C per example: for few
    outputs only). Its sampled factor never forms that matrix: with ``sample`` (for a loss
    that is the negative log-likelihood of its targets), one pseudo-target is drawn from the
    model's predictive distribution and the factor column is the loss gradient at it (the
    Fisher identity E[g g^T] = E[d^2 loss]); without, a Hessian-vector form with Rademacher
    xi, E[xi (H xi)^T] = H, written as two signed columns ((xi + H xi)/2, +1) and
    ((xi - H xi)/2, -1). Either costs one backward through the loss per example, whatever
    C is. Built-in tasks give closed forms.

    Attributes:
        loss: per-example training loss (the optimizer minimised its batch mean).
        measurement: per-example f(z, theta) that scores explain.
        name: a label recorded in stores.
        sample: optional ``(outputs, targets, generator) -> pseudo-targets`` drawn from the
            model's predictive distribution; only valid if ``loss`` is exactly the negative
            log-likelihood of its targets (unscaled).
    """

    loss: LossFn
    measurement: LossFn
    name: str = "custom"
    sample: SampleFn | None = None
    # Curvature mode used by SourceConfig(curvature="auto").
    default_curvature: ClassVar[str] = "exact"

    def hessian_factor(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A (B, C, R) with A A^T = Hessian of the loss w.r.t. the flattened outputs (PSD part)."""
        shape = outputs.shape[1:]
        flat = outputs.detach().reshape(outputs.shape[0], -1)
        hess = vmap(hessian(lambda o, t: self.loss(o.reshape(1, *shape), t[None])[0]))(flat, targets)
        evals, evecs = torch.linalg.eigh(hess.to(torch.float64))
        return (evecs * evals.clamp_min(0.0).sqrt()[:, None, :]).to(outputs.dtype)

    def check_targets(self, targets: torch.Tensor, n_outputs: int, first_row: int = 0) -> None:
        """Raise ``ValueError`` for targets this task cannot train on, naming their rows
        (``first_row`` + position in the batch); ``n_outputs`` is C, the model's outputs per
        example. The generic task accepts any targets; built-in tasks override this."""

    def sampled_hessian_factor(
        self, outputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> Factor:
        """One random draw per example: (columns (B, C, R), signs (R,) or None), R = 1 with
        ``sample``, 2 otherwise (see the class docstring)."""
        batch = outputs.shape[0]
        out = outputs.detach().to(torch.float64).requires_grad_(True)
        with torch.enable_grad():
            if self.sample is not None:
                pseudo = self.sample(outputs.detach(), targets, generator)
                (grad,) = torch.autograd.grad(self.loss(out, pseudo).sum(), out)
                return grad.reshape(batch, -1, 1).to(outputs.dtype), None
            xi = rademacher(tuple(outputs.shape), generator, out)
            (grad,) = torch.autograd.grad(self.loss(out, targets).sum(), out, create_graph=True)
            (hxi,) = torch.autograd.grad((grad * xi).sum(), out)
        columns = torch.stack([(xi + hxi) / 2, (xi - hxi) / 2], dim=-1).reshape(batch, -1, 2)
        return columns.to(outputs.dtype), torch.tensor([1.0, -1.0], dtype=outputs.dtype, device=outputs.device)


def _margin(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    own = outputs.gather(1, targets[:, None].long())[:, 0]
    own_mask = torch.arange(outputs.shape[1], device=outputs.device)[None, :] == targets[:, None].long()
    others = outputs.masked_fill(own_mask, -math.inf)
    return own - torch.logsumexp(others, dim=1)


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets.long(), reduction="none")


def softmax_factor(logits: torch.Tensor) -> torch.Tensor:
    """A (..., C, C) with A A^T = diag(p) - p p^T, p = softmax(logits) over the last axis:
    A = diag(sqrt p) - p sqrt(p)^T (uses sum(p) = 1); float64."""
    probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)
    root = probs.sqrt()
    return torch.diag_embed(root) - probs[..., :, None] * root[..., None, :]


def softmax_pseudo_gradient(
    logits: torch.Tensor, generator: torch.Generator, where: torch.Tensor | None = None
) -> torch.Tensor:
    """p - e_y with one label y ~ softmax(logits) per row of the last axis (float64): the
    cross-entropy gradient at a pseudo-label, E[(p - e_y)(p - e_y)^T] = diag(p) - p p^T.

    With ``where`` (bool, the leading shape of ``logits``), labels are drawn only at its True
    rows, in row-major order (zeros elsewhere), so the draws do not depend on how many other
    rows (e.g. padding) there are.
    """
    probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)
    chosen = torch.ones(probs.shape[:-1], dtype=torch.bool, device=probs.device) if where is None else where
    picked = probs[chosen]
    out = torch.zeros_like(probs)
    if picked.shape[0] == 0:
        return out
    labels = torch.multinomial(picked.cpu(), 1, generator=generator)[:, 0].to(probs.device)
    out[chosen] = picked - F.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return out


@dataclass(frozen=True)
class ClassificationTask(Task):
    """Softmax cross-entropy training on (B, C) logits; the measurement is the margin
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
            raise InputError(
                f"classification labels must be integer class indices, got dtype {targets.dtype} (rows "
                f"{first_row}-{first_row + len(targets) - 1}); convert whole-number labels with .long(), "
                "soft labels need a custom Task"
            )
        if targets.ndim != 1:
            raise InputError(f"classification labels must be one class index per row, got shape {tuple(targets.shape)}")
        for bad, problem in (
            (targets == -100, "-100, PyTorch's ignore index: a row without a label has no loss to attribute; "
             "drop those rows"),
            ((targets < 0) | (targets >= n_outputs), f"outside [0, {n_outputs}) (the model has {n_outputs} outputs)"),
        ):
            if bad.any():
                rows = (bad.nonzero()[:, 0][:10] + first_row).tolist()
                values = targets[bad][:10].tolist()
                raise InputError(f"classification labels of rows {rows} (values {values}) are {problem}")

    def hessian_factor(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return softmax_factor(outputs).to(outputs.dtype)

    def sampled_hessian_factor(
        self, outputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> Factor:
        # One pseudo-label y ~ p per example: the CE gradient's output part is p - e_y.
        return softmax_pseudo_gradient(outputs, generator).to(outputs.dtype)[..., None], None


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

    def sampled_hessian_factor(
        self, outputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> Factor:
        # sqrt(2) xi with Rademacher xi: E[2 xi xi^T] = 2 I.
        return math.sqrt(2.0) * rademacher((outputs.shape[0], outputs[0].numel(), 1), generator, outputs), None


def resolve_task(task: Task | str) -> Task:
    """A Task from an instance or the names "classification" / "regression" / "causal_lm"."""
    if isinstance(task, Task):
        return task
    from source_proj.gradients.causal_lm import CausalLMTask

    builtins = {"classification": ClassificationTask, "regression": RegressionTask, "causal_lm": CausalLMTask}
    if task in builtins:
        return builtins[task]()
    raise InputError(f"unknown task {task!r}; pass a Task or one of {sorted(builtins)}")
