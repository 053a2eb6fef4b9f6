"""Adam's diagonal preconditioner at each checkpoint, read from the optimizer's saved state.

For a trajectory trained with ``torch.optim.Adam`` / ``AdamW`` the step at checkpoint c is
theta <- theta - eta * D_c * m_hat (plus the decay), with

    D_c = 1 / (sqrt(v_c / (1 - beta2^step_c)) + eps)      (element-wise, per parameter),

v_c the optimizer's ``exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad``) and step_c its step
count. SOURCE works in the coordinates rescaled by D^{1/2} (docs/math.md, section 9): every
gradient taken at checkpoint c is multiplied element-wise by D_c^{1/2} before it is projected,
and the segment Hessian gains the decay term. :class:`Preconditioner` reads the states
(``Checkpoint.optimizer_state``: a ``state_dict()``, a path to one, or a mapping name ->
``exp_avg_sq``), checks them against the model, and provides per checkpoint

* :meth:`Preconditioner.sqrt_scale`: D_c^{1/2} per attributed parameter (flat blocks),
* :meth:`Preconditioner.decay`: the decay rate added to the projected Hessian's diagonal,
* :meth:`Preconditioner.digests`: SHA-256 of the second moments and steps the scores use.

Weight decay. AdamW's decoupled decay (theta <- theta - eta lambda theta) adds exactly
lambda I in the rescaled space, as for SGD. Adam's coupled L2 (lambda theta added to the
gradient before preconditioning) adds lambda D, which a projection does not keep diagonal; it
is approximated by lambda * c_c I with c_c = sum_j D_j^2 v_hat_j / sum_j D_j v_hat_j, the mean
of D along the rescaled gradient energy (v_hat, the optimizer's running mean of squared
gradients, stands for the diagonal of the gradient second moment, so coordinates that never
see a gradient do not count; c is about 1 / mean_j sqrt(v_hat_j)). Per-group weight decay
(e.g. none on biases) enters as one lambda, the parameter-weighted mean over the param groups
(:func:`mean_group_decay`): a ``state_dict`` whose groups say otherwise than the trajectory's
``weight_decay`` is refused, naming the value to pass.

Step counts. A ``state_dict`` records how many steps its optimizer took; :func:`check_step_counts`
compares them with the trajectory's steps (``Trajectory.cumulative_steps``) before any work. The
trajectory does not know the run's absolute step at its first checkpoint (it may start mid-run,
and a state then also counts the steps before it), so the check is on differences: the first
recorded state counts at least the steps its stage has up to that checkpoint, and each later
state exceeds the previous recorded one by exactly the trajectory's steps between the two
checkpoints, or, in a later stage than that one, equals its own stage's steps so far (an
optimizer created afresh for the stage, as ``train_adamw`` called per stage does). This refuses
states swapped between checkpoints, stale or edited step counts and states of a run saved at
other steps. A state from another run of the same length and checkpoint spacing is not
detected: its moments would have to be compared with the checkpoint's weights, which nothing
records. Mappings name -> ``exp_avg_sq`` record no step and are not checked.

For SGD and heavy-ball trajectories the preconditioner is the identity (``sqrt_scale`` is
None) and the decay is ``weight_decay``, so callers have one code path.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
import xxhash
from torch import nn

from source_proj.trajectory.checkpoints import Trajectory, TrajectoryError
from source_proj.trajectory.digests import FileDigests, StateDigests

# What a step count and second moment look like after resolution: name -> (step, v).
Moments = dict[str, tuple[float, torch.Tensor]]


def is_state_dict(state: Any) -> bool:
    """Whether ``state`` is a ``torch.optim`` optimizer ``state_dict()`` (rather than a
    mapping parameter name -> ``exp_avg_sq``)."""
    return isinstance(state, Mapping) and "state" in state and "param_groups" in state


def state_location(source: Mapping[str, Any] | str | os.PathLike, index: int) -> str:
    """How errors name checkpoint ``index``'s optimizer state: the checkpoint, and the file
    when the state was given as a path."""
    return f"checkpoint {index}" if isinstance(source, Mapping) else f"checkpoint {index} ({os.fspath(source)!r})"


def load_optimizer_state(source: Mapping[str, Any] | str | os.PathLike, where: str) -> Mapping[str, Any]:
    """The optimizer state as given, or loaded on the CPU from a ``torch.save`` file.
    Raises ``TrajectoryError`` naming ``where`` for a file that cannot be read (missing,
    truncated, corrupt) or that holds no mapping."""
    if isinstance(source, Mapping):
        return source
    try:
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise TrajectoryError(
            f"{where}: could not load optimizer state file (missing, truncated or corrupt? save it again "
            f"from the optimizer): {reason}"
        ) from exc
    if not isinstance(state, Mapping):
        raise TrajectoryError(
            f"{where}: the optimizer state file holds a {type(state).__name__}, not an optimizer state_dict()"
        )
    return state


def default_param_order(model: nn.Module) -> tuple[str, ...]:
    """``model.named_parameters()`` order (a tensor shared by several names appears once,
    under its first name, as it does in an optimizer built from ``model.parameters()``)."""
    return tuple(name for name, _ in model.named_parameters())


def optimizer_param_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[tuple[str, ...], ...]:
    """The names of ``optimizer``'s parameters per param group, in its order: the
    ``param_order`` to give a :class:`Trajectory` whose optimizer states come from it.
    Raises ``TrajectoryError`` for an optimizer parameter that is not one of ``model``'s."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for g, group in enumerate(optimizer.param_groups):
        unknown = [i for i, p in enumerate(group["params"]) if id(p) not in names]
        if unknown:
            raise TrajectoryError(
                f"param group {g} of the optimizer holds tensors that are not parameters of the model "
                f"(positions {unknown})"
            )
        groups.append(tuple(names[id(p)] for p in group["params"]))
    return tuple(groups)


