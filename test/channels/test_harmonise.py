"""Spectrum-swapping CT harmonisation: the recipe op against a DCT written out here (the DCT matrix and scipy.fft's
1-D transforms, not the module's dctn), the high frequencies untouched, the reference file's checks, and the
mapping to a grid of another size."""

import json

import numpy as np
import pytest
import scipy.fft
from builders import model_entry, write_weights

from hnseg_infer.channels.harmonise import (
    SpectrumReference,
    load_reference,
    low_frequency_block,
    save_reference,
    swap_low_frequencies,
)
from hnseg_infer.channels.intensity import apply_ops, load_spectra, validate_ops
from hnseg_infer.errors import RecipeError
from hnseg_infer.recipe.load import load_recipe

pytestmark = pytest.mark.torch

RNG = np.random.default_rng(7)
SIZE_ZYX = (5, 24, 20)


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II: C[k, i] = a(k) cos(pi (2i + 1) k / 2n), a(0) = sqrt(1/n), a(k) = sqrt(2/n)."""
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    c[0] /= np.sqrt(2.0)
    return c


def direct_dct2(slice_yx):
    """2-D DCT of one slice: scipy.fft's 1-D orthonormal DCT-II along y, then along x."""
    return scipy.fft.dct(scipy.fft.dct(slice_yx, type=2, norm="ortho", axis=0), type=2, norm="ortho", axis=1)


def direct_idct2(coefficients_yx):
    return scipy.fft.idct(scipy.fft.idct(coefficients_yx, type=2, norm="ortho", axis=1), type=2, norm="ortho",
                          axis=0)


def direct_swap(x_zyx, reference_zyx, radius):
    """SSIMH as its authors' code does it, slice by slice: dct2, A(1:b, 1:b) = B(1:b, 1:b), idct2."""
    out = np.empty(x_zyx.shape)
    for k in range(x_zyx.shape[0]):
        a, b = direct_dct2(x_zyx[k].astype(np.float64)), direct_dct2(reference_zyx[k].astype(np.float64))
        a[:radius, :radius] = b[:radius, :radius]
        out[k] = direct_idct2(a)
    return out


