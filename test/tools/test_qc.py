"""QC pictures: the view centre on oblique/permuted geometry, its fallbacks, the picture's orientation (contour
colours where radiological convention puts them), ROI boxes from run reports, a HECKTOR-2020-style small crop
(views centred on the data, box names apart, measured by matplotlib's renderer), and `hnseg qc`."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from builders import image_from_function, oblique_direction
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from hnseg_infer.cli.main import main
from hnseg_infer.errors import InputError
from hnseg_infer.geometry.grid import IDENTITY, Box, Grid
from hnseg_infer.tools.qc import (
    BOX_LABEL_GID,
    DPI,
    FIGURE_SIZE_IN,
    MASK_COLOURS,
    REFERENCE_COLOURS,
    boxes_from_report,
    draw_qc,
    qc_figure,
    view_centre,
)

CENTRE = np.array([10.0, -20.0, -150.0])  # centre of the CT field
GTVP = CENTRE + [-8.0, 5.0, 3.0]  # the largest lesion, radius 10 mm
NODE_LEFT = GTVP + [28.0, 0.0, 0.0]  # patient left of GTVp, in its axial and coronal planes
NODE_ANTERIOR_SUPERIOR = GTVP + [0.0, -28.0, 18.0]  # in GTVp's sagittal plane
PET_SPOT = CENTRE + [15.0, 15.0, -25.0]  # hottest PET voxel inside the CT
PET_SPOT_OUTSIDE_CT = CENTRE + [0.0, 0.0, 70.0]  # hotter, but outside the CT field
FLIP_PERMUTE = (0.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0)  # index x → +z, y → -x, z → +y


def _ct_geometry(direction):
    size, spacing = np.array([70, 60, 40]), np.array([1.4, 1.7, 2.5])
    d = np.asarray(direction).reshape(3, 3)
    origin = CENTRE - d @ (spacing * (size - 1) / 2) + [0.3, -0.2, 0.7]  # an offset, off the lattice
    return {"size_xyz": tuple(size.tolist()), "spacing_xyz_mm": tuple(spacing.tolist()),
            "origin_xyz_mm": tuple(origin.tolist()), "direction": tuple(direction)}


def _labels(points, *, gtvp=GTVP, nodes=(NODE_LEFT, NODE_ANTERIOR_SUPERIOR)):
    out = np.zeros(len(points))
    for node in nodes:
        out[np.linalg.norm(points - node, axis=1) <= 6.0] = 2
    if gtvp is not None:
        out[np.linalg.norm(points - gtvp, axis=1) <= 10.0] = 1
    return out


def _case(direction=FLIP_PERMUTE, *, label_fn=_labels):
    geometry = _ct_geometry(direction)
    def ct_values(p):
        body = np.linalg.norm((p - CENTRE)[:, :2] / [45.0, 40.0], axis=1) < 1
        return np.where(body, 40.0, -1000.0) + 20.0 * (_labels(p) > 0)

    ct = image_from_function(ct_values, **geometry)
    mask = sitk.Cast(image_from_function(label_fn, **geometry), sitk.sitkUInt8)

    def pet_values(p):
        hot = lambda q, suv, width: suv * np.exp(-np.sum((p - q) ** 2, axis=1) / (2 * width ** 2))  # noqa: E731
        return 0.5 + 6.0 * (_labels(p) == 1) + hot(PET_SPOT, 12.0, 4.0) + hot(PET_SPOT_OUTSIDE_CT, 30.0, 4.0)

    pet_spacing = np.array([4.0, 4.0, 3.27])
    pet = image_from_function(pet_values, size_xyz=(40, 40, 52), spacing_xyz_mm=tuple(pet_spacing),
                              origin_xyz_mm=tuple(CENTRE - pet_spacing * [19.5, 19.5, 25.5] + [1.1, -0.7, 0.4]),
                              direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return ct, pet, mask


def _empty_like(image):
    empty = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(image)
    return empty


@pytest.mark.parametrize("direction", [FLIP_PERMUTE, oblique_direction()], ids=["flip-permute", "oblique"])
def test_view_centre_is_the_largest_lesion_in_physical_space(direction):
    ct, pet, mask = _case(direction)
    centre = view_centre(mask=mask, reference=None, pet=pet, ct_grid=Grid.of(ct))
    assert centre.source == "mask" and centre.label == 1
    assert np.linalg.norm(np.subtract(centre.center_xyz_mm, GTVP)) < 0.75
    assert centre.volume_ml == pytest.approx(4 / 3 * np.pi * 10.0 ** 3 / 1000, rel=0.1)


def test_view_centre_falls_back_to_reference_then_pet_peak_inside_ct():
    ct, pet, reference = _case(label_fn=lambda p: _labels(p, gtvp=None, nodes=(NODE_LEFT,)))
    empty = _empty_like(ct)
    from_reference = view_centre(mask=empty, reference=reference, pet=pet, ct_grid=Grid.of(ct))
    assert from_reference.source == "reference" and from_reference.label == 2
    assert np.linalg.norm(np.subtract(from_reference.center_xyz_mm, NODE_LEFT)) < 0.75
    from_pet = view_centre(mask=empty, reference=empty, pet=pet, ct_grid=Grid.of(ct))
    assert from_pet.source == "pet peak" and from_pet.label is None
    assert np.linalg.norm(np.subtract(from_pet.center_xyz_mm, PET_SPOT)) < 3.5  # half a PET voxel's diagonal


def _colour_pixels(png, colour, *, tolerance=0.12):
    rgb = imread(png)[..., :3]
    return np.argwhere(np.linalg.norm(rgb - np.asarray(to_rgb(colour)), axis=-1) < tolerance)  # (row, col)


def _in_panel(pixels, *, width, height, column):
    """Pixels of the CT row's panel in `column` (0 axial, 1 coronal, 2 sagittal); the panels are ~0.24 wide."""
    rows, cols = pixels[:, 0], pixels[:, 1]
    keep = (rows < 0.5 * height) & (cols >= 0.24 * column * width) & (cols < 0.24 * (column + 1) * width)
    return pixels[keep]


