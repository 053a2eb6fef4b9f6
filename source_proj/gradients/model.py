"""The model as a function of its attributed parameters (``torch.func.functional_call``).

Any ``nn.Module`` works, as users train it:

* **Inputs.** A batch tensor, a tuple of tensors (positional arguments) or a mapping of
  tensors (keyword arguments, e.g. ``input_ids``/``attention_mask`` as a Hugging Face collator
  or a ``datasets`` dataset yields them). Keys the forward does not name are dropped when it
  names its arguments (as Hugging Face's ``Trainer`` drops unused columns).
* **Outputs.** A tensor; a mapping or ``ModelOutput`` (the ``"logits"`` entry by default);
  a tuple or list (its first element); or whatever ``output`` (a key, or a callable taking
  the raw output) selects. The selected tensor keeps its shape: (B, *O), e.g. (B, C) logits
  or (B, T, V) token logits, and tasks receive it as is.
* **Tied weights.** A tensor registered under several names (a language-model head tied to
  the embedding) is one parameter, attributed once under the name ``named_parameters()``
  gives it (its first name). Checkpoint state dicts may hold any of its names (the tied key
  present, as in ``pytorch_model.bin``, or absent, as in ``model.safetensors``):
  :meth:`ModelFunction.canonical_state` maps them onto that one name.

Buffers are passed through unchanged (put models in eval mode so that batch-norm uses running
statistics).
"""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from source_proj.errors import InputError
from source_proj.trajectory.checkpoints import TrajectoryError

Inputs = torch.Tensor | tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor]
OutputSelector = str | Callable[[Any], torch.Tensor] | None
DEFAULT_OUTPUT_KEY = "logits"


