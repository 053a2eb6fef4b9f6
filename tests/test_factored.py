"""The factored (Kronecker) projection: gradients, curvature rows and scores against the
explicit Kronecker matrix applied to gradients formed by autograd, its layout, its budget,
its statistics, and its agreement with the dense projection."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from factored_helpers import explicit_matrix, side_matrix
from test_projection import oracle_entry
from tiny_models import blobs, dense_source_scores, flat_grad, trained_classifier
from torch import nn

from source_proj.attributor import SourceAttributor
from source_proj.gradients.data import as_examples
from source_proj.gradients.model import ModelFunction
from source_proj.gradients.per_example import factor_objective, per_example_gradients
from source_proj.gradients.tasks import ClassificationTask
from source_proj.projection.jl import ProjectionConfig, project
from source_proj.projection.kronecker import (
    factor_matrix,
    plan_budget,
    rank_one_variance,
    share_budget,
    split_kronecker,
)
from source_proj.projection.projected import (
    make_projection,
    projected_gn_factors,
    projected_gradients,
)
from source_proj.trajectory.checkpoints import Checkpoint, Trajectory


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def numels(model: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters()}


# ------------------------------------------------------------------ small MLP
@pytest.mark.parametrize("terms", [1, 3])
def test_mlp_projected_gradients_equal_kronecker_matrix_times_formed_gradients(terms):
    model, traj, (x, y) = trained_classifier(dims=(12, 16, 9), n=12)
    fn = ModelFunction.build(model)
    projection = make_projection(ProjectionConfig(60, seed=3), "factored", fn, terms)
    plan = projection.plan
    assert [b.name for b in plan.blocks] == ["0.weight", "2.weight"] and plan.rest == ("0.bias", "2.bias")
    assert any(b.k_rows < b.rows and b.k_cols < b.cols and b.terms == terms for b in plan.blocks)
    matrix = explicit_matrix(projection, numels(model))
    task = ClassificationTask()
    states = [c.load() for c in traj.checkpoints[-2:]]
    loaded = [(*fn.split_state(s, torch.device("cpu")), f"checkpoint {i}", None) for i, s in enumerate(states)]
    got = projected_gradients(fn, loaded, task.loss, x, y, projection)
    formed = torch.stack([
        sum(flat_grad(model, s, lambda m, i=i: task.loss(m(x[i : i + 1]), y[i : i + 1])[0]) for s in states)
        for i in range(len(y))
    ])
    want = formed @ matrix.T
    assert got.shape == (len(y), plan.dim) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5


def test_loop_fallback_hooks_equal_kronecker_matrix_times_formed_gradients_and_factor_rows():
    """The hooks outside ``vmap`` (the one-example-at-a-time fallback of models that cannot run
    under it), for gradients and for exact Gauss-Newton factor rows (several columns per
    example), against the explicit matrix applied to autograd's gradients."""
    model, traj, (x, y) = trained_classifier(dims=(5, 7, 3), n=6)
    fn = ModelFunction.build(model)
    fn.runtime["loop"] = True
    projection = make_projection(ProjectionConfig(24, seed=2), "factored", fn, 2)
    matrix = explicit_matrix(projection, numels(model))
    task = ClassificationTask()
    state = traj.checkpoints[-1].load()
    params, consts = fn.split_state(state, torch.device("cpu"))
    got = projected_gradients(fn, [(params, consts, "last", None)], task.loss, x, y, projection)
    formed = torch.stack([flat_grad(model, state, lambda m, i=i: task.loss(m(x[i : i + 1]), y[i : i + 1])[0])
                          for i in range(len(y))])
    assert rel_err(got, formed @ matrix.T) < 1e-5
    rows, _ = projected_gn_factors(fn, params, consts, task, x, y, projection, "exact", torch.Generator(), "last")
    factor = task.hessian_factor(fn.forward(params, consts, x), y)
    dense_rows = per_example_gradients(fn, params, consts, factor_objective, x, y, factor)
    formed_rows = torch.cat([dense_rows[n] for n in fn.names], dim=-1).double()
    assert rows.shape == (len(y), 3, projection.dim)
    assert rel_err(rows, formed_rows @ matrix.T) < 1e-5