def test_picture_shows_contours_in_patient_orientation(tmp_path):
    ct, pet, mask = _case(FLIP_PERMUTE)
    reference = sitk.Image(mask)
    png = tmp_path / "qc" / "case.png"
    centre = draw_qc(ct=ct, pet=pet, mask=mask, reference=reference, out_png=png, title="test", case="case",
                     boxes=[("head", Box.around(CENTRE, (80, 80, 80))),
                            ("fine", Box.around(GTVP, (40, 40, 40), oblique_direction()))])
    assert centre.source == "mask"
    height, width = int(FIGURE_SIZE_IN[1] * DPI), int(FIGURE_SIZE_IN[0] * DPI)
    assert imread(png).shape[:2] == (height, width)
    assert [p.name for p in png.parent.iterdir()] == ["case.png"]  # no temporary file left
    red = _colour_pixels(png, MASK_COLOURS[1])
    blue = _colour_pixels(png, MASK_COLOURS[2])
    assert len(_colour_pixels(png, REFERENCE_COLOURS[1])) > 20  # the reference's dashes show
    size = dict(width=width, height=height)
    for column in range(3):
        assert len(_in_panel(red, column=column, **size)) > 30, f"no GTVp contour in panel {column}"
    # axial: the lesion is the view centre (panel centre); the left node appears on the image's right, same row
    axial_red, axial_blue = _in_panel(red, column=0, **size), _in_panel(blue, column=0, **size)
    assert abs(axial_red[:, 1].mean() - 0.12 * width) < 0.02 * width
    assert abs(axial_red[:, 0].mean() - 0.25 * height) < 0.05 * height
    assert axial_blue[:, 1].mean() > axial_red[:, 1].mean() + 20
    assert abs(axial_blue[:, 0].mean() - axial_red[:, 0].mean()) < 5
    # coronal: the left node is on the right too
    coronal_red, coronal_blue = _in_panel(red, column=1, **size), _in_panel(blue, column=1, **size)
    assert coronal_blue[:, 1].mean() > coronal_red[:, 1].mean() + 20
    # sagittal: the anterior-superior node is left of (anterior) and above (superior) GTVp
    sagittal_red, sagittal_blue = _in_panel(red, column=2, **size), _in_panel(blue, column=2, **size)
    assert sagittal_blue[:, 1].mean() < sagittal_red[:, 1].mean() - 20
    assert sagittal_blue[:, 0].mean() < sagittal_red[:, 0].mean() - 10


def test_picture_of_empty_mask_and_reference(tmp_path):
    ct, pet, _ = _case()
    empty = _empty_like(ct)
    centre = draw_qc(ct=ct, pet=pet, mask=empty, reference=None, out_png=tmp_path / "empty.png")
    assert centre.source == "pet peak" and (tmp_path / "empty.png").is_file()


