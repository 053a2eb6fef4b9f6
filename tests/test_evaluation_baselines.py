"""Baselines in the projected space against independent oracles.

The oracles take per-example gradients with plain ``torch.autograd`` (one example at a time),
project them with the explicit matrix ``project(I_p)`` (p x k), and evaluate each estimator's
textbook formula in float64; SOURCE on a cached run is checked against ``SourceAttributor``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity

from source_proj.attributor import SourceAttributor
from source_proj.config import SourceConfig
from source_proj.evaluation import scenarios
from source_proj.evaluation.baselines import (
    ensemble,
    influence_scores,
    influence_self_influence,
    penultimate_features,
    representation_similarity,
    source_scores,
    source_self_influence,
    tracin_scores,
    tracin_self_influence,
    trak_scores,
)
from source_proj.evaluation.projected_run import project_run
from source_proj.gradients.tasks import ClassificationTask
from source_proj.projection.jl import ProjectionConfig, project

DIM = 24
SEED = 5


def _shrink(scenario: scenarios.Scenario) -> scenarios.Scenario:
    """6 hidden units and 6 epochs (3 kept checkpoints per stage for 1-stage digits)."""
    stages = tuple(dataclasses.replace(s, settings=dataclasses.replace(s.settings, epochs=6)) for s in scenario.stages)
    return dataclasses.replace(scenario, stages=stages, hidden=6)


def _pair(inputs: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(inputs), torch.from_numpy(targets)


@dataclasses.dataclass(frozen=True)
class Fixture:
    scenario: scenarios.Scenario
    model: torch.nn.Module
    trajectory: object
    data: dict
    queries: tuple[torch.Tensor, torch.Tensor]
    run: object


def _fixture(scenario: scenarios.Scenario) -> Fixture:
    model, trajectory = scenarios.train_run(scenario, np.arange(scenario.num_train), seed=1)
    data = {s.label: _pair(s.inputs, s.targets) for s in scenario.stages}
    queries = _pair(scenario.query_inputs, scenario.query_targets)
    run = project_run(model, scenario.task(), trajectory, data, scenario.attributed.label, queries, DIM, SEED, progress=False)
    return Fixture(scenario, model, trajectory, data, queries, run)


@pytest.fixture(scope="module")
def one_stage() -> Fixture:
    return _fixture(_shrink(scenarios.digits(num_train=50, num_queries=4)))


@pytest.fixture(scope="module")
def adamw() -> Fixture:
    return _fixture(_shrink(scenarios.digits_adamw(num_train=50, num_queries=4)))


@pytest.fixture(scope="module")
def two_stage() -> Fixture:
    return _fixture(_shrink(scenarios.digits_two_stage(num_stage1=40, num_stage2=20, num_queries=4)))


def _projection_matrix(num_params: int, dim: int = DIM) -> torch.Tensor:
    """(p, k) float64 explicit projection: row i is the projection of the i-th unit vector."""
    return project(torch.eye(num_params), ProjectionConfig(dim=dim, seed=SEED, backend="cpu")).double()


def _oracle_gradients(model: torch.nn.Module, state: dict, fn, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, p) float64 gradients of fn(outputs (1, C), target (1,))[0], one example at a time."""
    model.load_state_dict(state)
    rows = []
    for i in range(len(targets)):
        value = fn(model(inputs[i : i + 1]), targets[i : i + 1])[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(model.parameters()))]))
    return torch.stack(rows).double()


def _assert_scores_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    np.testing.assert_allclose(got.numpy(), expected.detach().double().numpy(), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"query_mode": "segment"},
        {"curvature": "sampled", "num_segments": 2, "momentum_factor": False},
        {"proj_dim": 12, "num_segments": 1, "time_scale": 3.0},
    ],
)
def test_source_on_a_cached_run_equals_the_attributor(one_stage: Fixture, settings: dict) -> None:
    config = SourceConfig(**{"proj_dim": DIM, "seed": SEED, "progress": False, **settings})
    attributor = SourceAttributor(one_stage.model, "classification", one_stage.trajectory, config)
    expected = attributor.fit(one_stage.data[0]).score(one_stage.queries)
    _assert_scores_close(source_scores(one_stage.run, config), expected)


@pytest.mark.parametrize("settings", [{}, {"query_mode": "final", "time_scale": 0.3}])
def test_source_on_a_cached_adamw_run_equals_the_preconditioned_attributor(adamw: Fixture, settings: dict) -> None:
    config = SourceConfig(**{"proj_dim": DIM, "seed": SEED, "progress": False, **settings})
    attributor = SourceAttributor(adamw.model, "classification", adamw.trajectory, config)
    expected = attributor.fit(adamw.data[0]).score(adamw.queries)
    _assert_scores_close(source_scores(adamw.run, config), expected)


