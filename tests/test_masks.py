"""gadget.mri.masks against the fastmri package (used only as a test oracle)."""
import numpy as np
import pytest
import torch

from fastmri.data import subsample as fm_subsample
from fastmri.data import transforms as fm_transforms
from fastmri.models.varnet import SensitivityModel

from gadget.mri.masks import (
    MASK_KINDS,
    MaskSampler,
    MaskSpec,
    apply_mask,
    center_block,
    contiguous_center_lines,
    detect_acs_count,
    make_mask,
)

FASTMRI_CLASSES = {
    "random": fm_subsample.RandomMaskFunc,
    "equispaced": fm_subsample.EquiSpacedMaskFunc,
    "equispaced-fraction": fm_subsample.EquispacedMaskFractionFunc,
}
NUM_COLS = [368, 372, 320, 640]
SETTINGS = [(0.08, 4), (0.04, 8)]  # (center_fraction, acceleration)
SEEDS = [0, 42, 2**31 - 1, tuple(map(ord, "file1000001.h5")), tuple(map(ord, "file_brain_AXT2_200_2000019.h5"))]
OFFSETS = [None, 0, 1, 3]


def fastmri_mask(mask_func, num_cols, offset=None, seed=None):
    """Run a fastMRI MaskFunc for k-space (1, num_cols, 1); return (bool (num_cols,), num_low)."""
    mask, num_low = mask_func((1, num_cols, 1), offset, seed)
    assert tuple(mask.shape) == (1, num_cols, 1)
    values = mask.numpy().ravel()
    assert set(np.unique(values)) <= {0.0, 1.0}
    return values.astype(bool), int(num_low)


def assert_same(ours, theirs):
    mask, num_low = ours
    ref_mask, ref_num_low = theirs
    assert mask.dtype == bool and mask.shape == ref_mask.shape
    np.testing.assert_array_equal(mask, ref_mask)
    assert num_low == ref_num_low
    assert isinstance(num_low, int)


# ----------------------------------------------------------------------------- equality with fastMRI


@pytest.mark.parametrize("num_cols", NUM_COLS)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_per_call_seed_matches_fastmri(kind, num_cols):
    for center_fraction, acceleration in SETTINGS:
        for seed in SEEDS:
            for offset in OFFSETS:
                ours = make_mask(kind, num_cols, acceleration, center_fraction, seed=seed, offset=offset)
                ref_func = FASTMRI_CLASSES[kind]([center_fraction], [acceleration])
                assert_same(ours, fastmri_mask(ref_func, num_cols, offset, seed))
                # the mask really is undersampled and contains its centre block
                mask, num_low = ours
                assert mask.sum() < num_cols
                assert np.all(mask[center_block(num_cols, num_low)])


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_sampler_seed_and_repeated_calls_match_fastmri(kind):
    """Unseeded calls advance both generators identically, for all widths and offsets."""
    for sampler_seed in (0, 7):
        spec = MaskSpec(kind, [0.08], [4], seed=sampler_seed)
        ours = MaskSampler(spec)
        ref = FASTMRI_CLASSES[kind]([0.08], [4], seed=sampler_seed)
        for num_cols in NUM_COLS * 2:
            for offset in OFFSETS:
                assert_same(ours(num_cols, offset), fastmri_mask(ref, num_cols, offset))


@pytest.mark.parametrize("allow_any_combination", [False, True])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_multi_entry_lists_match_fastmri(kind, allow_any_combination):
    spec = MaskSpec(kind, [0.08, 0.04], [4, 8], allow_any_combination=allow_any_combination, seed=1234)
    ours = MaskSampler(spec)
    ref = FASTMRI_CLASSES[kind]([0.08, 0.04], [4, 8], allow_any_combination=allow_any_combination, seed=1234)
    num_lows = set()
    for call in range(40):
        num_cols = NUM_COLS[call % len(NUM_COLS)]
        result = ours(num_cols)
        assert_same(result, fastmri_mask(ref, num_cols))
        num_lows.add((num_cols, result[1]))
    # both entries of the lists were actually drawn
    assert {(368, 29), (368, 15)} <= num_lows


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_per_call_seed_leaves_sampler_state_alone(kind):
    """Seeded calls interleaved with unseeded ones: same sequence as fastMRI, and unseeded
    calls continue as if the seeded ones never happened."""
    spec = MaskSpec(kind, [0.08, 0.04], [4, 8], seed=5)
    ours, plain = MaskSampler(spec), MaskSampler(spec)
    ref = FASTMRI_CLASSES[kind]([0.08, 0.04], [4, 8], seed=5)
    for i in range(6):
        seed = tuple(map(ord, f"file{i}.h5"))
        assert_same(ours(372, seed=seed), fastmri_mask(ref, 372, seed=seed))
        unseeded = ours(372)
        assert_same(unseeded, fastmri_mask(ref, 372))
        assert_same(unseeded, plain(372))


