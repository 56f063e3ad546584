import json

import numpy as np
import pytest

from hnseg_infer.errors import RecipeError
from hnseg_infer.restore.postprocess import PostprocessConfig, postprocess

ISO = (1.0, 1.0, 1.0)
THICK_Z = (1.0, 1.0, 3.0)  # x, y, z mm: 3 mm slices


def run(labels, spacing=ISO, **config):
    return postprocess(labels, spacing_xyz_mm=spacing, config=PostprocessConfig(**config))


def step(record, name):
    (found,) = [s for s in record["steps"] if s["step"] == name]
    return found


def line_of_ten(label=1):
    labels = np.zeros((9, 12, 16), np.uint8)
    labels[4, 5, 3:13] = label  # 10 voxels along x
    return labels


# --- min volume -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing, survives", [(ISO, False), (THICK_Z, True), ((3.0, 1.0, 1.0), True)])
def test_min_volume_is_in_mm3_with_the_anisotropic_spacing(spacing, survives):
    out, record = run(line_of_ten(), spacing, min_volume_mm3={1: 25})  # 10 voxels: 10 mm³ or 30 mm³
    assert out.sum() == (10 if survives else 0)
    removed = step(record, "min_volume")["removed"]
    assert len(removed) == (0 if survives else 1)


def test_min_volume_is_per_label_and_strict():
    labels = line_of_ten(1)
    labels[1, 1, 1:4] = 2  # 3 voxels of GTVn
    out, record = run(labels, THICK_Z, min_volume_mm3={1: 30, 2: 9.5})  # GTVp 30 mm³ is not < 30; GTVn 9 mm³ < 9.5
    assert (out == 1).sum() == 10 and (out == 2).sum() == 0
    (removed,) = step(record, "min_volume")["removed"]
    assert removed == {"label": 2, "name": "GTVn", "voxels": 3, "volume_mm3": 9.0, "centroid_index_zyx": [1.0, 1.0, 2.0]}
    # a zero or missing threshold keeps everything
    out, record = run(labels, THICK_Z, min_volume_mm3={1: 0})
    assert np.array_equal(out, labels) and not step(record, "min_volume")["enabled"]


def test_diagonal_voxels_are_one_component_26_connectivity():
    labels = np.zeros((6, 6, 6), np.uint8)
    for i in range(3):
        labels[i + 1, i + 1, i + 2] = 1  # touch only at corners
    out, record = run(labels, min_volume_mm3={1: 3})  # one 3-voxel component: 3 mm³ is kept
    assert out.sum() == 3
    out, record = run(labels, min_volume_mm3={1: 3.5})
    assert out.sum() == 0
    (removed,) = step(record, "min_volume")["removed"]
    assert removed["voxels"] == 3 and removed["centroid_index_zyx"] == [2.0, 2.0, 3.0]


def test_centroids_are_full_array_zyx_indices():
    labels = np.zeros((20, 30, 40), np.uint8)
    labels[15, 2:4, 30] = 2  # far from the origin, elongated along y
    labels[3, 25, 5] = 1     # so the foreground bounding box starts away from 0 too
    _, record = run(labels, THICK_Z, min_volume_mm3={"GTVn": 100, "GTVp": 100})
    by_label = {r["label"]: r for r in step(record, "min_volume")["removed"]}
    assert by_label[2]["centroid_index_zyx"] == [15.0, 2.5, 30.0]
    assert by_label[1]["centroid_index_zyx"] == [3.0, 25.0, 5.0]
    assert by_label[2]["volume_mm3"] == 6.0


# --- keep largest -----------------------------------------------------------------------------------------------

def test_keep_largest_gtvp_leaves_nodes_alone():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:5, 2:5, 2:5] = 1        # 27 voxels
    labels[10:12, 10:12, 10:12] = 1  # 8 voxels
    labels[15, 15, 15] = 2
    labels[17, 2, 2] = 2
    out, record = run(labels, THICK_Z, keep_largest_gtvp=True)
    assert (out == 1).sum() == 27 and out[3, 3, 3] == 1 and out[10, 10, 10] == 0
    assert (out == 2).sum() == 2
    s = step(record, "keep_largest_gtvp")
    assert s["kept"]["voxels"] == 27 and s["kept"]["volume_mm3"] == 81.0
    assert [(r["label"], r["voxels"], r["centroid_index_zyx"]) for r in s["removed"]] == [(1, 8, [10.5, 10.5, 10.5])]


