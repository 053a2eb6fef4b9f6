"""Adam and AdamW trajectories: the preconditioned estimator against independent oracles.

(a) the preconditioner D read from a state equals the one torch's Adam step applies;
(b) a dense evaluation of the preconditioned formulas (explicit D, explicit matrices);
(c) exact unrolled differentiation of preconditioned descent: in test_source_oracles.py;
(d) the three forms of optimizer state (state_dict, optimizer.pt path, exp_avg_sq mapping),
    parameter orders and param groups, and the errors for states that do not fit;
(e) both projection paths (CPU, Triton) and the feature store's record of the states.
"""

import copy

import numpy as np
import pytest
import torch
from tiny_models import (
    blobs,
    dense_source_scores,
    identity_projection,
    mlp,
    projection_matrix,
)
from torch import nn

from source_proj.attributor import SourceAttributor
from source_proj.evaluation.training import AdamWSettings, train_adamw
from source_proj.features.errors import StoreMismatchError
from source_proj.gradients.tasks import ClassificationTask
from source_proj.store_fit import fit_store, open_store
from source_proj.trajectory.checkpoints import Checkpoint, Trajectory, TrajectoryError
from source_proj.trajectory.optimizer_state import Preconditioner, optimizer_param_order

SETTINGS = AdamWSettings(
    epochs=3, batch_size=8, lr=0.02, weight_decay=0.05, warmup_fraction=0.2, checkpoints_per_epoch=1
)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def adamw_run(n=24, settings=SETTINGS, checkpoint_dir=None, dims=(4, 6, 3)):
    x, y = blobs(n, dims[0], dims[-1], seed=0)
    model = mlp(dims, 0)
    ckpts = train_adamw(model, ClassificationTask(), x, y, settings, checkpoint_dir=checkpoint_dir)
    return model, settings.trajectory(ckpts), (x, y)


def explicit_d(state_dict: dict, beta2: float, eps: float) -> torch.Tensor:
    """D = 1 / (sqrt(v / (1 - beta2^step)) + eps), flattened in parameter order (float64)."""
    parts = []
    for i in sorted(state_dict["state"]):
        entry = state_dict["state"][i]
        step = float(entry["step"])
        parts.append(1.0 / ((entry["exp_avg_sq"].double() / (1 - beta2**step)).sqrt() + eps).reshape(-1))
    return torch.cat(parts)


def mapping_trajectory(model, traj, **kwargs) -> Trajectory:
    """The same run with each state given as a name -> exp_avg_sq mapping."""
    names = [n for n, _ in model.named_parameters()]
    ckpts = [
        Checkpoint(c.state, c.steps, c.lr, c.stage, exp_avg_sq(c.optimizer_state, names)) for c in traj.checkpoints
    ]
    return Trajectory(
        tuple(ckpts), optimizer=traj.optimizer, weight_decay=traj.weight_decay, betas=traj.betas, eps=traj.eps, **kwargs
    )


def exp_avg_sq(state_dict: dict, names: list[str]) -> dict:
    """name -> exp_avg_sq of a state_dict whose parameter i is ``names[i]``."""
    return {n: state_dict["state"][i]["exp_avg_sq"] for i, n in enumerate(names)}


def test_a_preconditioner_is_the_one_torch_adam_steps_with():
    # beta1 = 0 makes Adam's step exactly -lr * D * g (no first-moment averaging), so
    # D = -(theta_after - theta_before) / (lr * g) is read off the update itself.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.0, 0.99), eps=1e-6)
    x = torch.randn(16, 5)
    for _ in range(4):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    moved = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)]).double()
    step_d = -moved / (1e-2 * grads)
    traj = Trajectory((Checkpoint(model.state_dict(), 4, 1e-2, optimizer_state=opt.state_dict()),),
                      optimizer="adam", betas=(0.0, 0.99), eps=1e-6)
    pre = Preconditioner.build(traj, model, [n for n, _ in model.named_parameters()])
    got = torch.cat(list(pre.sqrt_scale(0).values())).double() ** 2
    keep = grads.abs() > 1e-4  # where the update resolves D in float32
    assert keep.sum() > 30
    assert rel_err(got[keep], step_d[keep]) < 1e-3