def test_same_seed_same_mask_different_seed_different_mask():
    a = make_mask("random", 368, 4, 0.08, seed=(1, 2, 3))
    b = make_mask("random", 368, 4, 0.08, seed=(1, 2, 3))
    c = make_mask("random", 368, 4, 0.08, seed=(1, 2, 4))
    assert_same(a, b)
    assert not np.array_equal(a[0], c[0])


def test_float_and_alias_arguments_match_fastmri():
    # float accelerations are fine for random / equispaced-fraction; 4.0 is accepted as 4 for equispaced
    assert_same(
        make_mask("equispaced-fraction", 368, 4.5, 0.08, seed=3),
        fastmri_mask(fm_subsample.EquispacedMaskFractionFunc([0.08], [4.5]), 368, seed=3),
    )
    assert_same(
        make_mask("random", 368, 6.0, 0.06, seed=3),
        fastmri_mask(fm_subsample.RandomMaskFunc([0.06], [6.0]), 368, seed=3),
    )
    assert_same(
        make_mask("equispaced", 368, 4.0, 0.08, seed=3),
        fastmri_mask(fm_subsample.EquiSpacedMaskFunc([0.08], [4]), 368, seed=3),
    )
    spec = MaskSpec("equispaced_fraction", (0.08,), (4,))
    assert spec.kind == "equispaced-fraction"
    assert spec.center_fractions == (0.08,) and spec.accelerations == (4,)


def test_known_center_block_and_equispaced_layout():
    mask, num_low = make_mask("equispaced", 368, 4, 0.08, offset=1, seed=0)
    assert num_low == 29  # round(368 * 0.08) = round(29.44)
    start = (368 - 29 + 1) // 2
    expected = np.zeros(368, bool)
    expected[start : start + 29] = True
    expected[1::4] = True
    np.testing.assert_array_equal(mask, expected)
    assert contiguous_center_lines(mask) >= 29


# ----------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="gaussian", center_fractions=[0.08], accelerations=[4]), "unknown mask kind"),
        (dict(kind="random", center_fractions=[0.08], accelerations=[0]), "acceleration must be >= 1"),
        (dict(kind="random", center_fractions=[0.08], accelerations=[-4]), "acceleration must be >= 1"),
        (dict(kind="random", center_fractions=[0.08], accelerations=[float("nan")]), "acceleration"),
        (dict(kind="equispaced", center_fractions=[0.08], accelerations=[4.5]), "integer"),
        (dict(kind="random", center_fractions=[0.0], accelerations=[4]), r"center fraction must be in \(0, 1\)"),
        (dict(kind="random", center_fractions=[1.0], accelerations=[4]), r"center fraction must be in \(0, 1\)"),
        (dict(kind="random", center_fractions=[-0.1], accelerations=[4]), r"center fraction must be in \(0, 1\)"),
        (dict(kind="random", center_fractions=["0.08"], accelerations=[4]), "center fraction"),
        (dict(kind="random", center_fractions=[0.08, 0.04], accelerations=[4]), "same length"),
        (dict(kind="random", center_fractions=[], accelerations=[], allow_any_combination=True), "must not be empty"),
    ],
)
def test_bad_spec_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskSpec(**kwargs)


@pytest.mark.parametrize(
    "kind, num_cols, acceleration, center_fraction, offset, message",
    [
        ("random", 1, 4, 0.08, None, "num_cols must be an integer >= 2"),
        ("random", 368.0, 4, 0.08, None, "num_cols must be an integer"),
        ("random", 10, 4, 0.04, None, "rounds to 0 center lines"),
        ("random", 3, 4, 0.9, None, "not fewer than the 3 columns"),
        ("equispaced-fraction", 100, 4, 0.3, None, "center lines already reach acceleration"),
        ("equispaced", 368, 4, 0.08, -1, "offset must be an integer in"),
        ("equispaced", 368, 4, 0.08, 368, "offset must be an integer in"),
    ],
)
def test_bad_call_raises(kind, num_cols, acceleration, center_fraction, offset, message):
    with pytest.raises(ValueError, match=message):
        make_mask(kind, num_cols, acceleration, center_fraction, seed=0, offset=offset)


def test_failed_call_does_not_advance_rng():
    spec = MaskSpec("random", [0.08], [4], seed=11)
    sampler, fresh = MaskSampler(spec), MaskSampler(spec)
    with pytest.raises(ValueError):
        sampler(4)
    with pytest.raises(ValueError, match="seed"):
        sampler(368, seed=-3)
    assert_same(sampler(368), fresh(368))


def test_sampler_requires_spec():
    with pytest.raises(ValueError, match="MaskSpec"):
        MaskSampler({"kind": "random"})


# ----------------------------------------------------------------------------- centre-line detection


def fastmri_detected_count(mask_1d):
    """fastMRI's E2E-VarNet detection on a mask shaped (1, 1, 1, W, 1)."""
    model = SensitivityModel(chans=2, num_pools=1)
    mask = torch.as_tensor(np.asarray(mask_1d, dtype=np.float32)).reshape(1, 1, 1, -1, 1)
    pad, num_low = model.get_pad_and_num_low_freqs(mask)
    return int(num_low.item())