def test_mlp_scores_equal_dense_formula_with_the_kronecker_matrix():
    """Gradients, Gauss-Newton factor rows and queries all go through the factored projection:
    the scores equal the formula of docs/math.md evaluated densely with P the explicit matrix."""
    model, traj, train = trained_classifier(dims=(4, 6, 3), n=24)
    queries = blobs(4, 4, 3, seed=9)
    att = SourceAttributor(model, "classification", traj, proj_dim=30, seed=5, proj_structure="factored",
                           num_segments=2, query_mode="final", chunk_size=7, progress=False,
                           curvature_blocks="full").fit(train)  # the formula's whole k x k Hessian
    matrix = explicit_matrix(att.projection, numels(model))
    dense = dense_source_scores(model, ClassificationTask(), traj, train, queries, matrix, 2, query_mode="final")
    assert np.abs(dense).max() > 1e-3
    assert rel_err(att.score(queries).numpy(), dense) < 2e-4


def test_weight_used_outside_its_module_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):  # inner.weight also used functionally: the hooks miss that use
            return self.head(torch.tanh(self.inner(x)) @ self.inner.weight)

    torch.manual_seed(0)
    model = Shared()
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    traj = Trajectory((Checkpoint(model.state_dict(), steps=3, lr=0.1),))
    att = SourceAttributor(model, "classification", traj, proj_dim=12, proj_structure="factored", num_segments=1,
                           progress=False)
    with pytest.raises(ValueError, match=r"'inner.weight'.*outside those modules"):
        att.fit((x, y))