def test_mask_off_the_ct_grid_is_an_input_error(tmp_path):
    ct, pet, mask = _case()
    shifted = sitk.Image(mask)
    shifted.SetOrigin(tuple(np.add(mask.GetOrigin(), 1.0)))
    with pytest.raises(InputError, match="not on the grid"):
        draw_qc(ct=ct, pet=pet, mask=shifted, out_png=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_boxes_from_cascade_and_single_stage_reports():
    coarse, fine = Box.around((0, 0, -150), (200, 200, 310)), Box.around((5, -10, -180), (144, 144, 144),
                                                                         oblique_direction())
    cascade = {"stages": [{"name": "coarse", "roi": {"method": "pet_threshold", "box": coarse.to_dict()}},
                          {"name": "fine", "roi": {"box": fine.to_dict()}}, {"name": "no box"}]}
    names, boxes = zip(*boxes_from_report(cascade))
    assert names == ("coarse", "fine")
    assert boxes[0] == coarse
    assert np.allclose(boxes[1].corners_xyz_mm(), fine.corners_xyz_mm())
    single = {"roi": {"method": "brain_peak", "box": json.loads(json.dumps(coarse.to_dict()))}}
    assert boxes_from_report(single) == [("roi (brain_peak)", coarse)]
    assert boxes_from_report({"status": "error"}) == []
    with pytest.raises(InputError, match=r"stages\[0\].roi.box"):
        boxes_from_report({"stages": [{"name": "a", "roi": {"box": {"corner_xyz_mm": [0, 0]}}}]})


def test_box_from_dict_inverts_to_dict():
    box = Box.around((1.5, -2.0, 3.25), (10, 20, 30), oblique_direction())
    assert Box.from_dict(box.to_dict()) == box
    assert Box.from_dict({"corner_xyz_mm": [0, 0, 0], "size_xyz_mm": [1, 2, 3]}).direction == IDENTITY
    with pytest.raises(ValueError):
        Box.from_dict({"corner_xyz_mm": [0, 0, 0], "size_xyz_mm": [1, 2, 3], "direction": [1, 0, 0]})


def _write_case(folder, *, mask=None):
    ct, pet, own_mask = _case()
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"ct": folder / "ct.mha", "pet": folder / "pet.nii.gz", "mask": folder / "case7.nii.gz"}
    for role, image in (("ct", ct), ("pet", pet), ("mask", mask if mask is not None else own_mask)):
        sitk.WriteImage(image, str(paths[role]))
    return paths


def test_cli_qc_writes_png_with_report_boxes(tmp_path, capsys):
    paths = _write_case(tmp_path / "in")
    report = tmp_path / "in" / "report.json"
    report.write_text(json.dumps({"roi": {"method": "fixed", "box": Box.around(CENTRE, (80, 80, 80)).to_dict()}}))
    out = tmp_path / "out" / "case7.png"
    code = main(["qc", "--ct", str(paths["ct"]), "--pet", str(paths["pet"]), "--mask", str(paths["mask"]),
                 "--reference", str(paths["mask"]), "--report", str(report), "--out", str(out)])
    assert code == 0 and out.is_file()
    assert f"wrote {out}" in capsys.readouterr().out