@pytest.mark.parametrize("query_mode,optimizer", [("final", "adamw"), ("segment", "adamw"), ("final", "adam")])
def test_b_scores_equal_dense_preconditioned_formula(query_mode, optimizer, monkeypatch):
    model, traj, train = adamw_run()
    if optimizer == "adam":  # the same moments described as coupled-L2 Adam: lambda c I for lambda D
        traj = mapping_trajectory(model, traj)
        traj = Trajectory(traj.checkpoints, optimizer="adam", weight_decay=0.05, betas=traj.betas, eps=traj.eps)
    queries = blobs(4, 4, 3, seed=9)
    monkeypatch.setattr("source_proj.projection.projected.project", identity_projection)
    p = sum(q.numel() for q in model.parameters())
    att = SourceAttributor(model, "classification", traj, proj_dim=p, num_segments=3, query_mode=query_mode,
                           progress=False, chunk_size=8).fit(train)
    beta2, eps = traj.betas[1], traj.eps
    _, adamw, _ = adamw_run()
    ds = [explicit_d(c.optimizer_state, beta2, eps) for c in adamw.checkpoints]
    if optimizer == "adam":
        # c = sum D^2 v_hat / sum D v_hat with v_hat = (1/D - eps)^2, the documented stand-in.
        decays = [0.05 * float((d**2 * (1 / d - eps) ** 2).sum() / (d * (1 / d - eps) ** 2).sum()) for d in ds]
        assert all(abs(a - b) < 1e-6 * a for a, b in zip(decays, att.preconditioner.decays))
        assert decays[0] > 5 * 0.05  # D >> 1 here, so the coupled decay differs from AdamW's
    else:
        decays = None
    dense = dense_source_scores(model, ClassificationTask(), traj, train, queries, None, 3,
                                query_mode=query_mode, precond=ds, decays=decays)
    assert rel_err(att.score(queries).numpy(), dense) < 1e-4
    # ...and D matters: the SGD description of the same run scores differently.
    sgd = Trajectory(tuple(Checkpoint(c.state, c.steps, c.lr) for c in traj.checkpoints), weight_decay=0.05)
    plain = SourceAttributor(model, "classification", sgd, proj_dim=p, query_mode=query_mode, progress=False).fit(train)
    assert rel_err(plain.score(queries).numpy(), dense) > 0.3


def test_b_projected_scores_equal_dense_formula_in_projected_space():
    model, traj, train = adamw_run()
    queries = blobs(4, 4, 3, seed=9)
    k, seed = 16, 5
    att = SourceAttributor(model, "classification", traj, proj_dim=k, seed=seed, query_mode="final",
                           progress=False, chunk_size=8).fit(train)
    p = sum(q.numel() for q in model.parameters())
    ds = [explicit_d(c.optimizer_state, *traj.betas[1:], traj.eps) for c in traj.checkpoints]
    dense = dense_source_scores(model, ClassificationTask(), traj, train, queries, projection_matrix(seed, p, k), 3,
                                precond=ds)
    assert rel_err(att.score(queries).numpy(), dense) < 1e-4


def test_d_state_dict_path_and_mapping_give_the_same_scores(tmp_path):
    model, traj, train = adamw_run(checkpoint_dir=tmp_path)
    assert all(isinstance(c.optimizer_state, str) for c in traj.checkpoints)  # saved optimizer-*.pt files
    loaded = Trajectory(
        tuple(
            Checkpoint(c.state, c.steps, c.lr, c.stage, torch.load(c.optimizer_state, weights_only=True))
            for c in traj.checkpoints
        ),
        optimizer="adamw", weight_decay=traj.weight_decay, betas=traj.betas, eps=traj.eps,
    )
    queries = blobs(5, 4, 3, seed=4)
    kwargs = dict(proj_dim=32, progress=False, chunk_size=8)
    from_paths = SourceAttributor(model, "classification", traj, **kwargs).fit(train)
    from_dicts = SourceAttributor(model, "classification", loaded, **kwargs).fit(train)
    from_map = SourceAttributor(model, "classification", mapping_trajectory(model, loaded), **kwargs).fit(train)
    reference = from_dicts.score(queries).numpy()
    assert np.abs(reference).max() > 0
    np.testing.assert_array_equal(from_paths.score(queries).numpy(), reference)
    np.testing.assert_allclose(from_map.score(queries).numpy(), reference, rtol=1e-6, atol=1e-9)
    # The digests depend on the second moments and steps, not on how they were given.
    assert from_paths.preconditioner.digests == from_map.preconditioner.digests


def _hand_adamw(model, x, y, groups, steps=6):
    """A plain AdamW loop over ``groups`` (param-group dicts); returns the trajectory checkpoints."""
    opt = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.01)
    for _ in range(steps):
        opt.zero_grad()
        ClassificationTask().loss(model(x), y).mean().backward()
        opt.step()
    state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    return opt, [Checkpoint(state, steps, 0.01, optimizer_state=opt_state)]


