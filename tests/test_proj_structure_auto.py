"""proj_structure="auto": the rule that picks dense or factored per model, and stores that
record the structure it resolved to."""

import functools

import pytest
import torch
from lm_helpers import tiny_gpt2
from tiny_models import blobs, mlp
from torch import nn

import source_proj.attributor as attributor_module
from source_proj.attributor import SourceAttributor
from source_proj.config import SourceConfig
from source_proj.evaluation.training import TrainSettings, train_sgd
from source_proj.features.errors import StoreMismatchError
from source_proj.gradients.model import ModelFunction
from source_proj.gradients.tasks import ClassificationTask
from source_proj.projection.kronecker import FactoredProjection
from source_proj.projection.options import AUTO_DENSE_MAX_PARAMS
from source_proj.projection.projected import resolve_structure
from source_proj.store_fit import fit_store, open_store, store_config


def _fn(model: nn.Module) -> ModelFunction:
    return ModelFunction.build(model.eval(), None, None)


def test_small_mlp_resolves_dense_and_the_threshold_is_its_parameter_count():
    model = mlp((100, 150, 10), seed=0)
    p = 100 * 150 + 150 + 150 * 10 + 10  # 16,660, counted by hand; the weights are 99% of it
    assert p <= AUTO_DENSE_MAX_PARAMS
    assert resolve_structure("auto", _fn(model)) == "dense"
    assert resolve_structure("auto", _fn(model), dense_max_params=p) == "dense"  # "at most" the threshold
    assert resolve_structure("auto", _fn(model), dense_max_params=p - 1) == "factored"
    assert resolve_structure("dense", _fn(model), dense_max_params=0) == "dense"  # explicit choices kept


def test_gpt2_above_the_threshold_resolves_factored_by_its_factorable_share():
    vocab, positions, width, layers = 10, 16, 8, 2
    fn = _fn(tiny_gpt2(vocab=vocab, positions=positions, width=width, layers=layers))
    # By hand: token and position embeddings (the head is tied to the first) and per block the
    # Conv1D weights c_attn (E x 3E), attn c_proj (E x E), c_fc (E x 4E), mlp c_proj (4E x E);
    # not factorable: biases (3E + E + 4E + E) and two LayerNorms (4E) per block, ln_f (2E).
    factorable = vocab * width + positions * width + layers * 12 * width**2
    others = layers * 13 * width + 2 * width
    assert fn.num_params() == factorable + others
    assert resolve_structure("auto", fn) == "grouped"  # 1,824 parameters, embeddings: under the default threshold
    # With embeddings the grouped threshold counts, not the dense one.
    assert resolve_structure("auto", fn, dense_max_params=0, grouped_max_params=fn.num_params()) == "grouped"
    share = factorable / (factorable + others)
    assert resolve_structure("auto", fn, grouped_max_params=1000, min_factorable_share=share) == "factored"
    assert resolve_structure("auto", fn, grouped_max_params=1000, min_factorable_share=share + 1e-9) == "grouped"
    assert resolve_structure("auto", fn, grouped_max_params=1000) == "factored"  # the default share, 0.5


class _MostlyTable(nn.Module):
    """A raw parameter table (not factorable: no Linear/Embedding registers it) and a small head."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(50, 40))
        self.head = nn.Linear(40, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x @ self.table))


def test_model_mostly_of_non_factorable_parameters_resolves_dense():
    fn = _fn(_MostlyTable())
    assert fn.num_params() == 50 * 40 + 40 * 3 + 3
    # Only the head's weight (120 of 2,123: 5.7%) can be factored: dense however large the model.
    assert resolve_structure("auto", fn, dense_max_params=0) == "dense"
    assert resolve_structure("auto", fn, dense_max_params=0, min_factorable_share=120 / 2123) == "factored"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    settings = TrainSettings(epochs=3, batch_size=8, lr=0.05, momentum=0.9, checkpoints_per_epoch=1)
    x, y = blobs(24, 6, 3, seed=0)
    model = mlp((6, 8, 3), 0)
    ckpts = train_sgd(model, ClassificationTask(), x, y, settings, checkpoint_dir=tmp_path_factory.mktemp("ckpts"))
    return model, settings.trajectory(ckpts), (x, y)


def _attributor(run, structure: str) -> SourceAttributor:
    model, traj, _ = run
    return SourceAttributor(model, "classification", traj, proj_dim=32, chunk_size=8, progress=False,
                            proj_structure=structure)


def test_default_is_auto_and_a_small_model_keeps_the_dense_features_bit_for_bit(run, tmp_path):
    assert SourceConfig().proj_structure == "auto"
    auto = _attributor(run, "auto")
    assert auto.config.proj_structure == "dense" and not isinstance(auto.projection, FactoredProjection)
    assert torch.equal(auto.fit(run[2]).train_features, _attributor(run, "dense").fit(run[2]).train_features)
    # A store written with an explicit "dense" (as every store before "auto" was) opens with "auto".
    store, _ = fit_store(_attributor(run, "dense"), run[2], tmp_path / "dense.zarr", chunk_rows=8)
    assert store.metadata["source_config"]["proj_structure"] == "dense"
    open_store(_attributor(run, "auto"), tmp_path / "dense.zarr")


def test_store_fitted_with_auto_records_the_resolved_structure_and_reopens_either_way(run, tmp_path, monkeypatch):
    # Every model resolves to factored (where its weights allow) with the threshold at zero.
    monkeypatch.setattr(attributor_module, "resolve_structure", functools.partial(resolve_structure, dense_max_params=0))
    auto = _attributor(run, "auto")
    assert auto.config.proj_structure == "factored" and isinstance(auto.projection, FactoredProjection)
    path = tmp_path / "auto.zarr"
    store, _ = fit_store(auto, run[2], path, chunk_rows=8)
    assert store.metadata["source_config"]["proj_structure"] == "factored"
    assert store_config(store).proj_structure == "factored"
    open_store(_attributor(run, "auto"), path)
    open_store(_attributor(run, "factored"), path)
    with pytest.raises(StoreMismatchError, match="projection|proj_structure"):
        open_store(_attributor(run, "dense"), path)
    explicit = _attributor(run, "factored").fit(run[2]).train_features
    assert torch.equal(torch.from_numpy(store.read_rows(0, 24)), explicit)
    assert torch.equal(_attributor(run, "auto").fit(run[2]).train_features, explicit)
