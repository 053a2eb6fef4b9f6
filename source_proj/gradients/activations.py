"""What a batch's activations take in memory, measured for the model (the budget's other part,
``gradients.memory``); imports torch, which the budget arithmetic and the settings do not."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial

import torch

from source_proj.gradients.memory import ActivationCost
from source_proj.gradients.model import Inputs, ModelFunction, take_rows


def saved_bytes(run: Callable[[], Iterable[torch.Tensor]], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass while ``run()``
    executes (with gradients enabled), plus those of the tensors it returns; storages of
    ``exclude`` (parameters, constants, inputs) are not counted. Each storage counts once
    (views of one tensor, or a tensor saved by several operations)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    sizes: dict[int, int] = {}

    def note(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    # The saved tensors stay alive (the graph holds them) until ``returned`` is dropped, so no
    # two of them share an address.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
        returned = list(run())
    for t in returned:
        note(t)
    return sum(sizes.values())


def _named_tensors(inputs: Inputs) -> list[tuple[object, torch.Tensor]]:
    if isinstance(inputs, Mapping):
        return list(inputs.items())
    return list(enumerate(inputs if isinstance(inputs, tuple) else (inputs,)))


def activation_cost(
    fn: ModelFunction,
    params: dict[str, torch.Tensor],
    consts: dict[str, torch.Tensor],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: Inputs,
    targets: torch.Tensor,
) -> ActivationCost:
    """The activations' bytes of ``fn``'s forward and ``loss`` (outputs, targets) -> (B,) on
    rows shaped like the first of ``inputs``: :func:`saved_bytes` of one and of two copies of
    that row (parameters differentiable, so that every tensor their gradients need is
    saved); the difference is the per-example part. Measured once per row shape and cached
    in ``fn.runtime``."""
    cache = fn.runtime.setdefault("activations", {})
    key = tuple((name, tuple(x.shape[1:]), x.dtype) for name, x in _named_tensors(inputs))
    if key not in cache:
        rows = {b: (take_rows(inputs, [0] * b), targets[[0] * b]) for b in (1, 2)}
        data = [t for x, y in rows.values() for _, t in [*_named_tensors(x), (None, y)]]
        exclude = [*params.values(), *consts.values(), *data]
        differentiable = {n: v.detach().requires_grad_() for n, v in params.items()}
        held: list = []

        def run(batch: int) -> tuple[torch.Tensor, ...]:
            x, y = rows[batch]
            outputs = fn.call(differentiable, consts, x)
            value = loss(outputs, y).sum()
            # torch.func's grad differentiates with create_graph=True: what the backward pass
            # saves (the activations' gradients, mostly) lives until it returns, so it counts
            # too. Its result is held (with that graph) until the count is done.
            if value.requires_grad:  # else nothing to differentiate: the forward's count is all
                held.append(torch.autograd.grad(value, list(differentiable.values()), create_graph=True, allow_unused=True))
            return outputs, value

        one, two = (saved_bytes(partial(run, b), exclude) for b in (1, 2))
        held.clear()
        cache[key] = ActivationCost(per_example=max(two - one, 0), fixed=max(2 * one - two, 0))
    return cache[key]
