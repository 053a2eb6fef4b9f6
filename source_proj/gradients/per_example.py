"""Per-example gradients with ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``).

Each example is run as a batch of one. Gradients come back as a dict of per-parameter
blocks, name -> (B, [R,] numel), in the model's parameter order, ready for ``project``.
A model whose forward cannot run under ``vmap`` (data-dependent control flow, ``.item()``,
as in Hugging Face's SDPA attention masks) is differentiated one example at a time instead,
with the same results (see ``ModelFunction.note_no_vmap``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch
from torch.func import grad, vmap

from source_proj.errors import SourceProjError
from source_proj.gradients.model import Inputs, ModelFunction, take_rows


class NonFiniteError(SourceProjError, FloatingPointError):
    """NaN or inf met in gradients or curvature.

    Attributes:
        what: where they were met.
        rows: the first offending rows: positions in the batch, or, once the error has left
            a ``dataset_rows`` block, row indices of the data set (``in_dataset``).
    """

    def __init__(self, what: str, rows: Sequence[int] | None = None, *, in_dataset: bool = False) -> None:
        self.what, self.rows, self.in_dataset = what, None if rows is None else list(rows), in_dataset
        where = "" if rows is None else f" (first bad rows {self.rows}{' of the data' if in_dataset else ' of the batch'})"
        super().__init__(f"non-finite values in {what}{where}")


@contextmanager
def dataset_rows(indices: Sequence[int]) -> Iterator[None]:
    """Translate the batch positions of a ``NonFiniteError`` raised inside into the data
    set's row indices: ``indices[i]`` is the data set row of the batch's row i."""
    try:
        yield
    except NonFiniteError as exc:
        if exc.rows is None or exc.in_dataset:
            raise
        raise NonFiniteError(exc.what, [int(indices[i]) for i in exc.rows], in_dataset=True) from None


ExampleFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _vmap_limitation(exc: RuntimeError) -> bool:
    text = str(exc)
    return "vmap" in text and ("data-dependent control flow" in text or ".item()" in text)


def _stack(rows: list):
    """Stack a list of equally structured (nested dict / tuple) results along a new dim 0."""
    first = rows[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(rows)
    if isinstance(first, dict):
        return {k: _stack([r[k] for r in rows]) for k in first}
    return tuple(_stack([r[i] for r in rows]) for i in range(len(first)))


def _over_examples(fn: ModelFunction, per_example: Callable, shared, batched: dict, inputs: Inputs,
                   targets: torch.Tensor, extra: torch.Tensor | None):
    """``per_example(shared, batched_i, x_i, y_i, extra_i)`` for every example i, stacked along
    dim 0: one ``vmap``, or a loop for models that cannot run under it."""
    if not fn.runtime.get("loop"):
        try:
            batched_fn = vmap(per_example, in_dims=(None, 0, 0, 0, None if extra is None else 0))
            return batched_fn(shared, batched, inputs, targets, extra)
        except RuntimeError as exc:
            if not _vmap_limitation(exc):
                raise
            fn.note_no_vmap("data-dependent control flow or .item() in the forward")
    rows = [
        per_example(shared, {k: v[i] for k, v in batched.items()}, take_rows(inputs, i), targets[i],
                    None if extra is None else extra[i])
        for i in range(int(targets.shape[0]))
    ]
    return _stack(rows)


def _over_columns(fn: ModelFunction, per_example: Callable, shared, batched: dict, inputs: Inputs,
                  targets: torch.Tensor, extra: torch.Tensor | None):
    """``_over_examples`` with ``per_example`` also mapped over the R columns of ``extra``
    (B, C, R): results (B, R, ...) (None: no columns, results (B, ...)). A single column (a
    sampled factor) is passed as (B, C) without a ``vmap`` over columns, whose batching costs
    ~10% of a small model's gradients, and its results get their column axis back."""
    if extra is None:
        return _over_examples(fn, per_example, shared, batched, inputs, targets, None)
    if extra.shape[-1] != 1:
        columns = vmap(per_example, in_dims=(None, None, None, None, -1))
        return _over_examples(fn, columns, shared, batched, inputs, targets, extra)
    return _with_column_axis(_over_examples(fn, per_example, shared, batched, inputs, targets, extra[..., 0]))


def _with_column_axis(found):
    """(nested dict / tuple of) tensors (B, ...) as (B, 1, ...)."""
    if isinstance(found, torch.Tensor):
        return found.unsqueeze(1)
    if isinstance(found, dict):
        return {k: _with_column_axis(v) for k, v in found.items()}
    return tuple(_with_column_axis(v) for v in found)


