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


def sampled_mean(task, out, y, seed):
    """Mean over the batch of sum_r s_r a_r a_r^T for the task's sampled factor (B, C, R)."""
    cols, signs = task.sampled_hessian_factor(out, y, torch.Generator().manual_seed(seed))
    signs = torch.ones(cols.shape[2], dtype=cols.dtype) if signs is None else signs
    return torch.einsum("bcr,r,bdr->cd", cols, signs, cols) / cols.shape[0]


def _sample_labels(out, _targets, generator):
    return torch.multinomial(torch.softmax(out, dim=1).cpu(), 1, generator=generator)[:, 0]


def test_sampled_factors_are_unbiased(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    out = torch.randn(1, 4, generator=gen, dtype=torch.float64).expand(40000, 4)
    y = torch.zeros(40000, dtype=torch.long)
    cls = ClassificationTask()
    exact = cls.hessian_factor(out[:1], y[:1])[0]
    # The generic sampled forms never build the output Hessian: its only builder is disabled.
    monkeypatch.setattr("source_proj.gradients.tasks.hessian", None)
    tasks = (
        cls,
        Task(loss=cls.loss, measurement=cls.measurement, sample=_sample_labels),  # NLL: a pseudo-label
        Task(loss=cls.loss, measurement=cls.measurement),  # Hessian-vector form, two signed columns
    )
    for task in tasks:
        # Monte Carlo over 40000 draws: entries of size ~0.2 within ~3e-3.
        torch.testing.assert_close(sampled_mean(task, out, y, 3), exact @ exact.T, rtol=0, atol=6e-3)
    reg, target = RegressionTask(), torch.zeros(40000, 3, dtype=torch.float64)
    for task in (reg, Task(loss=reg.loss, measurement=reg.measurement)):
        got = sampled_mean(task, torch.randn(40000, 3, generator=gen, dtype=torch.float64), target, 4)
        torch.testing.assert_close(got, 2 * torch.eye(3, dtype=torch.float64), rtol=0, atol=0.1)


def test_generic_sampled_factor_of_many_outputs_costs_one_backward(monkeypatch):
    """A custom loss over 50,000 outputs: the full output Hessian would be 20 GB in float64."""
    monkeypatch.setattr("source_proj.gradients.tasks.hessian", None)

    def loss(o, t):
        return ((o - t) ** 2).sum(dim=(1, 2)) + 0.1 * (o**4).sum(dim=(1, 2))

    task = Task(loss=loss, measurement=loss)
    out = torch.randn(3, 250, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cols, signs = task.sampled_hessian_factor(out, torch.zeros_like(out), torch.Generator().manual_seed(1))
    assert cols.shape == (3, 50000, 2) and signs.tolist() == [1.0, -1.0]
    # The two columns are (xi + H xi)/2 and (xi - H xi)/2 with H = diag(2 + 1.2 o^2) here.
    xi, hxi = cols[..., 0] + cols[..., 1], cols[..., 0] - cols[..., 1]
    torch.testing.assert_close(xi.abs(), torch.ones_like(xi))
    torch.testing.assert_close(hxi, xi * (2 + 1.2 * out.reshape(3, -1) ** 2))


def test_margin_and_absolute_error_definitions():
    out = torch.tensor([[2.0, 0.5, -1.0]])
    expected = 2.0 - torch.logsumexp(torch.tensor([0.5, -1.0]), 0)
    torch.testing.assert_close(ClassificationTask().measurement(out, torch.tensor([0])), expected[None])
    torch.testing.assert_close(RegressionTask().measurement(torch.tensor([[1.5]]), torch.tensor([3.0])), torch.tensor([1.5]))
    torch.testing.assert_close(RegressionTask().loss(torch.tensor([[1.5]]), torch.tensor([3.0])), torch.tensor([2.25]))
