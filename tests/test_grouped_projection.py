"""The grouped projection (``proj_structure="grouped"``) against independent oracles: the dense
matrix of ``kernels.reference`` restricted to each group, per-example gradients taken one row at
a time with plain autograd, hand-computed shares, and the matrix functions of the block-restricted
Hessian."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from tiny_models import small_attributor, small_run

from source_proj.attributor import SourceAttributor
from source_proj.config import SourceConfig
from source_proj.errors import InputError
from source_proj.evaluation import scenarios
from source_proj.evaluation.baselines import source_scores
from source_proj.evaluation.projected_run import project_run
from source_proj.gradients.per_example import NonFiniteError
from source_proj.kernels.reference import matrix_block
from source_proj.projection.grouped import GroupedProjection, energy_shares, squared_norms
from source_proj.projection.jl import ProjectionConfig, project
from source_proj.projection.layer_names import layer_key, layer_members
from source_proj.store_fit import fit_store, open_store

SIZES = {"a": 7, "b": 5, "c": 9}  # three parameters, in the dense layout's order


def _gradients(batch: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(batch, size, generator=generator) for name, size in SIZES.items()}


def test_grouped_projection_is_the_dense_matrix_restricted_to_each_group() -> None:
    # Group 0 holds parameters a and c, whose rows are not contiguous: two products, one sum.
    config = ProjectionConfig(dim=6, seed=11, backend="cpu")
    projection = GroupedProjection(config, (("a", "c"), ("b",)), (16, 5), shares=(4, 2))
    grads = _gradients()
    got = projection.project(grads)
    # Oracle: R's rows of each parameter (global offsets 0, 7, 12), the group's first k_g columns / sqrt(k_g).
    offsets = {"a": 0, "b": 7, "c": 12}
    expected = torch.zeros(3, 6, dtype=torch.float64)
    for (members, share), start in zip(((("a", "c"), 4), (("b",), 2)), (0, 4)):
        for name in members:
            block = matrix_block(11, offsets[name], offsets[name] + SIZES[name], share).double() / math.sqrt(share)
            expected[:, start : start + share] += grads[name].double() @ block
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert projection.layer_groups().tolist() == [0, 0, 0, 0, 1, 1]


def test_one_group_is_the_dense_projection_bit_for_bit() -> None:
    config = ProjectionConfig(dim=8, seed=3, backend="cpu")
    grads = _gradients()
    grouped = GroupedProjection(config, (tuple(SIZES),), (sum(SIZES.values()),), shares=(8,))
    assert torch.equal(grouped.project(grads), project(grads, config))


def test_energy_shares_by_hand() -> None:
    # Proportional to energy 3 : 1 : 0 of 20 is 15 : 5 : 0; group 0 is capped at its 10
    # parameters and group 2 given its one coordinate, so group 1 takes the remaining 9.
    assert energy_shares([10, 1000, 1000], [3.0, 1.0, 0.0], 20) == (10, 9, 1)
    # Rounding leaves 2 (floors of 20 / 3 are 6 each): one to the largest energy, one to the next.
    assert energy_shares([100, 100, 100], [1.0, 1.0 + 1e-9, 1.0], 20) == (7, 7, 6)
    # Fewer parameters than k: every group whole, the total p.
    assert energy_shares([2, 3], [1.0, 5.0], 10) == (2, 3)
    with pytest.raises(InputError, match="below the number of projected blocks"):
        energy_shares([5, 5, 5], [1.0, 1.0, 1.0], 2)
    # Refused when the projection is made, before any fit: every layer needs a coordinate.
    with pytest.raises(InputError, match="proj_dim=2 is below the number of layers"):
        GroupedProjection(ProjectionConfig(dim=2), (("a",), ("b",), ("c",)), (7, 5, 9))


def test_layer_names() -> None:
    assert layer_key("transformer.h.0.mlp.c_fc.weight") == "transformer.h.0"
    assert layer_key("0.bias") == "0"
    assert layer_key("transformer.wte.weight") == "transformer.wte"
    assert layer_key("scale") == "scale"
    assert layer_members(["0.weight", "head.weight", "0.bias", "head.bias"]) == (("0.weight", "0.bias"),
                                                                              ("head.weight", "head.bias"))


def test_squared_norms_rescale_then_sum_over_rows() -> None:
    grads = _gradients()
    scale = {name: torch.linspace(0.5, 2.0, size) for name, size in SIZES.items()}
    got = squared_norms(grads, (("a", "c"), ("b",)), scale)
    expected = [sum(float((grads[n].double() * scale[n].double()).pow(2).sum()) for n in group) for group in (("a", "c"), ("b",))]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def run():
    return small_run()


def _attributor(run, **settings) -> SourceAttributor:
    return small_attributor(run, proj_structure="grouped", **settings)


def test_measured_shares_follow_the_layers_gradient_rms(run) -> None:
    model, traj, (x, y) = run
    attributor = _attributor(run)
    with pytest.raises(InputError, match="measure_projection"):
        attributor.query_features((x[:2], y[:2]))
    attributor.measure_projection((x, y))
    # Oracle: every row's loss gradient at the final checkpoint, one row at a time with autograd.
    model.load_state_dict(traj.checkpoints[-1].load())
    groups = (("0.weight", "0.bias"), ("2.weight", "2.bias"))
    assert attributor.projection.groups == groups
    named = dict(model.named_parameters())
    totals = np.zeros(2)
    for i in range(len(y)):  # 24 rows: every row is measured (fewer than ENERGY_ROWS)
        loss = torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [named[n] for group in groups for n in group])
        flat = dict(zip([n for group in groups for n in group], grads))
        totals += [sum(float(flat[n].double().pow(2).sum()) for n in group) for group in groups]
    rms = np.sqrt(totals / len(y))
    assert attributor.projection.shares == energy_shares([6 * 8 + 8, 8 * 3 + 3], list(rms), 24)
    assert attributor.projection.shares[0] != attributor.projection.shares[1]  # not an even split by chance


def test_grouped_segment_curvature_is_block_diagonal_over_the_groups(run) -> None:
    assert _attributor(run).curvature_groups is None  # an MLP keeps the whole Hessian by default
    attributor = _attributor(run, curvature_blocks="layer").fit(run[2])
    groups = attributor.curvature_groups
    assert groups is not None and groups.tolist() == attributor.projection.layer_groups().tolist()
    segment = attributor.segments[0]
    hessian = torch.stack([attributor.checkpoint_hessian(c, run[2]) for c in segment.checkpoints]).mean(0)
    keep = groups[:, None] == groups[None, :]
    h = torch.where(keep, 0.5 * (hessian + hessian.T), torch.zeros((), dtype=torch.float64))
    h = h + attributor.preconditioner.decays[0] * torch.eye(groups.numel(), dtype=torch.float64)
    torch.testing.assert_close(attributor.spectra[0].exp(), torch.linalg.matrix_exp(-segment.time * h), rtol=0, atol=1e-10)


def test_a_store_records_the_shares_and_queries_reuse_them(run, tmp_path) -> None:
    _, _, (x, y) = run
    fitted = _attributor(run).fit((x, y))
    path = tmp_path / "grouped.zarr"
    store, _ = fit_store(_attributor(run), (x, y), path, chunk_rows=8)
    recorded = store.metadata["projection"]
    assert recorded["structure"] == "grouped"
    assert [share for _, share in recorded["groups"]] == list(fitted.projection.shares)
    # A fresh attributor (no training rows) queries the store with the recorded shares.
    reopened = _attributor(run)
    reopened.features = open_store(reopened, path)
    assert reopened.projection.shares == fitted.projection.shares
    torch.testing.assert_close(torch.as_tensor(reopened.score((x[:4], y[:4]))),
                               torch.as_tensor(fitted.score((x[:4], y[:4]))), rtol=1e-5, atol=1e-6)


def test_baselines_project_a_grouped_run_like_the_attributor() -> None:
    scenario = scenarios.digits_adamw(num_train=30, num_queries=3)
    stages = tuple(dataclasses.replace(s, settings=dataclasses.replace(s.settings, epochs=6)) for s in scenario.stages)
    scenario = dataclasses.replace(scenario, stages=stages, hidden=6)
    model, trajectory = scenarios.train_run(scenario, np.arange(scenario.num_train), seed=1)
    data = {s.label: (torch.from_numpy(s.inputs), torch.from_numpy(s.targets)) for s in scenario.stages}
    queries = (torch.from_numpy(scenario.query_inputs), torch.from_numpy(scenario.query_targets))
    run = project_run(model, scenario.task(), trajectory, data, scenario.attributed.label, queries, 32, 5,
                      curvature_modes=("exact",), progress=False, structure="grouped")
    assert run.structure == "grouped" and run.layer_groups is not None
    config = SourceConfig(proj_dim=32, seed=5, progress=False, proj_structure="grouped")
    expected = SourceAttributor(model, "classification", trajectory, config).fit(data[0]).score(queries)
    got = source_scores(run, config)
    scale = float(torch.as_tensor(expected).abs().max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-5 * scale)


def test_non_finite_gradients_are_named_before_any_share_is_set(run) -> None:
    _, _, (x, y) = run
    bad = x.clone()
    bad[5, 0] = float("nan")
    attributor = _attributor(run)
    with pytest.raises(NonFiniteError, match=r"first bad rows \[5\] of the data"):
        attributor.measure_projection((bad, y))
    assert not attributor.projection.measured