def select_output(raw: Any, selector: OutputSelector = None) -> torch.Tensor:
    """The tensor the task sees from a model's raw output (see the module docstring).

    Raises TypeError/KeyError naming what was found when nothing usable is selected.
    """
    if callable(selector):
        chosen = selector(raw)
    elif isinstance(raw, torch.Tensor):
        if selector is not None:
            raise TypeError(f"output={selector!r} selects a key, but the model returns a plain tensor")
        chosen = raw
    elif isinstance(raw, Mapping):  # dicts and transformers' ModelOutput
        key = DEFAULT_OUTPUT_KEY if selector is None else selector
        if key not in raw:
            raise KeyError(
                f"the model's output ({type(raw).__name__}) has no {key!r} entry; it has {list(raw.keys())}: "
                "pass output='<key>' or a callable to choose one"
            )
        chosen = raw[key]
    elif isinstance(raw, (tuple, list)) and raw:
        if selector is not None:
            raise TypeError(f"output={selector!r} selects a key, but the model returns a {type(raw).__name__}")
        chosen = raw[0]
    else:
        raise TypeError(f"cannot take a tensor from the model's output of type {type(raw).__name__}")
    if not isinstance(chosen, torch.Tensor):
        raise TypeError(f"the selected model output is a {type(chosen).__name__}, not a tensor")
    return chosen


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Every extra name of a parameter or buffer registered under several names (tied
    weights), mapped to its first name (the one ``named_parameters()`` reports)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        key = id(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _matches(name: str, pattern: str) -> bool:
    """Whether ``pattern`` (fnmatch-style) matches the parameter name or one of its module prefixes."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def select_parameters(model: nn.Module, patterns: Sequence[str] | None) -> tuple[str, ...]:
    """The parameter names (first names of tied tensors, in the model's order) selected by
    ``patterns``: exact parameter names, module names (``"lm_head"`` selects
    ``lm_head.weight``) or fnmatch patterns (``"transformer.h.*.mlp.*"``), matched against
    every name of a tied tensor. None selects all. Raises ValueError for a pattern that
    matches nothing."""
    canonical = [n for n, _ in model.named_parameters()]
    if patterns is None:
        return tuple(canonical)
    if isinstance(patterns, str):
        patterns = [patterns]
    aliases = tied_aliases(model)
    names_of: dict[str, list[str]] = {n: [n] for n in canonical}
    for alias, target in aliases.items():
        if target in names_of:
            names_of[target].append(alias)
    unmatched = [p for p in patterns if not any(_matches(a, p) for names in names_of.values() for a in names)]
    if unmatched:
        shown = canonical if len(canonical) <= 12 else [*canonical[:12], "..."]
        raise InputError(f"unknown parameter names or patterns {unmatched} (they match no parameter); the model has {shown}")
    chosen = tuple(n for n in canonical if any(_matches(a, p) for a in names_of[n] for p in patterns))
    if not chosen:
        raise InputError("param_names selects no parameter")
    return chosen


def _forward_keywords(model: nn.Module) -> frozenset[str] | None:
    """The keyword names ``model.forward`` declares, or None if it takes only ``**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return frozenset(named) if named else None


def forward_arguments(model: nn.Module, keywords: frozenset[str] | None, inputs: Inputs) -> tuple[tuple, dict]:
    """(positional, keyword) arguments of the forward for a batch: a mapping becomes keyword
    arguments (only the names in ``keywords``, unless None), anything else positional."""
    if isinstance(inputs, Mapping):
        kwargs = dict(inputs) if keywords is None else {k: v for k, v in inputs.items() if k in keywords}
        if not kwargs:
            raise InputError(f"none of the input keys {sorted(inputs)} is an argument of {type(model).__name__}.forward")
        return (), kwargs
    return (inputs if isinstance(inputs, tuple) else (inputs,)), {}


def call_module(model: nn.Module, inputs: Inputs, output: OutputSelector = None) -> torch.Tensor:
    """The selected output of ``model`` called as usual (its own parameters, autograd on) on
    a batch, with the same input and output conventions as :class:`ModelFunction`."""
    args, kwargs = forward_arguments(model, _forward_keywords(model), inputs)
    return select_output(model(*args, **kwargs), output)


def take_rows(inputs: Inputs, index: Any) -> Inputs:
    """``x[index]`` for every tensor of a batch (a tensor, tuple or mapping): an int takes one
    example, a slice or index tensor several, None adds a batch dimension of one."""
    if isinstance(inputs, Mapping):
        return {k: v[index] for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(x[index] for x in inputs)
    return inputs[index]


@dataclass(frozen=True)
class ModelFunction:
    """A model split into the parameters attributed through and everything held constant.

    Attributes:
        model: the module (its own parameters are not used; states come from checkpoints).
        names: the attributed parameter names, in the model's order (tied tensors once).
        output: which tensor of the forward's output the task sees (see ``select_output``).
        aliases: extra names of tied tensors -> their first name.
        keywords: the forward's declared keyword names (None: it takes any).
    """

    model: nn.Module
    names: tuple[str, ...]
    output: OutputSelector = None
    aliases: Mapping[str, str] = field(default_factory=dict)
    keywords: frozenset[str] | None = None
    # Set once per-example vmap has been found impossible for this model (see per_example).
    runtime: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(
        cls, model: nn.Module, param_names: Sequence[str] | None = None, output: OutputSelector = None
    ) -> ModelFunction:
        """Select the attributed parameters (all by default; names, module names or
        patterns, see :func:`select_parameters`) and the output."""
        if output is not None and not (callable(output) or isinstance(output, str)):
            raise TypeError(f"output must be a key, a callable or None, got {type(output).__name__}")
        return cls(model, select_parameters(model, param_names), output, tied_aliases(model), _forward_keywords(model))

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

    def canonical_state(self, state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """``state`` with every tied tensor under its first name only, checked against the
        model (keys and shapes) and in the model's dtypes (a float16 checkpoint of a float32
        model is cast, as ``load_state_dict`` copies it). Raises ``TrajectoryError`` naming
        ``where`` (the checkpoint) if keys are missing or unexpected, shapes differ, a
        floating tensor stands for an integer one (or the reverse), or two names of one tied
        tensor hold different values."""
        out = dict(state)
        for alias, target in self.aliases.items():
            if alias not in out:
                continue
            value = out.pop(alias)
            if target not in out:
                out[target] = value
            elif out[target] is not value and not torch.equal(out[target], value):
                raise TrajectoryError(
                    f"{where}: {alias!r} and {target!r} are tied in the model but hold different values "
                    "in the checkpoint (was the model trained untied?)"
                )
        expected = {k: v for k, v in self.model.state_dict().items() if k not in self.aliases}
        missing = sorted(set(expected) - set(out))
        extra = sorted(set(out) - set(expected))
        if missing or extra:
            raise TrajectoryError(f"{where}: state dict keys do not match the model (missing {missing}, unexpected {extra})")
        bad = [
            f"{k}: {tuple(out[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if tuple(out[k].shape) != tuple(v.shape)
        ]
        if bad:
            raise TrajectoryError(f"{where}: shapes do not match the model: {bad}")
        # Other floating dtypes (a float16 checkpoint of a float32 model) are cast to the
        # model's, as load_state_dict does; a float tensor for an integer one is refused.
        kinds = [
            f"{k}: {out[k].dtype} vs model {v.dtype}"
            for k, v in expected.items()
            if out[k].dtype != v.dtype and out[k].is_floating_point() != v.is_floating_point()
        ]
        if kinds:
            raise TrajectoryError(f"{where}: tensor types do not match the model: {kinds}")
        return {k: value.to(expected[k].dtype) for k, value in out.items()}

    def split_state(
        self, state: Mapping[str, torch.Tensor], device: torch.device
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(attributed params, constants) on ``device`` from a state that passed
        :meth:`canonical_state`."""
        attributed = set(self.names)
        params = {n: state[n].detach().to(device) for n in self.names}
        consts = {k: v.detach().to(device) for k, v in state.items() if k not in attributed}
        return params, consts

    def call(self, params: dict, consts: dict, inputs: Inputs) -> torch.Tensor:
        """The selected output (B, *O) of a batch."""
        args, kwargs = forward_arguments(self.model, self.keywords, inputs)
        return select_output(functional_call(self.model, (params, consts), args, kwargs), self.output)

    def forward_one(self, params: dict, consts: dict, inputs: Inputs) -> torch.Tensor:
        """Outputs (1, *O) for a single example (inputs without their batch dimension)."""
        return self.call(params, consts, take_rows(inputs, None))

    def forward(self, params: dict, consts: dict, inputs: Inputs) -> torch.Tensor:
        """Outputs (B, *O) for a batch, without gradients."""
        with torch.no_grad():
            return self.call(params, consts, inputs)

    def note_no_vmap(self, reason: str) -> None:
        """Record (and say once) that per-example gradients must loop over examples."""
        if not self.runtime.get("loop"):
            warnings.warn(
                f"{type(self.model).__name__}'s forward cannot run under torch.func.vmap ({reason}); "
                "per-example gradients are computed one example at a time (slower). For Hugging Face "
                "models, attn_implementation='eager' and an attention_mask input avoid this.",
                RuntimeWarning,
                stacklevel=3,
            )
        self.runtime["loop"] = True
