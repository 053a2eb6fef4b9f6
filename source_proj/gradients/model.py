"""The model as a function of its attributed parameters (``torch.func.functional_call``).

Any ``nn.Module`` whose forward takes a batch tensor (or a tuple of them) works; buffers are
passed through unchanged (put models in eval mode so that batch-norm uses running statistics).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from source_proj.trajectory.checkpoints import TrajectoryError

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


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
        """SHA-256 of what the model computes besides its checkpointed state: its module
        structure (``repr``: layers, activations, their settings), the names, shapes and
        dtypes of all parameters (and which are attributed) and buffers, the values of the
        non-persistent buffers (not in checkpoints, so taken from the model), and the source
        code of the ``forward`` of every module class not from torch itself (where Python can
        find it). Stable across processes and machines; changes when any of these change."""
        forwards = {}
        for module in self.model.modules():
            cls = type(module)
            if not cls.__module__.startswith("torch.") and f"{cls.__module__}.{cls.__qualname__}" not in forwards:
                try:
                    source = inspect.getsource(cls.forward)
                except (OSError, TypeError):  # defined where Python keeps no source
                    source = None
                forwards[f"{cls.__module__}.{cls.__qualname__}"] = source
        persistent = set(self.model.state_dict())
        buffers = []
        for name, buffer in self.model.named_buffers():
            entry = [name, list(buffer.shape), str(buffer.dtype)]
            if name not in persistent:
                data = buffer.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                entry.append(hashlib.sha256(data.tobytes()).hexdigest())
            buffers.append(entry)
        payload = {
            "class": type(self.model).__name__,
            "repr": repr(self.model),
            "params": [[n, list(p.shape), str(p.dtype)] for n, p in self.model.named_parameters()],
            "attributed": list(self.names),
            "buffers": buffers,
            "forward": forwards,
        }
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