def test_steps_run_in_order_small_removal_then_largest_then_distance():
    labels = np.zeros((10, 10, 60), np.uint8)
    labels[4:7, 4:7, 2:5] = 1     # GTVp, 27 voxels, far from the node
    labels[5, 5, 44:46] = 1       # a 2-voxel GTVp speck next to the node
    labels[5, 5, 50:52] = 2       # the node: 5 mm from the speck, 46 mm from the big GTVp
    _, record = run(labels, min_volume_mm3={1: 1}, keep_largest_gtvp=True, gtvn_max_distance_to_gtvp_mm=10)
    assert [s["step"] for s in record["steps"]] == ["min_volume", "keep_largest_gtvp", "gtvn_distance_to_gtvp"]
    # the distance prior sees GTVp after keep-largest, so the node is now far and dropped
    out, record = run(labels, keep_largest_gtvp=True, gtvn_max_distance_to_gtvp_mm=10)
    assert (out == 2).sum() == 0
    assert step(record, "gtvn_distance_to_gtvp")["removed"][0]["distance_mm"] == pytest.approx(46.0)
    # ... and without keep-largest the speck keeps it
    out, _ = run(labels, gtvn_max_distance_to_gtvp_mm=10)
    assert (out == 2).sum() == 2
    # small-component removal first: with the speck gone, keep-largest has nothing to remove
    out, record = run(labels, min_volume_mm3={1: 3}, keep_largest_gtvp=True)
    assert len(step(record, "min_volume")["removed"]) == 1 and step(record, "keep_largest_gtvp")["removed"] == []


# --- distance prior ---------------------------------------------------------------------------------------------

def nodes_around_a_tumour():
    labels = np.zeros((30, 20, 60), np.uint8)
    labels[5:8, 9:12, 10:13] = 1  # GTVp cube, z 5..7, x 10..12
    labels[11, 10, 11] = 2        # A: 4 slices above the top face (dz = 4 voxels)
    labels[6, 10, 16] = 2         # B: 4 voxels beyond the +x face
    labels[6, 10, 24] = 2         # C: 12 voxels beyond the +x face
    labels[6, 10, 40:42] = 2      # D: 28 voxels along x
    return labels


def surviving_nodes(out):
    points = {"A": (11, 10, 11), "B": (6, 10, 16), "C": (6, 10, 24), "D": (6, 10, 40)}
    return {name for name, zyx in points.items() if out[zyx] == 2}


def test_distance_prior_uses_the_anisotropic_spacing():
    labels = nodes_around_a_tumour()
    # 3 mm slices: A is 12 mm away along z, B 4 mm and C 12 mm along x (1 mm)
    out, record = run(labels, THICK_Z, gtvn_max_distance_to_gtvp_mm=12)
    assert surviving_nodes(out) == {"A", "B", "C"}  # 12 mm does not exceed 12 mm
    out, record = run(labels, THICK_Z, gtvn_max_distance_to_gtvp_mm=11.5)
    assert surviving_nodes(out) == {"B"}
    removed = {tuple(r["centroid_index_zyx"]): r["distance_mm"] for r in step(record, "gtvn_distance_to_gtvp")["removed"]}
    assert removed == {(11.0, 10.0, 11.0): pytest.approx(12.0), (6.0, 10.0, 24.0): pytest.approx(12.0),
                       (6.0, 10.0, 40.5): pytest.approx(28.0)}
    # isotropic 1 mm: A is only 4 mm away and survives
    out, _ = run(labels, ISO, gtvn_max_distance_to_gtvp_mm=11.5)
    assert surviving_nodes(out) == {"A", "B"}
    assert (out == 1).sum() == 27  # GTVp untouched


def test_distance_is_to_the_nearest_voxel_oblique():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[1, 1, 1] = 1
    labels[4, 5, 1] = 2  # dz 3 slices × 2 mm = 6 mm, dy 4 × 0.5 mm = 2 mm → sqrt(40)
    _, record = run(labels, (1.0, 0.5, 2.0), gtvn_max_distance_to_gtvp_mm=6)
    (removed,) = step(record, "gtvn_distance_to_gtvp")["removed"]
    assert removed["distance_mm"] == pytest.approx(np.sqrt(40), abs=1e-3)
    assert removed["label"] == 2 and removed["voxels"] == 1 and removed["volume_mm3"] == 1.0


def test_no_gtvp_keeps_all_nodes_and_says_so():
    labels = nodes_around_a_tumour()
    labels[labels == 1] = 0
    out, record = run(labels, THICK_Z, gtvn_max_distance_to_gtvp_mm=0)
    assert np.array_equal(out, labels)
    s = step(record, "gtvn_distance_to_gtvp")
    assert s["removed"] == [] and "no GTVp" in s["skipped"]


# --- contract ---------------------------------------------------------------------------------------------------