def test_tracin_on_an_adamw_run_uses_each_checkpoints_preconditioner(adamw: Fixture) -> None:
    # -sum_c (eta-sum_c / N) g_q(c)^T P^T P D_c g_m(c), D_c from the state torch's AdamW saved.
    f = adamw
    task, (_, beta2), eps = f.scenario.task(), f.trajectory.betas, f.trajectory.eps
    proj = _projection_matrix(sum(p.numel() for p in f.model.parameters()))
    expected = torch.zeros(4, f.scenario.num_train, dtype=torch.float64)
    for ckpt in f.trajectory.checkpoints:
        state = ckpt.optimizer_state["state"]
        d = torch.cat([
            1 / ((state[i]["exp_avg_sq"].double() / (1 - beta2 ** float(state[i]["step"]))).sqrt() + eps).reshape(-1)
            for i in sorted(state)
        ])
        train = _oracle_gradients(f.model, ckpt.state, task.loss, *f.data[0]) * d.sqrt() @ proj
        query = _oracle_gradients(f.model, ckpt.state, task.measurement, *f.queries) * d.sqrt() @ proj
        expected -= ckpt.lr_sum() / f.scenario.num_train * query @ train.T
    _assert_scores_close(tracin_scores(f.run), expected)


@pytest.mark.parametrize("query_mode", ["final", "segment"])
def test_source_attributes_stage_one_of_two_like_the_attributor(two_stage: Fixture, query_mode: str) -> None:
    config = SourceConfig(proj_dim=DIM, seed=SEED, progress=False, query_mode=query_mode, keep_segment_features=True)
    attributor = SourceAttributor(two_stage.model, "classification", two_stage.trajectory, config)
    attributor.fit(two_stage.data[0], stages=[0], curvature_data=two_stage.data)
    _assert_scores_close(source_scores(two_stage.run, config), attributor.score(two_stage.queries, stage=0))


def test_source_rejects_a_config_the_run_cannot_serve(one_stage: Fixture) -> None:
    with pytest.raises(ValueError, match="seed"):
        source_scores(one_stage.run, SourceConfig(proj_dim=DIM, seed=SEED + 1))
    with pytest.raises(ValueError, match="truncate"):
        source_scores(one_stage.run, SourceConfig(proj_dim=DIM + 1, seed=SEED))


def test_truncated_run_equals_projecting_to_fewer_dimensions(one_stage: Fixture) -> None:
    f = one_stage
    small = project_run(f.model, f.scenario.task(), f.trajectory, f.data, 0, f.queries, 10, SEED, ("exact",), progress=False)
    cut = f.run.truncate(10)
    torch.testing.assert_close(cut.train_grads, small.train_grads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cut.query_grads, small.query_grads, rtol=1e-4, atol=1e-6)
    # float32 rows: entries near 0 carry round-off of the largest ones
    scale = small.hessians["exact"].abs().max().item()
    torch.testing.assert_close(cut.hessians["exact"], small.hessians["exact"], rtol=1e-4, atol=1e-6 * scale)
    torch.testing.assert_close(cut.final_output_grads, small.final_output_grads, rtol=1e-4, atol=1e-6)


def test_tracin_matches_the_checkpoint_sum_of_lr_weighted_gradient_products(two_stage: Fixture) -> None:
    f = two_stage
    task = f.scenario.task()
    proj = _projection_matrix(sum(p.numel() for p in f.model.parameters()))
    expected = torch.zeros(4, f.scenario.num_train, dtype=torch.float64)
    for ckpt in f.trajectory.checkpoints:
        if ckpt.stage != 0:  # stage-1 rows were only trained on in stage 0's steps
            continue
        train = _oracle_gradients(f.model, ckpt.state, task.loss, *f.data[0]) @ proj
        query = _oracle_gradients(f.model, ckpt.state, task.measurement, *f.queries) @ proj
        expected -= ckpt.lr_sum() / f.scenario.num_train * query @ train.T
    _assert_scores_close(tracin_scores(f.run), expected)


