import numpy as np
import pytest
import SimpleITK as sitk
from conftest import small_case

from hnseg_infer.errors import InputError, OutputError
from hnseg_infer.geometry.grid import Grid
from hnseg_infer.io.images import (
    detect_pet_unit,
    discover_inputs,
    load_case,
    repair_nonfinite,
    validate_mask,
    write_image_atomic,
)


def test_pet_unit_suv_and_bqml():
    _, pet = small_case()
    suv = detect_pet_unit(pet)
    assert suv.unit == "suv" and suv.suv_per_stored_value == 1.0
    bqml = detect_pet_unit(pet * 5000.0)
    assert bqml.unit == "bqml" and "estimated" in bqml.note
    # the body (SUV 1 × 5000) is the median of the body voxels, so SUV ≈ stored / 5000
    assert bqml.suv_per_stored_value == pytest.approx(1 / 5000, rel=0.01)


def test_a_few_nans_are_repaired_and_reported(tmp_path):
    ct, _ = small_case()
    array = sitk.GetArrayFromImage(ct)
    array[0, 0, :5] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(ct)
    warnings = []
    fixed = repair_nonfinite(broken, role="ct", path=tmp_path / "ct.mha", warnings=warnings)
    assert np.all(sitk.GetArrayFromImage(fixed)[0, 0, :5] == -1024) and "5 non-finite" in warnings[0]
    assert Grid.of(fixed) == Grid.of(ct)


def test_partial_overlap_warns(tmp_path):
    ct, pet = small_case()
    pet.SetOrigin((pet.GetOrigin()[0], pet.GetOrigin()[1], pet.GetOrigin()[2] + 45.0))
    sitk.WriteImage(ct, str(tmp_path / "ct.mha"))
    sitk.WriteImage(pet, str(tmp_path / "pet.mha"))
    case = load_case(tmp_path / "ct.mha", tmp_path / "pet.mha")
    assert any("PET covers only" in w for w in case.warnings)


def test_discover_ignores_hidden_and_non_image_files(tmp_path):
    for folder in ("ct", "pet"):
        (tmp_path / "images" / folder).mkdir(parents=True)
        (tmp_path / "images" / folder / f"{folder}.mha").write_bytes(b"x")
        (tmp_path / "images" / folder / ".DS_Store").write_bytes(b"x")
        (tmp_path / "images" / folder / "notes.txt").write_text("x")
    ct, pet = discover_inputs(tmp_path)
    assert ct.name == "ct.mha" and pet.name == "pet.mha"
    with pytest.raises(InputError, match="does not exist"):
        discover_inputs(tmp_path / "nope")


def test_validate_mask_rejects_wrong_type_values_and_grid():
    ct, _ = small_case()
    grid = Grid.of(ct)
    good = grid.image_from_array(np.zeros(grid.size_zyx, np.uint8))
    validate_mask(good, grid)
    with pytest.raises(OutputError, match="uint8"):
        validate_mask(sitk.Cast(good, sitk.sitkInt16), grid)
    with pytest.raises(OutputError, match=r"\[0, 3\]"):
        validate_mask(grid.image_from_array(np.full(grid.size_zyx, 3, np.uint8) * (np.arange(grid.size_zyx[2]) % 2).astype(np.uint8)), grid)
    shifted = sitk.Image(good)
    shifted.SetOrigin((grid.origin_xyz_mm[0] + 0.01, *grid.origin_xyz_mm[1:]))
    with pytest.raises(OutputError, match="differs from the CT grid"):
        validate_mask(shifted, grid)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    image = sitk.Image([4, 4, 4], sitk.sitkUInt8)
    target = tmp_path / "out" / "images" / "x" / "output.unknownformat"
    with pytest.raises(OutputError, match="cannot write"):
        write_image_atomic(image, target)
    assert not (tmp_path / "out").exists()
    write_image_atomic(image, tmp_path / "ok" / "output.mha")
    assert [p.name for p in (tmp_path / "ok").iterdir()] == ["output.mha"]