def test_cli_qc_errors_name_the_file(tmp_path, capsys):
    paths = _write_case(tmp_path / "in")
    out = tmp_path / "out.png"
    missing = tmp_path / "in" / "nope.mha"
    assert main(["qc", "--ct", str(paths["ct"]), "--pet", str(paths["pet"]), "--mask", str(missing),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1
    assert main(["qc", "--ct", str(paths["ct"]), "--pet", str(paths["pet"]), "--mask", str(paths["mask"]),
                 "--report", str(tmp_path / "none.json"), "--out", str(out)]) == 2
    assert "none.json" in capsys.readouterr().err
    # a mask on another grid (the PET's) is refused, naming it
    _, pet, _ = _case()
    off_grid = _write_case(tmp_path / "off", mask=sitk.Cast(pet > 5, sitk.sitkUInt8))
    assert main(["qc", "--ct", str(off_grid["ct"]), "--pet", str(off_grid["pet"]), "--mask", str(off_grid["mask"]),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(off_grid["mask"]) in err and "not on the grid" in err
    assert not out.exists()


# --- a HECKTOR-2020-style crop: CT and PET cut to a 144 mm box on one 1×1×3 mm grid --------------------------

CROP_CENTRE = np.array([5.0, -30.0, 80.0])
CROP_GRID = {"size_xyz": (144, 144, 48), "spacing_xyz_mm": (1.0, 1.0, 3.0),
             "origin_xyz_mm": tuple(CROP_CENTRE - np.array([71.5, 71.5, 70.5])), "direction": IDENTITY}
CROP_GTVP = CROP_CENTRE + [22.0, 16.0, 30.0]  # off the crop's centre: views centred on it would not be on the data


def _crop_case():
    def labels(p):
        out = np.where(np.linalg.norm(p - (CROP_GTVP + [-30.0, 0, 0]), axis=1) <= 6.0, 2, 0)
        return np.where(np.linalg.norm(p - CROP_GTVP, axis=1) <= 9.0, 1, out)

    # soft tissue everywhere (grey in the CT window), so that the crop's edge shows against the black outside it
    ct = image_from_function(lambda p: 40.0 + 30.0 * (labels(p) > 0), **CROP_GRID)
    pet = image_from_function(lambda p: 1.0 + 8.0 * (labels(p) == 1), **CROP_GRID)
    mask = sitk.Cast(image_from_function(labels, **CROP_GRID), sitk.sitkUInt8)
    # the demo cascade's boxes: the localiser's and the coarse stage's are larger than the crop, the fine cube
    # sticks out of it, and a fixed ROI is the crop itself
    boxes = [("localise_head", Box.around(CROP_CENTRE, (512, 512, 384))),
             ("coarse", Box.around(CROP_CENTRE + [0, 0, -40], (200, 200, 310))),
             ("fine", Box.around(CROP_GTVP, (144, 144, 144))),
             ("roi (fixed)", Box.around(CROP_CENTRE, (144, 144, 144)))]
    return ct, pet, mask, boxes


def _grey_bounds_px(fig, renderer, ax):
    """(column, row) centre of the CT's grey pixels inside `ax`, and of `ax` itself, in canvas pixels."""
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    box = ax.get_window_extent(renderer)
    height = rgb.shape[0]
    rows = slice(int(height - box.y1) + 1, int(height - box.y0) - 1)
    cols = slice(int(box.x0) + 1, int(box.x1) - 1)
    panel = rgb[rows, cols]
    grey = (np.ptp(panel, axis=-1) < 8) & (panel[..., 0] > 100) & (panel[..., 0] < 150)
    # rows and columns that cross the grey square (anti-aliased letters give a few grey pixels too)
    r, c = np.flatnonzero(grey.sum(axis=1) > 50), np.flatnonzero(grey.sum(axis=0) > 50)
    data = ((c.min() + c.max()) / 2 + cols.start, (r.min() + r.max()) / 2 + rows.start)
    return np.array(data), np.array([(box.x0 + box.x1) / 2, height - (box.y0 + box.y1) / 2])


def test_small_crop_views_are_centred_and_box_names_do_not_overlap():
    ct, pet, mask, boxes = _crop_case()
    fig, centre = qc_figure(ct=ct, pet=pet, mask=mask, boxes=boxes)
    assert centre.source == "mask" and np.linalg.norm(np.subtract(centre.center_xyz_mm, CROP_GTVP)) < 1.0
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()

    labels = fig.findobj(lambda artist: artist.get_gid() == BOX_LABEL_GID)
    assert [label.get_text().strip() for label in labels] == [name for name, _ in boxes]
    extents = [label.get_window_extent(renderer) for label in labels]
    patches = [label.get_bbox_patch().get_window_extent(renderer) for label in labels]
    for i in range(len(labels)):
        for j in range(i):
            assert not extents[i].overlaps(extents[j]), f"{labels[i].get_text()} over {labels[j].get_text()}"
            assert not patches[i].overlaps(patches[j])
    mip = next(ax for ax in fig.axes if ax.get_gid() == "mip").get_window_extent(renderer)
    for extent in extents:  # inside the MIP panel: nothing clipped away
        assert mip.x0 <= extent.x0 and extent.x1 <= mip.x1 and mip.y0 <= extent.y0 and extent.y1 <= mip.y1

    field_centre = Grid.of(ct).box().center_xyz_mm
    for ax in fig.axes:
        view, _, modality = (ax.get_gid() or "").partition(" ")
        if view not in ("axial", "coronal", "sagittal"):
            continue
        left, right, bottom, top = ax.images[0].get_extent()
        in_plane = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[view]
        assert (left + right) / 2 == pytest.approx(field_centre[in_plane[0]], abs=0.5), ax.get_gid()
        assert (bottom + top) / 2 == pytest.approx(field_centre[in_plane[1]], abs=0.5), ax.get_gid()
        if modality == "CT":  # and on the canvas: the crop's grey square sits in the middle of its panel
            data_px, panel_px = _grey_bounds_px(fig, renderer, ax)
            assert np.abs(data_px - panel_px).max() <= 2.0, ax.get_gid()