def test_d_permuted_parameter_order_is_refused_or_mapped_by_param_order():
    x, y = blobs(20, 4, 3, seed=1)
    model = mlp((4, 6, 3), 0)
    params = dict(model.named_parameters())
    order = list(reversed(list(params)))
    opt, ckpts = _hand_adamw(model, x, y, [{"params": [params[n] for n in order]}])
    wrong = Trajectory(tuple(ckpts), optimizer="adamw", weight_decay=0.01)
    with pytest.raises(TrajectoryError, match=r"has shape \(3,\) but the parameter has shape \(6, 4\).*param_order"):
        SourceAttributor(model, "classification", wrong, proj_dim=8, num_segments=1, progress=False)
    right = Trajectory(tuple(ckpts), optimizer="adamw", weight_decay=0.01, param_order=order)
    assert optimizer_param_order(model, opt) == (tuple(order),)
    mapped = Trajectory(
        tuple(Checkpoint(c.state, c.steps, c.lr, optimizer_state=exp_avg_sq(c.optimizer_state, order)) for c in ckpts),
        optimizer="adamw", weight_decay=0.01,
    )
    queries = blobs(3, 4, 3, seed=2)
    a, b = (
        SourceAttributor(model, "classification", t, proj_dim=16, num_segments=1, progress=False).fit((x, y)).score(queries)
        for t in (right, mapped)
    )
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-9)


def test_d_param_groups_map_by_group_and_frozen_parameters_are_named():
    x, y = blobs(20, 4, 3, seed=1)
    model = mlp((4, 6, 3), 0)
    p = dict(model.named_parameters())
    groups = [["0.weight", "2.weight"], ["0.bias", "2.bias"]]
    param_groups = [{"params": [p[n] for n in g], "weight_decay": wd} for g, wd in zip(groups, (0.01, 0.0))]
    opt, ckpts = _hand_adamw(model, x, y, param_groups)
    # One decay for the estimator: the groups' parameter-weighted mean (weights 6x4 + 3x6 = 42
    # parameters at 0.01, biases 6 + 3 = 9 at 0); the decay of the first group alone is refused.
    with pytest.raises(TrajectoryError, match=r"weight decays \[0.01, 0.0\] .*mean is 0.00823529.*weight_decay=0.01;"):
        Preconditioner.build(Trajectory(tuple(ckpts), optimizer="adamw", weight_decay=0.01, param_order=groups), model, list(p))
    grouped = Trajectory(tuple(ckpts), optimizer="adamw", weight_decay=0.01 * 42 / 51, param_order=groups)
    assert optimizer_param_order(model, opt) == tuple(tuple(g) for g in groups)
    pre = Preconditioner.build(grouped, model, list(p))
    v = ckpts[0].optimizer_state["state"]
    d = pre.sqrt_scale(0)
    expected = 1 / ((v[1]["exp_avg_sq"] / (1 - 0.999**6)).sqrt() + 1e-8)  # id 1 = "2.weight"
    torch.testing.assert_close(d["2.weight"] ** 2, expected.reshape(-1), rtol=1e-5, atol=0)
    with pytest.raises(TrajectoryError, match=r"groups of sizes \[2, 2\].*\[3, 1\]"):
        regrouped = Trajectory(tuple(ckpts), optimizer="adamw", param_order=[groups[0] + ["0.bias"], ["2.bias"]])
        Preconditioner.build(regrouped, model, list(p))
    # Biases frozen (not given to the optimizer) but attributed: named; attributing weights only works.
    model = mlp((4, 6, 3), 0)
    p = dict(model.named_parameters())
    _, ckpts = _hand_adamw(model, x, y, [{"params": [p["0.weight"], p["2.weight"]]}])
    frozen = Trajectory(tuple(ckpts), optimizer="adamw", weight_decay=0.01, param_order=["0.weight", "2.weight"])
    with pytest.raises(TrajectoryError, match="'0.bias' is attributed but was not trained by the optimizer"):
        SourceAttributor(model, "classification", frozen, proj_dim=8, num_segments=1, progress=False)
    SourceAttributor(model, "classification", frozen, proj_dim=8, num_segments=1, progress=False,
                     param_names=["0.weight", "2.weight"])
    with pytest.raises(TrajectoryError, match="holds 2 parameters .* lists 4"):  # default order: all four
        default_order = Trajectory(tuple(ckpts), optimizer="adamw")
        SourceAttributor(model, "classification", default_order, proj_dim=8, num_segments=1, progress=False)


