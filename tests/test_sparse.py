"""The cs refine's solver (gadget/recon/sparse.py) against numpy: the Haar transform against explicit
matrices, the operator against a dense SENSE matrix, FISTA against closed-form solutions."""
import numpy as np
import pytest
import torch

from gadget.recon import sparse


def haar_matrix(n: int) -> np.ndarray:
    """One level of the 1-D orthonormal Haar analysis as a matrix: sums on the first n/2 rows,
    differences (even minus odd) on the last."""
    m = np.zeros((n, n))
    for i in range(n // 2):
        m[i, 2 * i] = m[i, 2 * i + 1] = 1 / np.sqrt(2)
        m[n // 2 + i, 2 * i], m[n // 2 + i, 2 * i + 1] = 1 / np.sqrt(2), -1 / np.sqrt(2)
    return m


def test_haar_matches_the_separable_matrices_and_inverts():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 12)) + 1j * rng.standard_normal((2, 8, 12))
    coarse, details = sparse.wavelet2(torch.from_numpy(x), 1, "haar")
    y = haar_matrix(8) @ x @ haar_matrix(12).T  # rows then columns
    np.testing.assert_allclose(coarse.numpy(), y[:, :4, :6], atol=1e-12)
    np.testing.assert_allclose(details[0][:, 0].numpy(), y[:, :4, 6:], atol=1e-12)   # across columns
    np.testing.assert_allclose(details[0][:, 1].numpy(), y[:, 4:, :6], atol=1e-12)   # across rows
    np.testing.assert_allclose(details[0][:, 2].numpy(), y[:, 4:, 6:], atol=1e-12)   # diagonal
    coarse3, details3 = sparse.wavelet2(torch.from_numpy(x[:, :8, :8]), 3, "haar")
    energy = coarse3.abs().square().sum() + sum(d.abs().square().sum() for d in details3)
    assert float(energy) == pytest.approx(float(np.sum(np.abs(x[:, :8, :8]) ** 2)), rel=1e-12)
    np.testing.assert_allclose(sparse.iwavelet2(coarse3, details3, "haar").numpy(), x[:, :8, :8], atol=1e-12)


def periodic_matrix(n: int, h) -> np.ndarray:
    """One level of the periodic 1-D wavelet analysis with low-pass ``h`` as an explicit matrix:
    row ``i`` (< n/2) holds ``h[k]`` at column ``(2i + k) mod n``, row ``n/2 + i`` the mirror filter."""
    g = [(-1) ** k * h[len(h) - 1 - k] for k in range(len(h))]
    m = np.zeros((n, n))
    for i in range(n // 2):
        for k in range(len(h)):
            m[i, (2 * i + k) % n] += h[k]
            m[n // 2 + i, (2 * i + k) % n] += g[k]
    return m


def test_db2_matches_the_periodic_matrices_is_orthonormal_and_kills_ramps():
    h = sparse.WAVELETS["db2"]
    for n in (8, 12):
        m = periodic_matrix(n, h)
        np.testing.assert_allclose(m @ m.T, np.eye(n), atol=1e-12)  # orthonormal
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 8, 12)) + 1j * rng.standard_normal((3, 8, 12))
    coarse, details = sparse.wavelet2(torch.from_numpy(x), 1, "db2")
    y = periodic_matrix(8, h) @ x @ periodic_matrix(12, h).T
    np.testing.assert_allclose(coarse.numpy(), y[:, :4, :6], atol=1e-12)
    np.testing.assert_allclose(details[0][:, 0].numpy(), y[:, :4, 6:], atol=1e-12)
    np.testing.assert_allclose(details[0][:, 1].numpy(), y[:, 4:, :6], atol=1e-12)
    np.testing.assert_allclose(details[0][:, 2].numpy(), y[:, 4:, 6:], atol=1e-12)
    big = torch.from_numpy(rng.standard_normal((2, 32, 16)).astype(np.complex128))
    coarse, details = sparse.wavelet2(big, 3, "db2")
    np.testing.assert_allclose(sparse.iwavelet2(coarse, details, "db2").numpy(), big.numpy(), atol=1e-12)
    # two vanishing moments: a ramp has no detail away from the periodic wrap
    ramp = torch.arange(32, dtype=torch.float64).repeat(32, 1)[None]
    _, details = sparse.wavelet2(ramp.to(torch.complex128), 1, "db2")
    assert float(details[0][0, 0, :, :-1].abs().max()) < 1e-10
    with pytest.raises(ValueError, match="wavelet"):
        sparse.wavelet2(big, 1, "db8")


