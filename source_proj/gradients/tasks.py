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
meaning all +1). The built-in tasks draw their sampled factor's randomness before the model
runs (``sampling_noise``) and form its column from the outputs with a function that runs
inside the per-example gradients' own forward (``sampled_columns``): the curvature pass then
needs no forward of its own (``projection.projected.projected_gn_factors``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, vmap

from source_proj.errors import InputError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SampleFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
Factor = tuple[torch.Tensor, torch.Tensor | None]


def _is_library(module: str | None) -> bool:
    """Whether code of ``module`` is installed library code, known by its name alone: this
    package, the standard library, or a distribution in site-packages."""
    root = (module or "").partition(".")[0]
    if not root:
        return False
    if root == "source_proj" or root in sys.stdlib_module_names:
        return True
    file = getattr(sys.modules.get(root), "__file__", None) or ""
    return bool({"site-packages", "dist-packages"} & set(Path(file).parts))


def _source(value: Any) -> str | None:
    try:
        return inspect.getsource(value)
    except (OSError, TypeError):  # defined where Python keeps no source (exec, a REPL)
        return None


def _bytecode(code: types.CodeType) -> dict[str, Any]:
    """A code object without its source: instructions, constants (nested code too), names."""
    consts = [_bytecode(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return {"bytecode": code.co_code.hex(), "consts": consts, "names": list(code.co_names)}


def _global_names(code: types.CodeType) -> set[str]:
    """Names a code object (and the functions nested in it) may look up as globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


# Dunder methods of a user's class that can change what it computes.
_CLASS_METHODS = ("__init__", "__post_init__", "__call__", "__getattr__")


class _CodeDescription:
    """JSON-serialisable description of what a task computes, for ``Task.fingerprint``.

    ``user_code`` becomes True once anything beyond plain values and library code is met (a
    function, class, module or object of the user's)."""

    def __init__(self) -> None:
        self.user_code = False
        self._open: set[int] = set()  # objects being described (cycles: a task's bound methods)

    def __call__(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (torch.Tensor, np.ndarray)):
            array = value.detach().cpu().contiguous() if isinstance(value, torch.Tensor) else np.ascontiguousarray(value)
            raw = array.reshape(-1).view(torch.uint8).numpy() if isinstance(array, torch.Tensor) else array.view(np.uint8)
            return {"array": str(array.dtype), "shape": list(array.shape), "sha256": hashlib.sha256(raw.tobytes()).hexdigest()}
        if id(value) in self._open:
            return "<recursive>"
        self._open.add(id(value))
        try:
            return self._compound(value)
        finally:
            self._open.discard(id(value))

    def _compound(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return {type(value).__name__: [self(v) for v in value]}
        if isinstance(value, (set, frozenset)):
            return {"set": sorted(json.dumps(self(v), sort_keys=True) for v in value)}
        if isinstance(value, dict):
            return {"dict": [[str(k), self(v)] for k, v in sorted(value.items(), key=lambda item: str(item[0]))]}
        if isinstance(value, types.ModuleType):
            return {"module": value.__name__}
        if isinstance(value, types.MethodType):
            return {"method": self(value.__func__), "of": self(value.__self__)}
        if isinstance(value, types.BuiltinFunctionType) or (
            isinstance(value, (types.FunctionType, type)) and _is_library(value.__module__)
        ):
            return {"library": f"{value.__module__}.{value.__qualname__}"}
        if isinstance(value, Task) and _is_library(type(value).__module__):
            return self._task(value)
        self.user_code = True
        if isinstance(value, functools.partial):
            return {"partial": self(value.func), "args": self(value.args), "keywords": self(value.keywords)}
        if isinstance(value, types.FunctionType):
            return self._function(value)
        if isinstance(value, type):  # its methods and class attributes, and its bases
            own = {k: v for k, v in vars(value).items() if not k.startswith("__") or k in _CLASS_METHODS}
            return {"class": value.__qualname__, "attributes": self(own),
                    "bases": [self(base) for base in value.__bases__]}
        if isinstance(value, (staticmethod, classmethod)):
            return {type(value).__name__: self(value.__func__)}
        if isinstance(value, property):
            return {"property": [self(value.fget), self(value.fset)]}
        if isinstance(value, nn.Module):
            return {
                "modules": [
                    [name, self(type(sub)), self({k: v for k, v in vars(sub).items() if not k.startswith("_") and k != "training"})]
                    for name, sub in value.named_modules()
                ],
                "tensors": [[name, self(t)] for name, t in (*value.named_parameters(), *value.named_buffers())],
            }
        if isinstance(value, Task):
            return self._task(value)
        if _is_library(type(value).__module__):  # e.g. a numpy ufunc: its type and name (no address)
            text = repr(value)
            return {"object": self(type(value)), "repr": None if " at 0x" in text else text}
        return {"object": self(type(value)), "fields": self(getattr(value, "__dict__", {}))}

    def _task(self, task: Task) -> dict[str, Any]:
        """All fields but the query ``measurement`` and the ``name`` (stores record it apart);
        a function given in place of the class's own is the user's choice, even a library one."""
        fields = {}
        for f in dataclasses.fields(task):
            if f.name in ("measurement", "name"):
                continue
            fields[f.name] = getattr(task, f.name)
            self.user_code |= f.init and callable(fields[f.name]) and fields[f.name] is not f.default
        return {"task": self(type(task)), "fields": self(fields)}

    def _function(self, fn: types.FunctionType) -> dict[str, Any]:
        code = fn.__code__
        cells = []
        for cell in fn.__closure__ or ():
            try:
                cells.append(self(cell.cell_contents))
            except ValueError:  # a cell not yet filled
                cells.append("<empty>")
        return {
            "function": fn.__qualname__,  # not its module's name: a task file's depends on how it is loaded
            "code": _source(fn) or _bytecode(code),
            "defaults": self(fn.__defaults__),
            "kwdefaults": self(fn.__kwdefaults__),
            "closure": cells,
            "globals": {n: self(fn.__globals__[n]) for n in sorted(_global_names(code)) if n in fn.__globals__},
        }


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

    def fingerprint(self) -> str | None:
        """SHA-256 of what this task's training features depend on beyond its ``name``, or
        None for a built-in task class on its own functions (its name says it all; a plain
        ``Task`` always has one, its functions being the user's choice).

        Feature stores record it, so that a store is never resumed or read with another loss.
        It covers the loss, ``sample``, the task's class (the source of a class of the
        user's: e.g. an overridden ``hessian_factor``) and every other field but
        ``measurement`` (queries only). A function counts by its source (its bytecode when
        Python keeps none), default arguments, closure values and the globals it names, a
        user's function or class recursively; an ``nn.Module`` loss by its settings (e.g.
        ``label_smoothing``) and tensors (e.g. class weights). Library code (this package,
        the standard library, installed distributions) counts by its name only. The same
        task rebuilt, in this process or another, has the same fingerprint."""
        description = _CodeDescription()
        payload = description(self)
        if not description.user_code:
            return None
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

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
        ``sample`` or :attr:`draws_before_forward`, 2 otherwise (see the class docstring)."""
        if self.draws_before_forward:
            noise = self.sampling_noise(targets, tuple(outputs.shape), generator).to(outputs.device)
            return self.sampled_columns(outputs.detach(), targets, noise), None
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

    @property
    def draws_before_forward(self) -> bool:
        """Whether the sampled factor is :meth:`sampled_columns` of :meth:`sampling_noise`
        (a task that defines both and keeps this class's ``sampled_hessian_factor``): not a
        ``sample`` function's draw nor the Hessian-vector form, which need the outputs first."""
        cls = type(self)
        return cls.sampling_noise is not Task.sampling_noise and cls.sampled_hessian_factor is Task.sampled_hessian_factor

    def sampling_noise(
        self, targets: torch.Tensor, output_shape: tuple[int, ...], generator: torch.Generator
    ) -> torch.Tensor:
        """The random numbers of one sampled draw for a batch whose outputs have
        ``output_shape`` (B, *O), drawn on the CPU from ``generator`` before the model runs:
        (B, ...), what :meth:`sampled_columns` takes (tasks with :attr:`draws_before_forward`)."""
        raise NotImplementedError(f"{type(self).__name__} draws its sampled factor from the outputs")

    def sampled_columns(self, outputs: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The sampled factor's columns (B, C, 1) from ``outputs`` (B, *O, no gradient needed)
        and the draw's ``noise`` (:meth:`sampling_noise`), on the outputs' device: the same
        draw for any B (it runs under ``vmap``, one example at a time, inside the gradients'
        own forward)."""
        raise NotImplementedError(f"{type(self).__name__} draws its sampled factor from the outputs")


def integer_labels(targets: torch.Tensor, requirement: str, first_row: int) -> torch.Tensor:
    """``targets`` as a tensor; ``InputError`` starting with ``requirement`` unless its dtype
    is an integer one (``.long()`` would silently truncate float labels to other classes),
    naming the rows (``first_row`` on) and the first values."""
    targets = torch.as_tensor(targets)
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise InputError(
            f"{requirement}, got dtype {targets.dtype} (rows {first_row}-{first_row + len(targets) - 1}, first "
            f"values {targets.reshape(-1)[:5].tolist()}); convert whole-number labels with .long(), soft "
            "labels need a custom Task"
        )
    return targets


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


def exponential_noise(
    shape: tuple[int, ...], generator: torch.Generator, where: torch.Tensor | None = None
) -> torch.Tensor:
    """Exp(1) draws, float64 on the CPU, of ``shape`` (..., C): the noise of one label per
    row of the last axis (:func:`softmax_pseudo_gradient`). With ``where`` (bool, ``shape[:-1]``)
    only its True rows are drawn, in row-major order (1 elsewhere), so the draws do not depend
    on how many other rows (e.g. padding) there are. ``torch.multinomial`` draws one sample
    the same way, so a generator gives the labels it would."""
    if where is None:
        return torch.empty(shape, dtype=torch.float64).exponential_(generator=generator)
    out = torch.ones(shape, dtype=torch.float64)
    chosen = where.cpu()
    count = int(chosen.sum())
    if count:
        out[chosen] = torch.empty(count, shape[-1], dtype=torch.float64).exponential_(generator=generator)
    return out


def softmax_pseudo_gradient(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """p - e_y per row of the last axis (float64), p = softmax(logits) and y = argmax p / E
    for the row's Exp(1) ``noise`` E (:func:`exponential_noise`): y ~ p (the first of
    independent exponential clocks of rates p to ring), so this is the cross-entropy gradient
    at a pseudo-label, E[(p - e_y)(p - e_y)^T] = diag(p) - p p^T. Runs under ``vmap``."""
    probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)
    labels = (probs / noise).argmax(dim=-1, keepdim=True)
    return probs - (labels == torch.arange(probs.shape[-1], device=probs.device)).to(probs.dtype)


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
        targets = integer_labels(targets, "classification labels must be integer class indices", first_row)
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

    def sampling_noise(
        self, targets: torch.Tensor, output_shape: tuple[int, ...], generator: torch.Generator
    ) -> torch.Tensor:
        """Exp(1) noise per class (B, C): one pseudo-label per example."""
        return exponential_noise(output_shape, generator)

    def sampled_columns(self, outputs: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """p - e_y (B, C, 1), the CE gradient's output part at the pseudo-label y ~ p."""
        return softmax_pseudo_gradient(outputs, noise).to(outputs.dtype)[..., None]


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

    def sampling_noise(
        self, targets: torch.Tensor, output_shape: tuple[int, ...], generator: torch.Generator
    ) -> torch.Tensor:
        """Rademacher xi per output (B, C), float64."""
        return rademacher((output_shape[0], math.prod(output_shape[1:])), generator, torch.zeros((), dtype=torch.float64))

    def sampled_columns(self, outputs: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """sqrt(2) xi (B, C, 1): E[2 xi xi^T] = 2 I."""
        return math.sqrt(2.0) * noise.to(outputs.dtype)[..., None]