def detection_cases():
    cases = {}
    for kind in MASK_KINDS:
        for num_cols in (368, 372, 33):
            for center_fraction, acceleration in [(0.08, 4), (0.04, 8), (0.2, 4)]:
                cases[f"{kind}-{num_cols}-{center_fraction}"] = make_mask(
                    kind, num_cols, acceleration, center_fraction, seed=num_cols
                )[0]
    cases["fully-sampled"] = np.ones(368, bool)
    cases["left-half-full"] = np.r_[np.ones(184, bool), np.ones(5, bool), np.zeros(179, bool)]
    cases["right-half-full"] = np.r_[np.zeros(180, bool), np.ones(4 + 184, bool)]
    cases["center-unsampled"] = np.r_[np.ones(184, bool), np.zeros(1, bool), np.ones(183, bool)]
    cases["asymmetric-block"] = np.r_[np.zeros(170, bool), np.ones(24, bool), np.zeros(174, bool)]
    cases["odd-width-block"] = np.r_[np.zeros(10, bool), np.ones(7, bool), np.zeros(10, bool)]
    cases["two-columns"] = np.array([True, False])
    rng = np.random.default_rng(0)
    for i in range(5):
        cases[f"random-bits-{i}"] = rng.random(64 + i) < 0.7
    return cases


DETECTION_CASES = detection_cases()


@pytest.mark.parametrize("name", sorted(DETECTION_CASES))
def test_detect_acs_count_matches_fastmri(name):
    mask = DETECTION_CASES[name]
    assert detect_acs_count(mask) == fastmri_detected_count(mask)
    assert detect_acs_count(torch.as_tensor(mask)) == detect_acs_count(mask.astype(np.float32))


def test_detect_acs_count_known_values():
    assert detect_acs_count(np.ones(368, bool)) == 1  # fastMRI quirk: no unsampled line found -> 1
    mask, num_low = make_mask("equispaced", 368, 4, 0.08, offset=0, seed=0)
    assert num_low == 29
    # the odd 29-line block (plus adjacent equispaced lines) is detected symmetric and even
    assert detect_acs_count(mask) % 2 == 0
    assert detect_acs_count(center_block(320, 26)) == 26
    assert detect_acs_count(center_block(320, 25)) == 24


def test_contiguous_center_lines():
    assert contiguous_center_lines(np.ones(368, bool)) == 368
    assert contiguous_center_lines(center_block(320, 25)) == 25
    assert contiguous_center_lines(center_block(368, 29)) == 29
    assert contiguous_center_lines(DETECTION_CASES["center-unsampled"]) == 0
    assert contiguous_center_lines(DETECTION_CASES["asymmetric-block"]) == 24
    for kind in MASK_KINDS:
        mask, num_low = make_mask(kind, 372, 4, 0.08, seed=9)
        assert contiguous_center_lines(mask) >= num_low


def test_detection_rejects_bad_masks():
    with pytest.raises(ValueError, match="1-D mask"):
        detect_acs_count(np.ones((2, 368)))
    with pytest.raises(ValueError, match="at least 2 columns"):
        detect_acs_count(np.ones(1))
    with pytest.raises(ValueError, match="1-D mask"):
        contiguous_center_lines(np.ones((1, 8)))


# ----------------------------------------------------------------------------- applying masks


def test_apply_mask_matches_fastmri_apply_mask():
    gen = torch.Generator().manual_seed(0)
    kspace = torch.randn(2, 4, 24, 40, dtype=torch.complex64, generator=gen)
    fname_seed = tuple(map(ord, "file1000001.h5"))
    mask, _ = make_mask("random", 40, 4, 0.08, seed=fname_seed)
    ref, _, _ = fm_transforms.apply_mask(
        torch.view_as_real(kspace), fm_subsample.RandomMaskFunc([0.08], [4]), seed=fname_seed
    )
    out = apply_mask(kspace, mask)
    assert out.shape == kspace.shape and out.dtype == kspace.dtype
    torch.testing.assert_close(out, torch.view_as_complex(ref.contiguous()), rtol=0, atol=0)


def test_apply_mask_zeroes_unsampled_columns_only():
    kspace = torch.full((3, 5, 6), complex(float("nan"), 1.0), dtype=torch.complex128)
    mask = np.array([1, 0, 1, 1, 0, 0], dtype=bool)
    out = apply_mask(kspace, torch.as_tensor(mask))
    assert torch.all(out[..., ~torch.as_tensor(mask)] == 0)  # exact zeros even over NaN
    assert torch.isnan(out[..., torch.as_tensor(mask)].real).all()
    assert kspace.isnan().any()  # input untouched


def test_apply_mask_rejects_bad_inputs():
    with pytest.raises(ValueError, match="5 columns but kspace shape"):
        apply_mask(torch.zeros(2, 4, 6, dtype=torch.complex64), np.ones(5, bool))
    with pytest.raises(ValueError, match="complex"):
        apply_mask(torch.zeros(4, 6), np.ones(6, bool))
    with pytest.raises(ValueError, match="1-D mask"):
        apply_mask(torch.zeros(4, 6, dtype=torch.complex64), np.ones((1, 6), bool))
