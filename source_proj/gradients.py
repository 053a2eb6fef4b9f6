"""Per-example gradients with ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``).

Any ``nn.Module`` whose forward takes a batch tensor (or a tuple of them) works; buffers are
passed through unchanged (put models in eval mode so that batch-norm uses running statistics).
Each example is run as a batch of one. Gradients come back as a dict of per-parameter
blocks, name -> (B, [R,] numel), in the model's parameter order, ready for ``project``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from source_proj.trajectory import TrajectoryError

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


class NonFiniteError(FloatingPointError):
    """NaN or inf met in gradients or curvature."""


@dataclass(frozen=True)
class ModelFunction:
    """A model split into the parameters attributed through and everything held constant.

    Attributes:
        model: the module (its own parameters are not used; states come from checkpoints).
        names: the attributed parameter names, in the model's order.
    """

    model: nn.Module
    names: tuple[str, ...]

    @classmethod
    def build(cls, model: nn.Module, param_names: Sequence[str] | None = None) -> ModelFunction:
        """Select the attributed parameters (all by default) and check the names exist."""
        all_names = [n for n, _ in model.named_parameters()]
        if param_names is None:
            return cls(model, tuple(all_names))
        unknown = sorted(set(param_names) - set(all_names))
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; the model has {all_names}")
        chosen = set(param_names)
        if not chosen:
            raise ValueError("param_names selects no parameter")
        return cls(model, tuple(n for n in all_names if n in chosen))

    def num_params(self) -> int:
        """p, the number of attributed scalar parameters."""
        shapes = dict(self.model.named_parameters())
        return sum(shapes[n].numel() for n in self.names)

    def fingerprint(self) -> str:
        """SHA-256 of the attributed parameter names and shapes and the model's class name."""
        shapes = {n: list(p.shape) for n, p in self.model.named_parameters()}
        payload = {"class": type(self.model).__name__, "params": [[n, shapes[n]] for n in self.names]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def check_state(self, state: Mapping[str, torch.Tensor], where: str) -> None:
        """Raise ``TrajectoryError`` if a checkpoint's state dict does not fit the model (keys or
        shapes); ``where`` names the checkpoint."""
        expected = self.model.state_dict()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise TrajectoryError(f"{where}: state dict keys do not match the model (missing {missing}, unexpected {extra})")
        bad = [
            f"{k}: {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if tuple(state[k].shape) != tuple(v.shape)
        ]
        if bad:
            raise TrajectoryError(f"{where}: shapes do not match the model: {bad}")

    def split_state(
        self, state: Mapping[str, torch.Tensor], device: torch.device
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(attributed params, constants) on ``device`` from a state dict that passed
        :meth:`check_state`."""
        attributed = set(self.names)
        params = {n: state[n].detach().to(device) for n in self.names}
        consts = {k: v.detach().to(device) for k, v in state.items() if k not in attributed}
        return params, consts

    def forward_one(self, params: dict, consts: dict, inputs: Inputs) -> torch.Tensor:
        """Outputs (1, C) for a single example (inputs without their batch dimension)."""
        args = tuple(x[None] for x in inputs) if isinstance(inputs, tuple) else (inputs[None],)
        return functional_call(self.model, (params, consts), args)

    def forward(self, params: dict, consts: dict, inputs: Inputs) -> torch.Tensor:
        """Outputs (B, C) for a batch."""
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        with torch.no_grad():
            return functional_call(self.model, (params, consts), args)


ExampleFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def per_example_gradients(
    fn: ModelFunction,
    params: dict[str, torch.Tensor],
    consts: dict[str, torch.Tensor],
    objective: ExampleFn,
    inputs: Inputs,
    targets: torch.Tensor,
    extra: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Gradients of the scalar ``objective(outputs (1, C), target (1, ...), extra)`` per example.

    Without ``extra`` the blocks are (B, numel). With ``extra`` of shape (B, C, R), the
    objective gets one column (1, C) at a time and the blocks are (B, R, numel): R gradients
    per example, batched with a nested ``vmap`` (cheaper than ``jacrev`` here).
    """

    def one(p: dict, x: Inputs, y: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
        out = fn.forward_one(p, consts, x)
        return objective(out, y[None], None if e is None else e[None])

    per_example = grad(one)
    if extra is not None:
        per_example = vmap(per_example, in_dims=(None, None, None, -1))
    grads = vmap(per_example, in_dims=(None, 0, 0, None if extra is None else 0))(params, inputs, targets, extra)
    lead = 1 if extra is None else 2
    return {n: g.reshape(*g.shape[:lead], -1) for n, g in grads.items()}


def loss_objective(loss: Callable) -> ExampleFn:
    """Scalar objective: the per-example loss (or measurement) of a batch of one."""
    return lambda out, y, _: loss(out, y)[0]


def factor_objective(out: torch.Tensor, y: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """a^T outputs for one column a (1, C) of the loss-Hessian factor A; the gradients over
    A's columns are the rows J^T a whose outer products sum to the Gauss-Newton J^T A A^T J."""
    return (out.reshape(out.shape[0], -1) * column).sum()


def check_finite(values: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError naming ``what`` if ``values`` holds NaN or inf."""
    if torch.isfinite(values.sum()):  # NaN and inf reach the sum: one fast pass (~40x isfinite)
        return
    if not torch.isfinite(values).all():  # a sum can also overflow with finite values
        bad = (~torch.isfinite(values)).reshape(values.shape[0], -1).any(dim=1).nonzero()[:5, 0].tolist()
        raise NonFiniteError(f"non-finite values in {what} (first bad rows {bad})")
