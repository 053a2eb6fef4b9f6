"""The memory budget counts the activations, measured for the model (``gradients.memory``).

The model throughout: h = ReLU(x W_a^T + b_a) on each of T positions of an input (T, d), its
mean over positions m (h,), and logits z = m W_b^T + b_b (C,), under the classification
task's cross-entropy. Hand count of what is held per example, float32 (4 bytes each), the
first row's input and target being data (not counted):

* forward: ReLU's output h (T x H, also what the mean's backward and nothing else needs;
  the first linear layer saves only its input), the mean m (H, saved by the second linear
  layer for its weight gradient), the logits z (C, the output), log_softmax's output (C,
  saved by it and by the NLL loss);
* backward, differentiated with ``create_graph=True`` as ``torch.func.grad`` does: the NLL
  loss's gradient w.r.t. the log-probabilities (C, saved by log_softmax's double backward)
  and the logits' gradient (C, saved by the second layer's weight-gradient product).

So 4 (T H + H + 4 C) bytes per example, and 8 bytes fixed (two float32 scalars: the NLL
loss's total weight and the summed loss).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from source_proj.attributor import SourceAttributor
from source_proj.gradients.activations import activation_cost
from source_proj.gradients.data import as_examples
from source_proj.gradients.memory import DEFAULT_MAX_CHUNK, ActivationCost, MemoryBudgetError, feature_chunk
from source_proj.gradients.model import ModelFunction
from source_proj.gradients.task_names import resolve_task
from source_proj.trajectory.checkpoints import Checkpoint, Trajectory

D, H, C = 3, 16, 4


class PooledMLP(nn.Module):
    """Linear + ReLU per position, mean over positions, linear head (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D, H)
        self.b = nn.Linear(H, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)).mean(dim=1))


def hand_count(positions: int) -> int:
    """Bytes per example held for the backward pass and as output (module docstring)."""
    return 4 * (positions * H + H + 4 * C)


NUM_PARAMS = D * H + H + H * C + C  # 132: 1,056 bytes of feature gradient buffers per row


def rows(n: int, positions: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, positions, D, generator=g), torch.randint(0, C, (n,), generator=g)


def attributor(**settings) -> SourceAttributor:
    torch.manual_seed(0)
    model = PooledMLP().eval()
    later = {n: v + 0.1 * torch.randn_like(v) for n, v in model.state_dict().items()}
    trajectory = Trajectory((Checkpoint(model.state_dict(), steps=3, lr=0.1), Checkpoint(later, steps=3, lr=0.1)))
    return SourceAttributor(model, "classification", trajectory, proj_dim=8, num_segments=1, progress=False, **settings)


@pytest.mark.parametrize("positions", [1, 10, 40])
def test_measured_activations_equal_the_hand_count(positions):
    torch.manual_seed(0)
    model = PooledMLP().eval()
    fn = ModelFunction.build(model, None, None)
    params, consts = fn.split_state(model.state_dict(), torch.device("cpu"))
    x, y = rows(3, positions)
    cost = activation_cost(fn, params, consts, resolve_task("classification").loss, x, y)
    assert cost == ActivationCost(per_example=hand_count(positions), fixed=8)
    assert fn.runtime["activations"]  # cached: measured once per row shape
    assert activation_cost(fn, params, consts, lambda *_: 1 / 0, x, y) is cost


def test_chunk_shrinks_as_activations_grow():
    """Rows of 10 and of 2,000 positions under one budget: gradient buffers of 2 x 132 x 4 =
    1,056 bytes per row either way, activations of 768 and 128,320 bytes per row (hand count):
    the chunk is floor((budget - 8) / (1,056 + activations)) with the hand-counted sizes."""
    budget = 1_000_000
    assert feature_chunk(NUM_PARAMS, budget, None) == DEFAULT_MAX_CHUNK  # gradients alone: the cap
    att = attributor(max_gradient_memory=budget)
    chunks = {}
    for positions in (10, 2000):
        att.check_training_data(as_examples(rows(4, positions)))
        chunks[positions] = att.chunk_size
        assert chunks[positions] == min(DEFAULT_MAX_CHUNK, (budget - 8) // (8 * NUM_PARAMS + hand_count(positions)))
    assert chunks == {10: DEFAULT_MAX_CHUNK, 2000: 7}


def test_one_example_over_the_budget_names_gradients_and_activations():
    grads, acts = 8 * NUM_PARAMS, hand_count(50)
    att = attributor(max_gradient_memory=grads + acts)  # the 8 fixed bytes do not fit
    with pytest.raises(MemoryBudgetError) as caught:
        att.fit(rows(4, 50))
    message = str(caught.value)
    assert f"per-example gradients need {grads:,} bytes" in message
    assert f"{acts + 8:,} bytes of activations (1 x {acts:,} measured per example + 8 fixed)" in message
    assert f"max_gradient_memory={grads + acts:,}" in message
    fixed_chunk = attributor(max_gradient_memory=10 * (grads + acts), chunk_size=12)
    with pytest.raises(MemoryBudgetError, match=rf"chunk_size=12 needs {12 * grads:,} bytes .* and {12 * acts + 8:,} bytes of activations"):
        fixed_chunk.fit(rows(4, 50))


def test_features_do_not_depend_on_the_chosen_chunk():
    data = rows(10, 50, seed=1)
    budget = 3 * (8 * NUM_PARAMS + hand_count(50)) + 8  # exactly three rows per chunk
    chunked = attributor(max_gradient_memory=budget).fit(data)
    whole = attributor(chunk_size=10).fit(data)
    assert (chunked.chunk_size, whole.chunk_size) == (3, 10)
    torch.testing.assert_close(chunked.train_features, whole.train_features, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(chunked.self_influence(), whole.self_influence(), rtol=1e-5, atol=1e-9)


def test_curvature_batches_hold_factor_rows_and_activations():
    """Exact curvature: C factor rows of p floats and the C x C factor in float64 per example,
    4 (132 x 4 + 4 x 8) = 2,240 bytes, plus its activations and the 8 fixed bytes: one byte
    less than one example's total is refused naming the activations; exactly one example's
    total runs in backward batches of one, with the Hessian of an unsplit pass."""
    data = as_examples(rows(6, 20, seed=2))
    one = C * (4 * NUM_PARAMS + 8 * C) + hand_count(20) + 8
    reference = attributor(curvature="exact").checkpoint_hessian(0, data)
    fits = attributor(curvature="exact", chunk_size=1, max_gradient_memory=one)
    fits.chunk_size = 6  # one chunk of curvature rows: the budget splits it into backward batches
    torch.testing.assert_close(fits.checkpoint_hessian(0, data), reference, rtol=1e-6, atol=1e-9)
    short = attributor(curvature="exact", chunk_size=1, max_gradient_memory=one - 1)
    needs = rf"curvature pass needs, per example, 2,240 bytes of factor rows .* and {hand_count(20) + 8:,} bytes of activations"
    with pytest.raises(MemoryBudgetError, match=needs):
        short.checkpoint_hessian(0, data)
