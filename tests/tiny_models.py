"""Tiny models, data and a dense (loop-and-autograd) reference of the SOURCE formulas."""

from __future__ import annotations

import copy

import numpy as np
import scipy.linalg
import torch
from torch import nn
from torch.func import functional_call

from source_proj.attributor import SourceAttributor
from source_proj.evaluation.training import TrainSettings, train_sgd
from source_proj.gradients.tasks import ClassificationTask, RegressionTask, Task
from source_proj.kernels.reference import matrix_block
from source_proj.trajectory.checkpoints import Checkpoint, Trajectory


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| (Frobenius), in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def blobs(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable-ish Gaussian blobs: inputs (n, dim) float32, labels (n,)."""
    gen = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(classes, dim, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    return centers[labels] + torch.randn(n, dim, generator=gen), labels


def mlp(dims: tuple[int, ...], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def trained_classifier(
    dims=(4, 6, 3), n=40, epochs=4, ckpts_per_epoch=2, momentum=0.9, weight_decay=1e-3, seed=0
) -> tuple[nn.Module, Trajectory, tuple[torch.Tensor, torch.Tensor]]:
    x, y = blobs(n, dims[0], dims[-1], seed)
    model = mlp(dims, seed)
    settings = TrainSettings(
        epochs=epochs, batch_size=8, lr=0.05, momentum=momentum, weight_decay=weight_decay,
        checkpoints_per_epoch=ckpts_per_epoch, seed=seed,
    )
    ckpts = train_sgd(model, ClassificationTask(), x, y, settings)
    return model, settings.trajectory(ckpts), (x, y)


def small_run() -> tuple[nn.Module, Trajectory, tuple[torch.Tensor, torch.Tensor]]:
    """A 6-8-3 MLP classifier trained 3 epochs (one checkpoint each) on 24 rows."""
    return trained_classifier(dims=(6, 8, 3), n=24, epochs=3, ckpts_per_epoch=1)


def small_attributor(run: tuple, **settings) -> SourceAttributor:
    """A classification attributor over ``run`` (:func:`small_run`): k = 24, chunks of 8, one segment."""
    model, traj, _ = run
    return SourceAttributor(model, "classification", traj, proj_dim=24, chunk_size=8, progress=False, num_segments=1,
                            **settings)


def flat_grad(model: nn.Module, state, fn) -> torch.Tensor:
    """Gradient of fn(model) w.r.t. all parameters, flattened in parameter order (float64)."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    params = list(m.parameters())
    grads = torch.autograd.grad(fn(m), params)
    return torch.cat([g.reshape(-1) for g in grads]).double()


def dense_gn_hessian(model: nn.Module, state, task: Task, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean Gauss-Newton Hessian J^T (d^2 loss/d out^2) J over the examples, (p, p) float64,
    with the output Hessian from autograd (independent of the tasks' closed forms)."""
    total = 0.0
    for i in range(len(y)):
        rows = [
            flat_grad(model, state, lambda m, c=c: m(x[i : i + 1])[0, c])
            for c in range(model(x[:1]).shape[1])
        ]
        jac = torch.stack(rows)  # (C, p)
        m = copy.deepcopy(model)
        m.load_state_dict(state)
        out = m(x[i : i + 1]).detach().double()
        hess_out = torch.autograd.functional.hessian(lambda o: task.loss(o, y[i : i + 1]).sum(), out)
        hess_out = hess_out.reshape(out.shape[1], out.shape[1])
        total = total + jac.T @ hess_out @ jac
    return total / len(y)


def projection_matrix(seed: int, p: int, k: int, kind: str = "rademacher") -> torch.Tensor:
    """P (k, p) float64, materialised densely."""
    return matrix_block(seed, 0, p, k, kind, scaled=True).double().T


def dense_source_scores(
    model: nn.Module,
    task: Task,
    traj: Trajectory,
    train: tuple[torch.Tensor, torch.Tensor],
    queries: tuple[torch.Tensor, torch.Tensor],
    proj: torch.Tensor | None,
    num_segments: int,
    time_scale: float = 1.0,
    attributed_stages: tuple | None = None,
    curvature_data: dict | None = None,
    query_mode: str = "final",
    precond: list[torch.Tensor] | None = None,
    decays: list[float] | None = None,
) -> np.ndarray:
    """The formula of docs/math.md evaluated densely: per-example autograd loops, scipy's expm and
    an explicit inverse. ``proj`` None means no projection (P = I). ``query_mode`` "final":
    the final query gradient carried through later exp(-tH); "segment": each segment's mean
    query gradient against its own phi, no carrying. Only segments of
    ``attributed_stages`` (default all) contribute terms; each stage's Hessian comes from
    ``curvature_data[stage]`` (default the training rows).

    Preconditioned runs (section 4): ``precond[c]`` is the diagonal D of checkpoint c, (p,)
    in parameter order: gradients at c become P D^{1/2} g and the Hessian
    P D^{1/2} G D^{1/2} P^T, with ``decays[c]`` (default the weight decay) on the diagonal."""
    x, y = train
    xq, yq = queries
    states = [c.load() for c in traj.checkpoints]
    p = sum(q.numel() for q in model.parameters())
    root = [torch.ones(p, dtype=torch.float64) if precond is None else precond[c].double().sqrt() for c in range(len(states))]

    def grads(c, xs, ys, fn):
        return torch.stack([
            root[c] * flat_grad(model, states[c], lambda m, i=i: fn(m(xs[i : i + 1]), ys[i : i + 1])[0])
            for i in range(len(ys))
        ])

    def hessian(c, stage):
        cx, cy = (curvature_data or {}).get(stage, train)
        return root[c][:, None] * dense_gn_hessian(model, states[c], task, cx, cy) * root[c][None, :]

    return dense_scores_from_parts(
        traj, num_segments, proj, len(y),
        train_grads=lambda c: grads(c, x, y, task.loss),
        query_grads=lambda c: grads(c, xq, yq, task.measurement),
        hessian=hessian, time_scale=time_scale, attributed_stages=attributed_stages, query_mode=query_mode,
        decays=decays,
    )


def dense_scores_from_parts(
    traj: Trajectory,
    num_segments: int,
    proj: torch.Tensor | None,
    n: int,
    train_grads,
    query_grads,
    hessian,
    time_scale: float = 1.0,
    attributed_stages: tuple | None = None,
    query_mode: str = "final",
    decays: list[float] | None = None,
) -> np.ndarray:
    """The segment algebra of ``dense_source_scores`` from unprojected parts at checkpoint c:
    ``train_grads(c)`` (N, p) loss gradients, ``query_grads(c)`` (Q, p) measurement gradients,
    ``hessian(c, stage)`` (p, p) mean Gauss-Newton Hessian; ``decays[c]`` (default the weight
    decay) is added to each checkpoint's Hessian diagonal."""
    segs = traj.segments(num_segments)
    final = len(traj.checkpoints) - 1
    decays = decays or [traj.weight_decay] * len(traj.checkpoints)
    exps, phis, gmeans = [], [], []
    for seg in segs:
        h = sum(_project(proj, hessian(c, seg.stage), both=True) for c in seg.checkpoints)
        k = h.shape[0]
        decay = float(np.mean([decays[c] for c in seg.checkpoints]))
        h = (h / len(seg.checkpoints) + decay * torch.eye(k, dtype=torch.float64)).numpy()
        t = seg.time * time_scale
        e = scipy.linalg.expm(-t * h)
        exps.append(e)
        phis.append((np.eye(k) - e) @ np.linalg.inv(h))
        gmeans.append(sum(_project(proj, train_grads(c)) for c in seg.checkpoints).numpy() / len(seg.checkpoints))
    scores = 0.0
    for l, seg in enumerate(segs):
        if attributed_stages is not None and seg.stage not in attributed_stages:
            continue
        if query_mode == "final":
            q = _project(proj, query_grads(final)).numpy()
            op = phis[l]
            for later in exps[l + 1 :]:
                op = later @ op
        else:
            q = sum(_project(proj, query_grads(c)) for c in seg.checkpoints).numpy() / len(seg.checkpoints)
            op = phis[l]
        scores = scores - q @ op @ gmeans[l].T / n
    return scores


def _project(proj: torch.Tensor | None, value: torch.Tensor, both: bool = False) -> torch.Tensor:
    """Rows of ``value`` projected (P g), or P H P^T with ``both``; P = I for None."""
    value = value.to(torch.float64)
    if proj is None:
        return value
    return proj @ value @ proj.T if both else value @ proj.T


def identity_projection(grads, config):
    """Stand-in for ``project`` that does not project (k = p), for exact oracles."""
    blocks = list(grads.values()) if isinstance(grads, dict) else [grads]
    return torch.cat([b.to(torch.float32) for b in blocks], dim=1)


def unrolled_linear_regression(lr: float, steps: int, weight_decay: float, precond: torch.Tensor | None = None):
    """Full-batch gradient descent on a small linear regression, differentiated exactly.

    Steps theta <- theta - lr (D grad + lambda theta), with D = I (``precond`` None: plain GD,
    an "sgd" trajectory) or the fixed diagonal ``precond`` (4,) over (weight (3), bias): an
    "adamw" trajectory whose checkpoints carry name -> exp_avg_sq mappings from which the
    library's bias-corrected D is exactly ``precond``. Returns (model, trajectory, data,
    queries, exact d f(query) / d w (3, 12) by backpropagation through the steps).
    """
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(12, 3, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(12, generator=gen)
    xq, yq = torch.randn(3, 3, generator=gen), torch.randn(3, generator=gen)
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.2, 0.1, -0.3]]))
        model.bias.fill_(0.1)
    task = RegressionTask()
    d_of = None if precond is None else {"weight": precond[:3].reshape(1, 3).double(), "bias": precond[3:].double()}
    beta2, eps = 0.999, 1e-8
    weights = torch.ones(12, dtype=torch.float64, requires_grad=True)
    params = {k: v.detach().clone().double().requires_grad_(True) for k, v in model.state_dict().items()}
    ckpts = []
    model64 = copy.deepcopy(model).double()
    for step in range(1, steps + 1):
        loss = (weights * task.loss(functional_call(model64, params, (x.double(),)), y.double())).mean()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {
            k: v - lr * ((g if d_of is None else d_of[k] * g) + weight_decay * v) for (k, v), g in zip(params.items(), grads)
        }
        # exp_avg_sq whose bias-corrected D at this cumulative step is exactly precond.
        state = None if d_of is None else {k: (1 - beta2**step) * (1 / d.float() - eps) ** 2 for k, d in d_of.items()}
        ckpts.append(Checkpoint({k: v.detach().float() for k, v in params.items()}, steps=1, lr=lr, optimizer_state=state))
    f = task.measurement(functional_call(model64, params, (xq.double(),)), yq.double())
    exact = torch.stack([torch.autograd.grad(f[j], weights, retain_graph=True)[0] for j in range(3)])
    if d_of is None:
        traj = Trajectory(tuple(ckpts), weight_decay=weight_decay)
    else:
        traj = Trajectory(tuple(ckpts), optimizer="adamw", weight_decay=weight_decay, betas=(0.9, beta2), eps=eps)
    return model, traj, (x, y), (xq, yq), exact.detach().numpy()
