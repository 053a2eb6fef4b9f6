"""Forward hooks that give the factored projection of weight gradients without forming them.

A weight used only through the forward of ``nn.Linear`` (y = x W^T + b), GPT-2's ``Conv1D``
(y = x W + b) or ``nn.Embedding`` (y = W[ids]) has, per example, the gradient
dW = sum_t u_t v_t^T over the module's calls and tokens t, with one side the module's input
(the activations, or the one-hot token rows of an embedding) and the other the gradient of the
objective w.r.t. its output. Its factored projection F_r^T dW F_c (``projection.kronecker``)
then needs only F^T of each side per token:

* the input side is projected in the forward hook and returned as an auxiliary output
  (an embedding looks its rows up);
* the output side comes out of the backward pass: the hook adds ``e @ F^T`` to the module's
  output for a zero perturbation e of shape (..., k) (one per call), so d objective / d e is
  F^T times the output gradient, and the weight is held constant, so its gradient is never
  formed.

:class:`LayerTaps` installs the hooks for one pass (``torch.func`` transforms, the loop
fallback and nested factor columns alike); ``per_example.per_example_tapped`` drives them.
Only exact module types are tapped (subclasses may compute something else; a weight registered
anywhere else stays dense), and :func:`per_example.check_tapped` compares the result once per
model with autograd, which catches a tapped weight also used outside its module's forward.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from source_proj.projection.kronecker import COLS, ROWS, Side, outer_sum

LINEAR, CONV1D, EMBEDDING = "linear", "conv1d", "embedding"
# Which side of the weight (rows or columns of its stored shape) the module's input feeds.
_INPUT_SIDE = {LINEAR: COLS, CONV1D: ROWS, EMBEDDING: ROWS}


def _module_kind(module: nn.Module) -> str | None:
    """The tap kind of a module, or None if its weight gradient is not an outer-product sum."""
    if type(module) is nn.Linear:
        return LINEAR
    if type(module) is nn.Embedding:
        return EMBEDDING if module.max_norm is None and not module.scale_grad_by_freq else None
    utils = sys.modules.get("transformers.pytorch_utils")  # only if transformers is in use
    if utils is not None and type(module) is getattr(utils, "Conv1D", None):
        return CONV1D
    return None


@dataclass(frozen=True)
class Tap:
    """One module whose weight is projected in factored form.

    Attributes:
        module: the module (hooked during a pass).
        path: its name in the model (for messages).
        param: the canonical name of its weight.
        kind: "linear", "conv1d" or "embedding".
    """

    module: nn.Module
    path: str
    param: str
    kind: str

    @property
    def input_side(self) -> int:
        """ROWS or COLS: the side of the weight that the module's input feeds."""
        return _INPUT_SIDE[self.kind]


def find_taps(model: nn.Module, names: tuple[str, ...], aliases: Mapping[str, str]) -> tuple[dict[str, tuple[int, int]], tuple[Tap, ...]]:
    """The attributed weights that can be projected in factored form and their taps.

    A parameter qualifies when it is 2-D and every module registering it (a tied tensor may
    have several, e.g. an embedding and a language-model head) registers it as ``weight`` and
    is an exact ``nn.Linear``, ``nn.Embedding`` (without ``max_norm`` or
    ``scale_grad_by_freq``) or ``transformers`` ``Conv1D``. Returns (name -> stored shape, in
    model order; the taps).
    """
    wanted = set(names)
    uses: dict[str, list[tuple[str, str, nn.Module]]] = {}
    for path, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{path}.{pname}" if path else pname
            canonical = aliases.get(full, full)
            if canonical in wanted:
                uses.setdefault(canonical, []).append((path, pname, module))
    shapes = dict(model.named_parameters())
    weights: dict[str, tuple[int, int]] = {}
    taps: list[Tap] = []
    for name in names:
        found = uses.get(name, [])
        kinds = [_module_kind(m) if pname == "weight" else None for _, pname, m in found]
        if not found or any(k is None for k in kinds) or shapes[name].dim() != 2:
            continue
        rows, cols = shapes[name].shape
        weights[name] = (rows, cols)
        taps += [Tap(m, path, name, cast(str, kind)) for (path, _, m), kind in zip(found, kinds)]  # no None (checked)
    return weights, tuple(taps)