def _flat(grads: dict[str, torch.Tensor], lead: int) -> dict[str, torch.Tensor]:
    return {n: g.reshape(*g.shape[:lead], -1) for n, g in grads.items()}


def per_example_gradients(
    fn: ModelFunction,
    params: dict[str, torch.Tensor],
    consts: dict[str, torch.Tensor],
    objective: ExampleFn,
    inputs: Inputs,
    targets: torch.Tensor,
    extra: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Gradients of the scalar ``objective(outputs (1, *O), target (1, ...), extra)`` per example.

    Without ``extra`` the blocks are (B, numel). With ``extra`` of shape (B, C, R), the
    objective gets one column (1, C) at a time and the blocks are (B, R, numel): R gradients
    per example, batched with a nested ``vmap`` (cheaper than ``jacrev`` here; none for R = 1).
    """

    def one(p: dict, _: dict, x: Inputs, y: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
        out = fn.forward_one(p, consts, x)
        return objective(out, y[None], None if e is None else e[None])

    return _flat(_over_columns(fn, grad(one), params, {}, inputs, targets, extra), 1 if extra is None else 2)


class Taps(Protocol):
    """Forward hooks that hand a layer's per-example output gradients and inputs to a factored
    projection (``projection.layer_taps.LayerTaps``, the one implementation: the projection
    layer supplies it, so this layer does not import it)."""

    weights: tuple[str, ...]

    def recording(self) -> AbstractContextManager[dict[str, tuple[int, ...]]]: ...

    def perturbations(self, shapes: Mapping[str, tuple[int, ...]], batch: int, like: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def active(self, perturbations: Mapping[str, torch.Tensor]) -> AbstractContextManager[dict[str, torch.Tensor]]: ...

    def combine(
        self, output_grads: Mapping[str, torch.Tensor], captured: Mapping[str, torch.Tensor], lead: int
    ) -> dict[str, torch.Tensor]: ...


def per_example_tapped(
    fn: ModelFunction,
    params: dict[str, torch.Tensor],
    consts: dict[str, torch.Tensor],
    objective: ExampleFn,
    inputs: Inputs,
    targets: torch.Tensor,
    taps: Taps,
    extra: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """As :func:`per_example_gradients`, with the weights of ``taps`` projected in factored form.

    Returns (gradients (B, [R,] numel) of the parameters not tapped, per tapped weight its
    projection (B, [R,] k_r k_c) float32; absent if its modules were not called). The tapped
    weights are held constant: their per-example gradients are never formed (see
    ``layer_taps``). The modules' output shapes are recorded on the first example (one forward);
    every example of a batch has them (the batch is padded to one length).
    """
    rest = {n: v for n, v in params.items() if n not in taps.weights}
    fixed = {n: params[n] for n in taps.weights}
    with torch.no_grad(), taps.recording() as shapes:
        fn.forward_one(params, consts, take_rows(inputs, 0))
    probe = next(iter(params.values()))
    perturbations = taps.perturbations(shapes, int(targets.shape[0]), probe)

    def one(p: dict, e_out: dict, x: Inputs, y: torch.Tensor, e: torch.Tensor | None):
        with taps.active(e_out) as captured:
            out = fn.forward_one({**p, **fixed}, consts, x)
        return objective(out, y[None], None if e is None else e[None]), dict(captured)

    per_example = grad(one, argnums=(0, 1), has_aux=True)
    (grads, output_grads), captured = _over_columns(fn, per_example, rest, perturbations, inputs, targets, extra)
    lead = 1 if extra is None else 2
    return _flat(grads, lead), taps.combine(output_grads, captured, lead)


def loss_objective(loss: Callable) -> ExampleFn:
    """Scalar objective: the per-example loss (or measurement) of a batch of one."""
    return lambda out, y, _: loss(out, y)[0]


def factor_objective(out: torch.Tensor, y: torch.Tensor, column: torch.Tensor | None) -> torch.Tensor:
    """a^T outputs for one column a (1, C) of the loss-Hessian factor A (outputs flattened to
    C = prod(O) entries, row-major); the gradients over A's columns are the rows J^T a whose
    outer products sum to the Gauss-Newton J^T A A^T J."""
    assert column is not None, "the factor's columns are passed as the extra argument"
    return (out.reshape(out.shape[0], -1) * column).sum()


def check_finite(values: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError naming ``what`` if ``values`` holds NaN or inf."""
    if torch.isfinite(values.sum()):  # NaN and inf reach the sum: one fast pass (~40x isfinite)
        return
    if not torch.isfinite(values).all():  # a sum can also overflow with finite values
        bad = (~torch.isfinite(values)).reshape(values.shape[0], -1).any(dim=1).nonzero()[:5, 0].tolist()
        raise NonFiniteError(what, bad)