def _step_count(value: Any, name: str, where: str) -> float:
    step = float(value.item() if isinstance(value, torch.Tensor) else value)
    if not (math.isfinite(step) and step >= 1):
        raise TrajectoryError(
            f"{where}: optimizer step count of {name!r} is {step:g}; Adam's bias correction "
            "1 - beta2^step needs at least one step taken (was the state saved before training?)"
        )
    return step


def _check_groups(groups: Sequence[Mapping[str, Any]], trajectory: Trajectory, where: str) -> None:
    """Settings recorded in the state's param groups must agree with the trajectory's."""
    for g, group in enumerate(groups):
        betas = group.get("betas", trajectory.betas)
        if not all(math.isclose(float(a), b, rel_tol=1e-6) for a, b in zip(betas, trajectory.betas)):
            raise TrajectoryError(
                f"{where}: param group {g} was trained with betas={tuple(group['betas'])}, but the "
                f"trajectory says betas={trajectory.betas}"
            )
        if "eps" in group and not math.isclose(float(group["eps"]), trajectory.eps, rel_tol=1e-6):
            raise TrajectoryError(
                f"{where}: param group {g} was trained with eps={group['eps']}, but the trajectory says "
                f"eps={trajectory.eps}"
            )
        if group.get("maximize", False):
            raise TrajectoryError(f"{where}: param group {g} maximised its objective (maximize=True): not supported")
        decoupled = group.get("decoupled_weight_decay")
        decays = float(group.get("weight_decay", 0.0)) > 0
        if decoupled is not None and decays and bool(decoupled) != (trajectory.optimizer == "adamw"):
            kind = "AdamW (decoupled weight decay)" if decoupled else "Adam (L2 weight decay added to the gradient)"
            raise TrajectoryError(
                f"{where}: param group {g} was trained by {kind}, but the trajectory says "
                f"optimizer={trajectory.optimizer!r}"
            )