def test_d_bad_states_raise_clear_errors():
    model, traj, train = adamw_run()
    ckpt = traj.checkpoints[0]
    names = [n for n, _ in model.named_parameters()]

    def build(state, optimizer="adamw", **kw):
        kw.setdefault("weight_decay", SETTINGS.weight_decay)
        t = Trajectory((Checkpoint(ckpt.state, ckpt.steps, ckpt.lr, optimizer_state=state),), optimizer=optimizer, **kw)
        return SourceAttributor(model, "classification", t, proj_dim=8, num_segments=1, progress=False)

    with pytest.raises(TrajectoryError, match="checkpoint 0: optimizer 'adamw' needs the optimizer state"):
        Trajectory((Checkpoint(ckpt.state, ckpt.steps, ckpt.lr),), optimizer="adamw")
    with pytest.raises(TrajectoryError, match="does not use"):
        Trajectory((ckpt,), optimizer="sgd")
    zero = copy.deepcopy(ckpt.optimizer_state)
    zero["state"][2]["step"] = torch.tensor(0.0)
    with pytest.raises(TrajectoryError, match="step count of '2.weight' is 0"):
        build(zero)
    missing = copy.deepcopy(ckpt.optimizer_state)
    del missing["state"][3]
    with pytest.raises(TrajectoryError, match="'2.bias' .* has no optimizer state"):
        build(missing)
    with pytest.raises(TrajectoryError, match=r"exp_avg_sq of '0.weight' has shape \(6,\) but the parameter has shape \(6, 4\)"):
        build({n: torch.ones(6) for n in names})
    with pytest.raises(TrajectoryError, match=r"no exp_avg_sq for attributed parameters \['2.bias'\]"):
        build(exp_avg_sq(ckpt.optimizer_state, names[:3]))
    with pytest.raises(TrajectoryError, match="betas=.0.9, 0.999.*trajectory says betas=.0.9, 0.99."):
        build(ckpt.optimizer_state, betas=(0.9, 0.99))
    with pytest.raises(TrajectoryError, match=r"trained with weight_decay=0.05, but the trajectory says weight_decay=0; "
                       r"pass Trajectory\(weight_decay=0.05\)"):
        build(ckpt.optimizer_state, weight_decay=0.0)  # torch's AdamW decays by default: forgetting it is refused
    with pytest.raises(TrajectoryError, match="trained by AdamW .* optimizer='adam'"):
        build(ckpt.optimizer_state, optimizer="adam", weight_decay=0.05)
    sgd_state = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(train[0]).sum().backward()
    sgd_state.step()
    with pytest.raises(TrajectoryError, match="no 'exp_avg_sq' .*momentum_buffer.*not the state of an Adam optimizer"):
        build(sgd_state.state_dict())
    with pytest.raises(TrajectoryError, match="could not load optimizer state file"):
        build("/nonexistent/optimizer.pt")


def test_e_triton_path_gives_the_cpu_scores():
    pytest.importorskip("triton", reason="triton is not installed")
    model, traj, train = adamw_run(n=12)
    queries = blobs(3, 4, 3, seed=3)
    kwargs = dict(proj_dim=16, seed=2, progress=False, chunk_size=12)
    cpu = SourceAttributor(model, "classification", traj, backend="cpu", **kwargs).fit(train)
    tri = SourceAttributor(model, "classification", traj, backend="triton", **kwargs).fit(train)
    np.testing.assert_allclose(tri.score(queries).numpy(), cpu.score(queries).numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(tri.self_influence().numpy(), cpu.self_influence().numpy(), rtol=1e-4, atol=1e-9)


def test_e_store_records_the_optimizer_and_refuses_other_states(tmp_path):
    model, traj, train = adamw_run(checkpoint_dir=tmp_path / "ckpts")
    att = SourceAttributor(model, "classification", traj, proj_dim=16, chunk_size=8, progress=False)
    store, _ = fit_store(att, train, tmp_path / "s.zarr", chunk_rows=8)
    meta = store.metadata
    assert meta["trajectory"]["optimizer"] == "adamw" and meta["trajectory"]["betas"] == [0.9, 0.999]
    assert meta["optimizer_state_digests"] == list(att.preconditioner.digests)
    memory = SourceAttributor(model, "classification", traj, proj_dim=16, chunk_size=8, progress=False).fit(train)
    np.testing.assert_allclose(store.self_influence(), memory.self_influence().numpy(), rtol=1e-6)
    open_store(SourceAttributor(model, "classification", traj, proj_dim=16, progress=False), tmp_path / "s.zarr")
    # The same checkpoints with one optimizer state changed: refused, naming the field.
    path = traj.checkpoints[1].optimizer_state
    state = torch.load(path, weights_only=True)
    state["state"][0]["exp_avg_sq"] *= 2
    torch.save(state, path)
    with pytest.raises(StoreMismatchError, match="optimizer_state_digests"):
        open_store(SourceAttributor(model, "classification", traj, proj_dim=16, progress=False), tmp_path / "s.zarr")
