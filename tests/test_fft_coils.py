"""k-space core: FFT against numpy, unitarity, adjointness of E/R and of the masked Fourier operator."""
import numpy as np
import pytest
import torch

from gadget.mri import fft2c, ifft2c, normalize_sens, rss, sens_expand, sens_reduce


def _crandn(*shape, seed=0, dtype=torch.complex128):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=dtype, generator=g)


def _inner(a, b):
    return torch.sum(a * b.conj())


@pytest.mark.parametrize("shape", [(2, 3, 16, 12), (1, 1, 15, 9), (4, 7)])
def test_fft2c_matches_numpy(shape):
    x = _crandn(*shape, dtype=torch.complex64)
    xn = x.numpy()
    want_f = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(xn, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    want_i = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(xn, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    np.testing.assert_allclose(fft2c(x).numpy(), want_f, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ifft2c(x).numpy(), want_i, atol=1e-6, rtol=0)


def test_fft2c_unitary_and_inverse():
    x = _crandn(2, 4, 17, 10, seed=1)
    assert torch.allclose(torch.linalg.vector_norm(fft2c(x)), torch.linalg.vector_norm(x), rtol=1e-12)
    assert torch.allclose(ifft2c(fft2c(x)), x, atol=1e-12)


def test_fft_rejects_real_input():
    with pytest.raises(TypeError, match="complex"):
        fft2c(torch.zeros(4, 4))


def test_expand_reduce_adjoint():
    """<E x, y> = <x, R y> in float64 (R = Eᴴ)."""
    sens = normalize_sens(_crandn(2, 5, 12, 10, seed=2))
    x, y = _crandn(2, 1, 12, 10, seed=3), _crandn(2, 5, 12, 10, seed=4)
    lhs, rhs = _inner(sens_expand(x, sens), y), _inner(x, sens_reduce(y, sens))
    assert abs(lhs - rhs) < 1e-10 * abs(lhs)


def test_masked_fourier_operator_adjoint():
    """A = M F S, Aᴴ = Sᴴ F⁻¹ M (M a 0/1 column mask is self-adjoint)."""
    sens = normalize_sens(_crandn(1, 4, 8, 16, seed=5))
    mask = torch.rand(16, generator=torch.Generator().manual_seed(6)) > 0.5
    x, y = _crandn(1, 1, 8, 16, seed=7), _crandn(1, 4, 8, 16, seed=8)
    lhs = _inner(sens_expand(x, sens) * mask, y)
    rhs = _inner(x, sens_reduce(y * mask, sens))
    assert abs(lhs - rhs) < 1e-10 * abs(lhs)


def test_normalized_sens_and_rss():
    sens = normalize_sens(_crandn(2, 6, 9, 9, seed=9))
    np.testing.assert_allclose(rss(sens, dim=1).numpy(), 1.0, atol=1e-12)
    x = _crandn(3, 4, 5, seed=10)
    np.testing.assert_allclose(rss(x, dim=0).numpy(), np.sqrt((np.abs(x.numpy()) ** 2).sum(0)), rtol=1e-12)
    # an all-zero map stays zero rather than turning into NaN
    assert torch.all(normalize_sens(torch.zeros(1, 3, 4, 4, dtype=torch.complex64)) == 0)


def test_reduce_of_expand_is_identity_for_normalized_maps():
    """R E x = Σ|S|² x = x when Σ|S|² = 1 (a data-consistency building block)."""
    sens = normalize_sens(_crandn(1, 4, 10, 10, seed=11))
    x = _crandn(1, 1, 10, 10, seed=12)
    assert torch.allclose(sens_reduce(sens_expand(x, sens), sens), x, atol=1e-12)
