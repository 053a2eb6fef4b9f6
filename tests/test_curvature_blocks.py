"""Block-diagonal segment curvature over the factored projection's layers (curvature_blocks)."""

import pytest
import torch
from lm_helpers import tiny_gpt2
from tiny_models import small_attributor, small_run

from source_proj.config import SourceConfig
from source_proj.curvature.spectra import SegmentSpectrum, segment_spectrum, transport_operators
from source_proj.errors import InputError
from source_proj.features.errors import StoreMismatchError
from source_proj.gradients.model import ModelFunction
from source_proj.projection.jl import ProjectionConfig
from source_proj.projection.projected import has_embeddings, make_projection, resolve_structure
from source_proj.store_fit import fit_store, open_store


def _masked(matrix: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    return torch.where(groups[:, None] == groups[None, :], matrix, torch.zeros((), dtype=matrix.dtype))


def test_block_spectrum_equals_the_matrix_functions_of_the_block_restricted_hessian():
    gen = torch.Generator().manual_seed(0)
    k, t, decay = 12, 3.0, 0.05
    factors = [torch.randn(k, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    hessians = [f @ f.T for f in factors]  # rank-5 PSD, mixing every coordinate
    groups = torch.tensor([2, 2, 0, 0, 0, 1, 2, 1, 1, 0, 2, 2])  # interleaved, unequal blocks
    spectrum = segment_spectrum(hessians, decay, t, groups)
    # Oracle: the mean Hessian plus decay, restricted to the blocks, through matrix_exp and a solve.
    h = _masked((hessians[0] + hessians[1]) / 2, groups) + decay * torch.eye(k, dtype=torch.float64)
    exp = torch.linalg.matrix_exp(-t * h)
    torch.testing.assert_close(spectrum.exp(), exp, rtol=0, atol=1e-12)
    torch.testing.assert_close(spectrum.phi(), torch.linalg.solve(h, torch.eye(k, dtype=torch.float64) - exp),
                               rtol=0, atol=1e-12)
    # The eigenvectors never mix coordinates of different groups.
    assert torch.count_nonzero(spectrum.eigenvectors[groups[:, None] != groups[None, :]]) == 0


@pytest.mark.parametrize("carried", [(True,) * 4, (False,) * 4, (True, True, False, False)])
def test_blockwise_transport_operators_equal_the_whole_matrix_products(carried):
    gen = torch.Generator().manual_seed(1)
    k = 12
    groups = torch.tensor([2, 2, 0, 0, 0, 1, 2, 1, 1, 0, 2, 2])
    spectra = []
    for t in (0.5, 2.0, 1.0):
        factor = torch.randn(k, 6, generator=gen, dtype=torch.float64)
        spectra.append(segment_spectrum([factor @ factor.T], 0.01, t, groups))
    spectra.append(SegmentSpectrum(torch.zeros(k, dtype=torch.float64), torch.eye(k, dtype=torch.float64), 0.7))
    # Oracle: the products of the whole k x k matrices, S_L ... S_{l+1} phi_l (or phi_l alone).
    expected = []
    for l, spectrum in enumerate(spectra):
        op = spectrum.phi()
        for later in spectra[l + 1 :] if carried[l] else []:
            op = later.exp() @ op  # S_{l+1} first, S_L last
        expected.append(op)
    got = transport_operators(spectra, carried, groups)
    torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=1e-12)
    assert torch.count_nonzero(got[:, groups[:, None] != groups[None, :]]) == 0


def test_layer_groups_follow_numbered_layers_and_keep_other_weights_apart():
    model = tiny_gpt2(vocab=10, positions=16, width=8, layers=2)
    fn = ModelFunction.build(model.eval(), None, None)
    plan = make_projection(ProjectionConfig(dim=256, seed=0), "factored", fn, 4).plan
    groups = plan.layer_groups()
    assert groups.shape == (plan.dim,)
    spans, start = {}, 0
    for block in plan.blocks:
        spans[block.name] = groups[start:start + block.dim]
        start += block.dim
    rest = groups[start:]
    # By hand: the token and position embeddings are layers of their own; each block's four
    # Conv1D weights share the block's layer; biases and norms (the dense remainder) are one more.
    layer = {name: int(values[0]) for name, values in spans.items() if torch.all(values == values[0])}
    assert set(layer) == set(spans)
    h0 = {layer[n] for n in spans if n.startswith("transformer.h.0.")}
    h1 = {layer[n] for n in spans if n.startswith("transformer.h.1.")}
    assert len(h0) == 1 and len(h1) == 1 and h0 != h1
    assert len({layer["transformer.wte.weight"], layer["transformer.wpe.weight"], *h0, *h1}) == 4
    assert plan.rest_dim > 0 and torch.all(rest == rest[0]) and int(rest[0]) not in layer.values()


@pytest.fixture(scope="module")
def run():
    return small_run()


_attributor = small_attributor


def test_layer_blocks_are_block_diagonal_over_layers_and_dense_stays_full(run):
    # An MLP (no embedding tables) keeps the whole Hessian by default, factored or not.
    assert _attributor(run, proj_structure="factored").config.curvature_blocks == "full"
    factored = _attributor(run, proj_structure="factored", curvature_blocks="layer")
    factored.fit(run[2])
    # Oracle: the segment's Hessian from the public per-checkpoint function, restricted to the
    # layers' blocks by hand (MLP layers "0" and "2", then the biases), through matrix_exp.
    names = [b.name for b in factored.projection.plan.blocks]
    assert names == ["0.weight", "2.weight"]
    groups = factored.curvature_groups
    assert groups is not None and len(torch.unique(groups)) == 3
    segment = factored.segments[0]
    hessian = torch.stack([factored.checkpoint_hessian(c, run[2]) for c in segment.checkpoints]).mean(0)
    h = _masked(0.5 * (hessian + hessian.T), groups) + factored.preconditioner.decays[0] * torch.eye(groups.numel(),
                                                                                                 dtype=torch.float64)
    torch.testing.assert_close(factored.spectra[0].exp(), torch.linalg.matrix_exp(-segment.time * h), rtol=0, atol=1e-10)
    full = _attributor(run, proj_structure="factored").fit(run[2])
    assert not torch.allclose(full.train_features, factored.train_features, rtol=1e-3, atol=0)
    dense = _attributor(run, proj_structure="dense")
    assert dense.config.curvature_blocks == "full" and dense.curvature_groups is None
    # Dense stores keep recording no such setting, as every store before it existed.
    assert "curvature_blocks" not in dense.config.recorded_settings()


def test_layer_blocks_need_the_factored_projection(run):
    with pytest.raises(InputError, match="curvature_blocks='layer' needs proj_structure='factored'"):
        _attributor(run, proj_structure="dense", curvature_blocks="layer")
    with pytest.raises(InputError, match="curvature_blocks must be one of"):
        SourceConfig(curvature_blocks="diagonal")


def test_store_records_the_blocks_and_refuses_the_other_curvature(run, tmp_path):
    path = tmp_path / "factored.zarr"
    store, _ = fit_store(_attributor(run, proj_structure="factored", curvature_blocks="layer"), run[2], path,
                         chunk_rows=8)
    assert store.metadata["source_config"]["curvature_blocks"] == "layer"
    open_store(_attributor(run, proj_structure="factored", curvature_blocks="layer"), path)
    # A factored store written before the setting existed was "full": it must not pass for "layer";
    # nor may "auto", which resolves to "full" for this MLP.
    for blocks in ("full", "auto"):
        with pytest.raises(StoreMismatchError, match="curvature_blocks"):
            open_store(_attributor(run, proj_structure="factored", curvature_blocks=blocks), path)


def test_auto_blocks_follow_embedding_tables():
    # GPT-2 (token and position embeddings): one block per layer under factored and grouped.
    gpt2 = ModelFunction.build(tiny_gpt2(vocab=10, positions=8, width=8, layers=2).eval(), None, None)
    assert has_embeddings(gpt2)
    assert resolve_structure("auto", gpt2) == "grouped"  # 1,792 parameters: small, with embeddings
    config = SourceConfig()
    assert [config.resolved_curvature_blocks(s, has_embeddings(gpt2)) for s in ("dense", "factored", "grouped")] == [
        "full", "layer", "layer"]
    mlp_fn = ModelFunction.build(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)),
                                 None, None)
    assert not has_embeddings(mlp_fn) and resolve_structure("auto", mlp_fn) == "dense"
    assert [config.resolved_curvature_blocks(s, False) for s in ("dense", "factored", "grouped")] == ["full"] * 3
