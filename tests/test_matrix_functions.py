"""exp(-tH) and phi = (I - exp(-tH)) H^-1 against scipy.linalg.expm and a direct inverse."""

import numpy as np
import pytest
import scipy.linalg
import torch

from source_proj.curvature.spectra import (
    gauss_newton_gram,
    phi_values,
    segment_spectra,
    segment_spectrum,
    transport_operators,
)
from source_proj.errors import InputError
from source_proj.trajectory.checkpoints import Segment


def random_spd(k: int, seed: int, low: float = 0.05, high: float = 5.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return (q * rng.uniform(low, high, k)) @ q.T


@pytest.mark.parametrize("seed,t", [(0, 0.3), (1, 2.0), (2, 17.0)])
def test_exp_and_phi_match_expm_and_inverse(seed, t):
    h = random_spd(12, seed)
    spectrum = segment_spectrum([torch.from_numpy(h)], weight_decay=0.0, time=t)
    expm = scipy.linalg.expm(-t * h)
    phi = (np.eye(12) - expm) @ np.linalg.inv(h)
    np.testing.assert_allclose(spectrum.exp().numpy(), expm, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(spectrum.phi().numpy(), phi, rtol=1e-9, atol=1e-11)


def test_weight_decay_and_checkpoint_mean_enter_the_hessian():
    a, b = random_spd(6, 3), random_spd(6, 4)
    spectrum = segment_spectrum([torch.from_numpy(a), torch.from_numpy(b)], weight_decay=0.2, time=1.5)
    h = (a + b) / 2 + 0.2 * np.eye(6)
    np.testing.assert_allclose(spectrum.exp().numpy(), scipy.linalg.expm(-1.5 * h), rtol=1e-10, atol=1e-12)


def test_phi_is_t_at_zero_eigenvalues_and_finite_when_singular():
    s = torch.tensor([0.0, 1e-300, 1e-12, 1e-7, 1e-3, 1.0, 50.0], dtype=torch.float64)
    t = 3.0
    values = phi_values(s, t)
    assert torch.isfinite(values).all()
    assert values[0] == t and values[1] == t
    # Reference in extended precision: (1 - e^{-ts}) / s via mpmath-free series/exact forms.
    ref = np.array([t, t] + [float(-np.expm1(-t * x) / x) for x in s[2:].tolist()])
    np.testing.assert_allclose(values.numpy(), ref, rtol=1e-12)
    # A rank-deficient H: phi acts as t * I on the null space.
    h = np.diag([0.0, 0.0, 2.0])
    phi = segment_spectrum([torch.from_numpy(h)], 0.0, t).phi().numpy()
    np.testing.assert_allclose(np.diag(phi), [t, t, -np.expm1(-2 * t) / 2], rtol=1e-12)


def test_series_branch_is_continuous_across_its_threshold():
    t = 1.0
    s = torch.tensor([0.999e-6, 1.001e-6], dtype=torch.float64)
    values = phi_values(s, t).numpy()
    exact = -np.expm1(-s.numpy()) / s.numpy()
    np.testing.assert_allclose(values, exact, rtol=1e-15)


def test_negative_round_off_eigenvalues_are_clamped():
    h = np.diag([-1e-10, 1.0])
    spectrum = segment_spectrum([torch.from_numpy(h)], 0.0, 2.0)
    assert spectrum.eigenvalues.min() == 0.0
    np.testing.assert_allclose(spectrum.phi().numpy(), np.diag([2.0, -np.expm1(-2.0)]), rtol=1e-12)


def test_transport_multiplies_later_segments_exponentials():
    hs = [random_spd(5, s) for s in (5, 6, 7)]
    ts = [0.5, 1.0, 2.0]
    spectra = [segment_spectrum([torch.from_numpy(h)], 0.0, t) for h, t in zip(hs, ts)]
    ops = transport_operators(spectra, (True,) * 3).numpy()
    e = [scipy.linalg.expm(-t * h) for h, t in zip(hs, ts)]
    phi = [(np.eye(5) - ei) @ np.linalg.inv(h) for ei, h in zip(e, hs)]
    np.testing.assert_allclose(ops[2], phi[2], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ops[1], e[2] @ phi[1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ops[0], e[2] @ e[1] @ phi[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(transport_operators(spectra, (False,) * 3).numpy()[0], phi[0], rtol=1e-9, atol=1e-12)
    # Only the first carried (the staged form): it still crosses every later segment.
    mixed = transport_operators(spectra, (True, False, False)).numpy()
    np.testing.assert_allclose(mixed[0], e[2] @ e[1] @ phi[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mixed[1], phi[1], rtol=1e-9, atol=1e-12)
    with pytest.raises(InputError, match="one carried flag per segment"):
        transport_operators(spectra, (True,))


def test_curvature_does_not_depend_on_the_thread_count():
    """The Gram matrix, the eigendecomposition and the operators are bit for bit the same with
    one thread and with two (LAPACK's eigh alone differs in its last bits here otherwise), so a
    store does not depend on how many processes and threads wrote it."""
    torch.manual_seed(0)
    rows = torch.randn(300, 512)
    segments = [Segment("a", (0,), steps=20, lr=0.1), Segment("a", (1,), steps=30, lr=0.05)]

    def curvature(threads: int) -> list[torch.Tensor]:
        torch.set_num_threads(threads)
        hessians = {0: gauss_newton_gram(rows), 1: gauss_newton_gram(rows[:200], torch.linspace(0.5, 1.0, 200))}
        spectra = segment_spectra(segments, hessians, 1e-3)
        return [hessians[0], hessians[1], *(s.eigenvectors for s in spectra), transport_operators(spectra, (True, True))]

    before = torch.get_num_threads()
    try:
        one, two = curvature(1), curvature(2)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
