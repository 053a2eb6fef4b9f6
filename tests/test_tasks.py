"""Built-in tasks' closed forms against autograd, and the generic Task path."""

import torch
import torch.nn.functional as F

from source_proj.gradients.tasks import ClassificationTask, RegressionTask, Task


def test_classification_factor_reproduces_the_softmax_hessian():
    gen = torch.Generator().manual_seed(0)
    out, y = torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randint(0, 4, (5,), generator=gen)
    task = ClassificationTask()
    a = task.hessian_factor(out, y)
    for i in range(5):
        hess = torch.autograd.functional.hessian(lambda o: F.cross_entropy(o[None], y[i : i + 1]), out[i])
        torch.testing.assert_close(a[i] @ a[i].T, hess, rtol=1e-10, atol=1e-12)


def test_generic_task_factor_equals_the_closed_forms():
    gen = torch.Generator().manual_seed(1)
    out, y = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)
    cls = ClassificationTask()
    generic = Task(loss=cls.loss, measurement=cls.measurement)
    a, b = generic.hessian_factor(out, y), cls.hessian_factor(out, y)
    torch.testing.assert_close(a @ a.transpose(1, 2), b @ b.transpose(1, 2), rtol=1e-9, atol=1e-12)
    reg = RegressionTask()
    generic = Task(loss=reg.loss, measurement=reg.measurement)
    target = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    a, b = generic.hessian_factor(out, target), reg.hessian_factor(out, target)
    torch.testing.assert_close(a @ a.transpose(1, 2), b @ b.transpose(1, 2), rtol=1e-9, atol=1e-12)


def test_sampled_factors_are_unbiased():
    gen = torch.Generator().manual_seed(2)
    out = torch.randn(1, 4, generator=gen, dtype=torch.float64).expand(40000, 4)
    y = torch.zeros(40000, dtype=torch.long)
    for task in (ClassificationTask(), Task(loss=ClassificationTask().loss, measurement=ClassificationTask().measurement)):
        v = task.sampled_hessian_factor(out, y, torch.Generator().manual_seed(3))[..., 0]
        exact = task.hessian_factor(out[:1], y[:1])[0]
        # Monte Carlo over 40000 draws: entries of size ~0.2 within ~3e-3.
        torch.testing.assert_close(v.T @ v / len(v), exact @ exact.T, rtol=0, atol=6e-3)


def test_margin_and_absolute_error_definitions():
    out = torch.tensor([[2.0, 0.5, -1.0]])
    expected = 2.0 - torch.logsumexp(torch.tensor([0.5, -1.0]), 0)
    torch.testing.assert_close(ClassificationTask().measurement(out, torch.tensor([0])), expected[None])
    torch.testing.assert_close(RegressionTask().measurement(torch.tensor([[1.5]]), torch.tensor([3.0])), torch.tensor([1.5]))
    torch.testing.assert_close(RegressionTask().loss(torch.tensor([[1.5]]), torch.tensor([3.0])), torch.tensor([2.25]))