def test_input_not_modified_and_output_is_a_new_uint8_array():
    labels = nodes_around_a_tumour()
    before = labels.copy()
    out, _ = run(labels, THICK_Z, min_volume_mm3={2: 10}, keep_largest_gtvp=True, gtvn_max_distance_to_gtvp_mm=5)
    assert np.array_equal(labels, before)
    assert out.dtype == np.uint8 and out.shape == labels.shape and not np.shares_memory(out, labels)
    assert not np.array_equal(out, labels)
    # a no-op config still returns a copy
    out, record = run(labels)
    assert np.array_equal(out, labels) and not np.shares_memory(out, labels)
    assert all(s["removed"] == [] for s in record["steps"])


def test_record_is_json_and_counts_voxels():
    labels = nodes_around_a_tumour()
    out, record = run(labels, THICK_Z, min_volume_mm3={"GTVn": 4}, gtvn_max_distance_to_gtvp_mm=11.5)
    again = json.loads(json.dumps(record))
    assert again["spacing_xyz_mm"] == [1.0, 1.0, 3.0] and again["voxel_volume_mm3"] == 3.0
    assert again["config"] == {"min_volume_mm3": {"GTVn": 4.0}, "keep_largest_gtvp": False,
                               "gtvn_max_distance_to_gtvp_mm": 11.5}
    assert again["voxels_before"] == {"GTVp": 27, "GTVn": 5}
    assert again["voxels_after"] == {"GTVp": int((out == 1).sum()), "GTVn": int((out == 2).sum())}
    # the 2-voxel node (6 mm³) survives 4 mm³; the 1-voxel nodes (3 mm³) do not
    assert [r["voxels"] for r in step(again, "min_volume")["removed"]] == [1, 1, 1]
    (far,) = step(again, "gtvn_distance_to_gtvp")["removed"]
    assert set(far) == {"label", "name", "voxels", "volume_mm3", "centroid_index_zyx", "distance_mm"}
    assert far["distance_mm"] == pytest.approx(28.0)


def test_bad_arrays_and_spacing_are_value_errors():
    with pytest.raises(ValueError, match="3-D"):
        run(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="spacing_xyz_mm"):
        run(np.zeros((4, 4, 4), np.uint8), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="0, 1, 2"):
        run(np.full((4, 4, 4), 3, np.uint8))


# --- config -----------------------------------------------------------------------------------------------------

def test_from_dict_label_names_and_defaults():
    c = PostprocessConfig.from_dict({"min_volume_mm3": {"GTVp": 100, "2": 50.5}, "keep_largest_gtvp": True,
                                     "gtvn_max_distance_to_gtvp_mm": 40})
    assert c.min_volume_mm3 == {1: 100.0, 2: 50.5} and c.keep_largest_gtvp and c.gtvn_max_distance_to_gtvp_mm == 40.0
    empty = PostprocessConfig.from_dict({})
    assert empty.min_volume_mm3 == {} and not empty.keep_largest_gtvp and empty.gtvn_max_distance_to_gtvp_mm is None
    assert PostprocessConfig.from_dict(c.to_dict()) == c


def test_from_dict_unknown_key_names_it_and_lists_the_allowed():
    with pytest.raises(RecipeError) as info:
        PostprocessConfig.from_dict({"min_volume": 3})
    message = str(info.value)
    assert "min_volume'" in message and "postprocess" in message
    for key in ("min_volume_mm3", "keep_largest_gtvp", "gtvn_max_distance_to_gtvp_mm"):
        assert key in message


@pytest.mark.parametrize("d, words", [
    ({"min_volume_mm3": {"GTVp": -1}}, ["min_volume_mm3", "GTVp", "-1"]),
    ({"min_volume_mm3": {"tumour": 10}}, ["min_volume_mm3", "tumour", "GTVn"]),
    ({"min_volume_mm3": {"GTVp": 10, "1": 20}}, ["GTVp", "twice"]),
    ({"min_volume_mm3": {"GTVn": "10"}}, ["min_volume_mm3", "'10'"]),
    ({"min_volume_mm3": [10, 20]}, ["min_volume_mm3"]),
    ({"gtvn_max_distance_to_gtvp_mm": -5}, ["gtvn_max_distance_to_gtvp_mm", "-5"]),
    ({"gtvn_max_distance_to_gtvp_mm": True}, ["gtvn_max_distance_to_gtvp_mm", "True"]),
    ({"keep_largest_gtvp": 1}, ["keep_largest_gtvp", "1"]),
])
def test_bad_config_values_are_recipe_errors_naming_key_and_value(d, words):
    with pytest.raises(RecipeError) as info:
        PostprocessConfig.from_dict(d)
    for word in words:
        assert word in str(info.value)


def test_direct_construction_is_validated_too():
    with pytest.raises(RecipeError, match="gtvn_max_distance_to_gtvp_mm"):
        PostprocessConfig(min_volume_mm3={}, gtvn_max_distance_to_gtvp_mm=float("nan"))
    with pytest.raises(RecipeError, match="min_volume_mm3"):
        PostprocessConfig(min_volume_mm3={3: 10})