class LayerTaps:
    """The hooks of one factored pass: taps plus each weight's (row, column) :class:`Side`.

    Args:
        taps: from :func:`find_taps`.
        sides: weight name -> (row Side, column Side) on the pass's device.
        terms: weight name -> r, the Kronecker products summed.
    """

    def __init__(self, taps: tuple[Tap, ...], sides: Mapping[str, tuple[Side, Side]], terms: Mapping[str, int]) -> None:
        self.taps = taps
        self.sides = sides
        self.terms = terms
        self.weights = tuple(dict.fromkeys(t.param for t in taps))

    def _input_and_output_sides(self, tap: Tap) -> tuple[Side, Side]:
        pair = self.sides[tap.param]
        return pair[tap.input_side], pair[1 - tap.input_side]

    @contextmanager
    def _hooked(self, hook) -> Iterator[None]:
        counts = [0] * len(self.taps)

        def make(i: int):
            def on_forward(module: nn.Module, args: tuple, output: torch.Tensor):
                key = f"{i}.{counts[i]}"
                counts[i] += 1
                return hook(self.taps[i], key, args[0], output)

            return on_forward

        handles = [tap.module.register_forward_hook(make(i)) for i, tap in enumerate(self.taps)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def recording(self) -> Iterator[dict[str, tuple[int, ...]]]:
        """Hooks that record each call's output shape: key "tap.call" -> shape."""
        shapes: dict[str, tuple[int, ...]] = {}

        def hook(tap: Tap, key: str, x: torch.Tensor, output: torch.Tensor) -> None:
            shapes[key] = tuple(output.shape)

        with self._hooked(hook):
            yield shapes

    def perturbations(self, shapes: Mapping[str, tuple[int, ...]], batch: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero perturbations (batch, *output shape[:-1], k) per recorded call, dtype of ``like``."""
        out = {}
        for key, shape in shapes.items():
            tap = self.taps[int(key.split(".")[0])]
            _, output_side = self._input_and_output_sides(tap)
            dim = shape[-1] if output_side.matrix is None else output_side.matrix.shape[1]
            out[key] = torch.zeros(batch, *shape[:-1], dim, dtype=like.dtype, device=like.device)
        return out

    @contextmanager
    def active(self, perturbations: Mapping[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """Hooks of the differentiated pass: each call's input side projected into the yielded
        dict (key "tap.call"), and ``perturbations[key] @ F^T`` added to its output."""
        captured: dict[str, torch.Tensor] = {}

        def hook(tap: Tap, key: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            if key not in perturbations:
                raise RuntimeError(
                    f"module {tap.path!r} was called more often than when its output shapes were recorded "
                    "(the forward's calls depend on the example): use proj_structure='dense' for this model"
                )
            e = perturbations[key]
            if tuple(e.shape[:-1]) != tuple(output.shape[:-1]):
                raise RuntimeError(
                    f"module {tap.path!r} returned {tuple(output.shape)} where {tuple(e.shape[:-1])} + (width,) was "
                    "recorded: its output shape depends on the example; use proj_structure='dense' for this model"
                )
            input_side, output_side = self._input_and_output_sides(tap)
            if tap.kind == EMBEDDING:
                embedding = cast(nn.Embedding, tap.module)  # the kind of an exact nn.Embedding
                rows = input_side.lookup(x, embedding.num_embeddings)
                if embedding.padding_idx is not None:  # torch gives that row no gradient
                    rows = rows * (x != embedding.padding_idx)[..., None].to(rows.dtype)
                captured[key] = rows
            else:
                captured[key] = input_side.apply(x)
            return output + output_side.transpose_apply(e)

        with self._hooked(hook):
            yield captured

    def combine(
        self, output_grads: Mapping[str, torch.Tensor], captured: Mapping[str, torch.Tensor], lead: int
    ) -> dict[str, torch.Tensor]:
        """Per weight, (*batch, k_r k_c) float32: sum over its calls and tokens of the row
        side's projection times the column side's (``outer_sum``; ``lead`` batch dimensions:
        1, or 2 with factor columns). Weights whose modules were not called are absent."""
        out: dict[str, torch.Tensor] = {}
        for key, grad_side in output_grads.items():
            tap = self.taps[int(key.split(".")[0])]
            inputs = captured[key]
            batch = inputs.shape[:lead]
            inputs = inputs.reshape(*batch, -1, inputs.shape[-1])
            outputs = grad_side.reshape(*batch, -1, grad_side.shape[-1])
            rows, cols = (inputs, outputs) if tap.input_side == ROWS else (outputs, inputs)
            block = outer_sum(rows, cols, self.terms[tap.param])
            out[tap.param] = block if tap.param not in out else out[tap.param] + block
        return out