def test_layers_without_factored_form_stay_dense():
    class Odd(nn.Linear):  # a subclass may compute anything: not tapped
        pass

    model = nn.Sequential(nn.Embedding(7, 4, max_norm=1.0), nn.Flatten(), Odd(8, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    fn = ModelFunction.build(model)
    plan = make_projection(ProjectionConfig(40), "factored", fn).plan
    assert [b.name for b in plan.blocks] == ["4.weight"]
    assert plan.rest == ("0.weight", "2.weight", "2.bias", "3.weight", "3.bias", "4.bias")


# ------------------------------------------------------------------ tiny GPT-2
def test_gpt2_gradients_and_factor_rows_equal_kronecker_matrix_times_formed_gradients():
    pytest.importorskip("transformers")
    from lm_helpers import (
        _grad,
        _logits,
        _with_state,
        as_columns,
        oracle_token_loss,
        random_rows,
        tiny_gpt2,
    )

    from source_proj.gradients.causal_lm import CausalLMTask

    model = tiny_gpt2(vocab=9, width=8, positions=12)
    rows = random_rows(5, 9, (3, 8), seed=4)  # varied lengths (padded per batch), some -100 labels
    fn = ModelFunction.build(model)
    projection = make_projection(ProjectionConfig(150, seed=1), "factored", fn)
    names = [b.name for b in projection.plan.blocks]
    # Conv1D layers, the tied embedding / LM head (one tensor, two modules) and positions.
    assert "transformer.wte.weight" in names and "transformer.h.0.attn.c_attn.weight" in names
    assert "transformer.wpe.weight" in names and "transformer.h.0.ln_1.weight" in projection.plan.rest
    matrix = explicit_matrix(projection, numels(model))
    state = model.state_dict()
    params, consts = fn.split_state(fn.canonical_state(state, "state"), torch.device("cpu"))
    inputs, targets = as_examples(as_columns(rows)).rows(0, len(rows))
    task = CausalLMTask(reduction="mean")
    got = projected_gradients(fn, [(params, consts, "state", None)], task.loss, inputs, targets, projection)
    m = _with_state(model, state)
    formed = torch.stack([_grad(m, oracle_token_loss(_logits(m, r), r, "mean")) for r in rows])
    assert rel_err(got, formed @ matrix.T) < 1e-5
    # Gauss-Newton factor rows (one sampled column per sequence): P J^T a from formed J^T a.
    gen = torch.Generator().manual_seed(0)
    rows_f, signs = projected_gn_factors(fn, params, consts, task, inputs, targets, projection, "sampled", gen, "state")
    gen = torch.Generator().manual_seed(0)
    factor, _ = task.sampled_hessian_factor(fn.forward(params, consts, inputs), targets, gen)
    dense_rows = per_example_gradients(fn, params, consts, factor_objective, inputs, targets, factor)
    formed_rows = torch.cat([dense_rows[n] for n in fn.names], dim=-1).double()
    assert signs is None and rows_f.shape == (len(rows), 1, projection.dim)
    assert rel_err(rows_f, formed_rows @ matrix.T) < 1e-5


def test_gpt2_factored_features_are_padding_invariant():
    pytest.importorskip("transformers")
    from lm_helpers import padded_batch, random_rows, tiny_gpt2, train_lm

    model = tiny_gpt2()
    rows = random_rows(4, 10, (3, 7), seed=3)
    traj = train_lm(model, rows, epochs=2)
    features = []
    for extra in (0, 5):
        data = padded_batch(rows, extra)  # junk labels at padding: the mask hides them
        att = SourceAttributor(model, "causal_lm", traj, proj_dim=64, num_segments=2, proj_structure="factored",
                               progress=False).fit(data)
        features.append(att.train_features)
    assert features[0].abs().max() > 0
    torch.testing.assert_close(features[0], features[1], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ layout and budget
def test_factor_entries_follow_the_documented_layout():
    for kind in ("rademacher", "gaussian"):
        f = factor_matrix(11, kind, index=3, side=1, size=6, dim=5, terms=3)  # terms side by side
        for term in range(3):
            start = 2**62 + (7 * 256 + term) * 2**32
            for i, j in [(0, 0), (5, 4), (2, 3)]:
                want = oracle_entry(11, start + i, j, kind) / math.sqrt(5)
                assert f[i, 5 * term + j].item() == pytest.approx(want, rel=1e-5)
    assert factor_matrix(0, "rademacher", 0, 0, 4, 4) is None  # a whole side is the identity


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernel_generates_the_factor_rows():
    """The factors are rows 2^62 + ... of the dense matrix R: the Triton kernel (interpreted on
    the CPU) produces the same ones, so CPU and GPU share one layout."""
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    start = 2**62 + 5 * 2**40  # index 2, columns, term 0
    via_kernel = project(x, ProjectionConfig(16, seed=2, backend="triton"), row_offset=start)
    torch.testing.assert_close(via_kernel, x @ side_matrix(2, "rademacher", 2, 1, 20, 16).float(), rtol=1e-5, atol=1e-6)


def test_budget_is_shared_by_size_capped_and_split_for_the_least_rank_one_variance():
    assert share_budget([100, 300, 600], 100) == [10, 30, 60]
    assert share_budget([5, 300, 600], 95) == [1, 31, 62]  # at least one each, the rest re-shared
    assert share_budget([3, 4, 5], 20) == [3, 4, 5]  # capped at their sizes
    assert share_budget([1, 10**6], 5) == [1, 4]
    with pytest.raises(ValueError, match="below the number of projected blocks"):
        share_budget([10, 10, 10], 2)
    # (k_r, k_c) minimises (1 + 2/k_r)(1 + 2/k_c) - 1 with whole sides free: by brute force.
    for target, rows, cols in [(64, 100, 100), (130, 10, 64), (50, 3, 1000), (7, 50, 50)]:
        k_r, k_c, _ = split_kronecker(target, rows, cols)
        best = min(
            rank_one_variance(a, min(cols, target // a), rows, cols)
            for a in range(1, min(rows, target) + 1)
        )
        assert k_r * k_c <= target and rank_one_variance(k_r, k_c, rows, cols) == pytest.approx(best)
    assert split_kronecker(64, 100, 100) == (8, 8, 1)
    assert split_kronecker(130, 10, 64) == (10, 13, 1)  # the 10 rows kept whole (2/13)...
    assert split_kronecker(130, 10, 64, terms=4) == (9, 14, 4)  # ... unless 4 terms do better (0.11)
    assert split_kronecker(870, 32, 64, terms=1) == (32, 27, 1)  # 2/27 beats 29 x 30's 0.14
    assert split_kronecker(870, 32, 64, terms=4) == (29, 30, 4)  # ... but not 29 x 30 with 4 terms (0.037)
    plan = plan_budget({"a": (40, 50), "b": (10, 10)}, {"bias": 20}, 500)  # shares 471, 23, 4
    assert [(b.k_rows, b.k_cols) for b in plan.blocks] == [(40, 11), (2, 10)]  # 40 rows whole: 2/11 < 2/21 + 2/22
    assert plan.rest_dim == 20 and plan.dim == 480  # rounding's leftover to the dense block, up to its size
    assert plan_budget({"a": (40, 50)}, {"bias": 200}, 500).dim == 500


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize("terms", [1, 4])
def test_kronecker_projection_is_isotropic_and_its_rank_one_error_is_as_stated(terms):
    """E[P^T P] = I; |P g|^2 / |g|^2 for rank-one g has the relative variance of
    ``rank_one_variance`` ((1 + 2/k_r)(1 + 2/k_c) - 1 for one term, Gaussian factors), far above
    i.i.d.'s 2/(k_r k_c) for one term, and is closer to i.i.d. for a gradient of full rank.
    Draws: disjoint column stripes of the factor rows of R (i.i.d. entries, as over seeds, but
    one generator call)."""
    rows, cols, k_r, k_c, draws = 5, 4, 2, 3, 20000

    def factors(side: int, size: int, dim: int) -> torch.Tensor:  # (draws, terms, size, dim), variance 1/dim
        f = side_matrix(0, "gaussian", 0, side, size, dim * terms * draws) * math.sqrt(terms * draws)
        return f.reshape(size, draws, terms, dim).permute(1, 2, 0, 3)

    a, b = factors(0, rows, k_r), factors(1, cols, k_c)
    ptp = torch.zeros(draws, rows * cols, rows * cols, dtype=torch.float64)
    p = sum(torch.einsum("nir,njc->nrcij", a[:, s], b[:, s]) for s in range(terms)) / math.sqrt(terms)
    p = p.reshape(draws, k_r * k_c, rows * cols)  # P per draw, acting on row-major vec(G)
    ptp = p.transpose(1, 2) @ p
    z = (ptp.mean(0) - torch.eye(rows * cols, dtype=torch.float64)).abs() / (ptp.std(0) / math.sqrt(draws))
    assert z.max() < 5  # every entry of the mean within 5 standard errors of I (400 entries)
    gen = torch.Generator().manual_seed(1)
    rank_one = torch.outer(torch.randn(rows, generator=gen, dtype=torch.float64),
                           torch.randn(cols, generator=gen, dtype=torch.float64)).reshape(-1)
    full = torch.randn(rows * cols, generator=gen, dtype=torch.float64)
    ratio = {label: (p @ g).square().sum(1) / g.square().sum() for label, g in (("one", rank_one), ("full", full))}
    assert float(ratio["one"].mean()) == pytest.approx(1.0, abs=0.05)
    assert float(ratio["full"].mean()) == pytest.approx(1.0, abs=0.05)
    expected = rank_one_variance(k_r, k_c, rows, cols, terms)  # 2.33 with one term, 0.83 with four
    assert float(ratio["one"].var()) == pytest.approx(expected, rel=0.1)
    if terms == 1:
        assert expected > 5 * 2 / (k_r * k_c)  # i.i.d. Gaussian: 2/6
        assert float(ratio["full"].var()) < 0.7 * float(ratio["one"].var())


# ------------------------------------------------------------------ against dense
def _digits_mlp_scores(width: int, k: int, runs: tuple[tuple[str, int], ...]) -> dict[tuple[str, int], np.ndarray]:
    """Scores (10 queries x 200 rows, flattened) of a 64-``width``-10 digits MLP trained with
    SGD, exact curvature, one segment, for each (structure, seed) of ``runs`` at total k; the
    whole k x k Hessian for both structures, so that only the projections differ."""
    from sklearn.datasets import load_digits

    from source_proj.evaluation.training import TrainSettings, train_sgd

    data = load_digits()
    x = torch.tensor((data.data - data.data.mean(0)) / np.where(data.data.std(0) > 0, data.data.std(0), 1),
                     dtype=torch.float32)
    y = torch.tensor(data.target)
    train, queries = (x[:200], y[:200]), (x[1000:1010], y[1000:1010])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))
    settings = TrainSettings(epochs=4, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-3, checkpoints_per_epoch=1)
    traj = settings.trajectory(train_sgd(model, ClassificationTask(), *train, settings))
    scores = {}
    for structure, seed in runs:
        att = SourceAttributor(model, "classification", traj, proj_dim=k, proj_structure=structure, seed=seed,
                               num_segments=1, chunk_size=200, curvature="exact", curvature_blocks="full",
                               progress=False).fit(train)
        assert 0.99 * k <= att.proj_dim <= k  # factored: k unless whole blocks leave some over
        scores[structure, seed] = att.score(queries).numpy().reshape(-1)
    return scores


def test_factored_and_dense_scores_agree_on_the_digits_mlp():
    """Equal total k = 1024 on the digits MLP (64-32-10, 2,410 parameters): the factored scores
    correlate with the dense ones nearly as well as dense scores of another seed do. (At this
    k the projection noise bounds any two projections' agreement, so the issue's 0.95 is out
    of reach for either structure; measured with exact curvature: 0.87 between dense seeds,
    0.84-0.86 factored (4 terms) vs dense; see README and the slow test below.)"""
    scores = _digits_mlp_scores(32, 1024, (("dense", 0), ("dense", 1), ("factored", 0)))
    between_seeds = np.corrcoef(scores["dense", 0], scores["dense", 1])[0, 1]
    factored = np.corrcoef(scores["dense", 0], scores["factored", 0])[0, 1]
    assert factored >= 0.8 and factored >= between_seeds - 0.06, (factored, between_seeds)


@pytest.mark.slow
def test_factored_and_dense_scores_correlate_at_095_where_the_projection_noise_allows():
    """The issue's criterion, correlation >= 0.95 at equal total k, on a digits MLP (64-128-10,
    9,610 parameters) at k = 8192, where dense scores of two seeds correlate at 0.977 (measured:
    factored vs dense 0.965-0.968; the factored total is 8158, whole blocks leaving 34 over).
    The first weight (128 x 64) is factored, not kept whole."""
    scores = _digits_mlp_scores(128, 8192, (("dense", 0), ("factored", 0)))
    assert np.corrcoef(scores["dense", 0], scores["factored", 0])[0, 1] >= 0.95


# ------------------------------------------------------------------ feature store and benchmark runs
def test_store_records_the_factored_sizes_and_refuses_the_other_structure(tmp_path):
    from source_proj.features.errors import StoreMismatchError
    from source_proj.store_fit import fit_store, open_store

    model, traj, train = trained_classifier(dims=(6, 8, 3), n=20)

    def attributor(**settings):
        return SourceAttributor(model, "classification", traj, proj_dim=30, num_segments=2, chunk_size=8,
                                progress=False, **settings)

    factored = attributor(proj_structure="factored")
    store, _ = fit_store(factored, train, tmp_path / "f.zarr", chunk_rows=8)
    recorded = store.metadata["projection"]
    assert recorded["structure"] == "factored" and recorded["dim"] == factored.proj_dim
    assert recorded["blocks"] == [[b.name, b.rows, b.cols, b.k_rows, b.k_cols, b.terms] for b in factored.projection.plan.blocks]
    np.testing.assert_allclose(store.read_rows(0, 20), attributor(proj_structure="factored").fit(train).train_features,
                               rtol=1e-5, atol=1e-8)
    fit_store(attributor(), train, tmp_path / "d.zarr", chunk_rows=8)
    for path, other in (("f.zarr", attributor()), ("d.zarr", attributor(proj_structure="factored")),
                        ("f.zarr", attributor(proj_structure="factored", kronecker_terms=2))):
        with pytest.raises(StoreMismatchError, match="projection"):
            open_store(other, tmp_path / path)
        with pytest.raises(StoreMismatchError, match="projection"):
            fit_store(other, train, tmp_path / path, chunk_rows=8)


def test_projected_run_with_factored_projection_scores_like_the_attributor():
    from source_proj.config import SourceConfig
    from source_proj.evaluation.baselines import source_scores
    from source_proj.evaluation.projected_run import project_run

    model, traj, train = trained_classifier(dims=(6, 8, 3), n=20)
    queries = blobs(4, 6, 3, seed=2)
    run = project_run(model, ClassificationTask(), traj, {0: train}, 0, queries, 30, seed=1, progress=False,
                      curvature_modes=("exact",), structure="factored", kronecker_terms=2)
    config = SourceConfig(proj_dim=30, seed=1, proj_structure="factored", kronecker_terms=2, progress=False)
    att = SourceAttributor(model, "classification", traj, config).fit(train)
    np.testing.assert_allclose(source_scores(run, config).numpy(), att.score(queries).numpy(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="does not nest"):
        run.truncate(10)
    with pytest.raises(ValueError, match="cannot be scored"):
        source_scores(run, SourceConfig(proj_dim=20, seed=1, proj_structure="factored", kronecker_terms=2))


def test_rank_one_fit_of_a_preconditioner_is_a_weighted_least_squares_optimum():
    from source_proj.projection.kronecker import rank_one_fit

    gen = torch.Generator().manual_seed(0)
    a0, b0 = torch.rand(8, generator=gen, dtype=torch.float64) + 0.5, torch.rand(6, generator=gen, dtype=torch.float64) + 0.5
    a, b = rank_one_fit(torch.outer(a0, b0), torch.rand(8, 6, generator=gen, dtype=torch.float64))
    torch.testing.assert_close(torch.outer(a, b), torch.outer(a0, b0))  # rank one: exact
    s = torch.outer(a0, b0) * torch.exp(0.3 * torch.randn(8, 6, generator=gen, dtype=torch.float64))
    w = torch.rand(8, 6, generator=gen, dtype=torch.float64)
    w[2] = 0.0  # a row without gradient energy: no say, and a finite positive value
    a, b = rank_one_fit(s, w, iterations=200)
    objective = lambda a, b: float((w * (s - torch.outer(a, b)).square()).sum())
    grad_a = -2 * ((w * (s - torch.outer(a, b))) @ b)
    grad_b = -2 * (a @ (w * (s - torch.outer(a, b))))
    assert grad_a.abs().max() < 1e-8 and grad_b.abs().max() < 1e-8  # stationary
    best = objective(a, b)
    for _ in range(50):
        da = 0.05 * torch.randn(8, generator=gen, dtype=torch.float64)
        db = 0.05 * torch.randn(6, generator=gen, dtype=torch.float64)
        assert objective(a + da, b + db) >= best
    assert bool(torch.isfinite(a).all() and (a > 0).all() and (b > 0).all())
    with pytest.raises(ValueError, match="positive"):
        rank_one_fit(-s, w)


# ------------------------------------------------------------------ Adam / AdamW
def test_adamw_rescaling_is_exact_on_dense_parameters_and_rank_one_on_factored_weights():
    """P (S' (x) g) with S' = D^{1/2} on biases and its fitted rank-one a b^T on factored
    weights (``FactoredProjection.fit_scale``), for training gradients and curvature rows."""
    from source_proj.evaluation.training import AdamWSettings, train_adamw
    from source_proj.projection.kronecker import rank_one_fit

    x, y = blobs(20, 12, 5, seed=0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
    settings = AdamWSettings(epochs=3, batch_size=5, lr=0.02, weight_decay=0.05, checkpoints_per_epoch=1)
    traj = settings.trajectory(train_adamw(model, ClassificationTask(), x, y, settings))
    att = SourceAttributor(model, "classification", traj, proj_dim=70, proj_structure="factored", kronecker_terms=2,
                           num_segments=1, progress=False)
    c = len(traj.checkpoints) - 1
    root = att.preconditioner.sqrt_scale(c)
    fitted = {}
    for name, p in model.named_parameters():
        d = root[name].double()
        if p.dim() == 2:
            a, b = rank_one_fit(d.reshape(p.shape), d.reshape(p.shape).pow(-4))
            fitted[name] = torch.outer(a, b).reshape(-1)
            assert rel_err(fitted[name], d) > 1e-4  # D^{1/2} is not rank one: the stand-in differs
        else:
            fitted[name] = d
    s_prime = torch.cat([fitted[n] for n, _ in model.named_parameters()])
    matrix = explicit_matrix(att.projection, numels(model))
    state = traj.checkpoints[c].load()
    task = ClassificationTask()
    formed = torch.stack([flat_grad(model, state, lambda m, i=i: task.loss(m(x[i : i + 1]), y[i : i + 1])[0])
                          for i in range(len(y))])
    got = att._projected_sum([c], task.loss, x, y)
    assert rel_err(got, (formed * s_prime) @ matrix.T) < 1e-5
    # Curvature rows take the same rescaling: the Hessian equals the explicit one.
    params, consts = att._load(c)
    rows, _ = projected_gn_factors(att.model_fn, params, consts, task, x, y, att.projection, "exact",
                                   torch.Generator(), "c", None, att.gradient_scale(c))
    fn = att.model_fn
    factor = task.hessian_factor(fn.forward(params, consts, x), y)
    dense_rows = per_example_gradients(fn, params, consts, factor_objective, x, y, factor)
    formed_rows = torch.cat([dense_rows[n] for n in fn.names], dim=-1).double() * s_prime
    assert rel_err(rows, formed_rows @ matrix.T) < 1e-5
