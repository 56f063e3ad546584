import numpy as np
import SimpleITK as sitk

from builders import signed_permutations
from hnseg_infer.grid import Grid
from hnseg_infer.phantom import make_phantom, write_case

FAST = {"ct_spacing_xyz_mm": (3.0, 3.0, 3.0), "ct_size_xy": 170, "pet_spacing_xyz_mm": (5.0, 5.0, 5.0)}


def test_deterministic_from_the_seed():
    a, b = make_phantom(seed=2, **FAST), make_phantom(seed=2, **FAST)
    assert np.array_equal(sitk.GetArrayFromImage(a.ct), sitk.GetArrayFromImage(b.ct))
    assert np.array_equal(sitk.GetArrayFromImage(a.pet), sitk.GetArrayFromImage(b.pet))
    c = make_phantom(seed=3, **FAST)
    assert c.tumour_center_xyz_mm != a.tumour_center_xyz_mm


def test_label_on_the_ct_grid_and_tumour_where_it_was_placed():
    p = make_phantom(seed=2, **FAST)
    assert Grid.of(p.label) == Grid.of(p.ct) and Grid.of(p.pet) != Grid.of(p.ct)
    zyx = np.argwhere(sitk.GetArrayFromImage(p.label) == 1).mean(axis=0)
    centroid = Grid.of(p.ct).index_to_physical(zyx[::-1])[0]
    assert np.linalg.norm(centroid - p.tumour_center_xyz_mm) < 3.0
    pet_at_tumour = p.pet.EvaluateAtPhysicalPoint(p.tumour_center_xyz_mm, sitk.sitkLinear)
    assert pet_at_tumour > 3.0


def test_same_anatomy_under_a_permuted_direction():
    direction = signed_permutations()[13]
    a, b = make_phantom(seed=2, **FAST), make_phantom(seed=2, ct_direction=direction, **FAST)
    assert b.ct.GetDirection() == direction
    centroids = []
    for p in (a, b):
        zyx = np.argwhere(sitk.GetArrayFromImage(p.label) == 1).mean(axis=0)
        centroids.append(Grid.of(p.ct).index_to_physical(zyx[::-1])[0])
    assert np.linalg.norm(centroids[0] - centroids[1]) < 2.0


def test_write_case_layout(tmp_path):
    write_case(make_phantom(seed=2, fov="head-only", **FAST), tmp_path)
    for sub in ("input/images/ct", "input/images/pet", "reference"):
        assert len(list((tmp_path / sub).glob("*.mha"))) == 1
    ct = sitk.ReadImage(str(next((tmp_path / "input/images/ct").glob("*.mha"))))
    assert ct.GetPixelID() == sitk.sitkInt16