def ct_like(size_zyx=SIZE_ZYX, *, offset=0.0):
    """A CT-ish volume: smooth body, an intensity gradient, noise (values in HU)."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in size_zyx], indexing="ij")
    body = np.where(y ** 2 + x ** 2 < 0.6, 40.0, -1000.0)
    return (body + 80 * x + 30 * z + offset + RNG.normal(0, 15, size_zyx)).astype(np.float32)


def write_reference(folder, reference_zyx, *, radius=3, name="reference_ct_dct.npz"):
    folder.mkdir(parents=True, exist_ok=True)
    return save_reference(folder / name, low_frequency_block(reference_zyx, radius), reference_zyx.shape)


def swap_op(folder, *, radius=3, name="reference_ct_dct.npz"):
    ops = validate_ops([{"op": "spectrum_swap", "reference": name, "radius": radius}], source="ct", where="t")
    return load_spectra(ops, folder=folder, where="t")


def test_block_is_the_matrix_dct_of_each_slice(tmp_path):
    x = ct_like()
    block = low_frequency_block(x, 4)
    cy, cx = dct_matrix(SIZE_ZYX[1]), dct_matrix(SIZE_ZYX[2])
    for k in range(SIZE_ZYX[0]):
        assert np.allclose(block[k], (cy @ x[k].astype(np.float64) @ cx.T)[:4, :4], rtol=0, atol=1e-8)
    assert np.isclose(block[0, 0, 0], x[0].astype(np.float64).mean() * np.sqrt(SIZE_ZYX[1] * SIZE_ZYX[2]))


@pytest.mark.parametrize("radius", [1, 3, 5])
def test_op_equals_the_direct_computation(tmp_path, radius):
    x, reference = ct_like(), ct_like(offset=200.0)
    write_reference(tmp_path, reference, radius=radius)
    out = apply_ops(x.copy(), swap_op(tmp_path, radius=radius), suv_per_stored_value=1.0)
    assert out.dtype == np.float32 and out.shape == x.shape
    assert np.allclose(out, direct_swap(x, reference, radius), rtol=0, atol=1e-3)


def test_only_the_low_frequency_block_changes(tmp_path):
    x, reference = ct_like(), ct_like(offset=-300.0)
    write_reference(tmp_path, reference)
    out = apply_ops(x.copy(), swap_op(tmp_path), suv_per_stored_value=1.0)
    for k in range(SIZE_ZYX[0]):
        before, after, wanted = (direct_dct2(v[k].astype(np.float64)) for v in (x, out, reference))
        change = after - before
        outside = np.ones(change.shape, bool)
        outside[:3, :3] = False  # the block of radius 3: max(u, v) < 3, nine coefficients
        assert np.abs(change[outside]).max() < 1e-3  # float32 output rounding only
        assert np.allclose(after[:3, :3], wanted[:3, :3], atol=1e-2)
        assert np.abs(change[:3, :3]).max() > 1.0  # the mean and the gradients did change
    # (0, 3), (3, 0) and (3, 3) lie outside max(u, v) < 3 even though u + v or u, v alone is small
    assert np.isclose(direct_dct2(out[0].astype(np.float64))[0, 3], direct_dct2(x[0].astype(np.float64))[0, 3],
                      atol=1e-3)


def test_a_slice_whose_block_is_the_references_is_unchanged(tmp_path):
    x = ct_like()
    write_reference(tmp_path, x)
    assert np.allclose(apply_ops(x.copy(), swap_op(tmp_path), suv_per_stored_value=1.0), x, rtol=0, atol=1e-3)
    # and the low-frequency block of a different image with the same block: same image back
    y = ct_like()
    same_low = direct_swap(y, x, 3).astype(np.float32)
    assert np.allclose(apply_ops(same_low.copy(), swap_op(tmp_path), suv_per_stored_value=1.0), same_low, atol=1e-3)


def test_input_is_not_modified_and_channel_mean_follows_the_reference(tmp_path):
    x, reference = ct_like(), ct_like(offset=500.0)
    write_reference(tmp_path, reference)
    kept = x.copy()
    out = apply_ops(x, swap_op(tmp_path), suv_per_stored_value=1.0)
    assert np.array_equal(x, kept)
    assert np.allclose(out.mean(axis=(1, 2)), reference.mean(axis=(1, 2)), atol=1e-2)  # DC term: the slice mean


def test_grid_of_another_size_uses_the_mapped_reference_and_says_so(tmp_path):
    constant = np.full((10, 30, 40), 25.0, np.float32)  # reference: every slice has mean 25 HU
    path = write_reference(tmp_path, constant)
    reference = load_reference(path, radius=3, where="t")
    block, note = reference.block_for((10, 30, 40), 3)
    assert note is None and np.array_equal(block, reference.low_frequency_dct[:, :3, :3])
    block, note = reference.block_for((4, 15, 20), 3)
    assert block.shape == (4, 3, 3) and "10×30×40" in note and "4×15×20" in note
    x = ct_like((4, 15, 20))
    out = swap_low_frequencies(x, block)
    assert np.allclose(out.mean(axis=(1, 2)), 25.0, atol=1e-3)  # the mapped DC keeps the reference's slice mean
    rows = reference.block_for((19, 30, 40), 3)[0]
    assert np.allclose(rows, reference.low_frequency_dct[np.rint(np.arange(19) * 9 / 18).astype(int), :3, :3])


@pytest.mark.parametrize("ops,source,message", [
    ([{"op": "spectrum_swap", "reference": "reference_ct_dct.npz"}], "pet", "applies only to a 'ct' source"),
    ([{"op": "spectrum_swap", "reference": "reference_ct_dct.npz", "radius": 0}], "ct", "radius must be an integer"),
    ([{"op": "spectrum_swap", "reference": "reference_ct_dct.npz", "radius": 2.5}], "ct", "radius must be an"),
    ([{"op": "spectrum_swap", "reference": "/etc/passwd"}], "ct", "a file name in the recipe's folder"),
    ([{"op": "spectrum_swap", "reference": "../x.npz"}], "ct", "a file name in the recipe's folder"),
    ([{"op": "spectrum_swap", "reference": "nothere.npz"}], "ct", "does not exist"),
    ([{"op": "spectrum_swap", "reference": "reference_ct_dct.npz", "radius": 4}], "ct", "lower 'radius'"),
    ([{"op": "spectrum_swap"}], "ct", "misses \\['reference'\\]"),
])
def test_bad_ops_are_refused(tmp_path, ops, source, message):
    write_reference(tmp_path, ct_like())
    with pytest.raises(RecipeError, match=message):
        load_spectra(validate_ops(ops, source=source, where="t"), folder=tmp_path, where="t")


def test_parsing_reads_no_file_and_an_unloaded_reference_refuses_to_run():
    (op,) = validate_ops([{"op": "spectrum_swap", "reference": "nothere.npz"}], source="ct", where="t")
    assert op.reference == "nothere.npz" and op.spectrum is None
    with pytest.raises(RecipeError, match="parsed but not loaded"):
        apply_ops(ct_like(), (op,), suv_per_stored_value=1.0)


@pytest.mark.parametrize("content,message", [
    (b"not a zip file at all", "cannot be read as a NumPy .npz"),
    ("no_block", "lacks \\['low_frequency_dct'\\]"),
    ("bad_shape", "low_frequency_dct has shape"),
    ("bad_size", "grid_size_zyx must be 3 positive integers"),
    ("nan", "non-finite"),
])
def test_corrupt_reference_files_are_recipe_errors(tmp_path, content, message):
    path = tmp_path / "reference_ct_dct.npz"
    good = low_frequency_block(ct_like(), 3)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        arrays = {"no_block": {"grid_size_zyx": np.array(SIZE_ZYX)},
                  "bad_shape": {"low_frequency_dct": good[:, :, :2], "grid_size_zyx": np.array(SIZE_ZYX)},
                  "bad_size": {"low_frequency_dct": good, "grid_size_zyx": np.array([5.0, 24.0, 20.0])},
                  "nan": {"low_frequency_dct": good * np.nan, "grid_size_zyx": np.array(SIZE_ZYX)}}[content]
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    with pytest.raises(RecipeError, match=message):
        swap_op(tmp_path)


def _harmonised_entry(**overrides):
    channels = [{"source": "ct", "ops": [{"op": "spectrum_swap", "reference": "reference_ct_dct.npz"},
                                         {"op": "window", "min": -1000, "max": 1000, "to": [-1, 1]}]},
                {"source": "pet", "ops": [{"op": "suv"}]}]
    return model_entry(spacing_xyz_mm=[1.0, 1.0, 1.0], channels=channels, **overrides)


def test_recipe_checks_the_reference_against_the_fixed_roi_grid_and_records_its_hash(tmp_path):
    box = {"method": "pet_threshold_head_neck_box", "params": {"size_mm": [20.0, 24.0, 31.0]}}
    folder = tmp_path / "w"
    write_reference(folder, ct_like((31, 24, 20)))
    recipe = load_recipe(write_weights(folder, models=[_harmonised_entry()], roi=box))
    record = recipe.to_dict()["stages"][0]["models"][0]
    ref = recipe.models[0].channels[0].ops[0].spectrum
    assert isinstance(ref, SpectrumReference) and ref.grid_size_zyx == (31, 24, 20)
    assert record["references"] == [{"file": "reference_ct_dct.npz", "sha256": ref.sha256}]
    assert len(ref.sha256) == 64
    write_reference(folder, ct_like((30, 24, 20)))  # one slice short of the 31 mm box at 1 mm
    with pytest.raises(RecipeError, match="computed on a 30×24×20 .* grid in its ROI is 31×24×20"):
        load_recipe(folder)


def test_variable_size_roi_is_not_checked_at_load_and_before_sampling_is_refused(tmp_path):
    folder = tmp_path / "w"
    write_reference(folder, ct_like((7, 24, 20)))
    assert load_recipe(write_weights(folder, models=[_harmonised_entry()], roi={"method": "ct_extent"}))
    entry = _harmonised_entry()
    entry["channels"][0]["ops_before_sampling"] = True
    (folder / "recipe.json").write_text(json.dumps({**json.loads((folder / "recipe.json").read_text()),
                                                    "models": [entry]}))
    with pytest.raises(RecipeError, match="cannot run before sampling"):
        load_recipe(folder)