def test_influence_matches_the_damped_inverse_gauss_newton_formula(two_stage: Fixture) -> None:
    f = two_stage
    task = f.scenario.task()
    state = f.trajectory.checkpoints[-1].state
    f.model.load_state_dict(state)
    proj = _projection_matrix(sum(p.numel() for p in f.model.parameters()))
    inputs = torch.cat([f.data[0][0], f.data[1][0]])
    params = dict(f.model.named_parameters())
    gn = 0.0
    for x in inputs:  # J^T (diag p - p p^T) J per row, J by autograd
        jac = torch.autograd.functional.jacobian(
            lambda *ps: torch.func.functional_call(f.model, dict(zip(params, ps)), (x[None],))[0], tuple(params.values())
        )
        jac = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1).double()
        prob = torch.softmax(f.model(x[None])[0].double(), dim=0)
        gn = gn + jac.T @ (torch.diag(prob) - torch.outer(prob, prob)) @ jac
    hessian = proj.T @ (gn / len(inputs)) @ proj + f.trajectory.weight_decay * torch.eye(DIM, dtype=torch.float64)
    damping = 0.01
    delta = damping * torch.linalg.eigvalsh(hessian).clamp_min(0).mean()
    train = _oracle_gradients(f.model, state, task.loss, *f.data[0]) @ proj
    query = _oracle_gradients(f.model, state, task.measurement, *f.queries) @ proj
    expected = -query @ torch.linalg.solve(hessian + delta * torch.eye(DIM, dtype=torch.float64), train.T) / len(inputs)
    _assert_scores_close(influence_scores(f.run, damping=damping), expected)


def test_trak_matches_margin_features_with_out_to_loss_weights(one_stage: Fixture) -> None:
    f = one_stage
    task = f.scenario.task()
    state = f.trajectory.checkpoints[-1].state
    proj = _projection_matrix(sum(p.numel() for p in f.model.parameters()))
    phi = _oracle_gradients(f.model, state, task.measurement, *f.data[0]) @ proj  # margin gradients
    phi_q = _oracle_gradients(f.model, state, task.measurement, *f.queries) @ proj
    with torch.no_grad():
        f.model.load_state_dict(state)
        probs = torch.softmax(f.model(f.data[0][0]).double(), dim=1)
    p_true = probs[torch.arange(len(probs)), f.data[0][1]]
    expected = phi_q @ torch.linalg.inv(phi.T @ phi) @ phi.T * (1.0 - p_true)[None, :]
    _assert_scores_close(trak_scores(f.run), expected)


def test_representation_similarity_is_the_cosine_of_hidden_activations(one_stage: Fixture) -> None:
    f = one_stage
    state = f.trajectory.checkpoints[-1].state
    hidden = lambda x: torch.relu(x @ state["0.weight"].T + state["0.bias"])  # noqa: E731
    expected = cosine_similarity(hidden(f.queries[0]).numpy(), hidden(f.data[0][0]).numpy())
    got = representation_similarity(
        penultimate_features(f.model, state, f.queries[0]), penultimate_features(f.model, state, f.data[0][0])
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_ensemble_is_the_mean_and_checks_shapes() -> None:
    a, b = np.arange(6.0).reshape(2, 3), torch.ones(2, 3)
    np.testing.assert_array_equal(ensemble([a, b]), (a + 1.0) / 2.0)
    with pytest.raises(ValueError, match="shapes"):
        ensemble([a, np.ones((3, 2))])
    with pytest.raises(ValueError, match="no score"):
        ensemble([])


@pytest.fixture(scope="module")
def self_run(one_stage: Fixture) -> object:
    """The one-stage run with the training rows as queries measured by their own loss: minus
    the diagonal of any estimator's scores is then its self-influence."""
    f = one_stage
    task = dataclasses.replace(ClassificationTask(), measurement=ClassificationTask().loss)
    return project_run(f.model, task, f.trajectory, f.data, 0, f.data[0], DIM, SEED, progress=False)


@pytest.mark.parametrize("query_mode", ["final", "segment"])
def test_source_self_influence_is_the_attributors_and_minus_the_own_loss_score(
    one_stage: Fixture, self_run: object, query_mode: str
) -> None:
    config = SourceConfig(proj_dim=DIM, seed=SEED, progress=False, query_mode=query_mode)
    attributor = SourceAttributor(one_stage.model, "classification", one_stage.trajectory, config).fit(one_stage.data[0])
    got = source_self_influence(one_stage.run, config)
    _assert_scores_close(got[None], attributor.self_influence()[None])
    _assert_scores_close(got[None], -torch.diagonal(source_scores(self_run, config))[None])


def test_tracin_and_influence_self_influence_are_minus_their_own_loss_scores(one_stage: Fixture, self_run: object) -> None:
    _assert_scores_close(tracin_self_influence(one_stage.run)[None], -torch.diagonal(tracin_scores(self_run))[None])
    for damping in (1e-3, 1.0):
        expected = -torch.diagonal(influence_scores(self_run, damping))
        _assert_scores_close(influence_self_influence(one_stage.run, damping)[None], expected[None])
    assert torch.all(tracin_self_influence(one_stage.run) > 0)
