"""The sampled curvature pass draws its pseudo-labels before the model runs and forms each
factor column from the outputs of the gradients' own forward (issue #27): no forward of the
batch on its own, the same draws as ``torch.multinomial`` and the same factor rows as the
two-forward formula (the outputs first, then the per-example gradients of a^T outputs)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from lm_helpers import as_columns, random_rows, tiny_gpt2
from tiny_models import blobs, mlp, rel_err

from source_proj.gradients.causal_lm import CausalLMTask
from source_proj.gradients.data import as_examples
from source_proj.gradients.model import ModelFunction
from source_proj.gradients.tasks import (
    ClassificationTask,
    RegressionTask,
    Task,
    exponential_noise,
    softmax_pseudo_gradient,
)
from source_proj.projection.jl import ProjectionConfig
from source_proj.projection.projected import make_projection, projected_gn_factors


def test_the_pseudo_labels_are_those_torch_multinomial_draws():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 7, generator=gen, dtype=torch.float64), dim=-1)
    where = torch.rand(500, generator=gen) < 0.7
    expected = torch.multinomial(probs[where], 1, generator=torch.Generator().manual_seed(5))[:, 0]
    noise = exponential_noise((500, 7), torch.Generator().manual_seed(5), where=where)
    drawn = softmax_pseudo_gradient(probs.log(), noise)
    labels = (probs - drawn).round().argmax(dim=-1)  # p - e_y: e_y is where the row drops by 1
    assert torch.equal(labels[where], expected)


def _lm_case():
    model = tiny_gpt2(vocab=11, width=8, positions=12)
    rows = random_rows(6, 11, (3, 9), seed=4)  # varied lengths (padded), some -100 labels
    return model, CausalLMTask(reduction="mean"), *as_examples(as_columns(rows)).rows(0, 6)


def _classifier_case(task):
    x, y = blobs(7, 4, 3, seed=1)
    return mlp((4, 6, 3), 0), task, x, (y if isinstance(task, ClassificationTask) else torch.randn(7, 3))


@dataclass(frozen=True)
class _TwoForward(Task):
    """``inner``'s sampled factor made the way tasks whose draws need the outputs make theirs:
    from a forward of the batch (Task.sampled_hessian_factor overridden)."""

    inner: Task | None = None

    def sampled_hessian_factor(self, outputs, targets, generator):
        return self.inner.sampled_hessian_factor(outputs, targets, generator)


@pytest.mark.parametrize("structure", ["dense", "factored"])
@pytest.mark.parametrize("case", ["classification", "regression", "causal_lm"])
def test_sampled_rows_equal_the_two_forward_path_without_a_batch_forward(case, structure, monkeypatch):
    if case == "causal_lm":
        model, task, inputs, targets = _lm_case()
    else:
        model, task, inputs, targets = _classifier_case(ClassificationTask() if case == "classification" else RegressionTask())
    fn = ModelFunction.build(model.eval())
    params, consts = fn.split_state(fn.canonical_state(model.state_dict(), "state"), torch.device("cpu"))
    projection = make_projection(ProjectionConfig(24, seed=2), structure, fn)
    forward, batch_forwards = ModelFunction.forward, []

    def counted(self, p, c, x):
        out = forward(self, p, c, x)
        batch_forwards.append(out.shape[0])
        return out

    monkeypatch.setattr(ModelFunction, "forward", counted)
    results = {}
    for name, chosen in (("drawn", task), ("two forwards", _TwoForward(task.loss, task.measurement, inner=task))):
        batch_forwards.clear()
        results[name] = projected_gn_factors(fn, params, consts, chosen, inputs, targets, projection, "sampled",
                                             torch.Generator().manual_seed(3), "state")
        assert max(batch_forwards) == (1 if name == "drawn" else len(targets))  # one row: the outputs' shape
    (rows, signs), (want, want_signs) = results["drawn"], results["two forwards"]
    assert signs is None and want_signs is None and want.abs().max() > 0
    assert rel_err(rows, want) < 1e-5  # float32 round-off: the same draws, the outputs of another forward