def state_sizes(per_param: Mapping[Any, Mapping[str, Any]]) -> dict[int, int]:
    """param id -> numel, from the first non-scalar tensor of each entry of an optimizer
    ``state_dict()["state"]`` (ids without such a tensor are left out)."""
    sizes = {}
    for pid, entry in per_param.items():
        tensors = [v for v in entry.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        if tensors:
            sizes[int(pid)] = tensors[0].numel()
    return sizes


def group_decays(groups: Sequence[Mapping[str, Any]], sizes: Mapping[int, int]) -> tuple[tuple[int, float], ...]:
    """(number of parameters, weight decay) of each of an optimizer's param groups;
    ``sizes``: param id -> numel (an id without one counts 1)."""
    return tuple(
        (sum(sizes.get(int(pid), 1) for pid in group["params"]), float(group.get("weight_decay", 0.0)))
        for group in groups
    )


def mean_group_decay(counted: Sequence[tuple[int, float]]) -> float:
    """The parameter-weighted mean of :func:`group_decays` (0 for no parameters)."""
    total = sum(count for count, _ in counted)
    return sum(count * decay for count, decay in counted) / total if total else 0.0


def _check_decay(groups: Sequence[Mapping[str, Any]], per_param: Mapping[Any, Any], trajectory: Trajectory, where: str) -> None:
    """The trajectory's ``weight_decay`` must be the groups' parameter-weighted mean (to 0.1%)."""
    counted = group_decays(groups, state_sizes(per_param))
    expected = mean_group_decay(counted)
    if math.isclose(trajectory.weight_decay, expected, rel_tol=1e-3, abs_tol=1e-12):
        return
    decays = sorted({decay for _, decay in counted})
    how = f"weight_decay={decays[0]:g}" if len(decays) == 1 else (
        f"param groups of weight decays {[decay for _, decay in counted]} (their parameter-weighted mean is "
        f"{expected:.6g}; the estimator uses one decay)"
    )
    raise TrajectoryError(
        f"{where}: the optimizer was trained with {how}, but the trajectory says "
        f"weight_decay={trajectory.weight_decay:g}; pass Trajectory(weight_decay={expected:.6g})"
    )


def _from_state_dict(
    state: Mapping[str, Any], order: Sequence[str] | Sequence[Sequence[str]], trajectory: Trajectory,
    names: Sequence[str], where: str,
) -> Moments:
    groups = state["param_groups"]
    _check_groups(groups, trajectory, where)
    ids = [list(group["params"]) for group in groups]
    grouped = bool(order) and not isinstance(order[0], str)
    sizes = [len(i) for i in ids]
    hint = (
        "pass Trajectory(param_order=...) with the names in the order they were given to the "
        "optimizer (one list per param group)"
    )
    if grouped:
        if [len(g) for g in order] != sizes:
            raise TrajectoryError(
                f"{where}: the optimizer state has param groups of sizes {sizes}, but param_order "
                f"has groups of sizes {[len(g) for g in order]}; {hint}"
            )
        flat = [n for g in order for n in g]
    else:
        flat = list(cast("Sequence[str]", order))  # not grouped: a flat sequence of names
        if len(flat) != sum(sizes):
            raise TrajectoryError(
                f"{where}: the optimizer state holds {sum(sizes)} parameters (param groups of sizes "
                f"{sizes}) but the parameter order lists {len(flat)}; {hint}"
            )
    id_of = dict(zip(flat, (i for group in ids for i in group)))
    amsgrad = {i: bool(group.get("amsgrad", False)) for group, gids in zip(groups, ids) for i in gids}
    per_param = state["state"]
    moments: Moments = {}
    for name in names:
        if name not in id_of:
            raise TrajectoryError(
                f"{where}: parameter {name!r} is attributed but was not trained by the optimizer (it is "
                "not among the optimizer's parameters: frozen?); leave it out with param_names=..., "
                "or list it in param_order if the optimizer did train it"
            )
        pid = id_of[name]
        entry = per_param.get(pid, per_param.get(str(pid)))
        if entry is None:
            raise TrajectoryError(
                f"{where}: parameter {name!r} (optimizer param id {pid}) has no optimizer state: it was "
                "frozen or never received a gradient; leave it out with param_names=..."
            )
        key = "max_exp_avg_sq" if amsgrad[pid] else "exp_avg_sq"
        if key not in entry:
            raise TrajectoryError(
                f"{where}: the optimizer state of {name!r} (param id {pid}) has no {key!r} (keys "
                f"{sorted(entry)}): not the state of an Adam optimizer"
            )
        moments[name] = (_step_count(entry.get("step", 0), name, where), entry[key])
    _check_decay(groups, per_param, trajectory, where)
    return moments


def _from_mapping(
    state: Mapping[str, Any], step: int, names: Sequence[str], known: Sequence[str], where: str
) -> Moments:
    # Second moments are never negative; weights are: a model's state dict given by mistake.
    signed = [
        n for n, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and bool((v < 0).any())
    ]
    if signed:
        raise TrajectoryError(
            f"{where}: not an optimizer state: it maps names to tensors with negative values ({signed[0]!r}, ...), "
            "as a model's weights do; give the optimizer's state_dict() (or the optimizer.pt it was saved to), "
            "or a mapping name -> exp_avg_sq"
        )
    unknown = sorted(set(state) - set(known))
    if unknown:
        raise TrajectoryError(f"{where}: the exp_avg_sq mapping names unknown parameters {unknown}")
    missing = [n for n in names if n not in state]
    if missing:
        raise TrajectoryError(
            f"{where}: no exp_avg_sq for attributed parameters {missing} (frozen in the optimizer?); "
            "leave them out with param_names=..., or give their second moments"
        )
    return {n: (float(step), state[n]) for n in names}


def _check_moment(name: str, v: Any, shape: torch.Size, where: str, values: bool = True) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TrajectoryError(f"{where}: exp_avg_sq of {name!r} is a {type(v).__name__}, not a tensor")
    if tuple(v.shape) != tuple(shape):
        raise TrajectoryError(
            f"{where}: exp_avg_sq of {name!r} has shape {tuple(v.shape)} but the parameter has shape "
            f"{tuple(shape)}; if the parameters were given to the optimizer in another order than "
            "named_parameters(), pass Trajectory(param_order=...)"
        )
    if not values:
        return v
    v = v.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        raise TrajectoryError(f"{where}: exp_avg_sq of {name!r} holds negative, NaN or inf values")
    return v


def _bias_correction(beta2: float, step: float) -> float:
    """1 - beta2^step, stable for beta2 near 1."""
    return 1.0 if beta2 == 0.0 else -math.expm1(step * math.log(beta2))


def inverse_denominator(v: torch.Tensor, step: float, beta2: float, eps: float) -> torch.Tensor:
    """D = 1 / (sqrt(v / (1 - beta2^step)) + eps), float32, the shape of ``v``."""
    return v.to(torch.float32).div(_bias_correction(beta2, step)).sqrt_().add_(eps).reciprocal_()


def moments_digest(moments: Moments, fast: bool = False) -> str:
    """SHA-256 of the names, steps, shapes and float32 values of second moments (stores record
    it), or with ``fast`` xxh3-128 of the same (each later read of the state is checked with it)."""
    digest = xxhash.xxh3_128() if fast else hashlib.sha256()
    for name in sorted(moments):
        step, v = moments[name]
        values = v.to(torch.float32).contiguous().reshape(-1)
        digest.update(f"{name}|{step!r}|{tuple(v.shape)}|".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def coupled_decay_factor(moments: Moments, beta2: float, eps: float) -> float:
    """c = sum_j D_j^2 v_hat_j / sum_j D_j v_hat_j over all coordinates (the gradient-energy
    mean of D that stands in for D in Adam's coupled L2 term; see the module docstring).
    Falls back to the plain mean of D when every v is 0."""
    num = den = plain = 0.0
    count = 0
    for step, v in moments.values():
        d = inverse_denominator(v, step, beta2, eps).double()
        v_hat = v.double() / _bias_correction(beta2, step)
        num += float((d * d * v_hat).sum())
        den += float((d * v_hat).sum())
        plain += float(d.sum())
        count += d.numel()
    return num / den if den > 0 else plain / count


def _same_step(recorded: float, expected: float) -> bool:
    """Step counts agree (torch keeps them in float32, exact integers up to 2^24)."""
    return math.isclose(recorded, expected, rel_tol=1e-6, abs_tol=0.5)


def check_step_counts(trajectory: Trajectory, recorded: Sequence[float | None]) -> None:
    """Refuse optimizer states whose step counts do not fit the trajectory's ``steps`` (the
    check of the module docstring, "Step counts"). ``recorded[c]``: the step count checkpoint
    c's state records, None where it records none. Raises ``TrajectoryError`` naming the
    checkpoint (and file), the state's step and the step expected."""
    checkpoints = trajectory.checkpoints
    previous: int | None = None
    for index, step in enumerate(recorded):
        if step is None:
            continue
        source = checkpoints[index].optimizer_state
        assert source is not None, "a recorded step count comes from an optimizer state"
        where = state_location(source, index)
        stage = checkpoints[index].stage
        start = trajectory.stage_checkpoints(stage)[0]
        in_stage = sum(int(c.steps) for c in checkpoints[start : index + 1])
        if previous is None:
            if step < in_stage - 0.5:
                within = f" of stage {stage!r}" if len(trajectory.stages) > 1 else ""
                raise TrajectoryError(
                    f"{where}: the optimizer state says step {step:.10g}, but the trajectory has {in_stage} "
                    f"steps{within} up to this checkpoint, all taken by its optimizer: the state is from earlier "
                    "in training or from another run (swapped or stale optimizer state?)"
                )
        else:
            since = trajectory.cumulative_steps(index) - trajectory.cumulative_steps(previous)
            previous_step = recorded[previous]
            assert previous_step is not None  # previous: the last checkpoint whose state records a step
            expected = previous_step + since
            fresh = start > previous  # c's stage began after the previous recorded state
            if not (_same_step(step, expected) or (fresh and _same_step(step, in_stage))):
                restart = f" (or {in_stage} for an optimizer created afresh for stage {stage!r})" if fresh else ""
                raise TrajectoryError(
                    f"{where}: the optimizer state says step {step:.10g}, but the trajectory expects step "
                    f"{expected:.10g}{restart}: checkpoint {previous}'s state says step {recorded[previous]:.10g} and "
                    f"the trajectory has {since} steps from checkpoint {previous} to checkpoint {index}. The optimizer "
                    f"states of checkpoints {previous} and {index} do not fit the trajectory's steps (swapped between "
                    "checkpoints, saved at other steps, or from another run?)"
                )
        previous = index


class _Checked(NamedTuple):
    """What the values of a checkpoint's second moments gave: their digests and (Adam's coupled
    L2) the decay factor c."""

    digests: StateDigests
    factor: float


@dataclass
class Preconditioner:
    """Adam's preconditioner per checkpoint of a trajectory, for the attributed parameters.

    Build with :meth:`build`, which opens every checkpoint's optimizer state (memory-mapped) and
    checks its structure against the model and the trajectory: parameters, shapes, param
    groups' settings, step counts. What needs the moments' values (their check: finite, not
    negative; their digests; Adam's coupled decay factor) is done per checkpoint when first
    needed (:attr:`digests`, :attr:`decays`, :meth:`moments`), and taken from the cache of
    :meth:`use_file_digests` for a state file unchanged since it was hashed; :meth:`sqrt_scale`
    reads a state again when it is needed, checked against the fast digest.

    Attributes:
        trajectory: the run.
        names: the attributed parameter names (the order of the gradient blocks).
        shapes: name -> shape of every model parameter.
        param_order: the names in optimizer order (``trajectory.param_order`` or the model's).
        steps: per checkpoint, the step count its state records (None for a mapping name ->
            ``exp_avg_sq``; empty when the optimizer has no preconditioner).
        file_digests: the cache of state-file digests by file identity (:meth:`use_file_digests`).
    """

    trajectory: Trajectory
    names: tuple[str, ...]
    shapes: Mapping[str, torch.Size]
    param_order: tuple
    steps: tuple[float | None, ...] = ()
    file_digests: FileDigests = field(default_factory=FileDigests, compare=False, repr=False)
    _checked: dict[int, _Checked] = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def build(cls, trajectory: Trajectory, model: nn.Module, names: Sequence[str]) -> Preconditioner:
        """Check every checkpoint's optimizer state against ``model`` for the attributed
        parameters ``names`` and the states' step counts against the trajectory
        (:func:`check_step_counts`); raises ``TrajectoryError`` naming the checkpoint and
        parameter. The moments' values are not read here (see the class docstring)."""
        shapes = {n: p.shape for n, p in model.named_parameters()}
        order = trajectory.param_order if trajectory.param_order is not None else default_param_order(model)
        grouped = bool(order) and not isinstance(order[0], str)
        flat = [n for g in order for n in g] if grouped else list(cast("Sequence[str]", order))
        unknown = sorted(set(flat) - set(shapes))
        if unknown:
            raise TrajectoryError(f"param_order names parameters the model does not have: {unknown}")
        built = cls(trajectory, tuple(names), shapes, tuple(order))
        if trajectory.preconditioned:
            built.steps = tuple(built._read(i, values=False)[1] for i in range(len(trajectory.checkpoints)))
            check_step_counts(trajectory, built.steps)
        return built

    def use_file_digests(self, cache: FileDigests) -> None:
        """Take the digests, step counts and decay factors of optimizer-state files from
        ``cache`` (e.g. the one a store keeps) where the file's identity (size, modification
        time) is unchanged and it was read for the same parameters and Adam settings; those
        computed later are added to it. Every later read of a state is still checked."""
        self.file_digests = cache

    @property
    def digests(self) -> tuple[str, ...]:
        """Per checkpoint, :func:`moments_digest` of its second moments (empty when the
        optimizer has no preconditioner): cached for unchanged state files, else read now."""
        return tuple(self._checked_at(i).digests.sha256 for i in self._preconditioned())

    @property
    def fast_digests(self) -> tuple[str, ...]:
        """The same, fast (``moments_digest(..., fast=True)``): every later read of a state must
        give it (a state file replaced during a run is refused)."""
        return tuple(self._checked_at(i).digests.fast for i in self._preconditioned())

    @property
    def decays(self) -> tuple[float, ...]:
        """Per checkpoint, :meth:`decay`."""
        return tuple(self.decay(i) for i in range(len(self.trajectory.checkpoints)))

    def decay(self, index: int) -> float:
        """The decay rate added to the projected Hessian of checkpoint ``index``: lambda
        (SGD, heavy-ball, AdamW), or lambda * c for Adam's coupled L2 (module docstring)."""
        decay = self.trajectory.weight_decay
        return decay * self._checked_at(index).factor if self._coupled() else decay

    def moments(self, index: int) -> Moments:
        """(step, v) per attributed parameter at checkpoint ``index``, checked (v float32, CPU)
        and compared with what was first read or cached (``TrajectoryError`` if the state changed)."""
        moments, step = self._read(index)
        known = self._known(index)
        if known is None:
            self._record(index, moments, step)
        elif moments_digest(moments, fast=True) != known.digests.fast:
            raise self._changed(index, "its second moments differ")
        return moments

    def _preconditioned(self) -> range:
        return range(len(self.trajectory.checkpoints) if self.trajectory.preconditioned else 0)

    def _coupled(self) -> bool:
        return self.trajectory.optimizer == "adam" and self.trajectory.weight_decay > 0

    def _checked_at(self, index: int) -> _Checked:
        known = self._known(index)
        return known if known is not None else self._record(index, *self._read(index))

    def _known(self, index: int) -> _Checked | None:
        """What checkpoint ``index``'s moments gave when read in this run, or as cached for its
        unchanged state file (with the step count :meth:`build` checked)."""
        if index not in self._checked:
            files = self._files(index)
            entry = None if files is None else self.file_digests.entry(files, self._context(index))
            if entry is not None and entry.get("step") == self.steps[index]:
                self._checked[index] = _Checked(StateDigests(entry["sha256"], entry["fast"]), float(entry["factor"]))
        return self._checked.get(index)

    def _record(self, index: int, moments: Moments, step: float | None) -> _Checked:
        if step != self.steps[index]:
            raise self._changed(index, "its step count differs")
        factor = coupled_decay_factor(moments, self.trajectory.betas[1], self.trajectory.eps) if self._coupled() else 1.0
        checked = self._checked[index] = _Checked(
            StateDigests(moments_digest(moments), moments_digest(moments, fast=True)), factor
        )
        files = self._files(index)
        if files is not None:
            self.file_digests.put(files, checked.digests, self._context(index), step=step, factor=factor)
        return checked

    def _changed(self, index: int, how: str) -> TrajectoryError:
        where = state_location(self._state_source(index), index)
        return TrajectoryError(f"{where} changed during the run ({how} from when it was first read): restore it, "
                               "or start again with the new file")

    def _files(self, index: int) -> list[Path] | None:
        source = self._state_source(index)
        return None if isinstance(source, Mapping) else [Path(source)]

    def _context(self, index: int) -> str:
        """What checkpoint ``index``'s moments, step and decay factor depend on besides its file."""
        t = self.trajectory
        shapes = sorted((n, tuple(s)) for n, s in self.shapes.items())
        described = (self.names, shapes, self.param_order, t.betas, t.eps, t.optimizer, t.weight_decay,
                     t.cumulative_steps(index))
        return hashlib.sha256(repr(described).encode()).hexdigest()[:32]

    def _state_source(self, index: int) -> Mapping[str, Any] | str | os.PathLike:
        source = self.trajectory.checkpoints[index].optimizer_state
        assert source is not None, "a preconditioned trajectory has an optimizer state at every checkpoint"
        return source

    def _read(self, index: int, values: bool = True) -> tuple[Moments, float | None]:
        """:meth:`moments` and the step count the state records (its attributed parameters'
        largest; None for a mapping name -> ``exp_avg_sq``, which records none); without
        ``values`` the moments are checked for type and shape only, and not read."""
        source = self._state_source(index)
        where = state_location(source, index)
        state = load_optimizer_state(source, where)
        if is_state_dict(state):
            raw = _from_state_dict(state, self.param_order, self.trajectory, self.names, where)
            recorded = max((step for step, _ in raw.values()), default=None)
        else:
            raw = _from_mapping(state, self.trajectory.cumulative_steps(index), self.names, list(self.shapes), where)
            recorded = None
        return {n: (step, _check_moment(n, v, self.shapes[n], where, values)) for n, (step, v) in raw.items()}, recorded

    def sqrt_scale(self, index: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor] | None:
        """D^{1/2} at checkpoint ``index``: name -> (numel,) float32 on ``device``, in the
        order of the gradient blocks; None when the optimizer has no preconditioner."""
        if not self.trajectory.preconditioned:
            return None
        beta2, eps = self.trajectory.betas[1], self.trajectory.eps
        return {
            n: inverse_denominator(v, step, beta2, eps).sqrt_().reshape(-1).to(device)
            for n, (step, v) in self.moments(index).items()
        }