def test_soft_threshold_and_shrink():
    z = torch.tensor([3 + 4j, 0.3 + 0.4j, 0j], dtype=torch.complex128)
    out = sparse.soft_threshold(z, torch.tensor(1.0, dtype=torch.float64))
    np.testing.assert_allclose(out.numpy(), [(3 + 4j) * 4 / 5, 0, 0], atol=1e-12)
    # a constant image has no detail: shrinking leaves it (any offset, any threshold)
    flat = torch.full((1, 20, 28), 2 - 1j, dtype=torch.complex64)
    np.testing.assert_allclose(sparse.wavelet_shrink(flat, torch.tensor([5.0]), 2, (1, 3), "haar").numpy()[:, :16, :16],
                               flat.numpy()[:, :16, :16], atol=1e-5)


def _problem(seed=0, coils=3, h=16, w=12):
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((coils, h, w)) + 1j * rng.standard_normal((coils, h, w))
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0)).max()  # Σ|S|² ≤ 1
    columns = rng.random(w) < 0.5
    columns[w // 2 - 1:w // 2 + 1] = True
    truth = rng.standard_normal((h, w)) + 1j * rng.standard_normal((h, w))
    return maps.astype(np.complex64), columns, truth.astype(np.complex64), rng


def dense_operator(maps: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """A = M F S as a dense matrix on the flattened (h, w) image, F the centred orthonormal 2-D DFT."""
    coils, h, w = maps.shape
    def centred_dft(n):
        eye = np.eye(n)
        return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(eye, axes=0), axis=0, norm="ortho"), axes=0)
    f = np.kron(centred_dft(h), centred_dft(w))
    keep = np.tile(columns, h)
    blocks = [(f * keep[:, None]) @ np.diag(maps[c].ravel()) for c in range(coils)]
    return np.concatenate(blocks)


def test_normal_operator_and_adjoint_match_the_dense_matrix():
    maps, columns, truth, _ = _problem()
    a = dense_operator(maps.astype(np.complex128), columns)
    x = truth.astype(np.complex128)
    want = (a.conj().T @ (a @ x.ravel())).reshape(x.shape)
    gram = sparse.row_gram(torch.from_numpy(maps), torch.from_numpy(columns))
    got = sparse.apply_gram(gram, torch.from_numpy(truth)[None])[0]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    y = (a @ x.ravel()).reshape(maps.shape).astype(np.complex64)
    got_adj = sparse.adjoint(torch.from_numpy(maps), torch.from_numpy(y), torch.from_numpy(columns))
    want_adj = (a.conj().T @ y.ravel()).reshape(x.shape)
    np.testing.assert_allclose(got_adj.numpy(), want_adj, rtol=1e-4, atol=1e-4 * np.abs(want_adj).max())


def test_fista_without_sparsity_reaches_the_regularised_least_squares_solution():
    """μ = 0: the solve is (AᴴA + λI) x = Aᴴy + λ x₀, which numpy solves directly; λ large gives x₀."""
    maps, columns, truth, rng = _problem(1)
    a = dense_operator(maps.astype(np.complex128), columns)
    y = (a @ truth.ravel().astype(np.complex128)).reshape(maps.shape)
    y += 0.05 * (rng.standard_normal(y.shape) + 1j * rng.standard_normal(y.shape)) * np.tile(columns, (1, 16, 1))
    prior = (truth + 0.3 * rng.standard_normal(truth.shape)).astype(np.complex64)
    lams = [0.05, 0.5]
    got = sparse.solve(torch.from_numpy(maps), torch.from_numpy(y.astype(np.complex64)), torch.from_numpy(columns),
                       torch.from_numpy(prior), lams, [0.0, 0.0], iterations=400)
    for lam, x in zip(lams, got):
        normal = a.conj().T @ a + lam * np.eye(a.shape[1])
        want = np.linalg.solve(normal, a.conj().T @ y.ravel() + lam * prior.ravel()).reshape(truth.shape)
        assert np.linalg.norm(x.numpy() - want) / np.linalg.norm(want) < 2e-3
    far = sparse.solve(torch.from_numpy(maps), torch.from_numpy(y.astype(np.complex64)), torch.from_numpy(columns),
                       torch.from_numpy(prior), [1e6], [0.0], iterations=5)[0]
    np.testing.assert_allclose(far.numpy(), prior, atol=1e-4 * np.abs(prior).max())


def test_sparsity_removes_noise_and_candidates_do_not_interact():
    """On a piecewise-constant object seen through noise, a sparsity weight brings the solve closer to the
    object than none; a candidate's result is the same whether solved alone or with others (and in chunks)."""
    maps, columns, _, rng = _problem(2, h=32, w=32)
    columns[:] = True
    obj = np.zeros((32, 32), np.complex64)
    obj[8:24, 8:24], obj[12:20, 4:12] = 1.0, 0.5
    a = dense_operator(maps.astype(np.complex128), columns)
    y = (a @ obj.ravel()).reshape(maps.shape) + 0.2 * (rng.standard_normal(maps.shape) + 1j * rng.standard_normal(maps.shape))
    start = (a.conj().T @ y.ravel()).reshape(32, 32).astype(np.complex64)  # μ's unit is this image's scale
    args = (torch.from_numpy(maps), torch.from_numpy(y.astype(np.complex64)), torch.from_numpy(columns),
            torch.from_numpy(start))
    both = sparse.solve(*args, [0.0, 0.0], [0.0, 0.05], iterations=80)
    errors = [np.linalg.norm(x.numpy() - obj) for x in both]
    assert errors[1] < 0.8 * errors[0]
    alone = sparse.solve(*args, [0.0], [0.05], iterations=80)[0]
    np.testing.assert_allclose(alone.numpy(), both[1].numpy(), atol=1e-5)
    old = sparse.CHUNK_VALUES
    try:
        sparse.CHUNK_VALUES = maps.size  # one candidate per chunk
        chunked = sparse.solve(*args, [0.0, 0.0], [0.0, 0.05], iterations=80)
    finally:
        sparse.CHUNK_VALUES = old
    np.testing.assert_allclose(chunked.numpy(), both.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="non-negative"):
        sparse.solve(*args, [-1.0], [0.0])


def test_spun_shrink_over_every_offset_commutes_with_circular_shifts():
    """Averaged over all ``2**levels``² grid offsets the shrinkage is shift-invariant (the undecimated
    wavelet's); on one grid it is not, which is why the solve spins."""
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal((2, 16, 24)) + 1j * rng.standard_normal((2, 16, 24)))
    threshold = torch.tensor([0.8, 1.5], dtype=torch.float64)
    every = [(r, c) for r in range(4) for c in range(4)]
    shift = (3, 5)

    def spun(image, offsets):
        return sparse.spun_shrink(image, threshold, 2, offsets, "db2")

    np.testing.assert_allclose(spun(torch.roll(x, shift, (-2, -1)), every).numpy(),
                               torch.roll(spun(x, every), shift, (-2, -1)).numpy(), atol=1e-12)
    one = [(0, 0)]
    moved = spun(torch.roll(x, shift, (-2, -1)), one) - torch.roll(spun(x, one), shift, (-2, -1))
    assert float(moved.abs().max()) > 0.1
    # the mean of the single-grid shrinkages
    np.testing.assert_allclose(spun(x, every[:3]).numpy(),
                               sum(sparse.wavelet_shrink(x, threshold, 2, o, "db2") for o in every[:3]).numpy() / 3,
                               atol=1e-12)


def test_spinning_in_every_step_denoises_better_than_one_grid():
    """Identity encoding (one coil, every column): the solve denoises a piecewise-constant image; with four
    grids per step it lands nearer the object than with one (shift-invariant thresholding leaves no block
    edges). Three noise draws, fixed seeds."""
    h = w = 64
    obj = np.zeros((h, w))
    obj[10:50, 12:44], obj[20:34, 20:30] = 1.0, 0.4
    obj[38:46, 30:52] += 0.7
    maps, columns = torch.ones(1, h, w, dtype=torch.complex64), torch.ones(w, dtype=torch.bool)
    for seed in (3, 4, 5):
        rng = np.random.default_rng(seed)
        noisy = (obj + 0.15 * (rng.standard_normal((h, w)) + 1j * rng.standard_normal((h, w)))).astype(np.complex64)
        y = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(noisy), norm="ortho"))[None].astype(np.complex64)
        errors = {}
        for offsets in (1, 4):
            x = sparse.solve(maps, torch.from_numpy(y), columns, torch.from_numpy(noisy), [0.0], [0.15], 30,
                             offsets=offsets)[0]
            errors[offsets] = np.linalg.norm(x.numpy() - obj)
        assert errors[4] < 0.95 * errors[1], (seed, errors)
    with pytest.raises(ValueError, match="offsets"):
        sparse.solve(maps, torch.from_numpy(y), columns, torch.from_numpy(noisy), [0.0], [0.15], offsets=0)
